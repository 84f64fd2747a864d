"""`sur-cache migrate`: a schema-1 store (the committed 0.1.0 test store) converted in place, bit-identically, and a
migration killed at any step leaves a store that migrates again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sur_cache import migration
from sur_cache.migration import migrate
from sur_cache.store import PENDING, SKIPPED, FeatureStore, StoreFormatError

# ---- schema 1 ----------------------------------------------------------------------------------------------------
SCHEMA1 = Path(__file__).parent / "data" / "store_schema1.zarr"


def _raw_arrays(url) -> dict[str, np.ndarray]:
    """Every array of a store read by zarr itself, bypassing sur-cache."""
    import zarr

    group = zarr.open_group(str(url), mode="r")
    return {name: array[:] for name, array in group.arrays()}


def test_a_schema1_store_is_refused_naming_migrate_then_migrated_bit_identically(tmp_path):
    copy = tmp_path / "v1.zarr"
    shutil.copytree(SCHEMA1, copy)
    with pytest.raises(StoreFormatError, match=rf"schema_version 1 .*`sur-cache migrate {copy}`"):
        FeatureStore.open(copy)
    assert FeatureStore.exists(copy)  # a store of ours: extract resumes nothing into it, and names migrate
    assert migrate(copy) is True and migrate(copy) is False
    migrated = FeatureStore.open(copy)
    original, v1 = _raw_arrays(SCHEMA1), json.loads((SCHEMA1 / "zarr.json").read_text())["attributes"]
    for name, values in original.items():
        assert migrated.array(name)[:].tobytes() == values.tobytes(), name
    assert migrated.file_names() == v1["file_names"]
    assert migrated.status().tolist() == original["status"].tolist() and (original["status"] == SKIPPED).sum() == 1
    assert migrated.summary()["skipped"] == {"unreadable_image": 1} and migrated.verify() == []
    settings = migrated.manifest.settings()
    assert {k: settings[k] for k in v1 if k in settings} == {k: v for k, v in v1.items() if k in settings}
    assert migrated.manifest.llm_features_file is None and migrated.manifest.store_id


@pytest.mark.parametrize("step", range(len(migration.MIGRATION_STEPS)))
def test_a_migration_killed_at_any_step_leaves_a_store_that_migrates_again(tmp_path, monkeypatch, step):
    copy = tmp_path / "v1.zarr"
    shutil.copytree(SCHEMA1, copy)
    steps = list(migration.MIGRATION_STEPS)

    def killed(migration):
        raise KeyboardInterrupt  # stands in for kill -9: nothing after it runs

    steps[step] = killed
    monkeypatch.setattr(migration, "MIGRATION_STEPS", tuple(steps))
    with pytest.raises(KeyboardInterrupt):
        migrate(copy)
    monkeypatch.undo()
    with pytest.raises(StoreFormatError, match="sur-cache migrate"):  # still schema 1: nothing half-converted opens
        FeatureStore.open(copy)
    assert migrate(copy) is True
    migrated, original = FeatureStore.open(copy), _raw_arrays(SCHEMA1)
    assert all(migrated.array(name)[:].tobytes() == values.tobytes() for name, values in original.items())
    assert migrated.verify() == [] and migrated.pending_shards() == []


def test_a_schema1_shard_never_committed_is_pending_after_migration(tmp_path):
    copy = tmp_path / "v1.zarr"
    shutil.copytree(SCHEMA1, copy)
    (copy / "status" / "c" / "2").unlink()  # schema 1 left a shard that was never committed without a status file
    migrate(copy)
    migrated = FeatureStore.open(copy)
    assert migrated.pending_shards() == [2] and migrated.status()[8:].tolist() == [PENDING, PENDING]
    assert not (copy / "status" / "c" / "2").exists() and migrated.verify() == []  # as schema 2 leaves it
