"""`sur-cache extract`, `inspect` and `verify` through click's test runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def test_extract_writes_the_commit_index_and_a_store_without_one_inspects_the_same(store, tmp_path):
    assert (store / "commits" / "index.json").exists()
    older = tmp_path / "older.zarr"  # a schema-2 store written before the index: inspect reads every marker
    shutil.copytree(store, older)
    (older / "commits" / "index.json").unlink()
    indexed, without = (CliRunner().invoke(main, ["inspect", str(path), "--json"]) for path in (store, older))
    assert indexed.exit_code == without.exit_code == 0, indexed.output + without.output
    assert json.loads(indexed.output) == json.loads(without.output) | {"url": str(store)}


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
        "dimensions": ["sample", "token", "clip_width"],
        "bytes_stored": 0,
    }
    assert described["bytes_stored"] > 12 * 2 * 77 * 32 * 2
    # schema 2: the names moved from the manifest into the file_name array; the manifest keeps their digest
    assert "file_names" not in described["manifest"] and len(described["manifest"]["file_names_sha256"]) == 64
    assert described["arrays"]["file_name"]["shape"][0] == 12
    assert (described["num_shards"], described["committed_shards"]) == (3, 3)


def test_inspect_text_lists_manifest_and_arrays(store):
    result = CliRunner().invoke(main, ["inspect", str(store)])
    assert result.exit_code == 0, result.output
    assert "samples   12: 12 complete, 0 pending" in result.output
    assert "llm_pooling" in result.output and "file_names_sha256" in result.output
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


def test_inspect_and_verify_name_an_unreadable_zarr_json(store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    (copy / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {')
    for command in ("inspect", "verify"):
        result = CliRunner().invoke(main, [command, str(copy)])
        assert result.exit_code == 1 and result.exception.__class__ is SystemExit
        assert f"Error: {copy}/zarr.json is not valid JSON" in result.output and "Traceback" not in result.output


def test_verify_fails_when_the_status_shard_is_deleted_and_names_non_finite_samples(store, tmp_path):
    import shutil

    import numpy as np

    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    (copy / "status" / "c" / "1").unlink()
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 1 and "corrupt   status samples 4..7: shard file missing" in result.output
    shutil.rmtree(copy)
    shutil.copytree(store, copy)
    from sur_cache.store import FeatureStore

    opened = FeatureStore.open(copy, mode="r+")
    llm = opened.array("llm")[8:12]
    llm[2, 0] = np.nan  # a valid checksum over a NaN
    opened.write_arrays(2, {"llm": llm})
    result = CliRunner().invoke(main, ["verify", str(copy)])
    assert result.exit_code == 1 and "corrupt   llm samples 10..10: NaN or inf in a complete sample" in result.output


def test_extract_never_deletes_a_folder_that_is_not_its_store(tiny_models, demo_dataset, tmp_path):
    import zarr

    out = tmp_path / "theirs.zarr"
    zarr.open_group(str(out), mode="w")
    (out / "README").write_text("keep")
    result = _extract(demo_dataset, out, tiny_models, "--overwrite")
    assert result.exit_code == 1 and "a Zarr group that is not a sur-cache store (README, zarr.json)" in result.output
    assert (out / "README").read_text() == "keep" and not (out / "writer.lock").exists()


def test_extract_refuses_a_memory_url(tiny_models, demo_dataset):
    result = _extract(demo_dataset, "memory://m.zarr", tiny_models)
    assert result.exit_code == 1 and "Error: --out memory://m.zarr: a memory:// store lives inside this process" in (
        result.output
    )


def test_extract_without_overwrite_says_what_overwrite_removes(store, tiny_models, demo_dataset):
    result = _extract(demo_dataset, store, tiny_models, "--resolution", "16")
    assert result.exit_code == 1
    assert "--overwrite removes the store's clip_simple, clip_complex," in result.output
    assert "status, zarr.json" in result.output


SCHEMA1 = Path(__file__).parent / "data" / "store_schema1.zarr"


def test_a_schema1_store_names_migrate_and_migrate_converts_it(tmp_path):
    copy = tmp_path / "v1.zarr"
    shutil.copytree(SCHEMA1, copy)
    for command in ("inspect", "verify"):
        result = CliRunner().invoke(main, [command, str(copy)])
        assert result.exit_code == 1 and f"`sur-cache migrate {copy}`" in result.output, result.output
    result = CliRunner().invoke(main, ["migrate", str(copy)])
    assert result.exit_code == 0 and result.output == f"{copy}: migrated to schema 2\n"
    assert CliRunner().invoke(main, ["migrate", str(copy)]).output == f"{copy}: already schema 2\n"
    result = CliRunner().invoke(main, ["inspect", str(copy), "--json"])
    described = json.loads(result.output)
    assert (described["complete"], described["skipped"]) == (9, {"unreadable_image": 1})
    assert CliRunner().invoke(main, ["verify", str(copy)]).exit_code == 0
