"""`sur-cache train --compile`: which part of the training step torch.compile takes, and in which mode.

The compiled region is the adapter with its two KL terms (`adapter_terms` in stages/train.py): its forward, and
through AOTAutograd its backward, become one graph each instead of ~160 small kernels launched one by one from
Python. That is where the host time of a step goes: the frozen UNet is a few large kernels that keep the GPU busy,
and the optimizer is already one fused AdamW kernel on CUDA. The fused attention kernel is a `torch.library`
operator (kernels/attention_calibration.py), so it sits inside the graph rather than breaking it.

Shapes are static (`dynamic=False`): the loader yields full batches only (an epoch's last partial batch is dropped,
sur_cache/loader.py `batches_per_epoch`), so one graph serves the whole run. Validation, whose last batch may be
partial and which runs in eval mode, stays eager: it is rare, and compiling it would add graphs for every shape.

Modes are torch.compile's: `default` (inductor kernels), `reduce-overhead` (the same, replayed from CUDA graphs:
one launch per graph, the mode that removes the host cost on a GPU), `max-autotune` (also searches matmul and
kernel configurations, and uses CUDA graphs; minutes of compile time). `auto` is `reduce-overhead` on CUDA and
`none` on the CPU, where nothing is launched: there the compiled features-only step measured slower than the eager
one, after minutes of compile (docs/train.md). The optimizer is not compiled, features-only included: AdamW is
fused (one operator for all parameters) and clipping a few foreach kernels on CUDA (docs/train.md says why).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sur_cache.choices import COMPILE_CHOICES, COMPILE_MODES  # defined there (torch-free), owned here

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_compile(choice: str, device: torch.device | str) -> str:
    """Map `auto` to `reduce-overhead` on CUDA and `none` elsewhere; the modes pass through."""
    if choice == "auto":
        return "reduce-overhead" if torch.device(device).type == "cuda" else "none"
    if choice not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    return choice


def compiled(function: Callable, mode: str) -> Callable:
    """`function` compiled in `mode` with static shapes, or `function` itself for `none`."""
    if mode == "none":
        return function
    return torch.compile(function, mode=mode, dynamic=False)


def mark_step(mode: str) -> None:
    """Tell CUDA-graph trees that a new micro-batch begins, so that the previous replay's outputs (already consumed:
    backward ran, the logged values were copied) may be overwritten by the next one."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
