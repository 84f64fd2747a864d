"""Fused Triton kernels for attention calibration: `out = softmax(Q K^T * scale) V + V`.

One head, q, k, v of shape [B, L, d] with 1 <= L <= 256 and d a multiple of 16 (768 to 2048 in the adapter).
FlashAttention-style kernels stop at head width 256; here the width is the large dimension and the sequence is short,
so the kernels keep a whole row of scores in one tile and stream over d instead of over keys.

Forward (two launches):
  1. `_probs_kernel`, one program per (batch, block of BLOCK_M query rows): S = Q K^T * scale, reduced over d in
     BLOCK_D chunks into an fp32 [BLOCK_M, BLOCK_L] tile; the key axis is padded to BLOCK_L (the next power of two
     >= L, at least 16) and masked to -inf. Every key of a row is in the tile, so the softmax is exact in one pass,
     in fp32: P = exp(S - rowmax(S)) / rowsum(exp(S - rowmax(S))). P is stored twice, as [B, L, Lp] with rows padded
     to Lp = a multiple of 16 values, the padding columns written as zeros (so that readers mask keys at Lp and
     Triton vectorizes their loads): fp32 P, and P^T in the input dtype for dV (so that the gradient kernel reads
     unit-stride rows).
  2. `_output_kernel`, one program per (batch, block of positions, width chunk): O = P V + V, one dot over the keys
     (P rounded to the input dtype). Splitting the forward in two keeps each program's chain of dependent steps
     short: the reduction over d runs once a row block, and the output is spread over many small programs.

Backward (two launches), from what the forward saved (6 L Lp bytes a sample for 16-bit inputs, less than 2 L d):
  1. `_scores_backward_kernel`, per (batch, block of BLOCK_M rows): dP = dO V^T (reduced over d), then
       dS = scale * P * (dP - delta),  delta = rowsum(dO * (O - V)) = rowsum(P * dP).
     The two forms of delta are equal because O - V = P V, so rowsum(dO * P V)_i = sum_j P_ij (dO_i . V_j); with the
     whole row in the tile the kernel takes the second form and never reads O. dS is stored in the input dtype twice,
     row-major and transposed (dS^T), so that both of its products below read unit-stride rows.
  2. `_grads_backward_kernel`, per (batch, block of BLOCK_M positions, width chunk):
       dQ = dS K,   dK = dS^T Q,   dV = P^T dO + dO    (scale is already folded into dS).
     The three products share one loop over key chunks (a single chunk covering every key for 16-bit inputs), and
     the six tiles of a chunk are loaded before its three dots, so that their memory latencies overlap. A program reads
     its width chunk of K, Q and dO for every key and writes its tile of each gradient once. Every output element
     belongs to exactly one program: no atomics, so the backward is deterministic.

Precision: accumulators and softmax statistics are fp32; matmul operands are the input dtype: P and dS are rounded to
it before their products (as FlashAttention does), which is also why they can be stored in it; fp32 inputs use IEEE
fp32 products (`input_precision="ieee"`).

Block sizes come from `launch_settings`, a deterministic function of (B, L, d, dtype): one configuration per shape
class instead of autotuning, because the Triton interpreter cannot autotune over several configurations and because a
fixed configuration can be tested. BLOCK_D always divides d (d is a multiple of 16), so loads along d need no mask.

On the CPU, `attention_calibration` runs the PyTorch reference, or these kernels when `TRITON_INTERPRET=1` is set
before this module is imported (Triton decides at definition time whether a kernel is interpreted). bf16 stays on the
reference under the interpreter, whose bf16 `tl.dot` is wrong.

The launches are wrapped as two `torch.library` operators, `sur_cache::attention_calibration_forward` and
`sur_cache::attention_calibration_backward`, with fake (meta) implementations and the autograd formula registered on
the forward: torch.compile then keeps the kernel in its graph as one opaque node instead of breaking the graph at
it, and replays it inside CUDA graphs (`sur-cache train --compile reduce-overhead`). `torch.library.opcheck` checks
both under the interpreter (tests/kernels/test_attention_calibration.py).
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
    block_m: int  # query rows per program of the kernels that reduce over d (probabilities, score gradient)
    block_d: int  # width chunk of the reductions over d (divides d)
    block_rows: int  # positions per program of the key-mixing kernels (output, gradients)
    block_keys: int  # key chunk of the key-mixing kernels (the whole padded key axis for 16-bit inputs)
    block_out_d: int  # width of the key-mixing kernels' output tiles (divides d)
    dot_precision: str  # "ieee" for fp32 operands, "tf32" otherwise (ignored by Triton for 16-bit operands)
    num_warps: int  # warps per program of the kernels that reduce over d
    num_stages: int  # their software-pipelining depth
    mix_warps: int  # warps per program of the key-mixing kernels
    mix_stages: int  # their pipelining depth: 2 when one key chunk covers every key (async copies straight to shared
    # memory, which keeps the loaded tiles out of registers), 3 over fp32's key chunks


# Row blocks of the kernels that reduce over d shrink from 32 to 16 rows when 32 would give fewer programs than this
# (about 2 per SM of an H100/H200): small batches need the parallelism, large ones the fewer re-reads of K and V.
ROW_BLOCK_PROGRAMS = 256
# The key-mixing kernels halve their width tile when the full one would give fewer programs than this (about 4 per
# SM).
MIXING_PROGRAMS = 512


@functools.lru_cache(maxsize=1024)
def launch_settings(batch: int, length: int, width: int, dtype: torch.dtype) -> LaunchSettings:
    """The one configuration used for inputs of this shape class (cached: it sits on every call's launch path).

    Width chunks are 64 wide for 16-bit inputs and 32 for fp32. The key-mixing kernels take the whole key axis in one
    chunk for 16-bit inputs (keys over fp32's FMA path come in chunks of 32, a larger chunk spills) and run with
    4 warps for 16-bit inputs: compiled for sm_90 the gradient kernel then needs 146 registers a thread and 72 KiB of
    shared memory at L=77, so three programs share an SM (with 8 warps, one did).
    """
    block_l = max(16, triton.next_power_of_2(length))
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    chunk = 64 if sixteen_bit else 32
    block_m = 32 if block_l > 128 or batch * triton.cdiv(length, 32) >= ROW_BLOCK_PROGRAMS else 16
    block_keys = block_l if sixteen_bit else min(block_l, 32)
    block_rows = max(16, min(block_l, 32 if sixteen_bit else 64))
    programs = batch * triton.cdiv(length, block_rows) * (width // math.gcd(width, chunk))
    out_chunk = chunk if programs >= MIXING_PROGRAMS else chunk // 2
    return LaunchSettings(
        block_l=block_l,
        block_m=min(block_m, block_l),
        block_d=math.gcd(width, chunk),
        block_rows=block_rows,
        block_keys=block_keys,
        block_out_d=math.gcd(width, out_chunk),
        dot_precision="ieee" if dtype == torch.float32 else "tf32",
        num_warps=8,
        num_stages=3,
        mix_warps=4 if sixteen_bit else 8,
        mix_stages=2 if block_keys == block_l else 3,
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
def _probs_kernel(
    q_ptr,
    k_ptr,
    p_ptr,
    pt_ptr,
    scale,
    length,
    padded_length,
    width,
    num_row_blocks,
    stride_qb,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kd,
    stride_pb,
    stride_pl,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """P = softmax(Q K^T * scale) for one block of query rows of one batch element.

    P is stored twice: fp32 rows (P[b, i, j]) for the output and score-gradient kernels and, in the input dtype,
    transposed (P^T[b, j, i]) for dV. Both share the strides stride_pb, stride_pl (and a unit stride along the last
    axis).
    """
    pid = tl.program_id(0)
    batch = (pid // num_row_blocks).to(tl.int64)
    offs_m = (pid % num_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_L)
    mask_m = offs_m < length
    mask_n = offs_n < length
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
    scores = tl.where(mask_n[None, :], scores * scale, float("-inf"))
    probs = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    probs = tl.where(mask_m[:, None], probs, 0.0)  # rows past L become P^T's zero padding columns
    square = batch * stride_pb
    p_ptrs = p_ptr + square + offs_m[:, None] * stride_pl + offs_n[None, :]
    tl.store(p_ptrs, probs, mask=mask_m[:, None] & (offs_n < padded_length)[None, :])
    tl.store(
        pt_ptr + square + offs_n[:, None] * stride_pl + offs_m[None, :],
        tl.trans(probs.to(pt_ptr.dtype.element_ty)),
        mask=mask_n[:, None] & (offs_m < padded_length)[None, :],
    )


@triton.jit
def _output_kernel(
    p_ptr,
    v_ptr,
    o_ptr,
    length,
    padded_length,
    num_row_blocks,
    num_d_blocks,
    stride_pb,
    stride_pl,
    stride_vb,
    stride_vl,
    stride_vd,
    stride_ob,
    stride_ol,
    stride_od,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """O = P V + V for one block of rows and one width chunk of one batch element, reduced over key chunks.

    P is the fp32 P of `_probs_kernel`, rounded to V's dtype for the dot (for 16-bit inputs one chunk covers every
    key). Padded keys load as zeros in both operands (zeros, not garbage: 0 * NaN would poison the sum).
    """
    pid = tl.program_id(0)
    batch = (pid // (num_row_blocks * num_d_blocks)).to(tl.int64)
    block = pid % (num_row_blocks * num_d_blocks)
    offs_m = (block // num_d_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (block % num_d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = (offs_m < length)[:, None]
    p_rows = p_ptr + batch * stride_pb + offs_m[:, None] * stride_pl
    v_cols = v_ptr + batch * stride_vb + offs_d[None, :] * stride_vd
    out = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        probs = tl.load(p_rows + offs_k[None, :], mask=mask_m & (offs_k < padded_length)[None, :], other=0.0)
        values = tl.load(v_cols + offs_k[:, None] * stride_vl, mask=(offs_k < length)[:, None], other=0.0)
        out = tl.dot(probs.to(values.dtype), values, out, input_precision=DOT_PRECISION)
    out += tl.load(v_cols + offs_m[:, None] * stride_vl, mask=mask_m).to(tl.float32)
    o_ptrs = o_ptr + batch * stride_ob + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _scores_backward_kernel(
    do_ptr,
    v_ptr,
    p_ptr,
    ds_ptr,
    scale,
    length,
    padded_length,
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
    stride_sb,
    stride_sl,
    stride_s_transposed,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS[b, rows] = scale * P * (dP - rowsum(P * dP)) with dP = dO V^T, for one block of rows.

    dS is stored in the input dtype twice: row-major at ds_ptr and transposed at ds_ptr + stride_s_transposed, so
    that the gradient kernel reads both dS (for dQ) and dS^T (for dK) with unit-stride rows.
    """
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
    mask_m = offs_m < length
    mask_n = offs_n < length
    mask = mask_m[:, None] & (offs_n < padded_length)[None, :]  # P's padding columns hold zeros
    probs = tl.load(p_ptr + batch * stride_pb + offs_m[:, None] * stride_pl + offs_n[None, :], mask=mask, other=0.0)
    delta = tl.sum(probs * grad_probs, axis=1)
    grad_scores = (scale * probs * (grad_probs - delta[:, None])).to(ds_ptr.dtype.element_ty)
    ds_ptr += batch * stride_sb
    tl.store(ds_ptr + offs_m[:, None] * stride_sl + offs_n[None, :], grad_scores, mask=mask)
    transposed_ptrs = ds_ptr + stride_s_transposed + offs_n[:, None] * stride_sl + offs_m[None, :]
    tl.store(transposed_ptrs, tl.trans(grad_scores), mask=mask_n[:, None] & (offs_m < padded_length)[None, :])


@triton.jit
def _grads_backward_kernel(
    q_ptr,
    k_ptr,
    do_ptr,
    pt_ptr,
    ds_ptr,
    grads_ptr,
    length,
    padded_length,
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
    stride_sb,
    stride_sl,
    stride_s_transposed,
    stride_g_which,
    stride_gb,
    stride_gl,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ = dS K, dK = dS^T Q, dV = P^T dO + dO for one block of positions and one width chunk of one batch element.

    The three products share one loop over key chunks, and every chunk's six tiles are loaded before its three dots,
    so their loads are in flight together; for 16-bit inputs one chunk covers all keys. P^T, dS and dS^T are in the
    input dtype with unit-stride rows and share one layout (strides stride_s*); grads is [3, B, L, d] contiguous:
    dQ, dK, dV. Padded keys load as zeros in both operands (zeros, not garbage: 0 * NaN would poison the sum).
    """
    pid = tl.program_id(0)
    batch = (pid // (num_row_blocks * num_d_blocks)).to(tl.int64)
    block = pid % (num_row_blocks * num_d_blocks)
    offs_m = (block // num_d_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (block % num_d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = (offs_m < length)[:, None]
    ds_rows = ds_ptr + batch * stride_sb + offs_m[:, None] * stride_sl
    pt_rows = pt_ptr + batch * stride_sb + offs_m[:, None] * stride_sl
    k_ptr += batch * stride_kb + offs_d[None, :] * stride_kd
    q_ptr += batch * stride_qb + offs_d[None, :] * stride_qd
    do_ptr += batch * stride_dob
    do_cols = do_ptr + offs_d[None, :] * stride_dod
    grad_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    grad_k = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < length
        square_mask = mask_m & (offs_k < padded_length)[None, :]
        grad_scores = tl.load(ds_rows + offs_k[None, :], mask=square_mask, other=0.0)
        keys = tl.load(k_ptr + offs_k[:, None] * stride_kl, mask=mask_k[:, None], other=0.0)
        grad_scores_t = tl.load(ds_rows + stride_s_transposed + offs_k[None, :], mask=square_mask, other=0.0)
        queries = tl.load(q_ptr + offs_k[:, None] * stride_ql, mask=mask_k[:, None], other=0.0)
        probs_t = tl.load(pt_rows + offs_k[None, :], mask=square_mask, other=0.0)
        grad_out = tl.load(do_cols + offs_k[:, None] * stride_dol, mask=mask_k[:, None], other=0.0)
        grad_q = tl.dot(grad_scores, keys, grad_q, input_precision=DOT_PRECISION)
        grad_k = tl.dot(grad_scores_t, queries, grad_k, input_precision=DOT_PRECISION)
        grad_v = tl.dot(probs_t, grad_out, grad_v, input_precision=DOT_PRECISION)
    grad_v += tl.load(do_cols + offs_m[:, None] * stride_dol, mask=mask_m).to(tl.float32)
    grads_ptr += batch * stride_gb + offs_m[:, None] * stride_gl + offs_d[None, :]
    element_ty = grads_ptr.dtype.element_ty
    tl.store(grads_ptr, grad_q.to(element_ty), mask=mask_m)
    tl.store(grads_ptr + stride_g_which, grad_k.to(element_ty), mask=mask_m)
    tl.store(grads_ptr + 2 * stride_g_which, grad_v.to(element_ty), mask=mask_m)


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


def _mix_meta(settings: LaunchSettings) -> dict:
    """Launch parameters of the key-mixing kernels (output and gradients): rows x width tiles, one loop over keys."""
    meta = _meta(settings, BLOCK_M=settings.block_rows, BLOCK_K=settings.block_keys, BLOCK_D=settings.block_out_d)
    return {**meta, "num_warps": settings.mix_warps, "num_stages": settings.mix_stages}


def square_buffer(batch: int, length: int, count: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Empty [count, B, L, Lp] storage for L x L matrices, rows padded to Lp = a multiple of 16 values.

    The kernels that write these matrices fill the padding columns [L, Lp) with zeros, so that readers mask keys at
    Lp, a multiple of 16 that Triton's specialization sees: their loads along the keys are then vectorized (a mask at
    L made them scalar). Padding rows are never read.
    """
    return torch.empty((count, batch, length, triton.cdiv(length, 16) * 16), device=device, dtype=dtype)


def probs_launch(q: Tensor, k: Tensor, probs: Tensor, probs_t: Tensor, scale: float, s: LaunchSettings) -> Launch:
    """probs (fp32) and probs_t (input dtype) are [B, L, Lp] with one layout."""
    batch, length, width = q.shape
    blocks = triton.cdiv(length, s.block_m)
    padded = probs.shape[-1]
    args = (q, k, probs, probs_t, scale, length, padded, width, blocks, *q.stride(), *k.stride(), *probs.stride()[:2])
    meta = _meta(s, BLOCK_M=s.block_m, BLOCK_L=s.block_l, BLOCK_D=s.block_d)
    return Launch(_probs_kernel, (batch * blocks,), args, meta)


def output_launch(probs: Tensor, v: Tensor, out: Tensor, s: LaunchSettings) -> Launch:
    batch, length, width = v.shape
    row_blocks, d_blocks = triton.cdiv(length, s.block_rows), width // s.block_out_d
    padded = probs.shape[-1]
    args = (probs, v, out, length, padded, row_blocks, d_blocks, *probs.stride()[:2], *v.stride(), *out.stride())
    # P is read in fp32 here: key chunks of at most 128, since a [32, 256] fp32 tile spilled at L=256 (sm_90, 4 warps)
    meta = {**_mix_meta(s), "BLOCK_K": min(s.block_keys, 128)}
    return Launch(_output_kernel, (batch * row_blocks * d_blocks,), args, meta)


def scores_backward_launch(
    grad_out: Tensor, v: Tensor, probs: Tensor, grad_scores: Tensor, scale: float, s: LaunchSettings
) -> Launch:
    """grad_scores is [2, B, L, Lp] in the input dtype: dS and dS^T."""
    batch, length, width = v.shape
    blocks = triton.cdiv(length, s.block_m)
    padded = probs.shape[-1]
    args = (grad_out, v, probs, grad_scores, scale, length, padded, width, blocks, *grad_out.stride(), *v.stride())
    strides = (*probs.stride()[:2], *grad_scores.stride()[1:3], grad_scores.stride(0))
    meta = _meta(s, BLOCK_M=s.block_m, BLOCK_L=s.block_l, BLOCK_D=s.block_d)
    return Launch(_scores_backward_kernel, (batch * blocks,), (*args, *strides), meta)


def grads_backward_launch(
    q: Tensor, k: Tensor, grad_out: Tensor, probs_t: Tensor, grad_scores: Tensor, grads: Tensor, s: LaunchSettings
) -> Launch:
    """probs_t is P^T [B, L, Lp], grad_scores [2, B, L, Lp] (dS, dS^T), both in the layout of square_buffer; grads
    is [3, B, L, d] contiguous: dQ, dK, dV."""
    batch, length, width = q.shape
    row_blocks, d_blocks = triton.cdiv(length, s.block_rows), width // s.block_out_d
    pointers = (q, k, grad_out, probs_t, grad_scores, grads)
    strides = (
        *q.stride(),
        *k.stride(),
        *grad_out.stride(),
        *grad_scores.stride()[1:3],
        grad_scores.stride(0),
        *grads.stride()[:3],
    )
    grid = (batch * row_blocks * d_blocks,)
    args = (*pointers, length, probs_t.shape[-1], row_blocks, d_blocks, *strides)
    return Launch(_grads_backward_kernel, grid, args, _mix_meta(s))


def attention_calibration_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, LaunchSettings]:
    """Launch the two forward kernels; returns (out [B, L, d], P fp32 and P^T in q's dtype [B, L, Lp], the settings)."""
    batch, length, width = q.shape
    settings = launch_settings(batch, length, width, q.dtype)
    probs = square_buffer(batch, length, 1, q.device, torch.float32)[0]
    probs_t = square_buffer(batch, length, 1, q.device, q.dtype)[0]
    out = torch.empty((batch, length, width), device=q.device, dtype=q.dtype)
    probs_launch(q, k, probs, probs_t, scale, settings)()
    output_launch(probs, v, out, settings)()
    return out, probs, probs_t, settings


# The kernels as two operators registered with torch.library, so that torch.compile keeps them inside its graph (a
# graph break at every adapter call otherwise) and knows their output shapes without running them (the fake
# implementations). The forward returns what the backward reads (P in fp32, P^T in the input dtype); the backward
# returns dQ, dK, dV stacked in one [3, B, L, d] tensor, since an operator's outputs may not be views of one buffer.
OPERATOR_NAMESPACE = "sur_cache"


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::attention_calibration_forward", mutates_args=())
def attention_calibration_forward_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, L, d], P fp32 [B, L, Lp], P^T in q's dtype [B, L, Lp]) of the two forward kernels."""
    out, probs, probs_t, _ = attention_calibration_forward(q, k, v, scale)
    return out, probs, probs_t


@attention_calibration_forward_op.register_fake
def _forward_fake(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    batch, length, _ = q.shape
    padded = (length + 15) // 16 * 16  # square_buffer's row padding, written for symbolic lengths too
    return (
        q.new_empty(q.shape),
        q.new_empty((batch, length, padded), dtype=torch.float32),
        q.new_empty((batch, length, padded)),
    )


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::attention_calibration_backward", mutates_args=())
def attention_calibration_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor, probs_t: Tensor, scale: float
) -> Tensor:
    """[3, B, L, d]: dQ, dK, dV of the two backward kernels (the launch settings are recomputed from the shapes)."""
    settings = launch_settings(*q.shape, q.dtype)
    grad_scores = square_buffer(*q.shape[:2], 2, q.device, q.dtype)
    grads = torch.empty((3, *q.shape), device=q.device, dtype=q.dtype)
    scores_backward_launch(grad_out, v, probs, grad_scores, scale, settings)()
    grads_backward_launch(q, k, grad_out, probs_t, grad_scores, grads, settings)()
    return grads


@attention_calibration_backward_op.register_fake
def _backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor, probs_t: Tensor, scale: float
) -> Tensor:
    return q.new_empty((3, *q.shape))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, scale = inputs
    _, probs, probs_t = output
    ctx.save_for_backward(q, k, v, probs, probs_t)
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor, _grad_probs, _grad_probs_t) -> tuple[Tensor, Tensor, Tensor, None]:
    """The incoming gradients of P and P^T are ignored: they are outputs for the backward only, read by nothing."""
    q, k, v, probs, probs_t = ctx.saved_tensors
    grads = attention_calibration_backward_op(grad_out, q, k, v, probs, probs_t, ctx.scale)
    return grads[0], grads[1], grads[2], None


attention_calibration_forward_op.register_autograd(_backward, setup_context=_setup_context)


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
        return attention_calibration_forward_op(q, k, v, scale)[0]
    return attention_calibration_reference(q, k, v, scale)
