"""Which LLM layers extract stores (`--llm-layer` / `--llm-layers`) and which teacher tensor train distils from them
(`train --llm-layer`).

A store holds one layer (`llm` [N, D], manifest `llm_layer`) or several (`llm` [N, L, D], manifest `llm_layers`,
ascending). At train time the teacher of a batch's `llm` rows is, with h_l the stored pooled vector of layer l:

    a layer number l     h_l (it must be stored)
    mean                 (1 / L) * sum_l h_l
    norm-mean            (1 / L) * sum_l h_l / sqrt(mean_d(h_l ** 2) + NORM_EPS)   (RMS over the feature dim)

and the default is the store's single layer, or the last (deepest) stored layer of a multi-layer store, which is
the reference's choice (layer 39 of LLaMA-13B's 40). The normalisation acts on the pooled vectors the store holds,
per sample and per layer: it puts layers whose scales differ by orders of magnitude on one footing before averaging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module imports no torch: the command line's option checks use it
    import torch

    from sur_cache.store import Manifest

ALL_LAYERS = "all"  # `extract --llm-layers all`: every decoder layer
LAYER_REDUCTIONS = ("mean", "norm-mean")  # `train --llm-layer` choices besides a layer number
NORM_EPS = 1e-6  # of norm-mean's RMS, as in Llama's RMSNorm


# ------------------------------------------------------------------------------------------------------ extract


def parse_layer_list(spec: str) -> list[int] | None:
    """`--llm-layers` text -> its layer numbers as typed (negative count from the end), or None for `all`."""
    if spec.strip().lower() == ALL_LAYERS:
        return None
    try:
        layers = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"--llm-layers {spec!r}: expected comma-separated layer numbers (20,30,39) or 'all'") from None
    return layers


def resolve_layer_list(spec: str, count: int, model: str) -> tuple[int, ...]:
    """`--llm-layers` for a model of `count` decoder layers -> the 0-based layers, ascending; refuses repeats and
    layers out of range."""
    layers = parse_layer_list(spec)
    if layers is None:
        return tuple(range(count))
    outside = [layer for layer in layers if not -count <= layer < count]
    if outside:
        raise ValueError(f"--llm-layers {spec}: {outside} out of range: {model} has {count} layers (0..{count - 1})")
    resolved = sorted(layer % count for layer in layers)
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"--llm-layers {spec}: a layer is named twice (after counting negative ones from the end)")
    return tuple(resolved)


def extracted_layers(manifest: Manifest) -> int | tuple[int, ...]:
    """What `models.encode_llm` is asked for to reproduce the store's `llm` rows: one layer, or the tuple of them."""
    return manifest.llm_layer if manifest.llm_layers is None else manifest.llm_layers


# -------------------------------------------------------------------------------------------------------- train


def check_teacher_choice(choice: str | None) -> str | None:
    """A problem with `train --llm-layer` as typed (None when fine): a layer number >= 0 or a reduction."""
    if choice is None or choice in LAYER_REDUCTIONS or (choice.isdigit() and choice.isascii()):
        return None
    return (
        "--llm-layer must be a stored layer's number (0-based, as the store's manifest lists them) or one of "
        f"{', '.join(LAYER_REDUCTIONS)}, got {choice!r}"
    )


@dataclass(frozen=True)
class TeacherLayer:
    """The teacher tensor of a store: `reduction` ("mean", "norm-mean") or one layer at `position` on the llm_layer
    axis (None for a single-layer store, whose `llm` rows are the teacher as they are)."""

    reduction: str | None = None
    position: int | None = None

    def select(self, llm: torch.Tensor) -> torch.Tensor:
        """A batch's `llm` rows ([B, D], or [B, L, D] from a multi-layer store) -> the teacher [B, D]."""
        layered = llm if llm.ndim == 3 else llm[:, None]
        if self.reduction == "mean":
            return layered.mean(1)
        if self.reduction == "norm-mean":
            return rms_normalise(layered).mean(1)
        return layered[:, 0 if self.position is None else self.position]


def rms_normalise(states: torch.Tensor) -> torch.Tensor:
    """`states / sqrt(mean(states ** 2, last dim) + NORM_EPS)`, in float32."""
    states = states.float()
    return states * (states.pow(2).mean(-1, keepdim=True) + NORM_EPS).rsqrt()


def resolve_teacher(choice: str | None, manifest: Manifest, store: str) -> TeacherLayer:
    """`train --llm-layer` on the store at `store` -> its TeacherLayer; a layer the store lacks is refused naming
    the stored ones."""
    if choice in LAYER_REDUCTIONS:
        return TeacherLayer(reduction=choice)
    if manifest.llm_layers is not None:
        if choice is None:
            return TeacherLayer(position=len(manifest.llm_layers) - 1)
        if int(choice) in manifest.llm_layers:
            return TeacherLayer(position=manifest.llm_layers.index(int(choice)))
        stored = ", ".join(map(str, manifest.llm_layers))
        raise ValueError(f"--llm-layer {choice}: {store} holds LLM layers {stored} only; pass one of them, or mean")
    if choice is None or (manifest.llm_layer is not None and int(choice) == manifest.llm_layer):
        return TeacherLayer()
    if manifest.llm_layer is None:
        raise ValueError(
            f"--llm-layer {choice}: the LLM features of {store} come from a feature file (llm_features_file), "
            "whose layer the store does not record; drop --llm-layer"
        )
    raise ValueError(
        f"--llm-layer {choice}: {store} holds LLM layer {manifest.llm_layer} only; drop --llm-layer, or extract "
        f"several layers (`sur-cache extract ... --llm-layers {manifest.llm_layer},{choice}`)"
    )
