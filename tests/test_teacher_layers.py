"""The stored LLM layers (extract --llm-layers) and the teacher chosen from them (train --llm-layer)."""

import dataclasses

import pytest
import torch

from sur_cache.store import synthetic_manifest
from sur_cache.teacher_layers import (
    NORM_EPS,
    TeacherLayer,
    check_teacher_choice,
    extracted_layers,
    parse_layer_list,
    resolve_layer_list,
    resolve_teacher,
    rms_normalise,
)

SHAPES = dict(num_samples=4, clip_width=8, llm_width=6, latent_channels=4, latent_size=2)


def test_layer_lists_resolve_to_ascending_zero_based_layers():
    assert parse_layer_list("20, 30,39") == [20, 30, 39] and parse_layer_list("ALL") is None
    assert resolve_layer_list("39,20,-10", 40, "m") == (20, 30, 39)
    assert resolve_layer_list("all", 3, "m") == (0, 1, 2)
    with pytest.raises(ValueError, match=r"--llm-layers 1,40: \[40\] out of range: m has 40 layers \(0..39\)"):
        resolve_layer_list("1,40", 40, "m")
    with pytest.raises(ValueError, match="named twice"):
        resolve_layer_list("39,-1", 40, "m")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layer_list("20;30")


def test_the_encoder_is_asked_for_what_the_store_holds():
    single = synthetic_manifest(**SHAPES, llm_layer=7)
    assert extracted_layers(single) == 7
    assert extracted_layers(dataclasses.replace(single, llm_layer=None, llm_layers=(1, 7))) == (1, 7)


def test_rms_normalise_divides_by_the_root_mean_square_over_the_feature_dim():
    states = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    expected = torch.tensor([[3.0, 4.0]]) / (12.5 + NORM_EPS) ** 0.5
    torch.testing.assert_close(rms_normalise(states)[:1], expected)
    assert torch.equal(rms_normalise(states)[1], torch.zeros(2))  # eps keeps an all-zero row finite


def test_a_single_layer_stores_rows_pass_through_and_reductions_still_apply():
    rows = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(TeacherLayer().select(rows), rows)
    assert torch.equal(TeacherLayer(reduction="mean").select(rows), rows)
    torch.testing.assert_close(TeacherLayer(reduction="norm-mean").select(rows), rms_normalise(rows))
    layered = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(TeacherLayer(position=1).select(layered), layered[:, 1])


def test_the_default_teacher_is_the_stores_layer_or_its_last_stored_one():
    single = synthetic_manifest(**SHAPES, llm_layer=39)
    layered = dataclasses.replace(single, llm_layer=None, llm_layers=(20, 30, 39))
    assert resolve_teacher(None, single, "s") == TeacherLayer() == resolve_teacher("39", single, "s")
    assert resolve_teacher(None, layered, "s") == TeacherLayer(position=2) == resolve_teacher("39", layered, "s")
    assert resolve_teacher("30", layered, "s") == TeacherLayer(position=1)
    assert resolve_teacher("norm-mean", layered, "s") == TeacherLayer(reduction="norm-mean")
    from_file = dataclasses.replace(single, llm_layer=None)
    with pytest.raises(ValueError, match="come from a feature file"):
        resolve_teacher("39", from_file, "s")
    assert resolve_teacher("mean", from_file, "s") == TeacherLayer(reduction="mean")


def test_teacher_choices_as_typed():
    assert [check_teacher_choice(c) for c in (None, "0", "39", "mean", "norm-mean")] == [None] * 5
    for bad in ("-1", "last", "3.0", "²"):
        assert "--llm-layer must be a stored layer's number" in check_teacher_choice(bad), bad
