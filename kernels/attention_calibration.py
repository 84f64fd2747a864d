"""Fused Triton kernels for attention calibration: `out = softmax(Q K^T * scale) V + V`.

One head, q, k, v of shape [B, L, d] with 1 <= L <= 256 and d a multiple of 16 (768 to 2048 in the adapter).
FlashAttention-style kernels stop at head width 256; here the width is the large dimension and the sequence is short,
so the kernels keep a whole row of scores in one tile and stream over d instead of over keys.

Forward (one launch), `_forward_kernel`, one program per (batch, block of BLOCK_M query rows):
  1. S = Q K^T * scale, reduced over d in BLOCK_D chunks into an fp32 [BLOCK_M, BLOCK_L] tile; the key axis is padded
     to BLOCK_L (the next power of two >= L, at least 16) and masked to -inf.
  2. Every key of a row is in the tile, so the softmax is exact in one pass, in fp32:
     P = exp(S - rowmax(S)) / rowsum(exp(S - rowmax(S))). P is stored fp32 for the backward, as [B, L, L] with rows
     padded to a multiple of 16 values (aligned rows let Triton vectorize the loads).
  3. O = P V + V, tiled over d: one [BLOCK_M, BLOCK_D] output chunk per step, P staying in registers.

Backward (two launches), from the P saved by the forward (4 L^2 bytes a sample, less than the 2 L d of O):
  1. `_scores_backward_kernel`, per (batch, block of rows): dP = dO V^T (reduced over d), then
       dS = scale * P * (dP - delta),  delta = rowsum(dO * (O - V)) = rowsum(P * dP).
     The two forms of delta are equal because O - V = P V, so rowsum(dO * P V)_i = sum_j P_ij (dO_i . V_j); with the
     whole row in the tile the kernel takes the second form and never reads O. dS is stored fp32 like P.
  2. `_grads_backward_kernel`, per (batch, block of positions, d chunk):
       dQ = dS K,   dK = dS^T Q,   dV = P^T dO + dO    (scale is already folded into dS).
     Every output element belongs to exactly one program: no atomics, so the backward is deterministic.

Precision: accumulators and softmax statistics are fp32; matmul operands are the input dtype (P and dS are rounded to
it before their products, as FlashAttention does); fp32 inputs use IEEE fp32 products (`input_precision="ieee"`).

Block sizes come from `launch_settings`, a deterministic function of (L, d, dtype): one configuration per shape class
instead of autotuning, because the Triton interpreter cannot autotune over several configurations and because a
fixed configuration can be tested. BLOCK_D always divides d (d is a multiple of 16), so loads along d need no mask.

On the CPU, `attention_calibration` runs the PyTorch reference, or these kernels when `TRITON_INTERPRET=1` is set
before this module is imported (Triton decides at definition time whether a kernel is interpreted). bf16 stays on the
reference under the interpreter, whose bf16 `tl.dot` is wrong.
"""

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reference import attention_calibration_reference

MAX_SEQUENCE_LENGTH = 256
WIDTH_MULTIPLE = 16
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Read once: Triton's @jit picks interpreted or compiled kernels when this module is imported, so the dispatch must
# agree with that decision rather than with a later change of the variable.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LaunchSettings:
    """Block sizes and launch parameters of one call; the forward saves them on ctx for the backward."""

    block_l: int  # keys per row tile: next power of two >= L, at least 16 (tl.dot needs every dim >= 16)
    block_m: int  # query rows per program in the forward and backward score kernels
    block_d: int  # width chunk of the reductions over d (divides d)
    block_rows: int  # positions per program in the gradient kernel
    block_keys: int  # key chunk of the reductions over the sequence
    block_out_d: int  # width of the gradient tiles (divides d)
    dot_precision: str  # "ieee" for fp32 operands, "tf32" otherwise (ignored by Triton for 16-bit operands)
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=256)
def launch_settings(length: int, width: int, dtype: torch.dtype) -> LaunchSettings:
    """The one configuration used for inputs of this shape class (cached: it sits on every call's launch path).

    The score tile [block_m, block_l] holds at most 32 x 256 fp32 values (32 KiB of registers). Width chunks are 64
    wide for 16-bit inputs and 32 for fp32, so a [256, chunk] key tile is 32 KiB. Compiled ahead of time for sm_90
    (Triton 3.9, ptxas 12.9), 8 warps and 3 pipeline stages use at most 172 registers a thread with no spills and at
    most 96 KiB of shared memory (of 228 KiB on an H100/H200) over the shape classes of the tests; 4 warps needed up to
    255 registers at L=256.
    """
    block_l = max(16, triton.next_power_of_2(length))
    chunk = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    block_d = math.gcd(width, chunk)
    return LaunchSettings(
        block_l=block_l,
        block_m=min(32, block_l),
        block_d=block_d,
        block_rows=min(64, block_l),
        block_keys=min(64, block_l),
        block_out_d=block_d,
        dot_precision="ieee" if dtype == torch.float32 else "tf32",
        num_warps=8,
        num_stages=3,
    )


@triton.jit
def _rows_times_rows_t(
    a_ptr,
    stride_a_row,
    stride_a_col,
    b_ptr,
    stride_b_row,
    stride_b_col,
    offs_m,
    offs_n,
    length,
    width,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of A[offs_m, :] @ B[offs_n, :]^T, reduced over the width in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a = (offs_m < length)[:, None]
    mask_b = (offs_n < length)[:, None]
    a_ptrs = a_ptr + offs_m[:, None] * stride_a_row + offs_d[None, :] * stride_a_col
    b_ptrs = b_ptr + offs_n[:, None] * stride_b_row + offs_d[None, :] * stride_b_col
    for _ in range(0, width, BLOCK_D):
        a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        b = tl.load(b_ptrs, mask=mask_b, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_D * stride_a_col
        b_ptrs += BLOCK_D * stride_b_col
    return acc


@triton.jit
def _mix_rows(
    w_ptr,
    stride_w_row,
    stride_w_key,
    x_ptr,
    stride_x_row,
    stride_x_col,
    offs_m,
    offs_d,
    length,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_D] tile of W[offs_m, :] @ X[:, offs_d], reduced over the sequence in BLOCK_K chunks.

    W is an fp32 [L, L] matrix (P or dS, or their transposes through the strides), rounded to X's dtype for the dot.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    mask_m = (offs_m < length)[:, None]
    for k0 in range(0, length, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < length
        w = tl.load(
            w_ptr + offs_m[:, None] * stride_w_row + offs_k[None, :] * stride_w_key,
            mask=mask_m & mask_k[None, :],
            other=0.0,
        )
        x_ptrs = x_ptr + offs_k[:, None] * stride_x_row + offs_d[None, :] * stride_x_col
        x = tl.load(x_ptrs, mask=mask_k[:, None], other=0.0)  # zeros, not garbage: 0 * NaN would poison the sum
        acc = tl.dot(w.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    p_ptr,
    scale,
    length,
    width,
    num_row_blocks,
    stride_qb,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vd,
    stride_ob,
    stride_ol,
    stride_od,
    stride_pb,
    stride_pl,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """For one block of query rows of one batch element: P = softmax(Q K^T * scale) (stored fp32), O = P V + V."""
    pid = tl.program_id(0)
    batch = (pid // num_row_blocks).to(tl.int64)
    offs_m = (pid % num_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = (offs_m < length)[:, None]
    mask_n = (offs_n < length)[:, None]
    scores = _rows_times_rows_t(
        q_ptr + batch * stride_qb,
        stride_ql,
        stride_qd,
        k_ptr + batch * stride_kb,
        stride_kl,
        stride_kd,
        offs_m,
        offs_n,
        length,
        width,
        BLOCK_M,
        BLOCK_L,
        BLOCK_D,
        DOT_PRECISION,
    )
    scores = tl.where((offs_n < length)[None, :], scores * scale, float("-inf"))
    probs = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    p_ptrs = p_ptr + batch * stride_pb + offs_m[:, None] * stride_pl + offs_n[None, :]
    tl.store(p_ptrs, probs, mask=mask_m & (offs_n < length)[None, :])

    probs = probs.to(v_ptr.dtype.element_ty)
    v_ptr += batch * stride_vb
    values_ptrs = v_ptr + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
    residual_ptrs = v_ptr + offs_m[:, None] * stride_vl + offs_d[None, :] * stride_vd
    o_ptrs = o_ptr + batch * stride_ob + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    for _ in range(0, width, BLOCK_D):
        out = tl.dot(probs, tl.load(values_ptrs, mask=mask_n, other=0.0), input_precision=DOT_PRECISION)
        out += tl.load(residual_ptrs, mask=mask_m, other=0.0).to(tl.float32)
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m)
        values_ptrs += BLOCK_D * stride_vd
        residual_ptrs += BLOCK_D * stride_vd
        o_ptrs += BLOCK_D * stride_od


@triton.jit
def _scores_backward_kernel(
    do_ptr,
    v_ptr,
    p_ptr,
    ds_ptr,
    scale,
    length,
    width,
    num_row_blocks,
    stride_dob,
    stride_dol,
    stride_dod,
    stride_vb,
    stride_vl,
    stride_vd,
    stride_pb,
    stride_pl,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS[b, rows] = scale * P * (dP - rowsum(P * dP)) with dP = dO V^T, for one block of rows."""
    pid = tl.program_id(0)
    batch = (pid // num_row_blocks).to(tl.int64)
    offs_m = (pid % num_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_L)
    grad_probs = _rows_times_rows_t(
        do_ptr + batch * stride_dob,
        stride_dol,
        stride_dod,
        v_ptr + batch * stride_vb,
        stride_vl,
        stride_vd,
        offs_m,
        offs_n,
        length,
        width,
        BLOCK_M,
        BLOCK_L,
        BLOCK_D,
        DOT_PRECISION,
    )
    mask = (offs_m < length)[:, None] & (offs_n < length)[None, :]
    offsets = batch * stride_pb + offs_m[:, None] * stride_pl + offs_n[None, :]
    probs = tl.load(p_ptr + offsets, mask=mask, other=0.0)
    delta = tl.sum(probs * grad_probs, axis=1)
    tl.store(ds_ptr + offsets, scale * probs * (grad_probs - delta[:, None]), mask=mask)


@triton.jit
def _grads_backward_kernel(
    q_ptr,
    k_ptr,
    do_ptr,
    p_ptr,
    ds_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    length,
    num_row_blocks,
    num_d_blocks,
    stride_qb,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kd,
    stride_dob,
    stride_dol,
    stride_dod,
    stride_gb,
    stride_gl,
    stride_gd,
    stride_pb,
    stride_pl,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ = dS K, dK = dS^T Q, dV = P^T dO + dO for one block of positions and one width chunk of one batch element.

    dQ, dK and dV share one contiguous layout (strides stride_g*), and so do P and dS (strides stride_p*).
    """
    pid = tl.program_id(0)
    batch = (pid // (num_row_blocks * num_d_blocks)).to(tl.int64)
    block = pid % (num_row_blocks * num_d_blocks)
    offs_m = (block // num_d_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (block % num_d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_m < length)[:, None]
    square = batch * stride_pb
    grad_offsets = batch * stride_gb + offs_m[:, None] * stride_gl + offs_d[None, :] * stride_gd
    do_ptr += batch * stride_dob

    grad_q = _mix_rows(
        ds_ptr + square,
        stride_pl,
        1,
        k_ptr + batch * stride_kb,
        stride_kl,
        stride_kd,
        offs_m,
        offs_d,
        length,
        BLOCK_M,
        BLOCK_K,
        BLOCK_D,
        DOT_PRECISION,
    )
    tl.store(dq_ptr + grad_offsets, grad_q.to(dq_ptr.dtype.element_ty), mask=mask)
    grad_k = _mix_rows(
        ds_ptr + square,
        1,
        stride_pl,
        q_ptr + batch * stride_qb,
        stride_ql,
        stride_qd,
        offs_m,
        offs_d,
        length,
        BLOCK_M,
        BLOCK_K,
        BLOCK_D,
        DOT_PRECISION,
    )
    tl.store(dk_ptr + grad_offsets, grad_k.to(dk_ptr.dtype.element_ty), mask=mask)
    grad_v = _mix_rows(
        p_ptr + square,
        1,
        stride_pl,
        do_ptr,
        stride_dol,
        stride_dod,
        offs_m,
        offs_d,
        length,
        BLOCK_M,
        BLOCK_K,
        BLOCK_D,
        DOT_PRECISION,
    )
    grad_v += tl.load(do_ptr + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod, mask=mask).to(tl.float32)
    tl.store(dv_ptr + grad_offsets, grad_v.to(dv_ptr.dtype.element_ty), mask=mask)


class Launch(NamedTuple):
    """One kernel launch: the grid, the positional arguments and the compile-time ones (constexprs, warps, stages)."""

    kernel: Callable
    grid: tuple[int]
    args: tuple
    meta: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def _meta(settings: LaunchSettings, **blocks: int) -> dict:
    return dict(
        blocks, DOT_PRECISION=settings.dot_precision, num_warps=settings.num_warps, num_stages=settings.num_stages
    )


def forward_launch(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, probs: Tensor, scale: float, s: LaunchSettings
) -> Launch:
    batch, length, width = q.shape
    blocks = triton.cdiv(length, s.block_m)
    args = (q, k, v, out, probs, scale, length, width, blocks, *q.stride(), *k.stride(), *v.stride(), *out.stride())
    meta = _meta(s, BLOCK_M=s.block_m, BLOCK_L=s.block_l, BLOCK_D=s.block_d)
    return Launch(_forward_kernel, (batch * blocks,), (*args, *probs.stride()[:2]), meta)


def scores_backward_launch(
    grad_out: Tensor, v: Tensor, probs: Tensor, grad_scores: Tensor, scale: float, s: LaunchSettings
) -> Launch:
    batch, length, width = v.shape
    blocks = triton.cdiv(length, s.block_m)
    args = (grad_out, v, probs, grad_scores, scale, length, width, blocks, *grad_out.stride(), *v.stride())
    meta = _meta(s, BLOCK_M=s.block_m, BLOCK_L=s.block_l, BLOCK_D=s.block_d)
    return Launch(_scores_backward_kernel, (batch * blocks,), (*args, *probs.stride()[:2]), meta)


def grads_backward_launch(
    q: Tensor, k: Tensor, grad_out: Tensor, probs: Tensor, grad_scores: Tensor, grads: Tensor, s: LaunchSettings
) -> Launch:
    """grads is [3, B, L, d]: dQ, dK, dV."""
    batch, length, width = q.shape
    row_blocks, d_blocks = triton.cdiv(length, s.block_rows), width // s.block_out_d
    pointers = (q, k, grad_out, probs, grad_scores, grads[0], grads[1], grads[2])
    strides = (*q.stride(), *k.stride(), *grad_out.stride(), *grads[0].stride(), *probs.stride()[:2])
    meta = _meta(s, BLOCK_M=s.block_rows, BLOCK_K=s.block_keys, BLOCK_D=s.block_out_d)
    grid = (batch * row_blocks * d_blocks,)
    return Launch(_grads_backward_kernel, grid, (*pointers, length, row_blocks, d_blocks, *strides), meta)


def attention_calibration_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor, LaunchSettings]:
    """Launch the forward kernel; returns (out [B, L, d], P [B, L, >= L] fp32, the settings used)."""
    batch, length, width = q.shape
    settings = launch_settings(length, width, q.dtype)
    probs = torch.empty((batch, length, triton.cdiv(length, 16) * 16), device=q.device, dtype=torch.float32)
    out = torch.empty((batch, length, width), device=q.device, dtype=q.dtype)
    forward_launch(q, k, v, out, probs, scale, settings)()
    return out, probs, settings


def attention_calibration_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor, scale: float, settings: LaunchSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels; returns (dQ, dK, dV), each [B, L, d] in the input dtype."""
    batch, length, width = q.shape
    grad_scores = torch.empty_like(probs)
    grads = torch.empty((3, batch, length, width), device=q.device, dtype=q.dtype)
    scores_backward_launch(grad_out, v, probs, grad_scores, scale, settings)()
    grads_backward_launch(q, k, grad_out, probs, grad_scores, grads, settings)()
    return grads[0], grads[1], grads[2]


class AttentionCalibrationFunction(torch.autograd.Function):
    """Triton forward and backward of `softmax(Q K^T * scale) V + V` as one autograd node."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out, probs, settings = attention_calibration_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        ctx.settings = settings
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, probs = ctx.saved_tensors
        grad_q, grad_k, grad_v = attention_calibration_backward(grad_out, q, k, v, probs, ctx.scale, ctx.settings)
        return grad_q, grad_k, grad_v, None


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise a TypeError or ValueError naming the problem if q, k, v are not inputs the kernels accept."""
    tensors = {"q": q, "k": k, "v": v}
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"attention_calibration: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"attention_calibration: {name} has dtype {tensor.dtype}; expected float32, float16 or bfloat16 "
                f"(cast with {name}.float())"
            )
        if tensor.dim() != 3:
            raise ValueError(
                f"attention_calibration: {name} must be [batch, length, width], got shape {tuple(tensor.shape)}"
            )
    if len({t.dtype for t in tensors.values()}) > 1:
        raise TypeError(
            f"attention_calibration: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype} "
            "(cast them to one dtype, e.g. under autocast cast v to q.dtype)"
        )
    if len({t.device for t in tensors.values()}) > 1:
        devices = f"{q.device}, {k.device}, {v.device}"
        raise ValueError(f"attention_calibration: q, k, v must be on one device, got {devices}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(
            "attention_calibration: q, k, v must have the same shape [batch, length, width], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, length, width = q.shape
    if batch < 1 or not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(
            f"attention_calibration: batch {batch} and length {length} must be >= 1, and length <= "
            f"{MAX_SEQUENCE_LENGTH} (the whole key axis is one tile); use the eager backend for longer sequences"
        )
    if width < WIDTH_MULTIPLE or width % WIDTH_MULTIPLE:
        raise ValueError(
            f"attention_calibration: width d={width} must be a positive multiple of {WIDTH_MULTIPLE}; "
            "pad the width or use the eager backend"
        )


def attention_calibration(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """`softmax(q k^T * scale) v + v` for q, k, v of shape [B, L, d]; differentiable in q, k and v.

    scale defaults to 1 / sqrt(d). Runs the Triton kernels on CUDA (and on the CPU under TRITON_INTERPRET=1, except
    for bf16), otherwise the PyTorch reference. Raises TypeError/ValueError for inputs the kernels do not accept.
    """
    check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.is_cuda or (TRITON_INTERPRETER and q.dtype != torch.bfloat16):
        return AttentionCalibrationFunction.apply(q, k, v, scale)
    return attention_calibration_reference(q, k, v, scale)
