"""One frozen dataclass per stage, built from the CLI options and passed down to functions.

Config flows one way: click options -> these dataclasses -> the stage functions. Nothing here is global. This
module imports neither torch nor zarr (the command line reads it for `--help`; tests/test_cli.py checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, get_args

from sur_cache.adapter_config import ATTENTION_CHOICES, AdapterConfig
from sur_cache.choices import (
    AUTO,
    COMPILE_CHOICES,
    COMPRESSIONS,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_COMPRESSION,
    DEFAULT_SHARD_ROWS,
    DTYPE_CHOICES,
    DTYPE_NAMES,
    LLM_ALIASES,
    CropMode,
    Pooling,
)
from sur_cache.eval_prompts import bundled_prompts_path
from sur_cache.locations import StorageOptions
from sur_cache.teacher_layers import check_teacher_choice, parse_layer_list

# The choices of the stages' options, each defined once here or by the module that owns the idea; the CLI offers
# exactly these (tests/test_cli.py checks every click.Choice against its config's CHOICES).
LLM_POOLINGS = get_args(Pooling)  # how models.encode_llm pools a layer's states
CROP_MODES = get_args(CropMode)  # how dataset.preprocess crops
LLM_DTYPES = DTYPE_NAMES
STORE_DTYPES = ("float16", "float32")  # fp16 by default: half the bytes, every feature checked to fit (docs/store.md)
LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
PRELOAD = ("none", "cpu", "device")
REFERENCE_MAX_STEPS = 5000  # the reference run's length, used when neither --max-steps nor --epochs is given


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice_problems(config, choices: dict[str, tuple[str, ...]]) -> list[str]:
    """One line per field of `config` whose value is not among its choices."""
    return [
        f"{_option(name)} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}"
        for name, allowed in choices.items()
        if getattr(config, name) not in allowed
    ]


@dataclass(frozen=True)
class ExtractConfig:
    """`sur-cache extract`: a SURD folder -> a feature store (CLIP, VAE and LLM features, computed once)."""

    data: Path
    out: str
    sd: str
    llm: str | None = None
    llm_features: Path | None = None
    resolution: int | None = None  # None: the model family's (models.DEFAULT_RESOLUTION)
    batch_size: int = 16
    llm_batch_size: int | None = None  # None: auto, from the GPU's free memory (sur_cache/memory_plan.py)
    device: str = AUTO
    sd_dtype: str = AUTO
    vae_dtype: str = AUTO  # auto: float32 for an SDXL VAE that asks to be upcast (fp16 overflows), else --sd-dtype
    llm_layer: int = -1
    llm_layers: str | None = None  # "20,30,39" or "all": several layers, `llm` [N, L, D] (sur_cache/teacher_layers.py)
    llm_pooling: str = "mean"
    llm_per_token: bool = False
    llm_chat_template: bool = False
    llm_8bit: bool = True
    llm_dtype: str = "float16"
    overlap: bool | None = None  # None: auto, on a GPU when CLIP, the VAE and the LLM fit together (memory_plan)
    trust_remote_code: bool = False
    crop: str = "center"
    seed: int = 0
    flip_variants: bool = False
    store_dtype: str = "float16"
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    compression: str = DEFAULT_COMPRESSION
    num_workers: int | None = None
    text_column: str = "text"
    prompt_column: str = "prompt"
    image_column: str = "file_name"
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    storage_options: StorageOptions = StorageOptions()  # fsspec's, for an --out URL (--storage-option KEY=VALUE)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "llm_pooling": LLM_POOLINGS,
        "crop": CROP_MODES,
        "store_dtype": STORE_DTYPES,
        "llm_dtype": LLM_DTYPES,
        "sd_dtype": DTYPE_CHOICES,
        "vae_dtype": DTYPE_CHOICES,
        "compression": COMPRESSIONS,
    }

    def __post_init__(self) -> None:
        problems = []
        if (self.llm is None) == (self.llm_features is None):
            problems.append("pass exactly one LLM source: --llm MODEL or --llm-features FILE.pt")
        if self.llm_features is not None and self.llm_per_token:
            problems.append("--llm-per-token needs --llm: a --llm-features file holds one pooled vector per prompt")
        problems += self._llm_layer_problems()
        for name in ("resolution", "batch_size", "llm_batch_size", "shard_rows", "chunk_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"--num-workers must be >= 0, got {self.num_workers}")
        problems += _choice_problems(self, self.CHOICES)
        if problems:
            raise ValueError("invalid extract options: " + "; ".join(problems))

    def _llm_layer_problems(self) -> list[str]:
        """--llm-layers and --llm-chat-template against the options they exclude."""
        problems = []
        if self.llm_chat_template and self.llm_features is not None:
            problems.append("--llm-chat-template needs --llm: a --llm-features file was computed already")
        if self.llm_layers is None:
            return problems
        try:
            parse_layer_list(self.llm_layers)
        except ValueError as error:
            problems.append(str(error))
        if self.llm_features is not None:
            problems.append("--llm-layers needs --llm: a --llm-features file holds one layer")
        if self.llm_layer != -1:
            problems.append("pass --llm-layer N (one layer) or --llm-layers LIST (several), not both")
        if self.llm_per_token:
            problems.append(
                "--llm-per-token stores one layer's states per token: use it with --llm-layer, not --llm-layers"
            )
        return problems


@dataclass(frozen=True)
class ImportReferenceConfig:
    """`sur-cache import-reference`: a reference `adapter_checkpoint*.pt` -> a sur-cache adapter folder."""

    checkpoint: Path
    out: Path
    adapter_weight: float
    llm_width: int = LLM_ALIASES["llama-13b"][1]  # the reference's teacher
    llm_proj_seed: int = 0
    num_heads: int = AdapterConfig.num_heads  # the reference's, which its checkpoints do not record
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
    device: str = AUTO
    dtype: str = AUTO
    attention: str = AUTO
    compare: bool = False
    overwrite: bool = False

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"dtype": DTYPE_CHOICES, "attention": ATTENTION_CHOICES}

    def __post_init__(self) -> None:
        problems = _choice_problems(self, self.CHOICES)
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


@dataclass(frozen=True)
class TrainConfig:
    """`sur-cache train`: a feature store (or, with `online`, the images themselves) -> a trained SUR-adapter.

    Defaults follow the reference run (DESIGN.md section 4) except where docs/train.md says why not:
    the denoising gradient reaches the adapter (`detach_unet_input=False`) and the LLM projection learns.
    One optimizer step consumes `batch_size * gradient_accumulation` samples per process.
    """

    store: str
    sd: str
    out: Path
    # data
    batch_size: int = 1
    gradient_accumulation: int = 4
    max_steps: int | None = None
    epochs: int | None = None
    random_flip: bool = False
    buffer_shards: int = 4
    read_workers: int = 1
    mapped_reads: bool = True
    preload: str = "none"
    online: bool = False
    data: Path | None = None
    llm: str | None = None
    # the teacher: a stored layer's number, mean or norm-mean; None: the store's (last) layer (teacher_layers.py)
    llm_layer: str | None = None
    # adapter (its hyper-parameters' defaults are AdapterConfig's)
    adapter_weight: float = AdapterConfig.adapter_weight
    num_layers: int = AdapterConfig.num_layers
    num_heads: int = AdapterConfig.num_heads
    feedforward: int = AdapterConfig.feedforward
    dropout: float = AdapterConfig.dropout
    attention: str = AUTO
    reference_compat: bool = False
    freeze_llm_proj: bool = False
    # objective
    denoise_weight: float = 1.0
    llm_weight: float = 1e-5
    align_weight: float = 1e-5
    detach_unet_input: bool = False
    snr_gamma: float | None = None
    # optimisation
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    compile: str = AUTO  # torch.compile of the adapter and its losses: reduce-overhead on CUDA, none on the CPU
    seed: int = 0
    # run
    checkpoint_every: int = 500
    val_fraction: float = 0.0  # 0: no validation; else the share of the store's shards held out (at least one)
    val_every: int | None = None  # None: every checkpoint_every steps, so that each checkpoint has its validation
    resume: str | None = None
    device: str = AUTO
    storage_options: StorageOptions = StorageOptions()  # fsspec's, for a --store URL (--storage-option KEY=VALUE)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ATTENTION_CHOICES,
        "compile": COMPILE_CHOICES,
        "lr_schedule": LR_SCHEDULES,
        "mixed_precision": MIXED_PRECISION,
        "preload": PRELOAD,
    }

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "gradient_accumulation", "buffer_shards", "checkpoint_every"):
            if getattr(self, name) < 1:
                problems.append(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if self.read_workers < 0:
            problems.append(f"--read-workers must be >= 0, got {self.read_workers}")
        for name in ("max_steps", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("denoise_weight", "llm_weight", "align_weight", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{_option(name)} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.max_grad_norm <= 0:
            problems.append(f"--lr and --max-grad-norm must be > 0, got {self.lr} and {self.max_grad_norm}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"--snr-gamma must be > 0, got {self.snr_gamma}")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_every is not None and self.val_every < 1:
            problems.append(f"--val-every must be >= 1, got {self.val_every}")
        if self.val_every is not None and self.val_fraction == 0:
            problems.append("--val-every validates on the held-out shards: add --val-fraction F (> 0), or drop it")
        problems += _choice_problems(self, self.CHOICES)
        if (problem := check_teacher_choice(self.llm_layer)) is not None:
            problems.append(problem)
        if self.online and self.data is None:
            problems.append("--online computes the features from the images: pass --data DATASET_DIR")
        if not self.online and (self.data is not None or self.llm is not None):
            problems.append("--data and --llm are read by --online only: add --online, or drop them")
        if self.online and self.preload != "none":
            problems.append("--preload reads cached features; it has no meaning with --online")
        if self.features_only and self.detach_unet_input:
            problems.append("--detach-unet-input has no effect with --denoise-weight 0 (the UNet is skipped); drop one")
        if self.features_only and self.random_flip:
            problems.append("--random-flip picks flipped latents, which --denoise-weight 0 never reads; drop one")
        if problems:
            raise ValueError("invalid train options:\n  " + "\n  ".join(problems))

    @property
    def features_only(self) -> bool:
        """The UNet term has weight 0: skip the UNet and the latents entirely."""
        return self.denoise_weight == 0

    @property
    def validation_interval(self) -> int:
        """Optimizer steps between validations (and one at the end): --val-every, or --checkpoint-every."""
        return self.checkpoint_every if self.val_every is None else self.val_every

    @property
    def total_steps_cap(self) -> int | None:
        """--max-steps, or the reference's 5000 when neither --max-steps nor --epochs bounds the run."""
        if self.max_steps is None and self.epochs is None:
            return REFERENCE_MAX_STEPS
        return self.max_steps


DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # the CLIP score's usual model (torchmetrics' default too)


@dataclass(frozen=True)
class EvaluateConfig:
    """`sur-cache evaluate`: an adapter and a prompts file -> a report of CLIP scores with and without the adapter."""

    sd: str
    adapter: Path
    out: Path
    clip: str = DEFAULT_CLIP
    prompts: Path | None = None  # None: the bundled set
    seed: int = 0
    num_seeds: int = 4
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    device: str = AUTO
    dtype: str = AUTO
    overwrite: bool = False
    progress: bool = True

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"dtype": DTYPE_CHOICES}

    def __post_init__(self) -> None:
        problems = [
            f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
            for name, allowed in self.CHOICES.items()
            if getattr(self, name) not in allowed
        ]
        for name in ("num_seeds", "steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            size = getattr(self, name)
            if size is not None and (size < 8 or size % 8):
                problems.append(f"--{name} must be a positive multiple of 8, got {size}")
        if problems:
            raise ValueError("invalid evaluate options: " + "; ".join(problems))

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.num_seeds))

    @property
    def prompts_path(self) -> Path:
        return self.prompts if self.prompts is not None else bundled_prompts_path()
