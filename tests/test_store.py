"""The store format: layout from the manifest, validation on open, shard writes, skip reports, verify."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from sur_cache.store import (
    DONE,
    PENDING,
    SKIPPED,
    FeatureStore,
    ManifestMismatchError,
    StoreFormatError,
    array_specs,
)

MANIFEST = {
    "sur_cache_version": "test",
    "store_dtype": "float16",
    "tokenizer_max_length": 77,
    "clip_width": 24,
    "llm_width": 40,
    "latent_channels": 4,
    "latent_size": 8,
    "flip_variants": True,
    "llm_per_token": True,
    "llm_layer": 2,
}


def _random_rows(store: FeatureStore, start: int, stop: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = {}
    for name, spec in store.specs.items():
        if name != "status":
            shape = (stop - start, *spec.row_shape)
            rows[name] = (rng.standard_normal(shape) * 10).astype(spec.dtype)
    return rows


@pytest.fixture
def store(tmp_path):
    return FeatureStore.create(tmp_path / "s.zarr", MANIFEST, num_samples=10, shard_rows=4, chunk_rows=1)


def test_layout_follows_the_manifest(store):
    assert store.shard_ranges() == [(0, 4), (4, 8), (8, 10)]
    assert store.array("clip_simple").shape == (10, 77, 24)
    assert store.array("clip_simple").chunks == (1, 77, 24)
    assert store.array("clip_simple").shards == (4, 77, 24)
    assert store.array("llm_tokens").shape == (10, 77, 40)
    assert store.array("status").chunks == (4,)  # tiny rows: one chunk per shard
    assert "latent_mean_flipped" in store.specs
    assert store.manifest["chunk_rows"] == 1 and store.manifest["compression"] == "none"
    without = array_specs({**MANIFEST, "flip_variants": False, "llm_per_token": False})
    assert "latent_mean_flipped" not in without and "llm_tokens" not in without and "llm_mask" not in without
    codecs = store.array("clip_simple").metadata.to_dict()["codecs"][0]["configuration"]
    assert {"name": "crc32c"} in [dict(c) for c in codecs["codecs"]]


def test_written_shard_reads_back_and_status_is_the_commit(store):
    assert store.pending_shards() == [0, 1, 2]
    rows = _random_rows(store, 4, 8, seed=1)
    store.write_shard(1, rows, np.array([DONE, DONE, SKIPPED, DONE], dtype=np.uint8))
    reopened = FeatureStore.open(store.url)
    back = reopened.read(["clip_simple", "llm", "sample_line"], 4, 8)
    np.testing.assert_array_equal(back["clip_simple"], rows["clip_simple"])
    np.testing.assert_array_equal(back["llm"], rows["llm"])
    assert reopened.complete_indices().tolist() == [4, 5, 7]
    assert reopened.pending_shards() == [0, 2]
    assert reopened.status()[:4].tolist() == [PENDING] * 4


def test_write_shard_refuses_incomplete_input(store):
    rows = _random_rows(store, 0, 4, seed=0)
    del rows["llm"]
    with pytest.raises(ValueError, match="expected arrays"):
        store.write_shard(0, rows, np.full(4, DONE, np.uint8))
    with pytest.raises(ValueError, match="final values"):
        store.write_shard(0, _random_rows(store, 0, 4, 0), np.zeros(4, np.uint8))


def test_open_refuses_other_settings_naming_each_field(store):
    expected = {**MANIFEST, "llm_layer": 1, "clip_width": 32, "num_samples": 10}
    with pytest.raises(ManifestMismatchError) as error:
        FeatureStore.open(store.url, mode="r+", expected=expected)
    message = str(error.value)
    assert "llm_layer: expected 1, found 2" in message
    assert "clip_width: expected 32, found 24" in message
    assert "num_samples" not in message
    assert "--overwrite" in message
    FeatureStore.open(store.url, mode="r+", expected={**MANIFEST, "num_samples": 10})  # same settings resume


def test_create_refuses_existing_store_unless_overwrite(store):
    with pytest.raises(FileExistsError, match="--overwrite"):
        FeatureStore.create(store.url, MANIFEST, num_samples=10, shard_rows=4)
    store.write_skipped(None, [{"line": 7, "file_name": None, "reason": "malformed_json", "detail": "x"}])
    report = Path(store.write_skipped_report())
    fresh = FeatureStore.create(store.url, {**MANIFEST, "llm_layer": 0}, num_samples=3, shard_rows=4, overwrite=True)
    assert fresh.num_samples == 3 and fresh.manifest["llm_layer"] == 0
    assert fresh.skipped_records() == [] and not report.exists()  # the old store's skip reports went with it


def test_create_never_wipes_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a Zarr store"):
            FeatureStore.create(tmp_path, MANIFEST, num_samples=2, shard_rows=2, overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_open_rejects_non_stores_and_broken_arrays(tmp_path, store):
    with pytest.raises(FileNotFoundError, match="sur-cache extract"):
        FeatureStore.open(tmp_path / "nothing")
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreFormatError, match="schema_version"):
        FeatureStore.open(tmp_path / "plain.zarr")
    group = zarr.open_group(store.url, mode="r+")
    del group["llm"]
    with pytest.raises(StoreFormatError, match="'llm' is missing"):
        FeatureStore.open(store.url)


def test_skip_reports_merge_per_part_and_count_once_committed(store):
    store.write_skipped(None, [{"line": 7, "file_name": None, "reason": "malformed_json", "detail": "x"}])
    store.write_skipped(1, [{"line": 2, "file_name": "a.png", "reason": "unreadable_image", "detail": ""}])
    assert store.summary()["skipped"] == {"malformed_json": 1}  # shard 1 is not committed yet
    store.write_shard(1, _random_rows(store, 4, 8, 0), np.array([DONE, SKIPPED, DONE, DONE], np.uint8))
    assert [r["line"] for r in store.skipped_records()] == [2, 7]
    assert store.summary()["skipped"] == {"malformed_json": 1, "unreadable_image": 1}
    store.write_skipped(1, [])  # a recomputed shard replaces its part
    assert store.summary()["skipped"] == {"malformed_json": 1}
    report = Path(store.write_skipped_report())
    assert [json.loads(line)["line"] for line in report.read_text().splitlines()] == [7]
    assert not list(report.parent.rglob("*.partial"))


def test_verify_finds_a_flipped_byte_by_sample_range(store, tmp_path):
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        store.write_shard(shard, _random_rows(store, start, stop, seed=shard), np.full(stop - start, DONE, np.uint8))
    assert store.verify() == []
    shard_file = tmp_path / "s.zarr" / "clip_complex" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF  # inside sample 4's chunk (chunks are laid out in order, index at the end)
    shard_file.write_bytes(bytes(data))
    (tmp_path / "s.zarr" / "llm" / "c" / "2" / "0").unlink()
    corrupt = store.verify()
    assert [(c.array, c.start, c.stop) for c in corrupt] == [("clip_complex", 4, 5), ("llm", 8, 10)]
    assert "checksum" in corrupt[0].error and corrupt[1].error == "shard file missing"


def test_verify_reports_a_corrupt_status_slice_instead_of_crashing(store, tmp_path):
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        store.write_shard(shard, _random_rows(store, start, stop, seed=shard), np.full(stop - start, DONE, np.uint8))
    shard_file = tmp_path / "s.zarr" / "status" / "c" / "1"
    data = bytearray(shard_file.read_bytes())
    data[1] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    (tmp_path / "s.zarr" / "llm" / "c" / "1" / "0").unlink()  # its shard still counts as written
    corrupt = store.verify()
    assert [(c.array, c.start, c.stop) for c in corrupt] == [("llm", 4, 8), ("status", 4, 8)]
    assert corrupt[0].error == "shard file missing" and "checksum" in corrupt[1].error
    with pytest.raises(StoreFormatError, match=r"status array cannot be read .*sur-cache verify"):
        store.summary()


def test_partial_files_are_removed(store, tmp_path):
    leftover = tmp_path / "s.zarr" / "llm" / "c" / "0" / "0.abc.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    assert store.remove_partial_files() == 1
    assert not leftover.exists()


def test_memory_url_store_round_trips():
    url = f"memory://sur-cache-test-{uuid.uuid4().hex}/s.zarr"
    created = FeatureStore.create(url, MANIFEST, num_samples=5, shard_rows=4)
    rows = _random_rows(created, 4, 5, seed=3)
    created.write_shard(1, rows, np.array([DONE], np.uint8))
    created.write_skipped(None, [{"line": 0, "file_name": None, "reason": "empty_prompt", "detail": ""}])
    opened = FeatureStore.open(url, expected=MANIFEST)
    np.testing.assert_array_equal(opened.read(["llm"], 4, 5)["llm"], rows["llm"])
    assert opened.summary() == {"num_samples": 5, "complete": 1, "pending": 4, "skipped": {"empty_prompt": 1}}
    assert opened.describe()["arrays"]["llm"]["chunks"] == [4, 40]  # default chunk_rows, capped at the shard


def test_compressed_store_round_trips_with_checksums(tmp_path):
    store = FeatureStore.create(tmp_path / "z.zarr", MANIFEST, num_samples=4, shard_rows=4, compression="zstd")
    rows = _random_rows(store, 0, 4, seed=5)
    store.write_shard(0, rows, np.full(4, DONE, np.uint8))
    np.testing.assert_array_equal(FeatureStore.open(store.url).read(["llm"], 0, 4)["llm"], rows["llm"])
    inner = [c["name"] for c in store.array("llm").metadata.to_dict()["codecs"][0]["configuration"]["codecs"]]
    assert inner == ["bytes", "zstd", "crc32c"]
    with pytest.raises(ValueError, match="compression must be one of"):
        FeatureStore.create(tmp_path / "b.zarr", MANIFEST, num_samples=4, compression="lzma")


def test_identity_is_kept_by_a_copy_and_changed_by_a_commit_or_a_new_store(store, tmp_path):
    import shutil

    first = store.identity
    assert set(first) == {"store_id", "fingerprint"} and len(first["fingerprint"]) == 64
    shutil.copytree(store.url, tmp_path / "copy.zarr")
    assert FeatureStore.open(tmp_path / "copy.zarr").identity == first
    store.write_shard(0, _random_rows(store, 0, 4, seed=0), np.full(4, DONE, np.uint8))
    committed = FeatureStore.open(store.url).identity
    assert committed["store_id"] == first["store_id"] and committed["fingerprint"] != first["fingerprint"]
    again = FeatureStore.create(store.url, MANIFEST, num_samples=10, shard_rows=4, chunk_rows=1, overwrite=True)
    assert again.identity["store_id"] != first["store_id"] and again.identity["fingerprint"] != first["fingerprint"]
