"""`sur-cache evaluate` on the tiny models: the report's files, base and adapted images from one pipeline with the
same seeds and settings, scores that are the CLIP scores of the saved images, refusals (existing files, bad prompts
files, bad options), the progress bar, the CLI's defaults."""

import csv
import dataclasses
import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sur_cache.adapter import AdapterConfig, SURAdapter
from sur_cache.cli import main
from sur_cache.eval_prompts import bundled_prompts_path
from sur_cache.report import CHART_FILE, METRICS_FILE, REPORT_FILE, SCORES_FILE, image_file
from sur_cache.scoring import ClipScorer
from sur_cache.stages.evaluate import EvaluateConfig
from sur_cache.stages.generate import generate, load_adapter, load_pipeline
from sur_cache.tiny_models import TINY_CLIP_WIDTH, build_tiny_clip

SIZE = 16
PROMPTS = [
    {"text": "two red boats wait at the pier", "prompt": "two red boats, pier, harbour, 8k", "category": "counting"},
    {"text": "a dog jumps over the fence", "category": "action"},
]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A trained-looking adapter: fc.weight non-zero and a large adapter weight, so its effect is visible."""
    torch.manual_seed(0)
    adapter = SURAdapter(AdapterConfig(width=TINY_CLIP_WIDTH, llm_width=48, feedforward=64, adapter_weight=0.5))
    torch.nn.init.normal_(adapter.fc.weight, std=1.0)
    return adapter.save_pretrained(tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS), encoding="utf-8")
    return path


def _args(tiny_models, adapter_dir, clip_dir, prompts_file, out):
    return [
        "evaluate",
        "--sd",
        str(tiny_models.sd),
        "--adapter",
        str(adapter_dir),
        "--clip",
        str(clip_dir),
        "--prompts",
        str(prompts_file),
        "--num-seeds",
        "2",
        "--steps",
        "2",
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def report(tiny_models, adapter_dir, clip_dir, prompts_file, tmp_path_factory):
    """One evaluate run through the CLI, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(main, _args(tiny_models, adapter_dir, clip_dir, prompts_file, out))
    assert result.exit_code == 0, result.output
    return out, result.output


def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_report_folder_holds_every_file_and_the_summary_names_it(report):
    out, output = report
    for name in (REPORT_FILE, CHART_FILE, METRICS_FILE, SCORES_FILE):
        assert (out / name).is_file(), name
    for prompt in range(len(PROMPTS)):
        for seed in (0, 1):
            for variant in ("base", "adapted"):
                assert Image.open(out / image_file(prompt, seed, variant)).size == (SIZE, SIZE)
    assert f"report      {out / REPORT_FILE}" in output
    assert "vs simple" in output and "vs complex" in output
    assert "image/s" in output  # the progress bar


def test_base_and_adapted_images_are_generate_s_from_the_same_seeds_and_settings(report, tiny_models, adapter_dir):
    out, _ = report
    pipe = load_pipeline(str(tiny_models.sd))
    adapter = load_adapter(adapter_dir, pipe, attention="eager")
    settings = dict(seeds=[0, 1], steps=2, height=SIZE, width=SIZE)
    for index, row in enumerate(PROMPTS):
        expected = {"base": generate(pipe, None, row["text"], **settings)}
        expected["adapted"] = generate(pipe, adapter, row["text"], **settings)
        for variant, images in expected.items():
            for seed, image in zip((0, 1), images, strict=True):
                saved = Image.open(out / image_file(index, seed, variant))
                assert np.abs(_pixels(saved) - _pixels(image)).max() <= 1, (index, seed, variant)
        base, adapted = (_pixels(Image.open(out / image_file(index, 0, v))) for v in ("base", "adapted"))
        assert np.abs(base - adapted).mean() > 1.0  # the pair differs by the adapter


def test_the_scores_are_the_clip_scores_of_the_saved_images(report, clip_dir):
    out, _ = report
    scorer = ClipScorer.from_pretrained(str(clip_dir))
    with (out / SCORES_FILE).open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 2 * (2 + 1)  # seeds x variants x (first prompt: simple and complex; second: simple)
    texts = {
        "simple": {row["text"]: row["text"] for row in PROMPTS},
        "complex": {PROMPTS[0]["text"]: PROMPTS[0]["prompt"]},
    }
    for row in rows:
        score = scorer.scores([Image.open(out / row["image"])], [texts[row["against"]][row["prompt"]]])[0, 0]
        assert float(row["score"]) == pytest.approx(score, abs=1e-3)
    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    assert [c["group"] for c in metrics["targets"]["simple"]["categories"]] == ["counting", "action"]
    assert [c["group"] for c in metrics["targets"]["complex"]["categories"]] == ["counting"]
    assert metrics["settings"]["seeds"] == [0, 1] and metrics["settings"]["device"] == "cpu"


def test_existing_files_are_refused_before_any_model_loads_and_overwrite_replaces_only_its_own(
    report, tiny_models, adapter_dir, clip_dir, prompts_file, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text("my own notes", encoding="utf-8")
    (out / "keep.txt").write_text("not sur-cache's", encoding="utf-8")
    args = _args(tiny_models, adapter_dir, clip_dir, prompts_file, out)
    no_model = [*args, "--sd", str(tmp_path / "no-such-model")]  # a later --sd wins: loading it would fail
    refused = CliRunner().invoke(main, no_model)
    assert refused.exit_code == 1, refused.output
    assert refused.output.startswith(f"Error: --out {out}: 1 of the files this run writes already exist")
    assert "--overwrite" in refused.output
    assert (out / REPORT_FILE).read_text(encoding="utf-8") == "my own notes"
    replaced = CliRunner().invoke(main, [*args, "--overwrite", "--no-progress"])
    assert replaced.exit_code == 0, replaced.output
    assert "image/s" not in replaced.output
    assert (out / REPORT_FILE).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert (out / "keep.txt").read_text(encoding="utf-8") == "not sur-cache's"


def test_a_bad_prompts_file_is_one_error_line_naming_file_and_line(tiny_models, adapter_dir, clip_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"text": "a cat"}\n{"txt": "a dog"}\n', encoding="utf-8")
    result = CliRunner().invoke(main, _args(tiny_models, adapter_dir, clip_dir, bad, tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --prompts {bad}: line 2 has unknown column(s) txt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--num-seeds", "0", "--num-seeds must be >= 1"),
        ("--steps", "0", "--steps must be >= 1"),
        ("--width", "20", "--width must be a positive multiple of 8"),
    ],
)
def test_bad_options_are_refused(tiny_models, adapter_dir, clip_dir, prompts_file, tmp_path, option, value, message):
    result = CliRunner().invoke(
        main, [*_args(tiny_models, adapter_dir, clip_dir, prompts_file, tmp_path), option, value]
    )
    assert (
        result.exit_code == 1
        and result.output.startswith("Error: invalid evaluate options: ")
        and message in result.output
    )


def test_the_bundled_prompts_are_the_default(tmp_path):
    config = EvaluateConfig(sd="sd", adapter=tmp_path, out=tmp_path)
    assert config.prompts is None and config.prompts_path == bundled_prompts_path()
    assert config.seeds == (0, 1, 2, 3)


def test_every_cli_default_and_choice_is_the_config_s():
    command = main.commands["evaluate"]
    fields = {field.name: field for field in dataclasses.fields(EvaluateConfig)}
    options = [param for param in command.params if isinstance(param, click.Option) and param.name != "help"]
    assert {option.name for option in options} == set(fields)
    for option in options:
        if fields[option.name].default is not dataclasses.MISSING:
            assert option.get_default(click.Context(command)) == fields[option.name].default, option.name
    offered = {o.name: tuple(o.type.choices) for o in options if isinstance(o.type, click.Choice)}
    assert offered == EvaluateConfig.CHOICES
