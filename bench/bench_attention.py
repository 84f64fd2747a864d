"""Attention calibration `softmax(Q K^T / sqrt(d)) V + V`: eager vs SDPA vs torch.compile vs the fused Triton kernel.

Core (kernel "core"): q, k, v of shape [B, 77, d] in bf16, B in {1, 16, 64, 256}, d in {768, 1024, 2048}, modes
"forward" and "forward+backward". Providers:
  eager        the PyTorch reference (`sur_cache.kernels.reference`), the one the tests check the kernel against
  sdpa         `F.scaled_dot_product_attention` restricted to the memory-efficient backend, plus V
  compile      `torch.compile(reference)` with default settings (compile time is printed, not timed)
  fused        `sur_cache.kernels.attention_calibration`
  fused+graph  the fused step replayed from a CUDA graph: the GPU time without Python and launch overhead
Adapter (kernel "adapter"): the whole `SURAdapter` forward+backward (bf16 weights, train mode, B=16) with the eager,
SDPA or fused core, and eager/fused replayed from a CUDA graph.

Timing is `triton.testing.do_bench` (p20/p50/p80 in us). Bytes moved are the inputs and outputs of the op, read or
written once: 4 tensors of [B, L, d] forward, 11 forward+backward (q, k, v, out; then dO, q, k, v, dq, dk, dv), the
bandwidth floor of DESIGN.md section 6; "% HBM" divides the achieved rate by a device copy measured in the same run.
Rows are upserted into bench/results/attention_<gpu>.csv (a provider that fails is recorded with its error and the
run goes on), a PNG is drawn from the CSV, and one adapter step per core is saved as a torch.profiler trace.
Per-launch breakdown (kernel "launch"): each Triton launch of the fused forward+backward timed alone on its own inputs
(--breakdown-batch-sizes, default 16 and 256, at every width), with its grid size and block sizes printed, so that a
run tells which kernel costs what; its GB/s counts the [B, L, d] tensors that launch must read or write (2, 2, 2, 6).
At d=768 a sweep (kernel "launch-sweep", --no-sweep to skip) times the launches again with one LaunchSettings change
at a time (SWEEP_CHANGES), so that one device run also gives the data to retune the blocks.

Without a GPU the script says so and runs the interpreter correctness check (TRITON_INTERPRET=1, child process) at a
small size instead.

Usage: python bench/bench_attention.py [--batch-sizes 1,16,64,256] [--widths 768,1024,2048] [--providers ...]
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path

import click
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sur_cache.kernels import attention_calibration, attention_calibration_reference

# the module itself (the package exports its function under the same name): its launchers build single launches
fused_kernels = importlib.import_module("sur_cache.kernels.attention_calibration")

CORE_PROVIDERS = ("eager", "sdpa", "fused", "fused+graph", "compile")
ADAPTER_PROVIDERS = ("eager", "sdpa", "fused", "eager+graph", "fused+graph")
MODES = ("forward", "forward+backward")
TENSORS_MOVED = {"forward": 4, "forward+backward": 11}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
KEY_COLUMNS = ("kernel", "provider", "mode", "B", "L", "d", "dtype", "gpu")
# [B, L, d] tensors each fused launch must read or write at least (the L x L buffers of P and dS not counted)
MIXING_KERNELS = ("_output_kernel", "_grads_backward_kernel")
# LaunchSettings fields read by the reducing kernels (False) and by the key-mixing kernels (True)
SWEEP_FIELDS = {
    False: {"block_m", "block_d", "num_warps", "num_stages"},
    True: {"block_rows", "block_out_d", "mix_warps"},
}
# One change at a time from launch_settings' choice, timed at d=768 for the launches it affects: data for retuning
SWEEP_WIDTH = 768
SWEEP_CHANGES = (
    {"block_m": 16},
    {"block_m": 32},
    {"block_d": 128},
    {"num_stages": 4},
    {"num_warps": 4},
    {"block_out_d": 32},
    {"block_out_d": 64},
    {"block_rows": 16},
    {"block_rows": 64, "mix_warps": 8},
)
LAUNCH_TENSORS = {"_probs_kernel": 2, "_output_kernel": 2, "_scores_backward_kernel": 2, "_grads_backward_kernel": 6}


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...]
    widths: tuple[int, ...]
    length: int
    dtype: str
    providers: tuple[str, ...]
    modes: tuple[str, ...]
    adapter_batch_sizes: tuple[int, ...]
    adapter_providers: tuple[str, ...]
    breakdown_batch_sizes: tuple[int, ...]
    sweep: bool
    results_dir: Path
    traces: bool


@dataclass
class Row:
    """One tidy CSV row; timings are empty and status holds the error when a provider failed."""

    kernel: str
    provider: str
    mode: str
    B: int
    L: int
    d: int
    dtype: str
    p20_us: float | None = None
    p50_us: float | None = None
    p80_us: float | None = None
    gbps: float | None = None
    status: str = "ok"
    gpu: str = ""
    torch: str = torch.__version__
    triton: str = triton.__version__


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_us(step: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> tuple[float, float, float]:
    """(p20, p50, p80) of one call in microseconds."""
    p20, p50, p80 = triton.testing.do_bench(step, quantiles=[0.2, 0.5, 0.8], grad_to_none=grad_to_none)
    return p20 * 1e3, p50 * 1e3, p80 * 1e3


def copy_bandwidth_gbps(gigabytes: float = 1.0) -> float:
    """Device-to-device copy rate (bytes read + written per second) of a large bf16 tensor, in GB/s."""
    source = torch.empty(int(gigabytes * 1e9) // 2, dtype=torch.bfloat16, device=DEVICE)
    target = torch.empty_like(source)
    _, p50, _ = time_us(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / (p50 * 1e-6) / 1e9


def cuda_graph(step: Callable[[], object], tensors_with_grad: list[torch.Tensor]) -> Callable[[], None]:
    """Capture step (after a warm-up on a side stream) and return the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for tensor in tensors_with_grad:
        tensor.grad = None  # the captured backward then allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def sdpa_calibration(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA computes softmax(Q K^T / sqrt(d)) V; one head is a [B, 1, L, d] call; the residual V is added after."""
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0] + v


def core_function(provider: str, compiled: Callable) -> Callable:
    return {
        "eager": attention_calibration_reference,
        "sdpa": sdpa_calibration,
        "compile": compiled,
        "fused": attention_calibration,
        "fused+graph": attention_calibration,
    }[provider]


def core_step(provider: str, mode: str, batch: int, length: int, width: int, dtype: torch.dtype, compiled: Callable):
    """A zero-argument callable running one forward (or forward+backward) and the tensors whose grads it sets."""
    backward = mode == "forward+backward"
    q, k, v, grad_out = (torch.randn(batch, length, width, device=DEVICE, dtype=dtype) for _ in range(4))
    inputs = [t.requires_grad_(backward) for t in (q, k, v)]
    function = core_function(provider, compiled)

    def step():
        out = function(*inputs)
        if backward:
            out.backward(grad_out)

    return step, inputs if backward else []


def measure_core(config: BenchConfig, provider: str, mode: str, batch: int, width: int, compiled: Callable) -> Row:
    dtype = getattr(torch, config.dtype)
    row = Row("core", provider, mode, batch, config.length, width, config.dtype)
    step, with_grad = core_step(provider, mode, batch, config.length, width, dtype, compiled)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if provider == "sdpa" else contextlib.nullcontext():
        if provider == "compile":
            started = time.perf_counter()
            step()
            torch.cuda.synchronize()
            print(f"  compile {mode} B={batch} d={width}: first call {time.perf_counter() - started:.1f} s")
        if provider.endswith("+graph"):
            row.p20_us, row.p50_us, row.p80_us = time_us(cuda_graph(step, with_grad))
        else:
            row.p20_us, row.p50_us, row.p80_us = time_us(step, grad_to_none=with_grad)
    bytes_moved = TENSORS_MOVED[mode] * batch * config.length * width * dtype.itemsize
    row.gbps = bytes_moved / (row.p50_us * 1e-6) / 1e9
    return row


def adapter_step(provider: str, batch: int, length: int, width: int, dtype: torch.dtype):
    """One forward+backward of the whole adapter (train mode, random fc so every layer gets gradient)."""
    from sur_cache.adapter import AdapterConfig, SURAdapter

    core = provider.removesuffix("+graph")
    adapter = SURAdapter(AdapterConfig(width=width, llm_width=5120, attention=core)).to(DEVICE, dtype).train()
    torch.nn.init.normal_(adapter.fc.weight, std=0.02)
    x = torch.randn(batch, length, width, device=DEVICE, dtype=dtype)
    grad = torch.randn_like(x)
    parameters = [p for p in adapter.parameters() if p.requires_grad]

    def step():
        adapter(x).embedding.backward(grad)

    return step, parameters


def measure_adapter(config: BenchConfig, provider: str, batch: int, width: int) -> Row:
    row = Row("adapter", provider, "forward+backward", batch, config.length, width, config.dtype)
    step, parameters = adapter_step(provider, batch, config.length, width, getattr(torch, config.dtype))
    if provider.endswith("+graph"):
        row.p20_us, row.p50_us, row.p80_us = time_us(cuda_graph(step, parameters))
    else:
        row.p20_us, row.p50_us, row.p80_us = time_us(step, grad_to_none=parameters)
    return row


def fused_launches(
    batch: int, length: int, width: int, dtype: torch.dtype, changes: dict[str, int] | None = None
) -> list:
    """The launches of one fused forward+backward on their own inputs, built by the kernel module's launchers, with
    the LaunchSettings fields in `changes` replaced (the sweep); P and dS have one layout whatever the settings.

    Each is run once in order, so every buffer a launch reads (P, P^T, dS) holds real values before it is timed.
    """
    q, k, v, grad_out = (torch.randn(batch, length, width, device=DEVICE, dtype=dtype) for _ in range(4))
    scale = width**-0.5
    out, probs, probs_t, settings = fused_kernels.attention_calibration_forward(q, k, v, scale)
    settings = replace(settings, **(changes or {}))
    grad_scores = fused_kernels.square_buffer(batch, length, 2, q.device, dtype)
    grads = torch.empty(3, batch, length, width, device=DEVICE, dtype=dtype)
    launches = [
        fused_kernels.probs_launch(q, k, probs, probs_t, scale, settings),
        fused_kernels.output_launch(probs, v, out, settings),
        fused_kernels.scores_backward_launch(grad_out, v, probs, grad_scores, scale, settings),
        fused_kernels.grads_backward_launch(q, k, grad_out, probs_t, grad_scores, grads, settings),
    ]
    for launch in launches:
        launch()
    return launches


def measure_launches(config: BenchConfig, batch: int, width: int, changes: dict[str, int] | None = None) -> list[Row]:
    """GPU time of each fused launch alone (kernel "launch", provider = the Triton kernel), with its grid size.

    With `changes`, only the launches those settings affect are timed, as kernel "launch-sweep" with the changes in
    the provider name.
    """
    dtype = getattr(torch, config.dtype)
    kernel, label = (
        ("launch-sweep", " " + ",".join(f"{k}={v}" for k, v in changes.items())) if changes else ("launch", "")
    )
    rows = []
    for launch in fused_launches(batch, config.length, width, dtype, changes):
        name = launch.kernel.__name__
        if changes and not set(changes) & SWEEP_FIELDS[name in MIXING_KERNELS]:
            continue
        mode = "backward" if name.endswith("_backward_kernel") else "forward"
        row = Row(kernel, name + label, mode, batch, config.length, width, config.dtype)
        row.p20_us, row.p50_us, row.p80_us = time_us(launch)
        row.gbps = LAUNCH_TENSORS[name] * batch * config.length * width * dtype.itemsize / (row.p50_us * 1e-6) / 1e9
        blocks = {key: value for key, value in launch.meta.items() if key.startswith("BLOCK") or key.startswith("num")}
        print(f"  {kernel} {name}{label} B={batch} d={width}: {row.p50_us:.1f} us, {launch.grid[0]} programs, {blocks}")
        rows.append(row)
    return rows


def measure_breakdown(config: BenchConfig, width: int) -> list[Row]:
    """The per-launch breakdown at every --breakdown-batch-sizes, and at d=768 the sweep of SWEEP_CHANGES (those that
    differ from launch_settings' choice); a variant that fails (a block shape that does not compile, shared memory
    overflow) is printed and skipped."""
    rows = []
    dtype = getattr(torch, config.dtype)
    for batch in config.breakdown_batch_sizes:
        default = asdict(fused_kernels.launch_settings(batch, config.length, width, dtype))
        sweep = [c for c in SWEEP_CHANGES if any(default[k] != v for k, v in c.items())] if config.sweep else []
        for changes in [None] + (sweep if width == SWEEP_WIDTH else []):
            try:
                rows.extend(measure_launches(config, batch, width, changes))
            except Exception as error:  # noqa: BLE001 - a failed variant is reported, the run goes on
                print(
                    f"  launch breakdown B={batch} d={width} {changes or ''}: failed: {type(error).__name__}: {error}"
                )
    return rows


def guarded(measure: Callable[[], Row], failed: Row) -> Row:
    """Run one measurement; a failure (compile error, unsupported backend, OOM) becomes a row with its error."""
    try:
        row = measure()
        print(f"  {row.kernel} {row.provider} {row.mode} B={row.B} d={row.d}: {row.p50_us:.1f} us")
        return row
    except Exception as error:  # noqa: BLE001 - any provider failure is data, the run goes on
        failed.status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        print(f"  {failed.kernel} {failed.provider} {failed.mode} B={failed.B} d={failed.d}: {failed.status}")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return failed


def save_trace(config: BenchConfig, provider: str, width: int, slug: str) -> Path:
    """Profile one adapter forward+backward (after warm-up) into a gzipped chrome trace; print its kernel count."""
    step, _ = adapter_step(provider, config.adapter_batch_sizes[0], config.length, width, getattr(torch, config.dtype))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        torch.cuda.synchronize()
    plain = config.results_dir / f"trace_adapter_{provider}_{slug}.json"
    profiler.export_chrome_trace(str(plain))
    events = json.loads(plain.read_text()).get("traceEvents", [])
    kernels = [event for event in events if event.get("cat") == "kernel"]
    path = plain.with_suffix(".json.gz")
    with gzip.open(path, "wb") as archive:
        archive.write(plain.read_bytes())
    plain.unlink()
    busy = sum(event.get("dur", 0) for event in kernels)
    print(f"  trace {path.name}: {len(kernels)} GPU kernels, {busy:.0f} us of kernel time")
    return path


def upsert_rows(path: Path, rows: list[Row]) -> None:
    """Replace rows with the same key (kernel, provider, mode, B, L, d, dtype, gpu) and append the new ones."""
    columns = [field.name for field in fields(Row)]
    new = {tuple(str(getattr(row, key)) for key in KEY_COLUMNS): row for row in rows}
    kept = []
    if path.exists():
        with path.open(newline="") as handle:
            kept = [old for old in csv.DictReader(handle) if tuple(old[key] for key in KEY_COLUMNS) not in new]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        for row in rows:
            writer.writerow({name: "" if getattr(row, name) is None else getattr(row, name) for name in columns})


def print_table(rows: list[Row], copy_gbps: float) -> None:
    """Median time, achieved GB/s, share of the measured copy bandwidth and speed-up over eager, one line per row."""
    eager = {(r.kernel, r.mode, r.B, r.d): r.p50_us for r in rows if r.provider == "eager" and r.p50_us}
    print(f"\nHBM copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    print(
        f"{'kernel':8} {'provider':12} {'mode':17} {'B':>4} {'d':>5} {'p50 us':>10} {'GB/s':>7} {'% HBM':>6} speed-up"
    )
    for r in rows[1:]:  # the first row is the copy itself
        cells = [f"{r.kernel:8} {r.provider:12} {r.mode:17} {r.B:>4} {r.d:>5}"]
        if r.p50_us is None:
            cells.append(f"{'-':>10}  {r.status}")
        else:
            base = eager.get((r.kernel, r.mode, r.B, r.d))
            cells.append(f"{r.p50_us:10.1f}")
            cells.append(f"{r.gbps:7.0f} {100 * r.gbps / copy_gbps:5.1f}%" if r.gbps else " " * 14)
            cells.append(f"{base / r.p50_us:7.2f}x" if base else "")
        print(" ".join(cells))


def run_gpu_bench(config: BenchConfig) -> None:
    gpu = torch.cuda.get_device_name()
    slug = gpu_slug(gpu)
    config.results_dir.mkdir(parents=True, exist_ok=True)
    csv_path = config.results_dir / f"attention_{slug}.csv"
    print(f"GPU: {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbps = copy_bandwidth_gbps()
    rows = [Row("hbm_copy", "torch", "copy", 0, 0, 0, "bfloat16", gbps=copy_gbps)]
    compiled = torch.compile(attention_calibration_reference)
    for width in config.widths:
        for batch in config.batch_sizes:
            for mode in config.modes:
                for provider in config.providers:
                    failed = Row("core", provider, mode, batch, config.length, width, config.dtype)
                    rows.append(guarded(partial(measure_core, config, provider, mode, batch, width, compiled), failed))
        for batch in config.adapter_batch_sizes:
            for provider in config.adapter_providers:
                failed = Row("adapter", provider, "forward+backward", batch, config.length, width, config.dtype)
                rows.append(guarded(partial(measure_adapter, config, provider, batch, width), failed))
        if "fused" in config.providers:
            rows.extend(measure_breakdown(config, width))
        for row in rows:
            row.gpu = gpu
        upsert_rows(csv_path, rows)  # after every width, so that a run cut short keeps what it measured
    print_table(rows, copy_gbps)
    if "fused" in config.providers:
        print_targets(rows, copy_gbps)
    print(f"\nrows upserted into {csv_path}")
    if config.traces:
        for provider in ("eager", "fused"):
            try:
                save_trace(config, provider, config.widths[0], slug)
            except Exception as error:  # noqa: BLE001 - a missing trace must not lose the measured rows
                print(f"  trace of the {provider} adapter failed: {type(error).__name__}: {error}")
    draw_plot(csv_path)


def print_targets(rows: list[Row], copy_gbps: float) -> None:
    """The issue's targets at L=77, d=768: core fwd+bwd at B=16 <= 30 us and >= 10x eager, at B=256 >= 50% of the
    copy bandwidth; whole adapter fwd+bwd at B=16 <= 1.5 ms."""

    def p50(kernel: str, provider: str, batch: int) -> float | None:
        match = [
            r for r in rows if (r.kernel, r.provider, r.mode, r.B, r.d) == (kernel, provider, MODES[1], batch, 768)
        ]
        return match[0].p50_us if match and match[0].p50_us else None

    def report(what: str, value: float | None, target: float, unit: str, at_most: bool) -> None:
        if value is None:
            print(f"  {what}: not measured")
            return
        met = value <= target if at_most else value >= target
        print(
            f"  {what}: {value:.1f} {unit} (target {'<=' if at_most else '>='} {target:g}) {'met' if met else 'MISSED'}"
        )

    print("\ntargets (bf16, L=77, d=768, forward+backward):")
    fused16, eager16 = p50("core", "fused", 16), p50("core", "eager", 16)
    report("core fused B=16", fused16, 30, "us", at_most=True)
    report("core fused B=16 speed-up vs eager", eager16 / fused16 if fused16 and eager16 else None, 10, "x", False)
    report("core fused+graph B=16 (no launch overhead)", p50("core", "fused+graph", 16), 30, "us", at_most=True)
    fused256 = p50("core", "fused", 256)
    share = TENSORS_MOVED[MODES[1]] * 256 * 77 * 768 * 2 / (fused256 * 1e-6) / 1e9 / copy_gbps if fused256 else None
    report("core fused B=256 share of HBM copy bandwidth", 100 * share if share else None, 50, "%", at_most=False)
    adapter = p50("adapter", "fused", 16)
    report("adapter fused B=16", adapter / 1e3 if adapter else None, 1.5, "ms", at_most=True)
    graphed = p50("adapter", "fused+graph", 16)
    report("adapter fused+graph B=16", graphed / 1e3 if graphed else None, 1.5, "ms", at_most=True)


def draw_plot(csv_path: Path) -> None:
    try:
        from plot_attention import plot_attention_csv
    except ImportError as error:  # matplotlib is not on every GPU image; the plot can be drawn later from the CSV
        print(f"no plot ({error}); draw it later with: python bench/plot_attention.py {csv_path}")
        return
    print(f"plot: {plot_attention_csv(csv_path)}")


def interpreter_check(batch: int = 2, length: int = 77, width: int = 64) -> int:
    """Fused forward+backward under the Triton interpreter vs the float64 reference; returns an exit status."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, length, width, generator=generator, dtype=torch.float64) for _ in range(4))
    results = {}
    for name, function, dtype in (("fused", attention_calibration, torch.float32), ("reference", None, torch.float64)):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = (function or attention_calibration_reference)(*inputs)
        out.backward(grad_out.to(dtype))
        results[name] = [out.double(), *(t.grad.double() for t in inputs)]
    errors = [(a - b).abs().max().item() for a, b in zip(results["fused"], results["reference"], strict=True)]
    print(f"interpreter check B={batch} L={length} d={width} fp32, max abs error vs float64 reference:")
    print(
        "  " + ", ".join(f"{name} {error:.2e}" for name, error in zip(("out", "dq", "dk", "dv"), errors, strict=True))
    )
    passed = max(errors) <= 1e-4
    print("  PASS" if passed else "  FAIL: error above 1e-4")
    return 0 if passed else 1


def run_cpu_fallback() -> int:
    print("No CUDA device: nothing to time. Running the interpreter correctness check at a small size instead.")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, __file__, "--interpreter-check"], env=env, check=False).returncode


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(value) for value in text.split(",") if value.strip())


def name_list(allowed: tuple[str, ...]) -> Callable[[click.Context, click.Parameter, str], tuple[str, ...]]:
    def parse(_context, parameter, text):
        names = tuple(text.split(",")) if text else ()
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise click.BadParameter(f"unknown {unknown}; choose from {','.join(allowed)}", param=parameter)
        return names

    return parse


@click.command()
@click.option("--batch-sizes", default="1,16,64,256", show_default=True, help="Comma-separated batch sizes (core).")
@click.option("--widths", default="768,1024,2048", show_default=True, help="Comma-separated widths d.")
@click.option("--length", default=77, show_default=True, help="Sequence length L (CLIP's 77 tokens).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option(
    "--providers",
    default=",".join(CORE_PROVIDERS),
    show_default=True,
    callback=name_list(CORE_PROVIDERS),
    help="Core providers to time.",
)
@click.option(
    "--modes", default=",".join(MODES), show_default=True, callback=name_list(MODES), help="Core modes to time."
)
@click.option("--adapter-batch-sizes", default="16", show_default=True, help="Batch sizes of the whole-adapter rows.")
@click.option(
    "--adapter-providers",
    default=",".join(ADAPTER_PROVIDERS),
    show_default=True,
    callback=name_list(ADAPTER_PROVIDERS),
    help="Adapter providers to time (empty to skip the adapter).",
)
@click.option(
    "--breakdown-batch-sizes",
    default="16,256",
    show_default=True,
    help="Batch sizes at which each fused launch is also timed alone (empty to skip).",
)
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Also time each fused launch with single changes of its block sizes / warps / stages at d=768.",
)
@click.option(
    "--results-dir", type=click.Path(path_type=Path), default=RESULTS_DIR, show_default=True, help="CSV/plot/traces."
)
@click.option("--traces/--no-traces", default=True, show_default=True, help="Save adapter profiler traces.")
@click.option(
    "--interpreter-check", "interpreter_child", is_flag=True, hidden=True, help="Internal: the CPU fallback's child."
)
def main(
    batch_sizes,
    widths,
    length,
    dtype,
    providers,
    modes,
    adapter_batch_sizes,
    adapter_providers,
    breakdown_batch_sizes,
    sweep,
    results_dir,
    traces,
    interpreter_child,
):
    """Time the attention-calibration core and the adapter; write CSV rows, a plot and traces (see module doc)."""
    if interpreter_child:
        sys.exit(interpreter_check_main())
    if not torch.cuda.is_available():
        sys.exit(run_cpu_fallback())
    config = BenchConfig(
        batch_sizes=int_list(batch_sizes),
        widths=int_list(widths),
        length=length,
        dtype=dtype,
        providers=providers,
        modes=modes,
        adapter_batch_sizes=int_list(adapter_batch_sizes),
        adapter_providers=adapter_providers,
        breakdown_batch_sizes=int_list(breakdown_batch_sizes),
        sweep=sweep,
        results_dir=results_dir,
        traces=traces,
    )
    run_gpu_bench(config)


def interpreter_check_main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise click.UsageError("--interpreter-check runs under TRITON_INTERPRET=1 (set before the kernels import)")
    return interpreter_check()


if __name__ == "__main__":
    main()
