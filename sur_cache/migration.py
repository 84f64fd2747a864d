"""`sur-cache migrate`: a schema-1 store (sur-cache 0.1.0: the file names in the manifest, no store id, no field
checksums, no dimension names) converted in place to the current schema, crash-safely (docs/store.md)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from sur_cache.locations import filesystem, names_in, normalise_url, zarr_options
from sur_cache.store import (
    COMMITS_DIR,
    FILE_NAME_ARRAY,
    PENDING,
    SCHEMA_VERSION,
    FeatureStore,
    Manifest,
    StoreFormatError,
    _build,
    _create_array,
    _field_problems,
    _group_metadata,
    _is_sur_cache,
    _short,
    _write_atomically,
    array_specs,
    file_name_spec,
    name_bytes,
    names_sha256,
)
from sur_cache.writer_lock import writer_lock


@dataclass
class _Migration:
    """What a migration of one schema-1 store works on; each step below reads it and writes into the store."""

    url: str
    fs: Any
    root: str
    metadata: dict[str, Any]  # the group's zarr.json, schema 1
    manifest: Manifest  # the schema-2 manifest it becomes (a fresh store id)
    file_names: list[str]
    storage_options: Mapping[str, Any] | None = None

    def store(self) -> FeatureStore:
        """The store as schema 2 will see it (not validated: its zarr.json is still schema 1)."""
        group = zarr.open_group(self.url, mode="r+", **zarr_options(self.storage_options))
        return FeatureStore(self.url, group, self.manifest, self.storage_options)


def migrate(url: str | Path, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Convert the schema-1 store at `url` (sur-cache 0.1.0) in place to schema 2; False if it is schema 2 already.

    Holds the writer lock. Every step but the last writes only what schema 1 does not read (dimension names, the
    file_name array, commit markers of its committed shards); the last step, the commit, replaces the group's
    zarr.json atomically with the schema-2 manifest. A migration that stops at any point leaves a schema-1 store that
    migrates again from the start. Feature bytes are never rewritten. Status shards schema 1 never wrote (shards
    never committed) stay absent: in schema 2 too a shard has no status file until its commit.
    """
    url = normalise_url(url)
    fs, root = filesystem(url, storage_options)
    with writer_lock(url, storage_options):
        metadata = _group_metadata(fs, root)
        if metadata is None:
            raise FileNotFoundError(f"no sur-cache store at {url}; nothing to migrate")
        attributes = metadata["attributes"]
        if attributes.get("schema_version") == SCHEMA_VERSION:
            Manifest.from_json(attributes, url)
            return False
        if attributes.get("schema_version") != 1 or not _is_sur_cache(attributes):
            raise StoreFormatError(
                f"{url}/zarr.json: expected a sur-cache store of schema_version 1 to migrate, found schema_version "
                f"{_short(attributes.get('schema_version', '<absent>'))}; migrate converts sur-cache 0.1.0 stores only"
            )
        migration = _Migration(url, fs, root, metadata, *_schema1_manifest(url, attributes), storage_options)
        for step in MIGRATION_STEPS:
            step(migration)
    return True


def _schema1_manifest(url: str, attributes: dict[str, Any]) -> tuple[Manifest, list[str]]:
    """The schema-2 manifest of a schema-1 one, and its file names; every field checked as `from_json` does."""
    names = attributes.get("file_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise StoreFormatError(f"{url}/zarr.json: a schema-1 manifest lists its file_names; this one does not")
    fields = {key: value for key, value in attributes.items() if key not in ("schema_version", "file_names")}
    fields = {"llm_model": None, "llm_features_file": None, **fields}  # schema 1 left out the unused teacher
    fields.update(file_names_sha256=names_sha256(names), file_name_bytes=name_bytes(names), store_id=uuid.uuid4().hex)
    problems = _field_problems(Manifest, fields, "")
    if problems:
        raise StoreFormatError(
            f"{url}/zarr.json: this schema-1 manifest cannot become schema {SCHEMA_VERSION}: {'; '.join(problems)}; "
            "re-extract the store (`sur-cache extract ... --overwrite`)"
        )
    return _build(Manifest, fields), names


def _migrate_dimension_names(migration: _Migration) -> None:
    """Each array's zarr.json with this schema's dimension names (replaced atomically, its data untouched)."""
    for name, spec in array_specs(migration.manifest).items():
        path = f"{migration.root}/{name}/zarr.json"
        metadata = json.loads(migration.fs.cat_file(path))
        if metadata.get("dimension_names") != list(spec.dimension_names):
            metadata["dimension_names"] = list(spec.dimension_names)
            _write_atomically(migration.fs, path, json.dumps(metadata, indent=2))


def _migrate_file_names(migration: _Migration) -> None:
    """The file_name array, created anew from the schema-1 manifest's list."""
    store = migration.store()
    _create_array(store._group, FILE_NAME_ARRAY, file_name_spec(migration.manifest), migration.manifest, True)
    store._write_file_names(migration.file_names)


def _migrate_commit_markers(migration: _Migration) -> None:
    """A commit marker for every shard whose status is final (schema 1's commit), none for the others."""
    store = migration.store()
    folder = f"{migration.root}/{COMMITS_DIR}"
    for name in names_in(migration.fs, folder):  # a stopped migration's markers: written again below
        migration.fs.rm(f"{folder}/{name}")
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        status = store.array("status")[start:stop]
        if (status != PENDING).all():
            store._write_commit_marker(shard, status)


def _migrate_manifest(migration: _Migration) -> None:
    """The commit of the migration: the group's zarr.json with the schema-2 manifest, replaced atomically."""
    metadata = {**migration.metadata, "attributes": migration.manifest.to_json()}
    _write_atomically(migration.fs, f"{migration.root}/zarr.json", json.dumps(metadata, indent=2))


# In order; the last one is the commit (tests raise at each to simulate a kill).
MIGRATION_STEPS = (
    _migrate_dimension_names,
    _migrate_file_names,
    _migrate_commit_markers,
    _migrate_manifest,
)
