"""The feature store: one Zarr v3 group per extraction run, self-described by a manifest in its attributes.

Layout (sample axis first in every array; N = number of dataset rows that passed the metadata checks):

    clip_simple, clip_complex   [N, L, clip_width]              store dtype (L = tokenizer_max_length, 77)
    latent_mean, latent_logvar  [N, c, s, s]                    store dtype (+ *_flipped with flip variants)
    llm                         [N, llm_width]                  store dtype (+ llm_tokens [N, L, D], llm_mask [N, L])
    sample_line                 [N] int64                       0-based line in metadata.jsonl
    truncated                   [N, 2] bool                     CLIP truncated the (simple, complex) prompt
    crop_offset                 [N, 2] int32                    (top, left) of the crop in the resized image
    image_sha256, text_sha256, prompt_sha256  [N, 32] uint8     content hashes
    status                      [N] uint8                       0 pending, 1 done, 2 skipped

Every array is sharded along the sample axis at `shard_rows` samples: a shard is one file, written whole by one
writer, so concurrent processes never share a file. Inside a shard, feature arrays are chunked at `chunk_rows`
samples (16 by default: whole-shard reads, what the loader does, run near the speed of one chunk per shard, while a
single random sample still decodes only 16; docs/store.md has the measurements), uncompressed by default (fp16
features barely compress), and every chunk and every shard index carries a crc32c checksum.

The writer of a shard writes all its arrays first and its `status` slice last (the commit); a shard whose status is
not final is recomputed from scratch, so a crash at any point loses at most the shards in flight and the result
stays bit-identical to an uninterrupted run. Local writes go to a `*.partial` file renamed into place (zarr's
LocalStore), so a killed write never leaves a torn shard; `remove_partial_files` sweeps the leftovers. There is
no fsync: a process crash is covered, a power loss may lose the page cache's last writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

SCHEMA_VERSION = 2  # 2: the manifest carries a store id and field checksums; status is written whole at creation
PENDING, DONE, SKIPPED = 0, 1, 2
SKIPPED_DIR = "skipped"  # per-writer skip reports, one JSON-lines file per shard (plus one for the metadata pass)
SKIPPED_REPORT = "skipped.jsonl"  # the merged report, rewritten at the end of each extract run
LOCK_FILE = "writer.lock"  # the exclusive writer lock of an extract run (see `writer_lock`)
METADATA_PART, SHARD_PART_PREFIX = "metadata", "shard-"
COMPRESSIONS = ("none", "zstd", "blosc")
DEFAULT_COMPRESSION = "none"  # fp16 features barely compress; measured in docs/store.md
DEFAULT_CHUNK_ROWS = 16  # contiguous shard reads near the best, one random row still cheap: docs/store.md
DEFAULT_SHARD_ROWS = 256
_SMALL_ROW_BYTES = 64  # arrays with rows this small get one chunk per shard: per-chunk overhead would dominate
_HASH_BYTES = 32
# Fields every manifest must have; extract writes more (see stages/extract.py), all of them compared on resume.
REQUIRED_FIELDS = (
    "schema_version",
    "sur_cache_version",
    "num_samples",
    "shard_rows",
    "store_dtype",
    "tokenizer_max_length",
    "clip_width",
    "llm_width",
    "latent_channels",
    "latent_size",
    "flip_variants",
    "llm_per_token",
)


# Fields the store itself writes into its manifest: who it is and a checksum of every field. They are not settings, so
# a resume never compares them. (Kept together here until the manifest becomes a typed dataclass.)
STORE_ID = "store_id"  # a fresh random id per created store: a copy keeps it, a re-extraction gets a new one
FIELD_SHA256 = "field_sha256"  # {field: sha256 of its canonical JSON}


class ManifestMismatchError(ValueError):
    """An existing store was written with other settings than the ones asked for now."""


class StoreFormatError(ValueError):
    """A path is not a sur-cache store, its manifest was edited, or its data is missing, corrupt or replaced."""


class StoreLockedError(OSError):
    """Another extract run holds the store's writer lock."""


class StoreURLError(ValueError):
    """A store URL that cannot be used: a protocol whose package is missing, or one that cannot outlive the process."""


@dataclass(frozen=True)
class ArraySpec:
    """Per-sample shape and dtype of one array; the stored shape is `(num_samples, *row_shape)`."""

    row_shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CorruptRange:
    """Samples `[start, stop)` of `array` could not be read back (checksum mismatch, missing or unreadable shard)."""

    array: str
    start: int
    stop: int
    error: str


def array_specs(manifest: dict[str, Any]) -> dict[str, ArraySpec]:
    """Every array a store with this manifest holds; the manifest alone decides the layout."""
    length, dtype = int(manifest["tokenizer_max_length"]), str(manifest["store_dtype"])
    clip = (length, int(manifest["clip_width"]))
    latent = (int(manifest["latent_channels"]), int(manifest["latent_size"]), int(manifest["latent_size"]))
    specs = {
        "clip_simple": ArraySpec(clip, dtype),
        "clip_complex": ArraySpec(clip, dtype),
        "latent_mean": ArraySpec(latent, dtype),
        "latent_logvar": ArraySpec(latent, dtype),
    }
    if manifest["flip_variants"]:
        specs["latent_mean_flipped"] = ArraySpec(latent, dtype)
        specs["latent_logvar_flipped"] = ArraySpec(latent, dtype)
    specs["llm"] = ArraySpec((int(manifest["llm_width"]),), dtype)
    if manifest["llm_per_token"]:
        specs["llm_tokens"] = ArraySpec((length, int(manifest["llm_width"])), dtype)
        specs["llm_mask"] = ArraySpec((length,), "bool")
    specs["sample_line"] = ArraySpec((), "int64")
    specs["truncated"] = ArraySpec((2,), "bool")
    specs["crop_offset"] = ArraySpec((2,), "int32")
    for name in ("image_sha256", "text_sha256", "prompt_sha256"):
        specs[name] = ArraySpec((_HASH_BYTES,), "uint8")
    specs["status"] = ArraySpec((), "uint8")
    return specs


# Every array name a store can have (all options on): what `--overwrite` may remove, whatever the manifest says.
_ALL_ARRAY_NAMES = tuple(
    array_specs(
        {
            "tokenizer_max_length": 1,
            "store_dtype": "float16",
            "clip_width": 1,
            "latent_channels": 1,
            "latent_size": 1,
            "llm_width": 1,
            "flip_variants": True,
            "llm_per_token": True,
        }
    )
)


def manifest_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """One line per differing field, `field: expected X, found Y`; compared as JSON so tuples equal lists."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        want, have = _as_json(expected.get(key, "<absent>")), _as_json(found.get(key, "<absent>"))
        if want != have:
            lines.append(f"{key}: expected {_short(want)}, found {_short(have)}")
    return lines


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def field_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of every manifest field's canonical JSON, except the digests themselves."""
    return {
        key: hashlib.sha256(_canonical(value)).hexdigest() for key, value in manifest.items() if key != FIELD_SHA256
    }


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _compressors(compression: str, itemsize: int) -> list:
    """Bytes-to-bytes codecs of one chunk: optional compression, then always a crc32c checksum."""
    if compression == "none":
        return [Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "blosc":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize), Crc32cCodec()]
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


# ---- where a store lives ---------------------------------------------------------------------------------------------
_EXTRAS = {"s3": "s3"}  # fsspec protocol -> the sur-cache extra that installs its package


def _normalise_url(url: str | Path) -> str:
    """A local path for `file://` URLs (so the lock, the skip reports and zarr all see one path), else `url`."""
    url = str(url)
    return LocalFileSystem._strip_protocol(url) if url.startswith("file://") else url


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root path of `url`; a protocol whose package is missing names what to install."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as error:
        protocol = url.split("://", 1)[0]
        fix = f"pip install 'sur-cache[{_EXTRAS[protocol]}]'" if protocol in _EXTRAS else str(error)
        raise StoreURLError(f"{url}: {protocol}:// URLs need a package that is not installed: {fix}") from error
    return fs, root.rstrip("/")


def in_process_only(url: str) -> bool:
    """True for a URL whose data lives in this process's memory and is gone when it exits (`memory://`)."""
    fs, _ = _filesystem(_normalise_url(url))
    return isinstance(fs, MemoryFileSystem)


# ---- recognising a store ---------------------------------------------------------------------------------------------
def _entries(fs, root: str) -> list[str]:
    """Names in the folder `root` ([] if there is none), the writer's lock file left out."""
    if not fs.isdir(root):
        return []
    names = sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False))
    return [name for name in names if name != LOCK_FILE]


def _group_attributes(fs, root: str) -> dict[str, Any] | None:
    """The attributes of the Zarr group at `root`; None when `root` holds no `zarr.json`.

    A `zarr.json` that is not valid JSON, or not a Zarr v3 group's metadata, is a StoreFormatError naming the file.
    """
    path = f"{root}/zarr.json"
    if not fs.isfile(path):
        return None
    try:
        metadata = json.loads(fs.cat_file(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreFormatError(
            f"{path} is not valid JSON ({error}): expected the Zarr group metadata sur-cache extract writes; restore "
            "the file from a copy of the store, or extract into a new --out path"
        ) from None
    found = {k: metadata.get(k) for k in ("zarr_format", "node_type")} if isinstance(metadata, dict) else metadata
    attributes = metadata.get("attributes", {}) if isinstance(metadata, dict) else None
    if found != {"zarr_format": 3, "node_type": "group"} or not isinstance(attributes, dict):
        raise StoreFormatError(
            f"{path}: expected the metadata of a Zarr v3 group (zarr_format 3, node_type group, attributes), found "
            f"{_short(found)}; restore the file from a copy of the store, or extract into a new --out path"
        )
    return attributes


def _is_sur_cache(attributes: dict[str, Any] | None) -> bool:
    """A group sur-cache wrote: its manifest names a schema version and a store id."""
    return attributes is not None and isinstance(attributes.get("schema_version"), int) and STORE_ID in attributes


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refuse_foreign(url: str, fs, root: str) -> dict[str, Any] | None:
    """The manifest when `url` holds a sur-cache store, None when it is absent or empty; anything else is refused."""
    entries = _entries(fs, root)
    if not entries:
        return None
    attributes = _group_attributes(fs, root)
    if not _is_sur_cache(attributes):
        what = (
            "a Zarr group that is not a sur-cache store" if attributes is not None else "a folder that is not a store"
        )
        raise FileExistsError(
            f"{url} holds {what} ({_listing(entries)}); sur-cache writes a store only into a new or empty folder or "
            "a store of its own, and never deletes what it did not write: choose a new --out path"
        )
    return attributes


def _shard_key(array: zarr.Array, shard: int) -> str:
    """The stored key (path inside the store) of one shard file of `array`."""
    return f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"


def _owned(fs, root: str) -> list[str]:
    """What `--overwrite` removes: the group's `zarr.json`, every sur-cache array and the skip reports."""
    names = [name for name in _ALL_ARRAY_NAMES if fs.isfile(f"{root}/{name}/zarr.json")]
    names += [name for name in ("zarr.json", SKIPPED_DIR, SKIPPED_REPORT) if fs.exists(f"{root}/{name}")]
    return names


def what_overwrite_removes(url: str) -> str:
    """One phrase for messages: what `--overwrite` would remove from the store at `url`, and what it keeps."""
    url = _normalise_url(url)
    fs, root = _filesystem(url)
    owned = _owned(fs, root)
    kept = [name for name in _entries(fs, root) if name not in owned]
    keeps = f"; it keeps {_listing(kept)}" if kept else ""
    return f"--overwrite removes the store's {_listing(owned, limit=len(owned))}{keeps}"


def _remove_owned(fs, root: str) -> None:
    """Delete what a sur-cache store owns, file by file; anything else in its folders stays."""
    for name in _ALL_ARRAY_NAMES:
        folder = f"{root}/{name}"
        if not fs.isfile(f"{folder}/zarr.json"):
            continue
        for leftover in fs.glob(f"{folder}/*.partial"):
            fs.rm(leftover)
        if fs.exists(f"{folder}/c"):
            fs.rm(f"{folder}/c", recursive=True)
        fs.rm(f"{folder}/zarr.json")
        _remove_if_empty(fs, folder)
    for path in fs.glob(f"{root}/{SKIPPED_DIR}/*.jsonl") + fs.glob(f"{root}/{SKIPPED_DIR}/*.partial"):
        fs.rm(path)
    _remove_if_empty(fs, f"{root}/{SKIPPED_DIR}")
    for name in (SKIPPED_REPORT, "zarr.json"):
        if fs.isfile(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")


def _remove_if_empty(fs, folder: str) -> None:
    if isinstance(fs, LocalFileSystem) and fs.isdir(folder) and not fs.ls(folder):
        fs.rmdir(folder)


def _creation_interrupted(fs, root: str, manifest: dict[str, Any]) -> bool:
    """True when `create` stopped before the store was whole (an array or a status shard not yet written) and no
    sample's features were written yet: such a store holds nothing and is created anew instead of resumed."""
    try:
        specs = array_specs(manifest)
        shards = -(-int(manifest["num_samples"]) // int(manifest["shard_rows"]))
    except (KeyError, TypeError, ValueError):
        return False  # not a manifest `create` wrote; `open` names what is wrong with it
    whole = all(fs.isfile(f"{root}/{name}/zarr.json") for name in specs) and all(
        fs.isfile(f"{root}/status/c/{shard}") for shard in range(shards)
    )
    return not whole and not any(fs.exists(f"{root}/{name}/c") for name in specs if name != "status")


def _validated_manifest(url: str, attributes: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest, after its schema version, its field checksums and its required fields are checked."""
    path = f"{url.rstrip('/')}/zarr.json"
    found = (attributes or {}).get("schema_version", "<absent>")
    if found != SCHEMA_VERSION:
        raise StoreFormatError(
            f"{url}: expected a sur-cache store with schema_version {SCHEMA_VERSION} in {path}, found schema_version "
            f"{found}; extract it again with this sur-cache (a new --out path, or --overwrite)"
        )
    digests = attributes.get(FIELD_SHA256)
    if not isinstance(digests, dict):
        digests = {}
    actual = field_digests(attributes)
    edited = []
    for key in sorted(set(actual) | set(digests)):
        if key not in actual:
            edited.append(f"{key} (absent)")
        elif key not in digests:
            edited.append(f"{key} (not covered by {FIELD_SHA256})")
        elif digests[key] != actual[key]:
            edited.append(f"{key} (its value does not match its checksum)")
    if edited:
        raise StoreFormatError(
            f"{path}: the manifest was changed after extract wrote it: {', '.join(edited)}. The manifest records how "
            "the features were computed, so it cannot be edited: restore the file from a copy of the store, or "
            "re-extract with the settings you want (`sur-cache extract ... --overwrite`)"
        )
    missing = [key for key in REQUIRED_FIELDS if key not in attributes]
    if missing:
        raise StoreFormatError(f"{path}: the manifest lacks the required fields {missing}; re-extract the store")
    return attributes


# ---- one writer per store --------------------------------------------------------------------------------------------
def _holder_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"process {holder['pid']} on host {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder)"


def _dead_local_process(raw: bytes) -> bool:
    """True when the lock was written on this host by a process that no longer exists."""
    try:
        holder = json.loads(raw)
        if holder["host"] != socket.gethostname():
            return False
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False


@contextmanager
def writer_lock(url: str | Path) -> Iterator[None]:
    """Hold the store's exclusive writer lock, `<store>/writer.lock`, for the `with` block; refuse if it is held.

    Local stores: `fcntl.flock` on the lock file, which names the holder (host, pid, start time). The kernel drops a
    dead process's lock, so a stale lock is taken over without any guess. Other fsspec URLs (object stores): the lock
    file is created with exclusive-create (`mode="xb"`) and removed on release; a lock left by a dead process on
    this host is taken over, one left from another host must be deleted by hand (its holder is named).
    """
    url = _normalise_url(url)
    fs, root = _filesystem(url)
    path = f"{root}/{LOCK_FILE}"
    holding = _flock(url, path) if isinstance(fs, LocalFileSystem) else _exclusive_file(url, fs, path)
    with holding:
        yield


@contextmanager
def _flock(url: str, path: str) -> Iterator[None]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(_locked_message(url, path, os.pread(descriptor, 4096, 0))) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(_holder_record()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)  # an empty lock file names no holder; the flock itself is released below
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


@contextmanager
def _exclusive_file(url: str, fs, path: str) -> Iterator[None]:
    record = json.dumps(_holder_record()).encode()
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    for attempt in range(2):
        if _create_exclusively(fs, path, record):
            break
        raw = fs.cat_file(path)
        if attempt or not _dead_local_process(raw):
            raise StoreLockedError(_locked_message(url, path, raw) + f"; if that process is gone, delete {path}")
        fs.rm(path)  # the lock of a dead process on this host: taken over
    try:
        yield
    finally:
        fs.rm(path)


def _create_exclusively(fs, path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; False if it does."""
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # a filesystem without exclusive create: check, then write (racy)
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
    return True


def _locked_message(url: str, path: str, raw: bytes) -> str:
    return (
        f"{url} is being written by {_describe_holder(raw)}, which holds {path}: one extract writes a store at a "
        "time; wait for it to finish or stop it, or extract into another --out path"
    )


class FeatureStore:
    """A sur-cache feature store at a local path or fsspec URL (`file://...`, `s3://...`, `memory://...`).

    Open with `FeatureStore.open(url, mode="r")` to read, `FeatureStore.create(...)` to start one; `mode="r+"` with
    `expected=` a manifest resumes writing and refuses a store made with other settings. A writer holds
    `writer_lock(url)` for as long as it writes.
    """

    def __init__(self, url: str, group: zarr.Group, manifest: dict[str, Any]) -> None:
        self.url = url
        self._group = group
        self.manifest = manifest
        self.num_samples = int(manifest["num_samples"])
        self.shard_rows = int(manifest["shard_rows"])
        self.specs = array_specs(manifest)
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads the array's zarr.json

    # ---- opening --------------------------------------------------------------------------------------------------
    @staticmethod
    def exists(url: str | Path) -> bool:
        """True when `url` holds a sur-cache store to resume or read.

        False for nothing, an empty folder, a folder or Zarr group that is not a sur-cache store (`create` refuses
        those by name), and a store whose creation was interrupted before any sample was written (created anew).
        """
        url = _normalise_url(url)
        fs, root = _filesystem(url)
        try:
            attributes = _group_attributes(fs, root)
        except StoreFormatError:
            return False
        return _is_sur_cache(attributes) and not _creation_interrupted(fs, root, attributes)

    @staticmethod
    def refuse_foreign(url: str | Path) -> None:
        """Raise unless `url` is absent, an empty folder, or a sur-cache store: what a writer may write into."""
        url = _normalise_url(url)
        _refuse_foreign(url, *_filesystem(url))

    @classmethod
    def create(
        cls,
        url: str | Path,
        manifest: dict[str, Any],
        num_samples: int,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        overwrite: bool = False,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        compression: str = DEFAULT_COMPRESSION,
    ) -> FeatureStore:
        """Write the manifest, every (empty) array, then the whole status array (all pending) last.

        Refuses a folder that is not a sur-cache store, and a store unless `overwrite` (which removes only what the
        store owns) or its creation was interrupted (nothing in it was written yet).
        """
        url = _normalise_url(url)
        if num_samples < 1 or shard_rows < 1 or chunk_rows < 1:
            raise ValueError(
                f"num_samples, shard_rows, chunk_rows must be >= 1, got {num_samples, shard_rows, chunk_rows}"
            )
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        fs, root = _filesystem(url)
        found = _refuse_foreign(url, fs, root)
        if found is not None:
            if not overwrite and not _creation_interrupted(fs, root, found):
                raise FileExistsError(
                    f"{url} already holds a sur-cache store; resume it with the same settings, or replace it: "
                    f"{what_overwrite_removes(url)}"
                )
            _remove_owned(fs, root)
        manifest = cls._new_manifest(manifest, num_samples, shard_rows, min(chunk_rows, shard_rows), compression)
        group = zarr.open_group(url, mode="a", attributes=manifest)  # "a": other files in the folder stay
        specs = array_specs(manifest)
        for name, spec in specs.items():
            itemsize = np.dtype(spec.dtype).itemsize
            row_bytes = itemsize * int(np.prod(spec.row_shape, dtype=np.int64))
            rows = shard_rows if row_bytes <= _SMALL_ROW_BYTES else min(chunk_rows, shard_rows)
            group.create_array(
                name,
                shape=(num_samples, *spec.row_shape),
                dtype=spec.dtype,
                chunks=(rows, *spec.row_shape),
                shards=(shard_rows, *spec.row_shape),
                compressors=_compressors(compression, itemsize),
                fill_value=0,
                dimension_names=("sample", *[f"dim{i}" for i in range(len(spec.row_shape))]),
            )
        store = cls(url, group, manifest)
        # Every status shard exists from now on, so a missing one is damage, never "pending" (see `status`).
        store._writable("status")[:] = np.zeros(num_samples, np.uint8)
        return store

    @staticmethod
    def _new_manifest(
        manifest: dict[str, Any], num_samples: int, shard_rows: int, chunk_rows: int, compression: str
    ) -> dict[str, Any]:
        manifest = {
            **manifest,
            "num_samples": num_samples,
            "shard_rows": shard_rows,
            "chunk_rows": chunk_rows,
            "compression": compression,
            "schema_version": SCHEMA_VERSION,
            STORE_ID: uuid.uuid4().hex,
        }
        missing = [key for key in REQUIRED_FIELDS if key not in manifest]
        if missing:
            raise ValueError(f"manifest lacks required fields {missing}")
        manifest = _as_json(manifest)
        manifest[FIELD_SHA256] = field_digests(manifest)
        return manifest

    @classmethod
    def open(cls, url: str | Path, mode: str = "r", expected: dict[str, Any] | None = None) -> FeatureStore:
        """Open and validate a store: its `zarr.json`, the manifest's checksums, the arrays, and `expected` if given.

        `expected` is compared field by field with the stored manifest; any difference raises ManifestMismatchError
        listing every differing field. Every other problem is a StoreFormatError naming the file and the fix.
        """
        url = _normalise_url(url)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        fs, root = _filesystem(url)
        attributes = _group_attributes(fs, root)
        if attributes is None:
            raise FileNotFoundError(f"no sur-cache store at {url}; create one with `sur-cache extract --out {url}`")
        found = _validated_manifest(url, attributes)
        if expected is not None:
            differences = manifest_differences({**found, **_as_json(expected)}, found)
            if differences:
                raise ManifestMismatchError(
                    f"{url} was written with other settings:\n  "
                    + "\n  ".join(differences)
                    + f"\nChoose a new --out path, or replace the store: {what_overwrite_removes(url)}."
                )
        try:
            group = zarr.open_group(url, mode=mode)
        except Exception as error:  # noqa: BLE001 - zarr's own validation of the metadata; any failure is format
            raise StoreFormatError(f"{url}/zarr.json cannot be opened as a Zarr group ({error}); re-extract") from None
        store = cls(url, group, found)
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        for name, spec in self.specs.items():
            try:
                array = self._group[name]
            except KeyError:
                raise StoreFormatError(
                    f"{self.url}: array {name!r} is missing (the manifest says it exists); re-extract the store "
                    "(`sur-cache extract ... --overwrite`)"
                ) from None
            except Exception as error:  # noqa: BLE001 - an unreadable or invalid array zarr.json
                raise StoreFormatError(
                    f"{self.url}/{name}/zarr.json cannot be read as the metadata of array {name!r} ({error}); "
                    "restore it from a copy of the store, or re-extract (`sur-cache extract ... --overwrite`)"
                ) from None
            want = (self.num_samples, *spec.row_shape)
            if tuple(array.shape) != want or array.dtype != np.dtype(spec.dtype):
                raise StoreFormatError(
                    f"{self.url}: array {name!r} expected shape {want} dtype {spec.dtype}, "
                    f"found shape {tuple(array.shape)} dtype {array.dtype}"
                )

    # ---- reading --------------------------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, str]:
        """`{"store_id", "fingerprint"}`: equal for a copy of this store, different for a re-extracted or changed one.

        The fingerprint is a sha256 over the manifest's field checksums and the status array's bytes, so it changes
        when any manifest field changes or a shard is committed; it does not read the feature arrays.
        """
        digest = hashlib.sha256(_canonical(self.manifest[FIELD_SHA256]))
        digest.update(self.status().tobytes())
        return {"store_id": str(self.manifest[STORE_ID]), "fingerprint": digest.hexdigest()}

    @property
    def array_names(self) -> list[str]:
        return list(self.specs)

    def array(self, name: str) -> zarr.Array:
        if name not in self.specs:
            raise KeyError(f"{self.url} has no array {name!r}; it has {self.array_names}")
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def status(self) -> np.ndarray:
        """Every sample's status. A missing or corrupt status shard is a StoreFormatError naming its samples: zarr
        would read a missing one as zeros (pending), hiding that the samples' state is unknown."""
        missing = [shard for shard in range(len(self.shard_ranges())) if not self._shard_stored("status", shard)]
        if missing:
            start, stop = self.shard_ranges()[missing[0]]
            raise StoreFormatError(
                f"{self.url}: the status of samples {start}..{stop - 1} is missing ({len(missing)} status shard "
                f"files in all), so whether they were written is unknown; `sur-cache verify {self.url}` lists the "
                "damage; re-extract with --overwrite"
            )
        try:
            return self.array("status")[:]
        except ValueError as error:  # a crc32c mismatch or an undecodable shard
            raise StoreFormatError(
                f"{self.url}: the status array cannot be read ({error}); `sur-cache verify {self.url}` names the "
                "corrupt range; re-extract with --overwrite"
            ) from error

    def complete_indices(self) -> np.ndarray:
        """Sample indices whose features are written (status done), ascending."""
        return np.flatnonzero(self.status() == DONE).astype(np.int64)

    def read(self, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples `[start, stop)` of each named array (contiguous reads are the fast path).

        Never returns zarr's fill value for written data: a missing shard file of a written shard, and any chunk
        that fails to decode (checksum), is a StoreFormatError naming the array, the samples and the fix.
        """
        first, last = start // self.shard_rows, (stop - 1) // self.shard_rows
        out = {}
        for name in names:
            for shard in range(first, last + 1):
                if not self._shard_stored(name, shard) and self._shard_written(shard):
                    a, b = self.shard_ranges()[shard]
                    raise StoreFormatError(self._damage(name, a, b, "its shard file is missing"))
            try:
                out[name] = self.array(name)[start:stop]
            except Exception as error:  # noqa: BLE001 - any decode failure (crc32c, truncated shard) is damage
                raise StoreFormatError(self._damage(name, start, stop, f"cannot be decoded: {error}")) from error
        return out

    def _damage(self, name: str, start: int, stop: int, what: str) -> str:
        return (
            f"{self.url}: array {name!r}, samples {start}..{stop - 1}: {what}. `sur-cache verify {self.url}` lists "
            "every damaged range; re-extract the store (`sur-cache extract ... --overwrite`)"
        )

    def _shard_stored(self, name: str, shard: int) -> bool:
        fs, root = _filesystem(self.url)
        return fs.isfile(f"{root}/{_shard_key(self.array(name), shard)}")

    def _shard_written(self, shard: int) -> bool:
        """Does shard `shard`'s status say it was written? A missing or unreadable status counts as written."""
        start, stop = self.shard_ranges()[shard]
        if not self._shard_stored("status", shard):
            return True
        try:
            return bool((self.array("status")[start:stop] != PENDING).any())
        except Exception:  # noqa: BLE001 - a checksum or decode failure; `verify` locates it
            return True

    def shard_ranges(self) -> list[tuple[int, int]]:
        """`(start, stop)` of every shard, in order; each is written whole by one writer."""
        return [(s, min(s + self.shard_rows, self.num_samples)) for s in range(0, self.num_samples, self.shard_rows)]

    def pending_shards(self) -> list[int]:
        """Indices of the shards that still hold a pending sample (recomputed from scratch on resume)."""
        status = self.status()
        return [i for i, (a, b) in enumerate(self.shard_ranges()) if (status[a:b] == PENDING).any()]

    def skipped_records(self) -> list[dict[str, Any]]:
        """Every skipped row reported so far, sorted by metadata line.

        The metadata pass's part always counts; a shard's part counts once the shard is committed (a part written
        just before a crash belongs to a shard that will be recomputed).
        """
        fs, root = _filesystem(self.url)
        folder = f"{root}/{SKIPPED_DIR}"
        if not fs.exists(folder):
            return []
        status, ranges = self.status(), self.shard_ranges()
        records = []
        for path in sorted(fs.ls(folder, detail=False)):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".jsonl"):
                continue  # a `.partial` leftover
            if name.startswith(SHARD_PART_PREFIX):
                start, stop = ranges[int(name[len(SHARD_PART_PREFIX) : -len(".jsonl")])]
                if (status[start:stop] == PENDING).any():
                    continue
            with fs.open(path, "r") as f:
                records += [json.loads(line) for line in f if line.strip()]
        return sorted(records, key=lambda r: (r["line"], r["reason"]))

    def summary(self) -> dict[str, Any]:
        """Counts a user asks for first: samples done, pending, skipped by reason."""
        status = self.status()
        reasons = Counter(r["reason"] for r in self.skipped_records())
        return {
            "num_samples": self.num_samples,
            "complete": int((status == DONE).sum()),
            "pending": int((status == PENDING).sum()),
            "skipped": dict(sorted(reasons.items())),
        }

    def nbytes_stored(self) -> int:
        return sum(int(self.array(name).nbytes_stored()) for name in self.specs)

    # ---- writing --------------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, rows: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write shard `shard` whole: every feature array, then its status (see `write_arrays`, `commit_shard`)."""
        expected = set(self.specs) - {"status"}
        if set(rows) != expected:
            raise ValueError(f"shard {shard}: expected arrays {sorted(expected)}, got {sorted(rows)}")
        self.write_arrays(shard, rows)
        self.commit_shard(shard, status)

    def write_arrays(self, shard: int, rows: dict[str, np.ndarray]) -> None:
        """Write the whole shard `shard` of each named array; `rows[name]` is its `[stop - start, ...]` block.

        Nothing counts as written until `commit_shard`: a shard left uncommitted is recomputed from scratch.
        """
        start, stop = self.shard_ranges()[shard]
        self._check_still_this_store()
        for name in sorted(rows):
            if name == "status" or name not in self.specs:
                raise ValueError(f"shard {shard}: cannot write {name!r}; feature arrays are {self.array_names[:-1]}")
            block = np.asarray(rows[name], dtype=self.specs[name].dtype)
            want = (stop - start, *self.specs[name].row_shape)
            if block.shape != want:
                raise ValueError(f"shard {shard}: {name} expected shape {want}, got {block.shape}")
            self._writable(name)[start:stop] = block

    def commit_shard(self, shard: int, status: np.ndarray) -> None:
        """Write shard `shard`'s status (1 done, 2 skipped for every sample): the commit point of the shard.

        Re-checks first that the store is still the one this object opened or created (its store id).
        """
        start, stop = self.shard_ranges()[shard]
        if status.shape != (stop - start,) or not np.isin(status, (DONE, SKIPPED)).all():
            raise ValueError(f"shard {shard}: status must be {stop - start} final values (1 done, 2 skipped)")
        self._check_still_this_store()
        self._writable("status")[start:stop] = status.astype(np.uint8)

    def _check_still_this_store(self) -> None:
        """Refuse to write into a store that another run replaced (a new store id) since this one opened it."""
        fs, root = _filesystem(self.url)
        try:
            found = (_group_attributes(fs, root) or {}).get(STORE_ID, "<absent>")
        except StoreFormatError:
            found = "<unreadable>"
        if found != self.manifest[STORE_ID]:
            raise StoreFormatError(
                f"{self.url} is no longer the store this run opened: its store id is {found}, this run's is "
                f"{self.manifest[STORE_ID]}, so another run replaced it; nothing more is written into it. Run one "
                "extract per --out path at a time"
            )

    def _writable(self, name: str) -> zarr.Array:
        # Write every chunk, even all-zero ones, so that `verify` can tell a missing shard from a zero one.
        return self.array(name).with_config({"write_empty_chunks": True})

    def write_skipped(self, shard: int | None, records: list[dict[str, Any]]) -> None:
        """Replace the skip report of shard `shard` (None: the metadata pass's); one writer per part, atomic."""
        self._check_still_this_store()
        fs, root = _filesystem(self.url)
        part = METADATA_PART if shard is None else f"{SHARD_PART_PREFIX}{shard:06d}"
        path = f"{root}/{SKIPPED_DIR}/{part}.jsonl"
        if not records:
            if fs.exists(path):
                fs.rm(path)
            return
        fs.makedirs(f"{root}/{SKIPPED_DIR}", exist_ok=True)
        _write_atomically(fs, path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def write_skipped_report(self) -> str:
        """Merge every part into `skipped.jsonl` beside the arrays; returns its path."""
        fs, root = _filesystem(self.url)
        path = f"{root}/{SKIPPED_REPORT}"
        _write_atomically(fs, path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.skipped_records()))
        return path

    def remove_partial_files(self) -> int:
        """Delete the `*.partial` files a killed write left in the store's own arrays, skip reports and zarr.json
        (never elsewhere in the folder); call it while no other process writes."""
        fs, root = _filesystem(self.url)
        patterns = [f"{root}/{name}/**/*.partial" for name in self.specs]
        patterns += [f"{root}/{SKIPPED_DIR}/*.partial", f"{root}/zarr.*.partial", f"{root}/{SKIPPED_REPORT}.*.partial"]
        leftovers = sorted({path for pattern in patterns for path in fs.glob(pattern)})
        for path in leftovers:
            fs.rm(path)
        return len(leftovers)

    # ---- checking -------------------------------------------------------------------------------------------------
    def verify(self) -> list[CorruptRange]:
        """Read every chunk of every array back (checksums checked on decode); return what failed.

        A shard that fails is re-read one chunk at a time to name the bad sample range. A shard whose status says
        it was written (or whose status is itself missing or unreadable) but whose file is gone is reported as
        missing, and so is a missing status shard. A NaN or inf in a complete sample's feature is reported too.
        """
        corrupt = []
        for shard, (start, stop) in enumerate(self.shard_ranges()):
            written = self._shard_written(shard)
            done = self._done_or_none(start, stop)
            for name in self.specs:
                if (written or name == "status") and not self._shard_stored(name, shard):
                    corrupt.append(CorruptRange(name, start, stop, "shard file missing"))
                    continue
                try:
                    values = self.array(name)[start:stop]
                except Exception:  # noqa: BLE001 - any decode failure is corruption; narrowed below per chunk
                    corrupt += self._locate(name, start, stop)
                    continue
                if done is not None and values.dtype.kind == "f":
                    corrupt += _non_finite(name, start, values, done)
        return sorted(corrupt, key=lambda c: (list(self.specs).index(c.array), c.start))

    def _done_or_none(self, start: int, stop: int) -> np.ndarray | None:
        """Which samples of `[start, stop)` are done, or None when their status cannot be read."""
        shard = start // self.shard_rows
        if not self._shard_stored("status", shard):
            return None
        try:
            return self.array("status")[start:stop] == DONE
        except Exception:  # noqa: BLE001 - reported by `verify` as a corrupt status range
            return None

    def _locate(self, name: str, start: int, stop: int) -> list[CorruptRange]:
        array, rows = self.array(name), self.array(name).chunks[0]
        found = []
        for a in range(start, stop, rows):
            b = min(a + rows, stop)
            try:
                array[a:b]
            except Exception as error:  # noqa: BLE001
                if found and found[-1].stop == a and found[-1].error == str(error):
                    found[-1] = CorruptRange(name, found[-1].start, b, str(error))
                else:
                    found.append(CorruptRange(name, a, b, str(error)))
        return found

    def describe(self) -> dict[str, Any]:
        """Everything `sur-cache inspect` shows, JSON-ready."""
        arrays = {}
        for name in self.specs:
            array = self.array(name)
            arrays[name] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "chunks": list(array.chunks),
                "shards": list(array.shards or array.chunks),
                "bytes_stored": int(array.nbytes_stored()),
            }
        summary = self.summary()
        return {
            "url": self.url,
            "complete": summary["complete"],
            "pending": summary["pending"],
            "skipped": summary["skipped"],
            "num_samples": self.num_samples,
            "bytes_stored": sum(a["bytes_stored"] for a in arrays.values()),
            "manifest": self.manifest,
            "arrays": arrays,
        }


def _non_finite(name: str, start: int, values: np.ndarray, done: np.ndarray) -> list[CorruptRange]:
    """Ranges of complete samples with a NaN or inf in `values` (the rows of samples `start...`)."""
    bad = done & ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    ranges: list[CorruptRange] = []
    for offset in np.flatnonzero(bad):
        sample = start + int(offset)
        if ranges and ranges[-1].stop == sample:
            ranges[-1] = CorruptRange(name, ranges[-1].start, sample + 1, ranges[-1].error)
        else:
            ranges.append(CorruptRange(name, sample, sample + 1, "NaN or inf in a complete sample"))
    return ranges


def _write_atomically(fs, path: str, text: str) -> None:
    """Write through a `*.partial` sibling and rename it into place, so a killed write leaves no torn file."""
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    with fs.open(partial, "w") as f:
        f.write(text)
    fs.mv(partial, path)
