"""Rows that today abort a whole extract (text that is not Unicode, paths the OS refuses) are skipped rows instead,
through the real `sur-cache extract` on the tiny models."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from sur_cache.cli import main
from sur_cache.store import DONE, SKIPPED, FeatureStore
from sur_cache.tiny_models import TINY_RESOLUTION


def _dataset_with_refused_rows(source, target):
    """The demo dataset with lines 1-4 replaced by a lone surrogate, a symlink loop, a NUL byte, a 300-char name."""
    shutil.copytree(source, target)
    (target / "images" / "loop_a").symlink_to("loop_b")
    (target / "images" / "loop_b").symlink_to("loop_a")
    lines = (target / "metadata.jsonl").read_text().splitlines()
    lines[1] = '{"file_name": "images/00001.png", "text": "a dog \\ud800 runs", "prompt": "dog, running"}'
    lines[2] = json.dumps({"file_name": "images/loop_a", "text": "a", "prompt": "b"})
    lines[3] = json.dumps({"file_name": "images/00003\x00.png", "text": "a", "prompt": "b"})
    lines[4] = json.dumps({"file_name": "images/" + "x" * 300 + ".png", "text": "a", "prompt": "b"})
    (target / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return target


def _extract_args(data, out, models) -> list[str]:
    return [
        *("extract", "--data", str(data), "--out", str(out), "--sd", str(models.sd), "--llm", str(models.llm)),
        *("--resolution", str(TINY_RESOLUTION), "--batch-size", "4", "--shard-rows", "4", "--num-workers", "0"),
        *("--no-8bit", "--llm-dtype", "float32", "--no-progress"),
    ]


def test_rows_that_used_to_abort_the_run_are_skipped_with_their_reason(tiny_models, demo_dataset, tmp_path):
    data = _dataset_with_refused_rows(demo_dataset, tmp_path / "data")
    out = tmp_path / "store.zarr"
    result = CliRunner().invoke(main, _extract_args(data, out, tiny_models))
    assert result.exit_code == 0, result.output
    assert "done        8 of 10 samples" in result.output  # the loop and the long name: skipped when read
    assert "skipped     4 (invalid_path 3, invalid_text 1)" in result.output
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in report] == [
        (1, "invalid_text"),
        (2, "invalid_path"),
        (3, "invalid_path"),
        (4, "invalid_path"),
    ]
    store = FeatureStore.open(out)
    assert store.array("sample_line")[:].tolist() == [0, 2, *range(4, 12)]
    assert store.status().tolist() == [DONE, SKIPPED, SKIPPED] + [DONE] * 7


def test_strict_makes_the_same_rows_fatal_naming_each(tiny_models, demo_dataset, tmp_path):
    data = _dataset_with_refused_rows(demo_dataset, tmp_path / "data")
    result = CliRunner().invoke(main, [*_extract_args(data, tmp_path / "store.zarr", tiny_models), "--strict"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--strict: 4 bad rows" in result.output
    assert "line 1: invalid_text" in result.output and "line 4: invalid_path" in result.output
