"""The PyTorch reference for attention calibration, shared by the tests and the benchmark.

`out = softmax(Q K^T * scale) V + V` for one head: q, k, v are [B, L, d]. Written as the adapter's eager code path
writes it (no upcasting), so that running it on low-precision inputs measures PyTorch's own rounding error; the tests
run it on fp32 copies to get the ground truth.
"""

import torch
from torch import Tensor


def attention_calibration_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """`softmax(q k^T * scale) v + v`, with `scale = 1 / sqrt(d)` unless given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v) + v
