"""The adapter's hyper-parameters (`AdapterConfig`) and attention backends, without torch.

The command line reads their defaults and choices for its options, and `sur-cache --help` should not import torch
for that; `sur_cache.adapter` (the model) re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_BACKENDS = ("eager", "sdpa", "fused")
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)  # the commands' --attention; `resolve_attention` maps auto


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild an adapter; written to `config.json` beside the weights.

    `attention` picks the implementation of the calibration core only (the numbers agree to rounding); it is a
    runtime choice that `from_pretrained(..., attention=...)` may override. `llm_proj_seed`, when set, seeds the
    LLM projection's initialisation independently of the global RNG, so a frozen projection is reproducible
    (its weights are saved in any case).
    """

    width: int
    llm_width: int
    num_layers: int = 2
    num_heads: int = 8
    feedforward: int = 2048
    dropout: float = 0.1
    adapter_weight: float = 0.1
    attention: str = "eager"
    reference_compat: bool = False
    freeze_llm_proj: bool = False
    llm_proj_seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("width", "llm_width", "num_layers", "num_heads", "feedforward"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width >= 1 and self.num_heads >= 1 and self.width % self.num_heads:
            problems.append(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ATTENTION_BACKENDS:
            problems.append(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if problems:
            raise ValueError("invalid AdapterConfig: " + "; ".join(problems))
