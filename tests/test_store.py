"""The store format: the typed manifest, layout from it, validation on open, shard writes and commit markers, the
scans, skip reports, verify, schema-1 migration, and reading by xarray and tensorstore."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from sur_cache import store as store_module
from sur_cache.store import (
    DONE,
    PENDING,
    SKIPPED,
    FeatureStore,
    Manifest,
    ManifestMismatchError,
    StoreFormatError,
    array_specs,
    synthetic_manifest,
    synthetic_store,
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
LAYOUT = {"num_samples": 10, "shard_rows": 4, "chunk_rows": 1}


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
    return synthetic_store(tmp_path / "s.zarr", **MANIFEST, **LAYOUT)


def test_layout_follows_the_manifest(store):
    assert store.shard_ranges() == [(0, 4), (4, 8), (8, 10)]
    assert store.array("clip_simple").shape == (10, 77, 24)
    assert store.array("clip_simple").chunks == (1, 77, 24)
    assert store.array("clip_simple").shards == (4, 77, 24)
    assert store.array("llm_tokens").shape == (10, 77, 40)
    assert store.array("status").chunks == (4,)  # tiny rows: one chunk per shard
    assert "latent_mean_flipped" in store.specs
    assert store.manifest.chunk_rows == 1 and store.manifest.compression == "none"
    without = array_specs(dataclasses.replace(store.manifest, flip_variants=False, llm_per_token=False))
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
    expected = synthetic_manifest(**{**MANIFEST, "llm_layer": 1, "clip_width": 32}, **LAYOUT)
    with pytest.raises(ManifestMismatchError) as error:
        FeatureStore.open(store.url, mode="r+", expected=expected)
    message = str(error.value)
    assert "llm_layer: expected 1, found 2" in message
    assert "clip_width: expected 32, found 24" in message
    assert "num_samples" not in message and "store_id" not in message  # equal, and store-owned: never compared
    assert "--overwrite" in message
    FeatureStore.open(store.url, mode="r+", expected=synthetic_manifest(**MANIFEST, **LAYOUT))  # same settings resume


def test_create_refuses_existing_store_unless_overwrite(store):
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthetic_store(store.url, **MANIFEST, num_samples=10, shard_rows=4)
    store.write_skipped(None, [{"line": 7, "file_name": None, "reason": "malformed_json", "detail": "x"}])
    report = Path(store.write_skipped_report())
    fresh = synthetic_store(store.url, **{**MANIFEST, "llm_layer": 0}, num_samples=3, shard_rows=4, overwrite=True)
    assert fresh.num_samples == 3 and fresh.manifest.llm_layer == 0
    assert fresh.skipped_records() == [] and not report.exists()  # the old store's skip reports went with it


def test_create_never_wipes_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"holds a folder that is not a store \(notes.txt\)"):
            synthetic_store(tmp_path, **MANIFEST, num_samples=2, shard_rows=2, overwrite=overwrite)
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
    # The scans read the commit markers, never the status array: a corrupt status slice cannot stand in for data
    # there, and `verify` is what finds it.
    assert store.summary()["complete"] == 10 and store.status().tolist() == [DONE] * 10


def test_partial_files_are_removed(store, tmp_path):
    leftover = tmp_path / "s.zarr" / "llm" / "c" / "0" / "0.abc.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    assert store.remove_partial_files() == 1
    assert not leftover.exists()


def test_memory_url_store_round_trips():
    url = f"memory://sur-cache-test-{uuid.uuid4().hex}/s.zarr"
    created = synthetic_store(url, **MANIFEST, num_samples=5, shard_rows=4)
    rows = _random_rows(created, 4, 5, seed=3)
    created.write_shard(1, rows, np.array([DONE], np.uint8))
    created.write_skipped(None, [{"line": 0, "file_name": None, "reason": "empty_prompt", "detail": ""}])
    opened = FeatureStore.open(url, expected=synthetic_manifest(**MANIFEST, num_samples=5, shard_rows=4))
    np.testing.assert_array_equal(opened.read(["llm"], 4, 5)["llm"], rows["llm"])
    assert opened.summary() == {"num_samples": 5, "complete": 1, "pending": 4, "skipped": {"empty_prompt": 1}}
    assert opened.describe()["arrays"]["llm"]["chunks"] == [4, 40]  # default chunk_rows, capped at the shard


def test_compressed_store_round_trips_with_checksums(tmp_path):
    store = synthetic_store(tmp_path / "z.zarr", **MANIFEST, num_samples=4, shard_rows=4, compression="zstd")
    rows = _random_rows(store, 0, 4, seed=5)
    store.write_shard(0, rows, np.full(4, DONE, np.uint8))
    np.testing.assert_array_equal(FeatureStore.open(store.url).read(["llm"], 0, 4)["llm"], rows["llm"])
    inner = [c["name"] for c in store.array("llm").metadata.to_dict()["codecs"][0]["configuration"]["codecs"]]
    assert inner == ["bytes", "zstd", "crc32c"]
    with pytest.raises(ValueError, match="compression must be one of"):
        synthetic_store(tmp_path / "b.zarr", **MANIFEST, num_samples=4, compression="lzma")


def test_identity_is_kept_by_a_copy_and_changed_by_a_commit_or_a_new_store(store, tmp_path):

    first = store.identity
    assert set(first) == {"store_id", "fingerprint"} and len(first["fingerprint"]) == 64
    shutil.copytree(store.url, tmp_path / "copy.zarr")
    assert FeatureStore.open(tmp_path / "copy.zarr").identity == first
    store.write_shard(0, _random_rows(store, 0, 4, seed=0), np.full(4, DONE, np.uint8))
    committed = FeatureStore.open(store.url).identity
    assert committed["store_id"] == first["store_id"] and committed["fingerprint"] != first["fingerprint"]
    again = synthetic_store(store.url, **MANIFEST, **LAYOUT, overwrite=True)
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
        synthetic_store(root, **MANIFEST, num_samples=10, shard_rows=4)
    message = str(refused.value)
    assert "--overwrite removes the store's clip_simple, " in message and "zarr.json, skipped, skipped.jsonl" in message
    assert "it keeps NOTES.md, run1" in message
    fresh = synthetic_store(root, **{**MANIFEST, "flip_variants": False}, num_samples=6, shard_rows=4, overwrite=True)
    assert (root / "NOTES.md").read_text() == "mine" and (root / "run1" / "log.txt").read_text() == "mine too"
    assert (root / "llm" / "mine.txt").exists() and not (root / "latent_mean_flipped").exists()
    assert not (root / "skipped.jsonl").exists() and not (root / "skipped").exists() and not (root / "commits").exists()
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
            synthetic_store(tmp_path / "g.zarr", **MANIFEST, num_samples=2, shard_rows=2, overwrite=overwrite)
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
        synthetic_store(store.url, **MANIFEST, **LAYOUT)


def test_create_writes_no_status_shard_and_an_uncommitted_shard_without_one_is_pending(store, tmp_path):
    assert not (tmp_path / "s.zarr" / "status" / "c").exists()  # create wrote metadata only: O(1) in N
    store.write_shard(1, _random_rows(store, 4, 8, seed=1), np.full(4, DONE, np.uint8))
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "status" / "c").iterdir()) == ["1"]
    assert store.pending_shards() == [0, 2] and store.verify() == []
    assert store.status().tolist() == [PENDING] * 4 + [DONE] * 4 + [PENDING] * 2
    assert not store.read(["llm"], 0, 4)["llm"].any()  # never written: no file, no damage


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
        synthetic_store(tmp_path / "s.zarr", **MANIFEST, num_samples=10, shard_rows=4, overwrite=True)
    assert (tmp_path / "s.zarr" / "llm" / "zarr.json").exists()  # not recognisable: nothing removed


def test_an_unreadable_array_metadata_is_named(store, tmp_path):
    (tmp_path / "s.zarr" / "llm" / "zarr.json").write_text("{")
    with pytest.raises(StoreFormatError, match=r"s.zarr/llm/zarr.json cannot be read as the metadata of array 'llm'"):
        FeatureStore.open(tmp_path / "s.zarr")


def test_a_commit_into_a_replaced_store_is_refused(store):
    replacement = synthetic_store(store.url, **MANIFEST, **LAYOUT, overwrite=True)
    with pytest.raises(StoreFormatError, match="no longer the store this run opened"):
        store.write_shard(0, _random_rows(store, 0, 4, seed=0), np.full(4, DONE, np.uint8))
    with pytest.raises(StoreFormatError, match="no longer the store this run opened"):
        store.commit_shard(0, np.full(4, DONE, np.uint8))
    assert replacement.pending_shards() == [0, 1, 2] and not replacement.read(["llm"], 0, 4)["llm"].any()


def test_file_urls_are_local_paths(tmp_path):
    created = synthetic_store(f"file://{tmp_path}/f.zarr", **MANIFEST, num_samples=4, shard_rows=4)
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


# ---- the typed manifest ------------------------------------------------------------------------------------------
def _attributes_with(manifest: Manifest, edit) -> dict:
    """`manifest.to_json()` edited by `edit`, with checksums recomputed: what another writer could have written."""
    attributes = manifest.to_json()
    edit(attributes)
    attributes["field_sha256"] = store_module.field_digests(attributes)
    return attributes


def test_manifest_round_trips_through_json_and_stays_small_whatever_n(store):
    assert Manifest.from_json(json.loads(json.dumps(store.manifest.to_json())), store.url) == store.manifest
    on_disk = json.loads((Path(store.url) / "zarr.json").read_text())["attributes"]
    assert Manifest.from_json(on_disk, store.url) == store.manifest
    assert on_disk["schema_version"] == 2 and "file_names" not in on_disk
    huge = dataclasses.replace(synthetic_manifest(**MANIFEST, num_samples=10_000_000), store_id="x")
    assert len(json.dumps(huge.to_json())) < 8192  # nothing in the manifest grows with N


def test_manifest_validation_names_each_missing_extra_and_mistyped_field(store):
    def broken(attributes):
        del attributes["crop"]
        attributes["colour"] = "blue"
        attributes["llm_layer"] = "2"
        attributes["sd_model"] = {"id": "x"}
        attributes["llm_8bit"] = 1

    with pytest.raises(StoreFormatError) as error:
        Manifest.from_json(_attributes_with(store.manifest, broken), store.url)
    message = str(error.value)
    assert message.startswith(f"{store.url}/zarr.json: the manifest does not fit schema 2: ")
    for problem in (
        "missing field crop",
        "unexpected field colour",
        'llm_layer: expected an integer or null, found "2"',
        "missing field sd_model.revision",
        "llm_8bit: expected true or false or null, found 1",
    ):
        assert problem in message
    assert "sur-cache extract ... --overwrite" in message
    with pytest.raises(StoreFormatError, match=r"vae_scaling_factor: expected a number, found \"big\""):
        Manifest.from_json(_attributes_with(store.manifest, lambda a: a.update(vae_scaling_factor="big")), store.url)
    ints = _attributes_with(store.manifest, lambda a: a.update(vae_scaling_factor=1))
    assert Manifest.from_json(ints, store.url).vae_scaling_factor == 1.0 and isinstance(
        Manifest.from_json(ints, store.url).vae_scaling_factor, float
    )


def test_resume_differences_list_settings_only(store):
    other = dataclasses.replace(store.manifest, store_id="another", resolution=1024, crop="random")
    assert other.differences(store.manifest) == [
        'crop: expected "random", found "center"',
        "resolution: expected 1024, found 64",
    ]


# ---- commit markers and the scans ---------------------------------------------------------------------------------
def _slow_reference(store: FeatureStore) -> np.ndarray:
    """Per sample, the status array masked to pending where no commit marker exists, by a loop over the shards."""
    raw = store.array("status")[:]
    markers = os.listdir(Path(store.url) / "commits") if (Path(store.url) / "commits").exists() else []
    committed = {int(name.split("-")[0]) for name in markers if name.endswith(".json")}
    status = np.zeros_like(raw)
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        if shard in committed:
            status[start:stop] = raw[start:stop]
    return status


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_scans_equal_a_slow_reference_on_random_statuses(tmp_path, seed):
    rng = np.random.default_rng(seed)
    created = synthetic_store(tmp_path / "r.zarr", **MANIFEST, num_samples=int(rng.integers(20, 60)), shard_rows=5)
    for shard, (start, stop) in enumerate(created.shard_ranges()):
        kind = rng.integers(4)  # pending, committed, committed with skips, status written but killed before its marker
        status = np.where(rng.random(stop - start) < 0.3 * (kind >= 2), SKIPPED, DONE).astype(np.uint8)
        if kind == 0:
            continue
        if kind == 3:
            created._writable("status")[start:stop] = status  # what a kill between the status and the marker leaves
            continue
        created.commit_shard(shard, status)
    opened = FeatureStore.open(created.url)
    reference = _slow_reference(opened)
    np.testing.assert_array_equal(opened.status(), reference)
    np.testing.assert_array_equal(opened.complete_indices(), np.flatnonzero(reference == DONE))
    ranges = opened.shard_ranges()
    assert opened.pending_shards() == [i for i, (a, b) in enumerate(ranges) if (reference[a:b] == PENDING).any()]
    summary = opened.summary()
    assert (summary["complete"], summary["pending"]) == ((reference == DONE).sum(), (reference == PENDING).sum())
    counts = opened.shard_counts()
    assert counts.skipped.tolist() == [int((reference[a:b] == SKIPPED).sum()) for a, b in ranges]


def test_a_shard_is_pending_until_its_commit_marker_is_written(store, monkeypatch):
    class Killed(Exception):
        pass

    def killed(*args):
        raise Killed

    rows = _random_rows(store, 4, 8, seed=1)
    store.write_shard(1, rows, np.full(4, DONE, np.uint8))
    monkeypatch.setattr(FeatureStore, "_write_commit_marker", killed)
    with pytest.raises(Killed):  # a re-commit: the old marker goes first, the new status is written, then the kill
        store.commit_shard(1, np.array([DONE, SKIPPED, DONE, DONE], np.uint8))
    monkeypatch.undo()
    assert store.array("status")[4:8].tolist() == [DONE, SKIPPED, DONE, DONE]
    reopened = FeatureStore.open(store.url, mode="r+")
    assert reopened.pending_shards() == [0, 1, 2] and reopened.summary()["complete"] == 0
    reopened.commit_shard(1, np.array([DONE, SKIPPED, DONE, DONE], np.uint8))  # the resume's commit
    assert reopened.complete_indices().tolist() == [4, 6, 7]
    assert sorted(os.listdir(Path(store.url) / "commits")) == ["00000001-3-1.json"]


def test_verify_finds_a_commit_marker_that_claims_more_than_the_status(store):
    _write_all(store)
    commits = Path(store.url) / "commits"
    (commits / "00000001-4-0.json").rename(commits / "00000001-3-1.json")
    (commits / "00000001-3-1.json").write_text(json.dumps({"skipped": [0], "truncated": [0, 0], "bytes": {}}))
    assert FeatureStore.open(store.url).status()[4:8].tolist() == [SKIPPED, DONE, DONE, DONE]  # the markers rule
    found = [(c.array, c.start, c.stop) for c in store.verify()]
    assert found == [("status", 4, 8)]


def test_describe_counts_the_committed_shard_files(store):
    store.write_shard(1, _random_rows(store, 4, 8, seed=1), np.full(4, DONE, np.uint8))
    described = FeatureStore.open(store.url).describe()
    root = Path(store.url)
    for name, array in described["arrays"].items():
        shard_file = root / name / "c" / "1" / Path(*["0"] * (len(array["shape"]) - 1))
        assert array["bytes_stored"] == shard_file.stat().st_size, name
    assert described["committed_shards"] == 1 and described["num_shards"] == 3
    assert described["arrays"]["clip_simple"]["dimensions"] == ["sample", "token", "clip_width"]


# ---- the commit index ----------------------------------------------------------------------------------------------
def _write_with_a_skip(store: FeatureStore) -> None:
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        status = np.full(stop - start, DONE, np.uint8)
        status[0] = SKIPPED if shard == 1 else DONE
        store.write_shard(shard, _random_rows(store, start, stop, seed=shard), status)


def _files_read(monkeypatch) -> list[str]:
    paths: list[str] = []
    read_files = store_module.read_files
    monkeypatch.setattr(store_module, "read_files", lambda fs, names: paths.extend(names) or read_files(fs, names))
    return paths


def test_the_commit_index_gives_describe_the_markers_figures_in_one_read(store, monkeypatch):
    _write_with_a_skip(store)
    index = Path(store.url) / "commits" / "index.json"
    without = FeatureStore.open(store.url)  # a store written before the index existed: every marker is read
    described, truncated = without.describe(), without.truncated_counts()
    assert not index.exists() and truncated["simple"] > 0
    store.write_commit_index()
    paths = _files_read(monkeypatch)
    indexed = FeatureStore.open(store.url)
    assert indexed.describe() == described and indexed.truncated_counts() == truncated
    assert {Path(path).name for path in paths} == {"index.json"}  # no marker file read


def test_a_commit_removes_the_index_and_the_marker_listing_decides_what_it_covers(store):
    root = Path(store.url)
    rows = {shard: _random_rows(store, a, b, seed=shard) for shard, (a, b) in enumerate(store.shard_ranges())}
    store.write_shard(0, rows[0], np.full(4, DONE, np.uint8))
    store.write_commit_index()
    older = (root / "commits" / "index.json").read_bytes()
    store.write_shard(1, rows[1], np.full(4, DONE, np.uint8))
    assert not (root / "commits" / "index.json").exists()  # a commit after the index: gone before the commit
    truth = FeatureStore.open(store.url).describe()
    (root / "commits" / "index.json").write_bytes(older)  # an index naming shard 0 only: shard 1 from its marker
    assert FeatureStore.open(store.url).describe() == truth
    (root / "commits" / "00000000-4-0.json").unlink()  # the marker rules: shard 0 is pending, whatever the index says
    described = FeatureStore.open(store.url).describe()
    assert (described["committed_shards"], described["complete"], described["pending"]) == (1, 4, 6)
    (root / "commits" / "index.json").unlink()
    assert FeatureStore.open(store.url).describe() == described


def test_verify_finds_an_unreadable_or_disagreeing_commit_index(store):
    _write_with_a_skip(store)
    truth = FeatureStore.open(store.url).describe()
    store.write_commit_index()
    assert store.verify() == []
    path = Path(store.url) / "commits" / "index.json"
    index = json.loads(path.read_text())
    index["bytes"]["llm"][1] += 1
    path.write_text(json.dumps(index))
    assert [(c.array, c.start, c.stop) for c in store.verify()] == [("commits/index.json", 4, 8)]
    path.write_text('{"markers": ["00000000-4-0.json"], "truncated": [[0, 0]], "bytes": {"llm": [1, 2]}}')
    assert [(c.array, c.start, c.stop) for c in store.verify()] == [("commits/index.json", 0, 10)]
    assert FeatureStore.open(store.url).describe() == truth  # an unreadable index: the markers are read instead


def test_file_names_are_an_array_matching_the_manifest(tmp_path):
    names = ["a.png", "ünïcode/ß.jpg", "x" * 70]
    manifest = dataclasses.replace(
        synthetic_manifest(**MANIFEST, num_samples=3, shard_rows=2),
        file_names_sha256=store_module.names_sha256(names),
        file_name_bytes=store_module.name_bytes(names),
    )
    created = FeatureStore.create(tmp_path / "n.zarr", manifest, names)
    assert FeatureStore.open(created.url).file_names() == names and created.file_names(1, 2) == names[1:2]
    with pytest.raises(ValueError, match="file_names_sha256"):
        FeatureStore.create(tmp_path / "m.zarr", manifest, names[::-1])


# ---- other Zarr readers ------------------------------------------------------------------------------------------
def test_xarray_opens_the_whole_store_as_one_dataset(store):
    xarray = pytest.importorskip("xarray")
    _write_all(store)
    dataset = xarray.open_zarr(store.url, consolidated=False)
    assert set(dataset.data_vars) == set(store.array_names)
    assert dataset.sizes["sample"] == 10 and dataset.sizes["token"] == 77 and dataset.sizes["hash_byte"] == 32
    for name in store.array_names:
        np.testing.assert_array_equal(dataset[name].values, store.read([name], 0, 10)[name], err_msg=name)
    assert dataset.attrs["store_id"] == store.manifest.store_id


def test_tensorstore_reads_every_array_as_the_store_does(store):
    tensorstore = pytest.importorskip("tensorstore")
    _write_all(store)
    for name in store.array_names:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store.url}/{name}/"}}
        values = tensorstore.open(spec, read=True).result().read().result()
        np.testing.assert_array_equal(values, store.read([name], 0, 10)[name], err_msg=name)


def test_a_field_added_later_may_be_absent_and_reads_as_its_default():
    @dataclasses.dataclass(frozen=True)
    class Fields:
        kept: int
        newer: str = store_module.added_field("old meaning", "0.2")

    assert store_module._field_problems(Fields, {"kept": 1}, "") == []
    assert store_module._build(Fields, {"kept": 1}) == Fields(kept=1, newer="old meaning")
    assert store_module._field_problems(Fields, {"newer": "x"}, "") == ["missing field kept"]
    assert store_module._field_problems(Fields, {"kept": 1, "newer": 2}, "") == ["newer: expected a string, found 2"]


def test_a_manifest_written_before_the_sdxl_fields_reads_as_an_sd_store_with_its_vae_in_sd_dtype(store):
    def older(attributes):
        for name in ("sd_kind", "pooled_width", "vae_dtype"):
            del attributes[name]

    manifest = Manifest.from_json(_attributes_with(store.manifest, older), store.url)
    assert (manifest.sd_kind, manifest.pooled_width, manifest.vae_dtype) == ("sd", None, None)
    assert manifest.vae_compute_dtype == manifest.sd_dtype
    assert "pooled_simple" not in array_specs(manifest) and "original_size" not in array_specs(manifest)
    sdxl = array_specs(dataclasses.replace(manifest, sd_kind="sdxl", pooled_width=1280))
    assert sdxl["pooled_simple"].row_shape == (1280,) and sdxl["original_size"].dtype == "int32"


def test_a_tuple_of_integers_field_is_a_json_list_read_back_as_a_tuple():
    @dataclasses.dataclass(frozen=True)
    class Fields:
        layers: tuple[int, ...] | None

    assert store_module._field_problems(Fields, {"layers": [20, 30, 39]}, "") == []
    assert store_module._build(Fields, {"layers": [20, 30, 39]}) == Fields(layers=(20, 30, 39))
    assert store_module._build(Fields, {"layers": None}) == Fields(layers=None)
    for bad in ([], [1, 2.0], [True], "20,30", 3):
        expected = f"layers: expected a non-empty list of integers or null, found {json.dumps(bad)}"
        assert store_module._field_problems(Fields, {"layers": bad}, "") == [expected], bad


def test_a_store_written_before_llm_layers_reads_as_a_single_layer_store(store):
    attributes = store.manifest.to_json()
    older = {key: value for key, value in attributes.items() if key not in ("llm_layers", "llm_chat_template")}
    older["field_sha256"] = store_module.field_digests(older)
    manifest = Manifest.from_json(older, store.url)
    assert manifest.llm_layers is None and manifest.llm_chat_template is False
    assert array_specs(manifest)["llm"].row_shape == (40,)


def test_a_multi_layer_store_holds_llm_as_sample_layer_width_and_xarray_opens_it(tmp_path):
    xarray = pytest.importorskip("xarray")
    fields = {**MANIFEST, "llm_layer": None, "llm_layers": (0, 2, 5), "llm_per_token": False}
    store = synthetic_store(tmp_path / "layers.zarr", **fields, **LAYOUT)
    assert store.array("llm").shape == (10, 3, 40)
    assert store.specs["llm"].dimension_names == ("sample", "llm_layer", "llm_width")
    reopened = FeatureStore.open(store.url)
    assert reopened.manifest.llm_layers == (0, 2, 5) and reopened.manifest == store.manifest
    _write_all(store)
    dataset = xarray.open_zarr(store.url, consolidated=False)
    assert dataset["llm"].dims == ("sample", "llm_layer", "llm_width") and dataset.sizes["llm_layer"] == 3
    np.testing.assert_array_equal(dataset["llm"].values, store.read(["llm"], 0, 10)["llm"])
