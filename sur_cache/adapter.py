"""The SUR-adapter: a small network that rewrites a simple prompt's CLIP embedding before the frozen UNet sees it.

Math (DESIGN.md section 3), for the simple-prompt CLIP embedding `x [B, L, d]`:

    h = TransformerEncoder(x)                       2 post-norm layers, 8 heads, feed-forward 2048, ReLU, dropout 0.1
    A = softmax(Q K^T / sqrt(d)) V + V              Q = query_layer(h), K = key_layer(x), V = x   (`calibrate`)
    R = MLP(A) + A                                  MLP = Linear -> ReLU -> Linear, all d -> d
    out = w * fc(R) + (1 - w) * x                   fc.weight starts at zero, so a fresh adapter ignores R

`h` is returned too: the distillation loss pulls it towards the projected LLM feature (`project_llm`).

Parameter names follow the reference implementation's state dict, so a reference checkpoint imports by a plain
key check (`sur_cache.stages.import_reference`). The one behavioural difference is the transformer's layout: the
reference builds its layers with `batch_first=False` but feeds them `[B, L, d]`, so their self-attention mixes the
samples of a batch and never the tokens of a prompt. sur-cache attends across tokens; `reference_compat=True`
reproduces the reference (at batch 1, as in the reference run, every token then passes through the encoder on its
own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from sur_cache.adapter_config import ATTENTION_BACKENDS, ATTENTION_CHOICES, AdapterConfig  # noqa: F401 - torch-free

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_REPAIR = "pass another copy of the adapter (RUN_DIR/adapter or a checkpoint's adapter/ folder) or train it again"


class AdapterOutput(NamedTuple):
    """`embedding`: the adapted CLIP embedding `[B, L, d]` for the UNet; `h`: the encoder output `[B, L, d]`."""

    embedding: Tensor
    h: Tensor


def resolve_attention(choice: str, device: torch.device | str) -> str:
    """Map the commands' `auto` to a backend: the fused kernel on CUDA, eager elsewhere; other names pass through."""
    if choice == "auto":
        return "fused" if torch.device(device).type == "cuda" else "eager"
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    return choice


def calibrate(q: Tensor, k: Tensor, v: Tensor, backend: str = "eager") -> Tensor:
    """Attention calibration `softmax(q k^T / sqrt(d)) v + v` over `[B, L, d]` inputs, one head of width d.

    "eager" is the reference's matmul + softmax; "sdpa" is PyTorch's scaled_dot_product_attention plus the residual;
    "fused" is the Triton kernel of `sur_cache.kernels`, imported only when asked for. The kernel takes one dtype,
    while under autocast q and k come out of their Linear layers in half precision and v (the adapter input) does
    not: k and v are cast to q's dtype for it.
    """
    if backend == "eager":
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return torch.matmul(torch.softmax(scores, dim=-1), v) + v
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v) + v
    if backend == "fused":
        from sur_cache.kernels import attention_calibration

        return attention_calibration(q, k.to(q.dtype), v.to(q.dtype))
    raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")


class AttentionCalibration(nn.Module):
    """`R = MLP(A) + A` with `A = calibrate(query_layer(h), key_layer(x), x)`.

    The reference also defines a value projection that its forward never uses; it is left out here and ignored
    on import.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query_layer = nn.Linear(width, width)
        self.key_layer = nn.Linear(width, width)
        self.output_layer = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, h: Tensor, x: Tensor, backend: str) -> Tensor:
        calibrated = calibrate(self.query_layer(h), self.key_layer(x), x, backend)
        return self.output_layer(calibrated) + calibrated


class SURAdapter(nn.Module):
    """The adapter of DESIGN.md section 3 plus the LLM projection `llm_proj: Linear(llm_width -> width)`."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        layer = nn.TransformerEncoderLayer(
            d_model=config.width,
            nhead=config.num_heads,
            dim_feedforward=config.feedforward,
            dropout=config.dropout,
            activation="relu",
            batch_first=not config.reference_compat,
        )
        self.transformer_encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.attention = AttentionCalibration(config.width)
        self.fc = nn.Linear(config.width, config.width)
        # As in the reference, only the weight starts at zero: a fresh adapter returns (1 - w) x + w fc.bias, and
        # the calibration layers receive gradient once fc.weight has left zero (after the first optimizer step).
        nn.init.zeros_(self.fc.weight)
        self.llm_proj = nn.Linear(config.llm_width, config.width)
        if config.llm_proj_seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.llm_proj_seed)
                self.llm_proj.reset_parameters()
        self.llm_proj.requires_grad_(not config.freeze_llm_proj)

    def forward(self, x: Tensor) -> AdapterOutput:
        """Adapt `x [B, L, width]`; see the module docstring for the math."""
        h = self.transformer_encoder(x)
        calibrated = self.attention(h, x, self.config.attention)
        w = self.config.adapter_weight
        return AdapterOutput(w * self.fc(calibrated) + (1 - w) * x, h)

    def project_llm(self, llm: Tensor) -> Tensor:
        """Map pooled LLM features `[B, llm_width]` to the CLIP width `[B, width]` (the distillation teacher)."""
        return self.llm_proj(llm)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `model.safetensors` (all weights, the LLM projection included) and `config.json` into `folder`.

        `config.json` records the weights file's sha256, so a flipped byte in it is refused on load.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        weights = save(tensors, metadata={"format": "pt"})
        (folder / WEIGHTS_FILE).write_bytes(weights)
        config = {
            "format_version": FORMAT_VERSION,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            **dataclasses.asdict(self.config),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, attention: str | None = None) -> SURAdapter:
        """Load a folder written by `save_pretrained`, in eval mode on the CPU; `attention` overrides the backend.

        Raises ValueError, naming the file and the fix, for weights that are not a safetensors file, that differ
        from the sha256 `config.json` recorded, that do not fit `config.json`, or that hold a NaN or inf.
        """
        folder = Path(folder)
        config, weights_sha256 = _read_saved_config(folder)
        if attention is not None:
            config = dataclasses.replace(config, attention=attention)
        adapter = cls(config)
        tensors = _read_weights(folder / WEIGHTS_FILE, weights_sha256)
        problems = state_dict_problems(adapter.state_dict(), tensors)
        if problems:
            raise ValueError(
                f"{folder / WEIGHTS_FILE} does not fit the adapter {folder / CONFIG_FILE} describes "
                f"({len(problems)} problems): the two files come from different adapters; {_REPAIR}.\n  "
                + "\n  ".join(problems)
            )
        non_finite = [
            f"{name} ({int((~tensor.isfinite()).sum())} of {tensor.numel()})"
            for name, tensor in ((name, tensors[name]) for name in adapter.state_dict())
            if not tensor.isfinite().all()
        ]
        if non_finite:
            raise ValueError(
                f"{folder / WEIGHTS_FILE}: weights are not finite (NaN or inf) in {', '.join(non_finite)}: the run "
                f"that saved them diverged, and every image would be noise or black; {_REPAIR} (with a lower --lr)."
            )
        adapter.load_state_dict(tensors)
        return adapter.eval()


def _read_weights(path: Path, weights_sha256: str | None) -> dict[str, Tensor]:
    """The tensors of a safetensors file, read once and checked against the sha256 recorded at save time."""
    data = path.read_bytes()
    if weights_sha256 is not None and hashlib.sha256(data).hexdigest() != weights_sha256:
        raise ValueError(
            f"{path}: its sha256 differs from the one {CONFIG_FILE} recorded when the adapter was saved, so the "
            f"file is corrupt or was replaced; {_REPAIR}."
        )
    try:
        return load(data)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); {_REPAIR}.") from error


def state_dict_problems(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    """One line per key missing from `found`, unknown to `expected`, or of another shape."""
    lines = [f"missing: {name}" for name in sorted(set(expected) - set(found))]
    lines += [f"unknown: {name}" for name in sorted(set(found) - set(expected))]
    return lines + [
        f"wrong shape: {name}: expected {tuple(expected[name].shape)}, found {tuple(found[name].shape)}"
        for name in sorted(set(found) & set(expected))
        if found[name].shape != expected[name].shape
    ]


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    """Read and validate `config.json` of an adapter folder, with errors that say what to pass instead."""
    return _read_saved_config(Path(folder))[0]


def _read_saved_config(folder: Path) -> tuple[AdapterConfig, str | None]:
    """`config.json`'s AdapterConfig and the weights' sha256 it recorded (None: saved by an older sur-cache)."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} is not a sur-cache adapter folder: {name} is missing. Pass the folder written by "
                "`sur-cache train` (RUN_DIR/adapter or a checkpoint's adapter/) or by `sur-cache import-reference`."
            )
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({error}); re-save the adapter.") from error
    version = raw.pop("format_version", None)
    weights_sha256 = raw.pop("weights_sha256", None)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE}: adapter format_version {version!r} is not supported "
            f"(this sur-cache reads version {FORMAT_VERSION}); re-save it with a matching sur-cache."
        )
    fields = {field.name for field in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(raw) - fields)
    missing = sorted(field.name for field in dataclasses.fields(AdapterConfig) if field.name not in raw)
    if unknown or missing:
        raise ValueError(
            f"{folder / CONFIG_FILE} does not match AdapterConfig: unknown keys {unknown}, missing keys {missing}."
        )
    return AdapterConfig(**raw), weights_sha256
