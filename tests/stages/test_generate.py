"""`sur-cache generate` on the tiny models: files, sizes, seeds, the adapter's effect, --compare, compat mode."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sur_cache.adapter import AdapterConfig, SURAdapter
from sur_cache.cli import main
from sur_cache.config import GenerateConfig
from sur_cache.models import encode_clip
from sur_cache.stages import generate as generate_stage
from sur_cache.stages.generate import (
    generate,
    load_adapter,
    load_pipeline,
    plan_outputs,
    prompt_embeddings,
    seeds_from_options,
    side_by_side,
)
from sur_cache.tiny_models import TINY_CLIP_WIDTH, TINY_RESOLUTION

PROMPT = "a red circle waits by the sea"
FAST = dict(steps=2, guidance=7.5)


def _save_adapter(folder, *, reference_compat=False, width=TINY_CLIP_WIDTH, seed=0):
    """A trained-looking adapter: fc.weight non-zero and a large adapter weight, so its effect is visible."""
    torch.manual_seed(seed)
    config = AdapterConfig(
        width=width, llm_width=48, feedforward=64, adapter_weight=0.5, reference_compat=reference_compat
    )
    adapter = SURAdapter(config)
    torch.nn.init.normal_(adapter.fc.weight, std=1.0)
    return adapter.save_pretrained(folder)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return _save_adapter(tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return load_pipeline(str(tiny_models.sd))


@pytest.fixture(scope="module")
def adapter(pipe, adapter_dir):
    return load_adapter(adapter_dir, pipe, attention="eager")


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_cli_writes_one_image_of_the_requested_size(tiny_models, adapter_dir, tmp_path):
    out = tmp_path / "cat.png"
    args = ["generate", "--sd", str(tiny_models.sd), "--adapter", str(adapter_dir), "--prompt", PROMPT]
    result = CliRunner().invoke(main, [*args, "--steps", "2", "--height", "48", "--width", "40", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (40, 48)
    assert str(out) in result.output


def test_same_seed_same_image_other_seed_or_no_adapter_differs(pipe, adapter):
    first = generate(pipe, adapter, PROMPT, seeds=[0], **FAST)[0]
    again = generate(pipe, adapter, PROMPT, seeds=[0], **FAST)[0]
    other_seed = generate(pipe, adapter, PROMPT, seeds=[1], **FAST)[0]
    base = generate(pipe, None, PROMPT, seeds=[0], **FAST)[0]
    assert first.size == (TINY_RESOLUTION, TINY_RESOLUTION)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other_seed))
    assert np.abs(_pixels(first) - _pixels(base)).mean() > 1.0


def test_a_seed_gives_the_same_image_alone_or_batched_with_others(pipe, adapter):
    alone = generate(pipe, adapter, PROMPT, seeds=[1], **FAST)[0]
    batched = generate(pipe, adapter, PROMPT, seeds=[0, 1], **FAST)[1]
    assert np.abs(_pixels(alone) - _pixels(batched)).max() <= 1  # same noise; batched matmuls may round differently


@torch.inference_mode()
def test_positive_prompt_is_adapted_and_negative_prompt_is_plain_clip(pipe, adapter):
    embeddings = prompt_embeddings(pipe, adapter, PROMPT, "blurry")
    positive, negative = embeddings.positive, embeddings.negative
    assert embeddings.pooled is None and set(embeddings.pipeline_arguments()) == {
        "prompt_embeds",
        "negative_prompt_embeds",
    }
    clip = encode_clip(pipe.tokenizer, pipe.text_encoder, ["blurry", PROMPT]).embeddings
    torch.testing.assert_close(negative, clip[:1])
    torch.testing.assert_close(positive, adapter(clip[1:]).embedding)
    assert not torch.allclose(positive, clip[1:])


def test_negative_prompt_changes_the_image(pipe, adapter):
    plain = generate(pipe, adapter, PROMPT, seeds=[0], **FAST)[0]
    negative = generate(pipe, adapter, PROMPT, seeds=[0], negative_prompt="blurry, dark", **FAST)[0]
    assert not np.array_equal(_pixels(plain), _pixels(negative))


@torch.inference_mode()
def test_reference_compat_adapts_negative_and_positive_as_one_batch(pipe, tmp_path):
    compat = load_adapter(_save_adapter(tmp_path / "compat", reference_compat=True), pipe)
    embeddings = prompt_embeddings(pipe, compat, PROMPT, "blurry")
    positive, negative = embeddings.positive, embeddings.negative
    clip = encode_clip(pipe.tokenizer, pipe.text_encoder, ["blurry", PROMPT]).embeddings
    paired = compat(clip).embedding
    torch.testing.assert_close(negative, paired[:1])
    torch.testing.assert_close(positive, paired[1:])
    # The reference's transformer attends across the batch: the pair is not the same as each row on its own.
    assert not torch.allclose(positive, compat(clip[1:]).embedding)
    assert not torch.allclose(negative, clip[:1])


def test_compare_writes_base_and_adapter_halves_under_a_label_band(tiny_models, adapter_dir, pipe, adapter, tmp_path):
    out = tmp_path / "compare"
    args = ["generate", "--sd", str(tiny_models.sd), "--adapter", str(adapter_dir), "--prompt", PROMPT]
    result = CliRunner().invoke(main, [*args, "--steps", "2", "--num-seeds", "2", "--compare", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["seed"]) for row in rows] == [(PROMPT, 0), (PROMPT, 1)]
    for row in rows:
        assert str(out / row["file_name"]) in result.output
        grid = Image.open(out / row["file_name"])
        base = generate(pipe, None, PROMPT, seeds=[row["seed"]], **FAST)[0]
        adapted = generate(pipe, adapter, PROMPT, seeds=[row["seed"]], **FAST)[0]
        band = grid.height - TINY_RESOLUTION
        assert grid.width == 2 * TINY_RESOLUTION and band > 0
        left = grid.crop((0, band, TINY_RESOLUTION, grid.height))
        right = grid.crop((TINY_RESOLUTION, band, grid.width, grid.height))
        assert np.abs(_pixels(left) - _pixels(base)).max() <= 1
        assert np.abs(_pixels(right) - _pixels(adapted)).max() <= 1


def test_side_by_side_labels_both_halves():
    grid = side_by_side(Image.new("RGB", (64, 40), "red"), Image.new("RGB", (64, 40), "blue"))
    band = grid.height - 40
    labels = _pixels(grid.crop((0, 0, grid.width, band)))
    assert grid.size == (128, 40 + band)
    assert (labels[:, :64] < 128).any() and (labels[:, 64:] < 128).any()  # dark text on white in each half
    assert tuple(grid.getpixel((10, band + 5))) == (255, 0, 0)
    assert tuple(grid.getpixel((100, band + 5))) == (0, 0, 255)


def test_out_file_for_several_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Pass a folder as --out"):
        plan_outputs(["a", "b"], [0], tmp_path / "one.png")
    names = [p.path.name for p in plan_outputs(["A cat!", "a dog"], [3], tmp_path)]
    assert names == ["000-a-cat-seed3-image.png", "001-a-dog-seed3-image.png"]


def test_adapter_of_another_clip_width_is_refused(pipe, tmp_path):
    wide = _save_adapter(tmp_path / "wide", width=64)
    with pytest.raises(ValueError, match="width 64.*width 32"):
        load_adapter(wide, pipe)


def test_cli_reports_bad_options(tiny_models, adapter_dir, tmp_path):
    args = ["generate", "--sd", str(tiny_models.sd), "--adapter", str(adapter_dir), "--out", str(tmp_path / "x")]
    no_prompt = CliRunner().invoke(main, args)
    assert no_prompt.exit_code != 0 and "--prompt TEXT" in no_prompt.output
    both = CliRunner().invoke(main, [*args, "--prompt", "a", "--seed", "1", "--seed", "2", "--num-seeds", "3"])
    assert both.exit_code == 1 and both.output.startswith("Error: --num-seeds 3 counts up from one --seed, but 2")
    odd = CliRunner().invoke(main, [*args, "--prompt", "a", "--height", "30"])
    assert odd.exit_code != 0 and "multiple of 8" in odd.output


def test_seeds_from_options():
    assert seeds_from_options((), None) == GenerateConfig.seeds
    assert seeds_from_options((5, 2), None) == (5, 2)
    assert seeds_from_options((), 3) == tuple(range(GenerateConfig.seeds[0], GenerateConfig.seeds[0] + 3))
    assert seeds_from_options((7,), 2) == (7, 8)


def test_device_is_resolved_by_the_one_resolver_before_anything_loads(tiny_models, adapter_dir, tmp_path, monkeypatch):
    _pipeline_must_not_load(monkeypatch)
    args = [*_generate_args(tiny_models, adapter_dir, tmp_path / "x.png"), "--prompt", PROMPT]
    bogus = CliRunner().invoke(main, [*args, "--device", "gpu0"])
    assert bogus.exit_code == 1 and bogus.output.startswith("Error: --device 'gpu0' is not a torch device")
    if not torch.cuda.is_available():
        missing = CliRunner().invoke(main, [*args, "--device", "cuda"])
        assert missing.exit_code == 1 and "--device cuda: this machine has no cuda device" in missing.output


def test_prompts_file_adds_one_prompt_per_line(tiny_models, adapter_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\n  a green triangle  \n")
    out = tmp_path / "images"
    args = ["generate", "--sd", str(tiny_models.sd), "--adapter", str(adapter_dir), "--prompt", PROMPT]
    result = CliRunner().invoke(main, [*args, "--prompts-file", str(prompts), "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [PROMPT, "a blue square", "a green triangle"]
    assert all((out / row["file_name"]).is_file() for row in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_float16_pipeline_with_the_fused_adapter(tiny_models, adapter_dir, tmp_path):
    """What `--device auto --dtype auto --attention auto` picks on a GPU: a float16 pipeline, the fused kernel."""
    pipe = load_pipeline(str(tiny_models.sd), device="cuda", dtype=torch.float16)
    fused = load_adapter(adapter_dir, pipe)
    assert fused.config.attention == "fused"
    embeddings = prompt_embeddings(pipe, fused, PROMPT)
    positive, negative = embeddings.positive, embeddings.negative
    assert positive.dtype == negative.dtype == torch.float16 and positive.is_cuda
    eager = load_adapter(adapter_dir, pipe, attention="eager")
    torch.testing.assert_close(positive, prompt_embeddings(pipe, eager, PROMPT).positive, atol=2e-3, rtol=2e-3)
    image = generate(pipe, fused, PROMPT, seeds=[0], **FAST)[0]
    assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION)


def _generate_args(tiny_models, adapter, out) -> list[str]:
    return ["generate", "--sd", str(tiny_models.sd), "--adapter", str(adapter), "--steps", "1", "--out", str(out)]


def _pipeline_must_not_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was built although the adapter is unusable")

    monkeypatch.setattr(generate_stage, "load_pipeline", refuse)


def test_an_adapter_with_non_finite_weights_is_refused_before_the_pipeline_is_built(tiny_models, tmp_path, monkeypatch):
    adapter = SURAdapter.from_pretrained(_save_adapter(tmp_path / "adapter"))
    with torch.no_grad():
        adapter.fc.weight[0, 0] = float("nan")
    folder = adapter.save_pretrained(tmp_path / "nan_adapter")
    _pipeline_must_not_load(monkeypatch)
    out = tmp_path / "image.png"
    result = CliRunner().invoke(main, [*_generate_args(tiny_models, folder, out), "--prompt", PROMPT])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.startswith(f"Error: {folder / 'model.safetensors'}: weights are not finite (NaN or inf) in")
    assert "fc.weight (1 of 1024)" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("damage", ["truncated_weights", "config_of_another_adapter"])
def test_a_broken_adapter_folder_is_one_error_naming_the_file(tiny_models, tmp_path, monkeypatch, damage):
    folder = _save_adapter(tmp_path / "adapter")
    if damage == "truncated_weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        expected = f"Error: {weights}: its sha256 differs"
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_layers": 1}))
        expected = f"Error: {folder / 'model.safetensors'} does not fit the adapter {folder / 'config.json'} describes"
    _pipeline_must_not_load(monkeypatch)
    result = CliRunner().invoke(main, [*_generate_args(tiny_models, folder, tmp_path / "x.png"), "--prompt", PROMPT])
    assert result.exit_code == 1 and result.output.startswith(expected), result.output
    assert "or train it again" in result.output and "Traceback" not in result.output


def test_a_prompts_file_that_is_not_utf8_names_the_file_line_and_encoding(tiny_models, adapter_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\nun caf\u00e9 au soleil\n".encode("latin-1"))
    args = [*_generate_args(tiny_models, adapter_dir, tmp_path / "images"), "--prompts-file", str(prompts)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: --prompts-file {prompts}: line 2 is not UTF-8"), result.output
    assert "save the file as UTF-8" in result.output


def test_a_prompt_the_shell_could_not_decode_is_refused_naming_the_option(tiny_models, adapter_dir, tmp_path):
    """Python decodes undecodable argv bytes to lone surrogates ('caf\\udce9'), which no tokenizer accepts."""
    args = [*_generate_args(tiny_models, adapter_dir, tmp_path / "x.png"), "--prompt", "caf\udce9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: --prompt 'caf\\udce9' is not UTF-8 text"), result.output


def test_existing_images_are_never_replaced_without_overwrite(tiny_models, adapter_dir, tmp_path, monkeypatch):
    out = tmp_path / "images"
    out.mkdir()
    planned = plan_outputs([PROMPT], [0, 1], out)
    planned[1].path.write_bytes(b"the user's own file")
    (out / "index.jsonl").write_text("the user's notes\n")
    _pipeline_must_not_load(monkeypatch)
    args = [*_generate_args(tiny_models, adapter_dir, out), "--prompt", PROMPT, "--num-seeds", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "2 of the files this run writes already exist" in result.output and "--overwrite" in result.output
    assert planned[1].path.read_bytes() == b"the user's own file" and not planned[0].path.exists()
    assert (out / "index.jsonl").read_text() == "the user's notes\n"
    monkeypatch.undo()
    replaced = CliRunner().invoke(main, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert Image.open(planned[1].path).size == (TINY_RESOLUTION, TINY_RESOLUTION)


def test_an_adapter_of_another_width_is_refused_from_the_configs_before_the_pipeline_loads(
    tiny_models, tmp_path, monkeypatch
):
    wide = _save_adapter(tmp_path / "wide", width=64)
    _pipeline_must_not_load(monkeypatch)
    result = CliRunner().invoke(main, [*_generate_args(tiny_models, wide, tmp_path / "x.png"), "--prompt", PROMPT])
    assert result.exit_code == 1 and "width 64, but the pipeline's text encoder has width 32" in result.output
