"""`sur-cache import-reference`: a reference `adapter_checkpoint*.pt` -> a sur-cache adapter folder in compat mode.

The reference training script saves `adapter.state_dict()` with `torch.save`. Its parameter names are the ones
`SURAdapter` uses (sur_cache/adapter.py), so the import is a key and shape check; the width, depth and feed-forward
width are read from the shapes, the head count and the adapter weight come from the options (the checkpoint does
not record them). The file is read with `weights_only=True`, after `torch_files` has checked its zip archive does
not inflate far beyond its size. The reference never saved its LLM projection: the imported one is freshly
initialised from `--llm-proj-seed` and frozen.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from sur_cache.adapter import AdapterConfig, SURAdapter, state_dict_problems
from sur_cache.config import ImportReferenceConfig
from sur_cache.torch_files import refuse_inflating_archive

# Present in reference checkpoints but unused by the reference forward: the template layer that
# nn.TransformerEncoder deep-copies, and the value projection.
REFERENCE_IGNORED_PREFIXES = ("encoder_layer.", "attention.value_layer.")
_LAYER_KEY = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint whose keys or shapes do not match the reference adapter."""


def reference_adapter_config(
    state_dict: dict[str, Tensor],
    *,
    adapter_weight: float,
    llm_width: int,
    llm_proj_seed: int,
    num_heads: int = AdapterConfig.num_heads,
) -> AdapterConfig:
    """The compat-mode config of a reference state dict: width, depth and feed-forward read from the shapes.

    The head count is not visible in the weights (the packed in-projection is `[3d, d]` for any count); the
    reference hard-codes AdapterConfig's default, 8.
    """
    width_keys = ("fc.weight", "attention.query_layer.weight", "attention.key_layer.weight")
    width = next((state_dict[key].shape[-1] for key in width_keys if key in state_dict), None)
    layers = {int(match.group(1)) for key in state_dict if (match := _LAYER_KEY.match(key))}
    if width is None or not layers:
        raise ReferenceCheckpointError(
            "not a reference SUR-adapter state dict: cannot infer the width (none of "
            f"{', '.join(width_keys)}) or the depth (no transformer_encoder.layers.N.* keys); "
            f"found keys: {sorted(state_dict)[:20]}"
        )
    ff_key = "transformer_encoder.layers.0.linear1.weight"
    feedforward = state_dict[ff_key].shape[0] if ff_key in state_dict else AdapterConfig.feedforward
    try:
        return AdapterConfig(
            width=width,
            llm_width=llm_width,
            num_layers=max(layers) + 1,
            num_heads=num_heads,
            feedforward=feedforward,
            adapter_weight=adapter_weight,
            reference_compat=True,
            freeze_llm_proj=True,
            llm_proj_seed=llm_proj_seed,
        )
    except ValueError as error:  # an option that does not fit the checkpoint (--num-heads, --llm-width)
        raise ReferenceCheckpointError(f"{error}; fix --num-heads or --llm-width") from error


def adapter_from_reference(state_dict: dict[str, Tensor], config: AdapterConfig) -> SURAdapter:
    """Build a compat-mode adapter holding a reference state dict; one error lists every bad key.

    The reference never saved its LLM projection, so `llm_proj` keeps its fresh, seeded initialisation.
    """
    adapter = SURAdapter(config)
    expected = {name: tensor for name, tensor in adapter.state_dict().items() if not name.startswith("llm_proj.")}
    used = {name: tensor for name, tensor in state_dict.items() if not name.startswith(REFERENCE_IGNORED_PREFIXES)}
    lines = state_dict_problems(expected, used)
    if lines:
        raise ReferenceCheckpointError(
            f"the checkpoint does not match a reference adapter of width {config.width}, {config.num_layers} "
            f"layers, feed-forward {config.feedforward} ({len(lines)} problems):\n  " + "\n  ".join(lines)
        )
    adapter.load_state_dict({name: tensor.float() for name, tensor in used.items()}, strict=False)
    return adapter.eval()


def run_import_reference(config: ImportReferenceConfig) -> Path:
    """Read the checkpoint (weights only, its archive size checked first), build the compat-mode adapter, write its
    folder; returns the folder. Raises FileExistsError for a non-empty --out without --overwrite, and
    ReferenceCheckpointError (a ValueError) for a file that is no reference adapter or options that do not fit it."""
    if config.out.exists() and any(config.out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{config.out} exists and is not empty; choose another --out or pass --overwrite.")
    refuse_inflating_archive(config.checkpoint, "CHECKPOINT")
    try:
        state_dict = torch.load(config.checkpoint, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ReferenceCheckpointError(
            f"{config.checkpoint} cannot be read as a weights-only PyTorch checkpoint ({error}); "
            "pass an adapter_checkpoint<step>.pt written by the reference training script."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(value, Tensor) for value in state_dict.values()):
        raise ReferenceCheckpointError(
            f"{config.checkpoint} does not hold a state dict of tensors (found {type(state_dict).__name__}); "
            "pass an adapter_checkpoint<step>.pt written by the reference training script."
        )
    adapter_config = reference_adapter_config(
        state_dict,
        adapter_weight=config.adapter_weight,
        llm_width=config.llm_width,
        llm_proj_seed=config.llm_proj_seed,
        num_heads=config.num_heads,
    )
    return adapter_from_reference(state_dict, adapter_config).save_pretrained(config.out)
