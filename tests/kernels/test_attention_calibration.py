"""`sur_cache.kernels.attention_calibration` against the one PyTorch reference, on the CPU and on a GPU.

Interpreter cases run the Triton kernels on the CPU under TRITON_INTERPRET=1. Triton decides at definition time
whether a kernel is interpreted, so the variable must be set before `sur_cache.kernels` is imported, and setting it
in this process would also turn the GPU cases into interpreted ones. The interpreter cases therefore run together in
one child process: this file run as a script, which prints every case's errors as JSON.

Tolerances: fp32 kernels must match the float64 truth within 1e-4 (IEEE fp32 products, errors are ~1e-6); fp16 and bf16
kernels must be within 2x PyTorch's own error at that dtype, plus 1e-5 (the flash-attention test recipe), for the
output and each gradient.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
import triton

from sur_cache.kernels import attention_calibration, attention_calibration_reference

kernels = sys.modules["sur_cache.kernels.attention_calibration"]  # the module (the package exports the function)

OUTPUTS = ("out", "grad_q", "grad_k", "grad_v")
FP32_TOLERANCE = 1e-4
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_SLACK = 1e-5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    batch: int
    length: int
    width: int
    dtype: str
    contiguous: bool = True
    scale: float | None = None
    nan_buffers: bool = False  # the kernels' P / dS buffers start as NaN: their padding must be written before reads

    @property
    def name(self) -> str:
        layout = "" if self.contiguous else "-strided"
        scale = "" if self.scale is None else f"-scale{self.scale}"
        poisoned = "-nan-buffers" if self.nan_buffers else ""
        return f"B{self.batch}-L{self.length}-d{self.width}-{self.dtype}{layout}{scale}{poisoned}"


# Every value of the grid (L in {1, 77, 128, 200}, d in {16, 64, 768, 1024}, B in {1, 3}, fp32 and fp16) appears at
# least once, and d in {64, 768, 1024} in both dtypes; the interpreter is slow, so the grid is covered, not
# enumerated. The batch-16 and batch-90 cases reach the batch-dependent blocks of launch_settings (the same kernels
# with other constexprs) for 16-bit inputs. Every case runs through the registered torch.library operators.
INTERPRETER_CASES = [
    Case(1, 77, 768, "float32"),
    Case(3, 1, 16, "float32"),
    Case(3, 128, 64, "float16"),
    Case(1, 200, 64, "float32"),
    Case(3, 77, 64, "float16", contiguous=False),
    Case(1, 200, 768, "float16"),
    Case(1, 77, 1024, "float32"),
    Case(1, 77, 1024, "float16", contiguous=False),
    Case(3, 128, 16, "float32", contiguous=False, scale=0.3),
    # batches large enough to switch launch_settings to its other blocks: 64-wide output tiles (the benchmark's
    # B=16, d=768) and 32-row blocks in the kernels that reduce over d
    Case(16, 77, 768, "float16"),
    Case(90, 77, 32, "float16"),
    Case(2, 77, 64, "float16", nan_buffers=True),
]


def make_inputs(case: Case, device: str, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v and the output gradient, in float64 on the CPU; strided cases get a width stride != 1."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.width, case.length) if not case.contiguous else (case.batch, case.length, case.width)
    tensors = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(4)]
    if not case.contiguous:
        tensors = [tensor.transpose(1, 2) for tensor in tensors]
    return [tensor.to(device) for tensor in tensors]


def forward_backward(fn, inputs: list[torch.Tensor], dtype: torch.dtype, scale: float | None) -> dict:
    """Output and gradients of fn at `dtype`, returned in float64 (strides of the inputs are kept)."""
    q, k, v, grad_out = (tensor.to(dtype) for tensor in inputs)
    q, k, v = (tensor.detach().requires_grad_() for tensor in (q, k, v))
    out = fn(q, k, v, scale)
    out.backward(grad_out)
    return {name: t.detach().double() for name, t in zip(OUTPUTS, (out, q.grad, k.grad, v.grad), strict=True)}


def nan_square_buffer(
    batch: int, length: int, count: int, device: torch.device, dtype: torch.dtype, empty=kernels.square_buffer
) -> torch.Tensor:
    """kernels.square_buffer (bound at definition, before any patch), filled with NaN instead of left uninitialised
    (which is often zeros on the CPU)."""
    return empty(batch, length, count, device, dtype).fill_(float("nan"))


def max_errors(case: Case, device: str) -> dict[str, dict[str, float]]:
    """Max abs error vs the high-precision reference, per output: for the kernel and for PyTorch at case.dtype."""
    inputs = make_inputs(case, device)
    # float64 on the GPU too: an fp32 truth would silently be TF32 where TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 is set
    truth = forward_backward(attention_calibration_reference, inputs, torch.float64, case.scale)
    dtype = DTYPES[case.dtype]
    results = {
        "kernel": kernel_forward_backward(case, inputs, dtype),
        "torch": forward_backward(attention_calibration_reference, inputs, dtype, case.scale),
    }
    return {
        who: {name: (result[name] - truth[name]).abs().max().item() for name in OUTPUTS}
        for who, result in results.items()
    }


def kernel_forward_backward(case: Case, inputs: list[torch.Tensor], dtype: torch.dtype) -> dict:
    poisoned = mock.patch.object(kernels, "square_buffer", nan_square_buffer) if case.nan_buffers else None
    with poisoned or contextlib.nullcontext():
        return forward_backward(attention_calibration, inputs, dtype, case.scale)


def assert_within_tolerance(case: Case, errors: dict[str, dict[str, float]]) -> None:
    for name in OUTPUTS:
        kernel, torch_error = errors["kernel"][name], errors["torch"][name]
        if case.dtype == "float32":
            assert kernel <= FP32_TOLERANCE, f"{case.name} {name}: error {kernel:.3g} > {FP32_TOLERANCE}"
        else:
            bound = LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_SLACK
            assert kernel <= bound, f"{case.name} {name}: error {kernel:.3g} > 2 x PyTorch's {torch_error:.3g}"


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, dict[str, dict[str, float]]]:
    """Run every interpreter case in one child process with TRITON_INTERPRET=1; errors keyed by case name."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cases = json.dumps([asdict(case) for case in INTERPRETER_CASES])
    child = subprocess.run(
        [sys.executable, str(Path(__file__)), cases], env=env, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, f"interpreter child failed:\n{child.stderr[-4000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.interpreter
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda case: case.name)
def test_interpreted_kernel_matches_reference(case, interpreter_errors):
    assert_within_tolerance(case, interpreter_errors[case.name])


@pytest.mark.interpreter
def test_interpreter_child_really_ran_triton(interpreter_errors):
    """The child's fp16 kernel differs from PyTorch's fp16 result, so it did not fall back to the reference."""
    errors = interpreter_errors[Case(3, 128, 64, "float16").name]
    assert any(errors["kernel"][name] != errors["torch"][name] for name in OUTPUTS)


OPCHECK_CASE = Case(2, 77, 32, "float32", scale=0.3)


def operator_checks(case: Case) -> dict:
    """Under the interpreter: `torch.library.opcheck` of both registered operators (schema, autograd registration,
    fake implementation against the real one, AOT dispatch with dynamic shapes), and the largest difference between
    the kernel compiled by inductor with fullgraph=True (any graph break raises) and the kernel run eagerly."""
    q, k, v, grad_out = (t.float() for t in make_inputs(case, "cpu"))
    _, probs, probs_t = kernels.attention_calibration_forward_op(q, k, v, case.scale)
    results = {
        "forward": torch.library.opcheck(
            kernels.attention_calibration_forward_op, (*(t.requires_grad_() for t in (q, k, v)), case.scale)
        ),
        "backward": torch.library.opcheck(
            kernels.attention_calibration_backward_op,
            (grad_out, q.detach(), k.detach(), v.detach(), probs, probs_t, case.scale),
        ),
    }
    compiled = torch.compile(attention_calibration, fullgraph=True, dynamic=False)
    eager = forward_backward(attention_calibration, make_inputs(case, "cpu"), torch.float32, case.scale)
    fused = forward_backward(compiled, make_inputs(case, "cpu"), torch.float32, case.scale)
    return {**results, "compiled": {name: (fused[name] - eager[name]).abs().max().item() for name in OUTPUTS}}


@pytest.fixture(scope="module")
def interpreter_operator_checks() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, str(Path(__file__)), "operators", json.dumps(asdict(OPCHECK_CASE))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, f"interpreter child failed:\n{child.stderr[-4000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.interpreter
@pytest.mark.parametrize("operator", ["forward", "backward"])
def test_registered_operators_pass_opcheck(operator, interpreter_operator_checks):
    results = interpreter_operator_checks[operator]
    expected = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    assert results == dict.fromkeys(expected, "SUCCESS")


@pytest.mark.interpreter
@pytest.mark.slow
def test_the_kernel_compiles_without_a_graph_break_and_matches_eager(interpreter_operator_checks):
    """Inductor with fullgraph=True keeps the operators in one graph; the output and gradients are the eager ones."""
    for name, error in interpreter_operator_checks["compiled"].items():
        assert error <= 1e-6, f"{name}: compiled differs from eager by {error:.3g}"


def test_cpu_without_interpreter_runs_the_reference():
    case = Case(2, 5, 32, "bfloat16")
    inputs = make_inputs(case, "cpu")
    fused = forward_backward(attention_calibration, inputs, torch.bfloat16, None)
    reference = forward_backward(attention_calibration_reference, inputs, torch.bfloat16, None)
    for name in OUTPUTS:
        torch.testing.assert_close(fused[name], reference[name], rtol=0, atol=0)


def test_default_scale_is_one_over_sqrt_width():
    q, k, v, _ = make_inputs(Case(1, 4, 64, "float32"), "cpu")
    expected = torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1) @ v + v
    torch.testing.assert_close(attention_calibration(q.float(), k.float(), v.float()), expected.float())


@pytest.mark.parametrize(
    ("shapes", "dtypes", "error", "message"),
    [
        (((2, 7, 32), (2, 7, 32), (2, 8, 32)), None, ValueError, "same shape"),
        (((2, 257, 32),) * 3, None, ValueError, "length 257"),
        (((2, 7, 40),) * 3, None, ValueError, "multiple of 16"),
        (((7, 32),) * 3, None, ValueError, r"\[batch, length, width\]"),
        (((0, 7, 32),) * 3, None, ValueError, "batch 0"),
        (((2, 7, 32),) * 3, (torch.int32,) * 3, TypeError, "torch.int32"),
        (((2, 7, 32),) * 3, (torch.float16, torch.float32, torch.float16), TypeError, "one dtype"),
    ],
    ids=["shape-mismatch", "too-long", "width-not-multiple-of-16", "not-3d", "empty-batch", "int", "mixed-dtypes"],
)
def test_bad_inputs_raise_clear_errors(shapes, dtypes, error, message):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.zeros(shape).to(dtype) for shape, dtype in zip(shapes, dtypes, strict=True))
    with pytest.raises(error, match=message):
        attention_calibration(q, k, v)


def test_non_tensor_input_raises_type_error():
    q = torch.zeros(1, 4, 16)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        attention_calibration(q, q.numpy(), q)


def hopper_launches(case: Case) -> list:
    """The four launches of one forward+backward, built by the launchers from CPU tensors of the case's shape."""
    dtype = DTYPES[case.dtype]
    q, k, v, grad_out = (t.to(dtype) for t in make_inputs(case, "cpu"))
    settings = kernels.launch_settings(case.batch, case.length, case.width, dtype)
    probs = kernels.square_buffer(case.batch, case.length, 1, q.device, torch.float32)[0]
    probs_t = kernels.square_buffer(case.batch, case.length, 1, q.device, dtype)[0]
    grad_scores = kernels.square_buffer(case.batch, case.length, 2, q.device, dtype)
    grads = torch.empty(3, *q.shape, dtype=dtype)
    return [
        kernels.probs_launch(q, k, probs, probs_t, 0.1, settings),
        kernels.output_launch(probs, v, torch.empty_like(q), settings),
        kernels.scores_backward_launch(grad_out, v, probs, grad_scores, 0.1, settings),
        kernels.grads_backward_launch(q, k, grad_out, probs_t, grad_scores, grads, settings),
    ]


def hopper_resources(launch) -> tuple[int, int]:
    """Compile a launch for sm_90 ahead of time, specialized as Triton's launcher would; (shared bytes, stack bytes).

    The interpreter never compiles, so this is what catches block shapes that do not lower, shared memory overflow
    and register spills (a non-zero stack) on a machine without a GPU.
    """
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    names = launch.kernel.arg_names
    constexprs = {name: value for name, value in launch.meta.items() if name in names}
    signature, attrs = dict.fromkeys(constexprs, "constexpr"), {}
    for name, value in zip([n for n in names if n not in constexprs], launch.args, strict=True):
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec:
            attrs[(names.index(name),)] = CUDABackend.parse_attr(spec)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {key: launch.meta[key] for key in ("num_warps", "num_stages")}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
    return compiled.metadata.shared, stack


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
HOPPER_SHARED_MEMORY = 227 * 1024  # the most one H100/H200 block may use


@pytest.mark.skipif(kernels.TRITON_INTERPRETER, reason="kernels are interpreted in this process")
@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="Triton's NVIDIA tools (ptxas, cuobjdump) are not installed")
@pytest.mark.parametrize(
    "case",
    [
        Case(2, 77, 768, "bfloat16"),
        Case(256, 77, 768, "bfloat16"),  # a large batch takes wider gradient tiles
        Case(2, 256, 2048, "bfloat16"),
        Case(2, 200, 64, "float32", contiguous=False),
    ],
    ids=lambda case: case.name,
)
def test_kernels_compile_for_hopper_without_spills(case):
    for launch in hopper_launches(case):
        shared, stack = hopper_resources(launch)
        name = launch.kernel.__name__
        assert shared <= HOPPER_SHARED_MEMORY, f"{name}: {shared} bytes of shared memory"
        assert stack == 0, f"{name}: {stack} bytes of stack (register spills)"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_CASES = [
    Case(batch, length, width, dtype)
    for dtype in ("float16", "bfloat16")
    for width in (768, 1024, 2048)
    for length, batch in ((77, 16), (256, 3))
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.name)
def test_gpu_low_precision_within_twice_pytorch_error(case):
    assert_within_tolerance(case, max_errors(case, "cuda"))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "case",
    [
        Case(4, 77, 1024, "float32"),
        Case(3, 1, 16, "float32"),
        Case(2, 200, 64, "float32", contiguous=False, scale=0.3),
        Case(5, 77, 768, "bfloat16", contiguous=False),
    ],
    ids=lambda case: case.name,
)
def test_gpu_edge_shapes(case):
    assert_within_tolerance(case, max_errors(case, "cuda"))


@pytest.mark.gpu
@requires_cuda
def test_gpu_broadcast_output_gradient():
    """out.sum().backward() hands the kernel a gradient with all strides 0."""
    inputs = make_inputs(Case(2, 77, 64, "float32"), "cuda")[:3]
    grads = {}
    for function, dtype in ((attention_calibration, torch.float32), (attention_calibration_reference, torch.float64)):
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        function(q, k, v).sum().backward()
        grads[dtype] = [t.grad.double() for t in (q, k, v)]
    for got, expected in zip(grads[torch.float32], grads[torch.float64], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.gpu
@requires_cuda
def test_gpu_backward_is_deterministic():
    inputs = make_inputs(Case(16, 77, 768, "bfloat16"), "cuda")
    first = forward_backward(attention_calibration, inputs, torch.bfloat16, None)
    second = forward_backward(attention_calibration, inputs, torch.bfloat16, None)
    for name in OUTPUTS:
        assert torch.equal(first[name], second[name]), name


if __name__ == "__main__":  # the interpreter child: python test_attention_calibration.py '<cases as JSON>'
    assert os.environ.get("TRITON_INTERPRET") == "1", "run the interpreter child with TRITON_INTERPRET=1"
    if sys.argv[1] == "operators":  # python test_attention_calibration.py operators '<one case as JSON>'
        print(json.dumps(operator_checks(Case(**json.loads(sys.argv[2])))))
    else:
        child_cases = [Case(**fields) for fields in json.loads(sys.argv[1])]
        print(json.dumps({case.name: max_errors(case, "cpu") for case in child_cases}))
