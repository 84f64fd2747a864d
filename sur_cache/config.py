"""One frozen dataclass per stage, built from the CLI options and passed down to functions.

Config flows one way: click options -> these dataclasses -> the stage functions. Nothing here is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImportReferenceConfig:
    """`sur-cache import-reference`: a reference `adapter_checkpoint*.pt` -> a sur-cache adapter folder."""

    checkpoint: Path
    out: Path
    adapter_weight: float
    llm_width: int = 5120
    llm_proj_seed: int = 0
    num_heads: int = 8
    overwrite: bool = False


@dataclass(frozen=True)
class GenerateConfig:
    """`sur-cache generate`: prompts -> images from the stock Stable Diffusion pipeline with a trained adapter."""

    sd: str
    adapter: Path
    prompts: tuple[str, ...]
    out: Path
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    seeds: tuple[int, ...] = (0,)
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    compare: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.prompts:
            problems.append("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
        if self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if not self.seeds:
            problems.append("no seed: pass --seed N or --num-seeds N")
        for name in ("height", "width"):
            size = getattr(self, name)
            if size is not None and (size < 8 or size % 8):
                problems.append(f"--{name} must be a positive multiple of 8, got {size}")
        if problems:
            raise ValueError("invalid generate options: " + "; ".join(problems))
