"""The CLIP score (a tiny CLIP saved and loaded as `--clip` loads one, equal to CLIPModel called directly) and the
paired statistics on constructed cases: all wins, all losses, ties, the bootstrap interval."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from sur_cache.scoring import ClipScorer, PromptResult, summarise, summarise_by_category
from sur_cache.tiny_models import TINY_RESOLUTION, build_tiny_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return ClipScorer.from_pretrained(str(clip_folder))


def _images(count: int, size: tuple[int, int] = (TINY_RESOLUTION, TINY_RESOLUTION)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _direct_score(model, processor, image: Image.Image, text: str) -> float:
    """The CLIP score from the library alone: one image, one text, CLIPModel's own logits over its logit scale."""
    inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
        return float(100 * output.logits_per_image[0, 0] / model.logit_scale.exp())


def test_a_saved_tiny_clip_scores_as_clipmodel_called_directly(clip_folder, scorer):
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    images = _images(3) + _images(1, size=(24, 40))  # the processor resizes and crops another size
    texts = ["two cats share a sunny windowsill", "a red bicycle"]  # of different lengths: padded in one batch
    scores = scorer.scores(images, texts)
    assert scores.shape == (4, 2)
    direct = [[_direct_score(model, processor, image, text) for text in texts] for image in images]
    np.testing.assert_allclose(scores, direct, atol=1e-4)
    assert len({round(value, 4) for value in scores.ravel()}) == scores.size  # each pair scores differently


def test_a_clip_that_cannot_be_loaded_is_an_oserror_naming_clip(tmp_path):
    with pytest.raises(OSError, match=r"--clip .*missing.*CLIPModel.save_pretrained"):
        ClipScorer.from_pretrained(str(tmp_path / "missing"))


def test_a_non_finite_score_is_refused(clip_folder):
    model = CLIPModel.from_pretrained(clip_folder)
    with torch.no_grad():
        model.visual_projection.weight.fill_(float("nan"))
    broken = ClipScorer(model, CLIPProcessor.from_pretrained(clip_folder))
    with pytest.raises(ValueError, match="non-finite score"):
        broken.scores(_images(1), ["a red bicycle"])


# ------------------------------------------------------------------------------------------ the paired statistics


def _results(differences, base=50.0, category="counting", seeds=2) -> list[PromptResult]:
    """One prompt per difference: every seed's base score `base`, every adapted score `base + difference`."""
    return [
        PromptResult(index, category, (base,) * seeds, (base + difference,) * seeds)
        for index, difference in enumerate(differences)
    ]


def test_all_wins():
    summary = summarise("all", _results([1.0, 2.0, 3.0, 0.5]))
    assert (summary.wins, summary.win_rate, summary.prompts) == (4, 1.0, 4)
    assert summary.difference == pytest.approx(1.625)
    assert summary.adapted_mean - summary.base_mean == pytest.approx(summary.difference)
    assert 0 < summary.difference_interval[0] <= summary.difference <= summary.difference_interval[1]


def test_all_losses():
    summary = summarise("all", _results([-1.0, -2.0, -0.25]))
    assert (summary.wins, summary.win_rate) == (0, 0.0)
    assert summary.difference_interval[1] < 0


def test_ties_are_not_wins_and_have_a_zero_width_interval():
    summary = summarise("all", _results([0.0, 0.0, 0.0]))
    assert (summary.wins, summary.win_rate, summary.difference) == (0, 0.0, 0.0)
    assert summary.difference_interval == (0.0, 0.0)


def test_a_prompt_difference_is_the_mean_over_its_paired_seeds():
    result = PromptResult(0, "colour", base=(10.0, 20.0, 30.0), adapted=(12.0, 19.0, 33.0))
    assert result.difference == pytest.approx(4 / 3)
    assert result.win
    assert (result.base_mean, result.adapted_mean) == (pytest.approx(20.0), pytest.approx(64 / 3))


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    widths = []
    for count in (10, 40, 160):
        summary = summarise("all", _results(rng.normal(1.0, 2.0, count)))
        low, high = summary.difference_interval
        assert low < summary.difference < high
        assert summary.base_interval[0] <= summary.base_mean <= summary.base_interval[1]
        assert summary.adapted_interval[0] < summary.adapted_mean < summary.adapted_interval[1]
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_a_fixed_seed_gives_the_same_interval():
    results = _results(np.random.default_rng(2).normal(0.0, 1.0, 12))
    assert summarise("all", results) == summarise("all", results)
    assert summarise("all", results, seed=1).difference_interval != summarise("all", results).difference_interval


def test_categories_are_summarised_apart_in_order_of_first_appearance():
    results = _results([1.0, 1.0], category="colour") + _results([-1.0], category="action")
    results.append(PromptResult(3, "colour", (0.0,), (3.0,)))
    summaries = summarise_by_category(results)
    assert [(s.group, s.prompts, s.wins) for s in summaries] == [("colour", 3, 3), ("action", 1, 0)]
    assert summaries[0].difference == pytest.approx(5 / 3)


def test_an_empty_group_is_refused():
    with pytest.raises(ValueError, match="no prompt"):
        summarise("counting", [])
