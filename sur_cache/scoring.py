"""How `sur-cache evaluate` scores images and compares the base and the adapted variant.

**The score** is the CLIP score, `100 * cos(E_image, E_text)` of a CLIP model's projected image and text
embeddings, computed by `transformers.CLIPModel` (its forward's `image_embeds` and `text_embeds`) with the model's
own `CLIPProcessor`. It equals torchmetrics' `CLIPScore` wherever the cosine is positive (for a real CLIP, every
image and caption in practice); torchmetrics itself is not used because its 1.9 release cannot run with
transformers 5 (it calls `.norm()` on what `get_image_features` now returns, an output object, not a tensor).
Unlike torchmetrics, a negative cosine is not clamped to 0, so that no paired difference is hidden by the clamp.
Texts longer than the CLIP text encoder's positions are truncated, as the Stable Diffusion text encoder truncates
them.

**The comparison** is paired: a prompt's base and adapted images share their seeds and settings, so per prompt the
difference is the mean over its seeds of adapted minus base, and a win is a positive difference (a tie, 0, is not
a win). Per group of prompts (a category, or all): the mean of each variant, the mean difference with a 95%
percentile-bootstrap interval, and the win rate. The bootstrap resamples prompts, not images: the seeds of one
prompt are not independent samples of the prompt set. It is seeded, so the same scores give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

VARIANTS = ("base", "adapted")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------------------ the CLIP score


class ClipScorer:
    """A CLIP model and its processor, loaded once, scoring images against texts on one device."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | str = "cpu") -> ClipScorer:
        """Load `CLIPModel` and `CLIPProcessor` from a hub id or a folder (both saved with `save_pretrained`)."""
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name_or_path)
            processor = CLIPProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise OSError(
                f"--clip {name_or_path}: cannot load a CLIP model and processor ({error}); pass a hub id such as "
                "openai/clip-vit-large-patch14 or a folder holding both, written by CLIPModel.save_pretrained and "
                "CLIPProcessor.save_pretrained"
            ) from error
        return cls(model.to(device), processor)

    @torch.inference_mode()
    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """`[len(images), len(texts)]` CLIP scores (float64), one forward for all of them."""
        inputs = self.processor(
            text=list(texts),
            images=[image.convert("RGB") for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        device = next(self.model.parameters()).device
        output = self.model(**{name: value.to(device) for name, value in inputs.items()})
        cosine = output.image_embeds.float() @ output.text_embeds.float().T  # both are unit vectors
        scores = (100 * cosine).double().cpu().numpy()
        if not np.isfinite(scores).all():
            raise ValueError(
                f"the CLIP model gave a non-finite score for {texts!r}; its weights or these images hold NaN or "
                "inf: check --clip, and run in float32 (--dtype float32) if the images came out of float16 as NaN"
            )
        return scores


# ------------------------------------------------------------------------------------------- the paired statistics


@dataclass(frozen=True)
class PromptResult:
    """One prompt's scores against one text (the simple or the complex prompt), a value per seed for each variant."""

    index: int
    category: str
    base: tuple[float, ...]
    adapted: tuple[float, ...]

    @property
    def base_mean(self) -> float:
        return float(np.mean(self.base))

    @property
    def adapted_mean(self) -> float:
        return float(np.mean(self.adapted))

    @property
    def difference(self) -> float:
        """Mean over seeds of adapted minus base (the seeds are paired)."""
        return float(np.mean(np.subtract(self.adapted, self.base)))

    @property
    def win(self) -> bool:
        return self.difference > 0


@dataclass(frozen=True)
class GroupSummary:
    """Base and adapted means over a group of prompts, their mean difference with its interval, and the win rate.

    Each `*_interval` is the 95% percentile-bootstrap interval of that mean, over the same resamples of prompts.
    """

    group: str
    prompts: int
    base_mean: float
    adapted_mean: float
    difference: float
    difference_interval: tuple[float, float]
    base_interval: tuple[float, float]
    adapted_interval: tuple[float, float]
    wins: int
    win_rate: float


def summarise(group: str, results: Sequence[PromptResult], *, seed: int = BOOTSTRAP_SEED) -> GroupSummary:
    """The summary of `results` (at least one prompt), its intervals from `BOOTSTRAP_RESAMPLES` seeded resamples."""
    if not results:
        raise ValueError(f"group {group!r} has no prompt to summarise")
    base = np.array([result.base_mean for result in results])
    adapted = np.array([result.adapted_mean for result in results])
    resamples = np.random.default_rng(seed).integers(0, len(results), size=(BOOTSTRAP_RESAMPLES, len(results)))
    wins = sum(result.win for result in results)
    return GroupSummary(
        group=group,
        prompts=len(results),
        base_mean=float(base.mean()),
        adapted_mean=float(adapted.mean()),
        difference=float((adapted - base).mean()),
        difference_interval=bootstrap_interval(adapted - base, resamples),
        base_interval=bootstrap_interval(base, resamples),
        adapted_interval=bootstrap_interval(adapted, resamples),
        wins=wins,
        win_rate=wins / len(results),
    )


def bootstrap_interval(values: np.ndarray, resamples: np.ndarray) -> tuple[float, float]:
    """The `CONFIDENCE` percentile interval of the mean of `values` over `resamples` (rows of indices into values)."""
    means = values[resamples].mean(axis=1)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarise_by_category(results: Sequence[PromptResult]) -> list[GroupSummary]:
    """One summary per category, in the order the categories first appear."""
    categories = list(dict.fromkeys(result.category for result in results))
    return [summarise(name, [result for result in results if result.category == name]) for name in categories]
