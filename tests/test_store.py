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
        with pytest.raises(FileExistsError, match=r"holds a folder that is not a store \(notes.txt\)"):
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


def _write_all(store: FeatureStore) -> None:
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        store.write_shard(shard, _random_rows(store, start, stop, seed=shard), np.full(stop - start, DONE, np.uint8))


def test_overwrite_removes_only_what_the_store_owns(store, tmp_path):
    root = tmp_path / "s.zarr"
    _write_all(store)
    store.write_skipped(None, [{"line": 0, "file_name": None, "reason": "empty_prompt", "detail": ""}])
    store.write_skipped_report()
    (root / "NOTES.md").write_text("mine")
    (root / "run1").mkdir()
    (root / "run1" / "log.txt").write_text("mine too")
    (root / "llm" / "mine.txt").write_text("inside an array folder")
    with pytest.raises(FileExistsError) as refused:
        FeatureStore.create(root, MANIFEST, num_samples=10, shard_rows=4)
    message = str(refused.value)
    assert "--overwrite removes the store's clip_simple, " in message and "zarr.json, skipped, skipped.jsonl" in message
    assert "it keeps NOTES.md, run1" in message
    fresh = FeatureStore.create(root, {**MANIFEST, "flip_variants": False}, num_samples=6, shard_rows=4, overwrite=True)
    assert (root / "NOTES.md").read_text() == "mine" and (root / "run1" / "log.txt").read_text() == "mine too"
    assert (root / "llm" / "mine.txt").exists() and not (root / "latent_mean_flipped").exists()
    assert not (root / "skipped.jsonl").exists() and not (root / "skipped").exists()
    assert fresh.num_samples == 6 and fresh.pending_shards() == [0, 1]
    assert FeatureStore.open(root).read(["llm"], 0, 4)["llm"].tolist() == np.zeros((4, 40)).tolist()


def test_overwrite_refuses_a_zarr_group_that_is_not_a_sur_cache_store(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("x", shape=(2,), dtype="int8")
    (tmp_path / "g.zarr" / "README").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError, match=r"a Zarr group that is not a sur-cache store \(README, x, zarr.json\)"
        ):
            FeatureStore.create(tmp_path / "g.zarr", MANIFEST, num_samples=2, shard_rows=2, overwrite=overwrite)
    assert (tmp_path / "g.zarr" / "README").read_text() == "keep" and (tmp_path / "g.zarr" / "x" / "zarr.json").exists()
    assert not FeatureStore.exists(tmp_path / "g.zarr")


def test_reading_a_written_sample_whose_shard_file_is_missing_fails(store, tmp_path):
    store.write_shard(1, _random_rows(store, 4, 8, seed=1), np.full(4, DONE, np.uint8))
    (tmp_path / "s.zarr" / "llm" / "c" / "1" / "0").unlink()
    with pytest.raises(
        StoreFormatError, match=r"array 'llm', samples 4..7: its shard file is missing.*sur-cache verify"
    ):
        store.read(["clip_simple", "llm"], 4, 8)
    assert not store.read(["llm"], 0, 4)["llm"].any()  # a pending shard was never written: nothing is missing


def test_a_corrupt_chunk_read_names_the_array_and_samples(store, tmp_path):
    store.write_shard(1, _random_rows(store, 4, 8, seed=1), np.full(4, DONE, np.uint8))
    shard_file = tmp_path / "s.zarr" / "clip_complex" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StoreFormatError, match=r"array 'clip_complex', samples 4..7: cannot be decoded: .*checksum"):
        store.read(["clip_complex"], 4, 8)


def test_a_deleted_status_shard_is_damage_not_pending(store, tmp_path):
    _write_all(store)
    (tmp_path / "s.zarr" / "status" / "c" / "1").unlink()
    corrupt = store.verify()
    assert ("status", 4, 8, "shard file missing") in [(c.array, c.start, c.stop, c.error) for c in corrupt]
    with pytest.raises(StoreFormatError, match=r"the status of samples 4..7 is missing"):
        store.status()
    assert FeatureStore.exists(store.url)  # features were written: damage to report, not a creation to redo
    with pytest.raises(FileExistsError, match="already holds a sur-cache store"):
        FeatureStore.create(store.url, MANIFEST, num_samples=10, shard_rows=4, chunk_rows=1)


def test_verify_names_non_finite_complete_samples(store):
    rows = _random_rows(store, 4, 8, seed=1)
    rows["llm"][1, 3] = np.nan
    rows["latent_mean"][2, 0, 0, 0] = np.inf
    rows["llm"][3, 0] = np.nan  # a skipped sample: its features are never read
    store.write_shard(1, rows, np.array([DONE, DONE, DONE, SKIPPED], np.uint8))
    corrupt = [(c.array, c.start, c.stop, c.error) for c in store.verify()]
    assert corrupt == [
        ("latent_mean", 6, 7, "NaN or inf in a complete sample"),
        ("llm", 5, 6, "NaN or inf in a complete sample"),
    ]


def _edit_manifest(root: Path, edit) -> None:
    metadata = json.loads((root / "zarr.json").read_text())
    edit(metadata["attributes"])
    (root / "zarr.json").write_text(json.dumps(metadata))


def test_an_edited_manifest_is_refused_naming_the_file_and_field(store, tmp_path):
    root = tmp_path / "s.zarr"
    _edit_manifest(root, lambda attributes: attributes.update(llm_layer=0))
    with pytest.raises(StoreFormatError, match=r"s.zarr/zarr.json: the manifest was changed .*llm_layer \(its value"):
        FeatureStore.open(root)
    _edit_manifest(root, lambda attributes: attributes.update(llm_layer=2))
    FeatureStore.open(root)  # restored: accepted again
    _edit_manifest(root, lambda attributes: attributes.pop("num_samples"))
    with pytest.raises(StoreFormatError, match=r"zarr.json: the manifest was changed .*num_samples \(absent\)"):
        FeatureStore.open(root)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ('{"zarr_format": 3}', "expected the metadata of a Zarr v3 group"),
        ("", "is not valid JSON"),
    ],
    ids=["invalid", "incomplete", "empty"],
)
def test_an_unreadable_zarr_json_is_named(text, expected, store, tmp_path):
    (tmp_path / "s.zarr" / "zarr.json").write_text(text)
    with pytest.raises(StoreFormatError, match=rf"s.zarr/zarr.json:? {expected}"):
        FeatureStore.open(tmp_path / "s.zarr")
    with pytest.raises(StoreFormatError, match=rf"s.zarr/zarr.json:? {expected}"):
        FeatureStore.create(tmp_path / "s.zarr", MANIFEST, num_samples=10, shard_rows=4, overwrite=True)
    assert (tmp_path / "s.zarr" / "llm" / "zarr.json").exists()  # not recognisable: nothing removed


def test_an_unreadable_array_metadata_is_named(store, tmp_path):
    (tmp_path / "s.zarr" / "llm" / "zarr.json").write_text("{")
    with pytest.raises(StoreFormatError, match=r"s.zarr/llm/zarr.json cannot be read as the metadata of array 'llm'"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_a_commit_into_a_replaced_store_is_refused(store):
    replacement = FeatureStore.create(store.url, MANIFEST, num_samples=10, shard_rows=4, chunk_rows=1, overwrite=True)
    with pytest.raises(StoreFormatError, match="no longer the store this run opened"):
        store.write_shard(0, _random_rows(store, 0, 4, seed=0), np.full(4, DONE, np.uint8))
    with pytest.raises(StoreFormatError, match="no longer the store this run opened"):
        store.commit_shard(0, np.full(4, DONE, np.uint8))
    assert replacement.pending_shards() == [0, 1, 2] and not replacement.read(["llm"], 0, 4)["llm"].any()


def test_file_urls_are_local_paths(tmp_path):
    created = FeatureStore.create(f"file://{tmp_path}/f.zarr", MANIFEST, num_samples=4, shard_rows=4)
    assert created.url == f"{tmp_path}/f.zarr"
    created.write_skipped(None, [{"line": 0, "file_name": None, "reason": "empty_prompt", "detail": ""}])
    assert Path(created.write_skipped_report()).is_file()
    assert FeatureStore.open(tmp_path / "f.zarr").identity == created.identity


def test_an_s3_url_without_s3fs_names_the_extra(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    for call in (FeatureStore.open, FeatureStore.exists):
        with pytest.raises(ValueError, match=r"s3://bucket/s.zarr: s3:// URLs need .*pip install 'sur-cache\[s3\]'"):
            call("s3://bucket/s.zarr")


_HOLDER = """
import sys, time
from sur_cache.store import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_writer_lock_names_a_live_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    from sur_cache.store import LOCK_FILE, StoreLockedError, writer_lock

    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StoreLockedError, match=rf"process {holder.pid} on host {socket.gethostname()} \(since "):
            with writer_lock(out):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (out / LOCK_FILE).read_text()  # its record is still there, its flock is gone
    with writer_lock(f"file://{out}"):
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    assert (out / LOCK_FILE).read_text() == ""


def test_the_writer_lock_of_an_object_store_is_an_exclusive_file(monkeypatch):
    import fsspec

    from sur_cache.store import LOCK_FILE, StoreLockedError, writer_lock

    url = f"memory://sur-cache-lock-{uuid.uuid4().hex}/s.zarr"
    fs, root = fsspec.core.url_to_fs(url)
    with writer_lock(url):
        with pytest.raises(StoreLockedError, match=rf"if that process is gone, delete .*{LOCK_FILE}"):
            with writer_lock(url):
                pass
    assert not fs.exists(f"{root}/{LOCK_FILE}")  # removed on release
    import socket

    fs.pipe_file(
        f"{root}/{LOCK_FILE}", json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "since": "x"}).encode()
    )
    with writer_lock(url):  # that pid does not exist on this host: a stale lock, taken over
        assert json.loads(fs.cat_file(f"{root}/{LOCK_FILE}"))["pid"] != 2**22 + 1
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps({"host": "elsewhere", "pid": 1, "since": "x"}).encode())
    with pytest.raises(StoreLockedError, match="process 1 on host elsewhere"):
        with writer_lock(url):
            pass
