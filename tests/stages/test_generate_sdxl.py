"""`sur-cache generate` on a tiny SDXL: the stock StableDiffusionXLPipeline gets the adapted embedding with the
prompt's own pooled embedding, deterministic per seed, and --compare draws both halves from the same noise."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sur_cache.adapter import AdapterConfig, SURAdapter
from sur_cache.cli import main
from sur_cache.stages.generate import generate, load_adapter, load_pipeline, prompt_embeddings
from sur_cache.tiny_models import TINY_CLIP_WIDTH, TINY_RESOLUTION, TINY_SDXL_CLIP_WIDTHS

PROMPT = "a red circle waits by the sea"
FAST = dict(steps=2, guidance=5.0)


def _save_adapter(folder, width=sum(TINY_SDXL_CLIP_WIDTHS)):
    torch.manual_seed(0)
    adapter = SURAdapter(AdapterConfig(width=width, llm_width=48, feedforward=64, num_heads=4, adapter_weight=0.5))
    torch.nn.init.normal_(adapter.fc.weight, std=1.0)  # a visible effect
    return adapter.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return _save_adapter(tmp_path_factory.mktemp("sdxl_adapter"))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(str(tiny_sdxl))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


@torch.inference_mode()
def test_plain_embeddings_are_the_pipelines_own_and_the_adapter_changes_only_the_positive_states(pipe, adapter_dir):
    plain = prompt_embeddings(pipe, None, PROMPT, "blurry")
    own = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    for ours, theirs in zip((plain.positive, plain.negative, plain.pooled, plain.negative_pooled), own, strict=True):
        torch.testing.assert_close(ours, theirs)
    # no negative prompt: zeros, as the pipeline's force_zeros_for_empty_prompt gives
    empty = prompt_embeddings(pipe, None, PROMPT)
    assert not empty.negative.any() and not empty.negative_pooled.any()
    adapter = load_adapter(adapter_dir, pipe, attention="eager")
    adapted = prompt_embeddings(pipe, adapter, PROMPT, "blurry")
    torch.testing.assert_close(adapted.positive, adapter(plain.positive.float()).embedding)
    assert not torch.allclose(adapted.positive, plain.positive)
    torch.testing.assert_close(adapted.pooled, plain.pooled)  # the pooled embedding is not adapted
    torch.testing.assert_close(adapted.negative, plain.negative)


def test_same_seed_same_image_other_seed_or_no_adapter_differs(pipe, adapter_dir):
    adapter = load_adapter(adapter_dir, pipe, attention="eager")
    first = generate(pipe, adapter, PROMPT, seeds=[0], **FAST)[0]
    again = generate(pipe, adapter, PROMPT, seeds=[0], **FAST)[0]
    other = generate(pipe, adapter, PROMPT, seeds=[1], **FAST)[0]
    base = generate(pipe, None, PROMPT, seeds=[0], **FAST)[0]
    pixels = [np.asarray(image, dtype=np.int16) for image in (first, again, other, base)]
    assert first.size == (TINY_RESOLUTION, TINY_RESOLUTION)
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2]) and not np.array_equal(pixels[0], pixels[3])


def test_cli_compare_writes_base_and_adapted_side_by_side(tiny_sdxl, adapter_dir, pipe, tmp_path):
    out = tmp_path / "compare.png"
    args = ["generate", "--sd", str(tiny_sdxl), "--adapter", str(adapter_dir), "--prompt", PROMPT, "--compare"]
    result = CliRunner().invoke(main, [*args, "--steps", "2", "--guidance", "5", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    compare = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    base = np.asarray(generate(pipe, None, PROMPT, seeds=[0], **FAST)[0], dtype=np.int16)
    assert compare.shape[1] == 2 * TINY_RESOLUTION
    np.testing.assert_array_equal(compare[-TINY_RESOLUTION:, :TINY_RESOLUTION], base)


def test_an_sd_adapter_is_refused_by_an_sdxl_model(tiny_sdxl, tmp_path):
    folder = _save_adapter(tmp_path / "sd_adapter", width=TINY_CLIP_WIDTH)
    args = ["generate", "--sd", str(tiny_sdxl), "--adapter", str(folder), "--prompt", PROMPT, "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert f"trained on CLIP embeddings of width {TINY_CLIP_WIDTH}" in result.output
    assert f"text encoder has width {sum(TINY_SDXL_CLIP_WIDTHS)}" in result.output
