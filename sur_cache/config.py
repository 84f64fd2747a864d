"""One frozen dataclass per stage, built from the CLI options and passed down to functions.

Config flows one way: click options -> these dataclasses -> the stage functions. Nothing here is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExtractConfig:
    """`sur-cache extract`: a SURD folder -> a feature store (CLIP, VAE and LLM features, computed once)."""

    data: Path
    out: str
    sd: str
    llm: str | None = None
    llm_features: Path | None = None
    resolution: int = 512
    batch_size: int = 16
    device: str = "auto"
    sd_dtype: str = "auto"
    llm_layer: int = -1
    llm_pooling: str = "mean"
    llm_per_token: bool = False
    llm_8bit: bool = True
    llm_dtype: str = "float16"
    llm_alongside: bool = False
    trust_remote_code: bool = False
    crop: str = "center"
    seed: int = 0
    flip_variants: bool = False
    store_dtype: str = "float16"
    shard_rows: int = 256
    num_workers: int | None = None
    text_column: str = "text"
    prompt_column: str = "prompt"
    image_column: str = "file_name"
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if (self.llm is None) == (self.llm_features is None):
            problems.append("pass exactly one LLM source: --llm MODEL or --llm-features FILE.pt")
        for name in ("resolution", "batch_size", "shard_rows"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"--num-workers must be >= 0, got {self.num_workers}")
        choices = {
            "llm_pooling": ("mean", "last"),
            "crop": ("center", "random"),
            "store_dtype": ("float16", "float32"),
            "llm_dtype": ("float16", "bfloat16", "float32"),
            "sd_dtype": ("auto", "float16", "bfloat16", "float32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("invalid extract options: " + "; ".join(problems))


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
