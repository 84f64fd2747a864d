"""`sur-cache extract`, `inspect` and `verify` through click's test runner."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from sur_cache.cli import main
from sur_cache.tiny_models import TINY_RESOLUTION


def _extract(data, out, models, *extra: str):
    args = ["extract", "--data", str(data), "--out", str(out), "--sd", str(models.sd), "--llm", str(models.llm)]
    args += ["--resolution", str(TINY_RESOLUTION), "--batch-size", "4", "--shard-rows", "4", "--num-workers", "0"]
    return CliRunner().invoke(main, args + ["--no-progress", *extra])


@pytest.fixture(scope="module")
def store(tiny_models, demo_dataset, tmp_path_factory):
    """A default (8-bit LLM, fp16) store written through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "store.zarr"
    result = _extract(demo_dataset, out, tiny_models)
    assert result.exit_code == 0, result.output
    assert "done        12 of 12 samples" in result.output
    assert "truncated   0 simple, " in result.output, result.output[-600:]
    return out


def test_every_extract_option_has_help():
    command = main.commands["extract"]
    undocumented = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
    assert undocumented == []


def test_inspect_json_has_the_contracted_keys(store):
    result = CliRunner().invoke(main, ["inspect", str(store), "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert described["complete"] == 12 and described["skipped"] == {}
    assert described["manifest"]["llm_8bit"] is True and described["manifest"]["store_dtype"] == "float16"
    assert described["arrays"]["clip_simple"] | {"bytes_stored": 0} == {
        "shape": [12, 77, 32],
        "dtype": "float16",
        "chunks": [4, 77, 32],
        "shards": [4, 77, 32],
        "bytes_stored": 0,
    }
    assert described["bytes_stored"] > 12 * 2 * 77 * 32 * 2


def test_inspect_text_lists_manifest_and_arrays(store):
    result = CliRunner().invoke(main, ["inspect", str(store)])
    assert result.exit_code == 0, result.output
    assert "samples   12: 12 complete, 0 pending" in result.output
    assert "llm_pooling" in result.output and "[12 names]" in result.output
    assert "latent_logvar" in result.output and "chunks (4, 4, 8, 8) shards (4, 4, 8, 8)" in result.output


def test_verify_passes_then_names_a_corrupt_range(tiny_models, demo_dataset, tmp_path):
    out = tmp_path / "store.zarr"
    assert _extract(demo_dataset, out, tiny_models, "--no-8bit", "--chunk-rows", "2").exit_code == 0
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0 and result.output.startswith("ok:")
    shard = out / "latent_mean" / "c" / "2" / "0" / "0" / "0"  # samples 8..11
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert "corrupt   latent_mean samples 8..9: Stored and computed checksum do not match" in result.output


def test_extract_refuses_other_settings_with_a_fix(store, tiny_models, demo_dataset):
    result = _extract(
        demo_dataset, store, tiny_models, "--llm-pooling", "last", "--resolution", "16", "--llm-dtype", "bfloat16"
    )
    assert result.exit_code == 1
    assert 'llm_dtype: expected "bfloat16", found "float16"' in result.output  # 8-bit: it sets the other weights
    assert 'llm_pooling: expected "last", found "mean"' in result.output
    assert "resolution: expected 16, found 32" in result.output
    assert "--overwrite" in result.output


def test_inspect_and_verify_explain_a_missing_store(tmp_path):
    for command in ("inspect", "verify"):
        result = CliRunner().invoke(main, [command, str(tmp_path / "none")])
        assert result.exit_code == 1 and "no sur-cache store" in result.output
