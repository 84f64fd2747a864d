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

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

SCHEMA_VERSION = 1
PENDING, DONE, SKIPPED = 0, 1, 2
SKIPPED_DIR = "skipped"  # per-writer skip reports, one JSON-lines file per shard (plus one for the metadata pass)
SKIPPED_REPORT = "skipped.jsonl"  # the merged report, rewritten at the end of each extract run
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
    """A path is not a sur-cache store, or its arrays do not match its own manifest."""


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


def _exists(url: str) -> bool:
    try:
        zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False
    return True


class FeatureStore:
    """A sur-cache feature store at a local path or fsspec URL (`memory://...`, `s3://...`).

    Open with `FeatureStore.open(url, mode="r")` to read, `FeatureStore.create(...)` to start one; `mode="r+"` with
    `expected=` a manifest resumes writing and refuses a store made with other settings.
    """

    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url = url
        self._group = group
        self.manifest: dict[str, Any] = dict(group.attrs)
        self.num_samples = int(self.manifest["num_samples"])
        self.shard_rows = int(self.manifest["shard_rows"])
        self.specs = array_specs(self.manifest)

    # ---- opening --------------------------------------------------------------------------------------------------
    @staticmethod
    def exists(url: str) -> bool:
        """True when `url` holds a Zarr group (a sur-cache store or not)."""
        return _exists(str(url))

    @classmethod
    def create(
        cls,
        url: str,
        manifest: dict[str, Any],
        num_samples: int,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        overwrite: bool = False,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        compression: str = DEFAULT_COMPRESSION,
    ) -> FeatureStore:
        """Write the manifest first, then create every (empty) array. Refuses an existing store unless `overwrite`."""
        url = str(url)
        if num_samples < 1 or shard_rows < 1 or chunk_rows < 1:
            raise ValueError(
                f"num_samples, shard_rows, chunk_rows must be >= 1, got {num_samples, shard_rows, chunk_rows}"
            )
        if _exists(url):
            if not overwrite:
                raise FileExistsError(f"{url} already holds a store; resume it with the same settings, or --overwrite")
        elif _non_empty_folder(url):  # creating a group would delete whatever is there
            raise FileExistsError(f"{url} is a non-empty folder but not a Zarr store; choose a new --out path")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        chunk_rows = min(chunk_rows, shard_rows)
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
        if overwrite:
            _remove_sidecar_reports(url)
        manifest = _as_json(manifest)
        manifest[FIELD_SHA256] = field_digests(manifest)
        group = zarr.open_group(url, mode="w", attributes=manifest)
        for name, spec in array_specs(manifest).items():
            itemsize = np.dtype(spec.dtype).itemsize
            row_bytes = itemsize * int(np.prod(spec.row_shape, dtype=np.int64))
            rows = shard_rows if row_bytes <= _SMALL_ROW_BYTES else chunk_rows
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
        return cls(url, group)

    @classmethod
    def open(cls, url: str, mode: str = "r", expected: dict[str, Any] | None = None) -> FeatureStore:
        """Open and validate a store: schema version, arrays against the manifest, and `expected` if given.

        `expected` is compared field by field with the stored manifest; any difference raises ManifestMismatchError
        listing every differing field.
        """
        url = str(url)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        if not _exists(url):
            raise FileNotFoundError(f"no sur-cache store at {url}; create one with `sur-cache extract --out {url}`")
        group = zarr.open_group(url, mode=mode)
        found = dict(group.attrs)
        if found.get("schema_version") != SCHEMA_VERSION:
            raise StoreFormatError(
                f"{url}: expected a sur-cache store with schema_version {SCHEMA_VERSION}, "
                f"found schema_version {found.get('schema_version', '<absent>')}"
            )
        if expected is not None:
            differences = manifest_differences({**found, **_as_json(expected)}, found)
            if differences:
                raise ManifestMismatchError(
                    f"{url} was written with other settings:\n  "
                    + "\n  ".join(differences)
                    + "\nPass --overwrite to replace it, or choose a new --out path."
                )
        store = cls(url, group)
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        for name, spec in self.specs.items():
            try:
                array = self._group[name]
            except KeyError:
                raise StoreFormatError(
                    f"{self.url}: array {name!r} is missing (the manifest says it exists); if its creation was "
                    "interrupted, re-run extract with --overwrite"
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
        return self._group[name]

    def status(self) -> np.ndarray:
        """Every sample's status; a corrupt status chunk is a StoreFormatError that says how to locate it."""
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
        """Samples `[start, stop)` of each named array (contiguous reads are the fast path)."""
        return {name: self.array(name)[start:stop] for name in names}

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
        fs, root = fsspec.core.url_to_fs(self.url)
        folder = f"{root.rstrip('/')}/{SKIPPED_DIR}"
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
        for name in sorted(rows):
            if name == "status" or name not in self.specs:
                raise ValueError(f"shard {shard}: cannot write {name!r}; feature arrays are {self.array_names[:-1]}")
            block = np.asarray(rows[name], dtype=self.specs[name].dtype)
            want = (stop - start, *self.specs[name].row_shape)
            if block.shape != want:
                raise ValueError(f"shard {shard}: {name} expected shape {want}, got {block.shape}")
            self._writable(name)[start:stop] = block

    def commit_shard(self, shard: int, status: np.ndarray) -> None:
        """Write shard `shard`'s status (1 done, 2 skipped for every sample): the commit point of the shard."""
        start, stop = self.shard_ranges()[shard]
        if status.shape != (stop - start,) or not np.isin(status, (DONE, SKIPPED)).all():
            raise ValueError(f"shard {shard}: status must be {stop - start} final values (1 done, 2 skipped)")
        self._writable("status")[start:stop] = status.astype(np.uint8)

    def _writable(self, name: str) -> zarr.Array:
        # Write every chunk, even all-zero ones, so that `verify` can tell a missing shard from a zero one.
        return self.array(name).with_config({"write_empty_chunks": True})

    def write_skipped(self, shard: int | None, records: list[dict[str, Any]]) -> None:
        """Replace the skip report of shard `shard` (None: the metadata pass's); one writer per part, atomic."""
        fs, root = fsspec.core.url_to_fs(self.url)
        part = METADATA_PART if shard is None else f"{SHARD_PART_PREFIX}{shard:06d}"
        path = f"{root.rstrip('/')}/{SKIPPED_DIR}/{part}.jsonl"
        if not records:
            if fs.exists(path):
                fs.rm(path)
            return
        fs.makedirs(f"{root.rstrip('/')}/{SKIPPED_DIR}", exist_ok=True)
        _write_atomically(fs, path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def write_skipped_report(self) -> str:
        """Merge every part into `skipped.jsonl` beside the arrays; returns its path."""
        fs, root = fsspec.core.url_to_fs(self.url)
        path = f"{root.rstrip('/')}/{SKIPPED_REPORT}"
        _write_atomically(fs, path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.skipped_records()))
        return path

    def remove_partial_files(self) -> int:
        """Delete `*.partial` files a killed local write left behind; call it while no other process writes."""
        fs, root = fsspec.core.url_to_fs(self.url)
        leftovers = fs.glob(f"{root.rstrip('/')}/**/*.partial")
        for path in leftovers:
            fs.rm(path)
        return len(leftovers)

    # ---- checking -------------------------------------------------------------------------------------------------
    def verify(self) -> list[CorruptRange]:
        """Read every chunk of every array back (checksums checked on decode); return what failed.

        A shard that fails is re-read one chunk at a time to name the bad sample range. A shard whose status says
        it was written (or whose status is itself unreadable) but whose file is gone is reported as missing.
        """
        written = self._written_shards()
        fs, root = fsspec.core.url_to_fs(self.url)
        root = root.rstrip("/")
        corrupt = []
        for name in self.specs:
            array = self.array(name)
            for shard, (start, stop) in enumerate(self.shard_ranges()):
                key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))  # shards are the stored keys
                if written[shard] and not fs.exists(f"{root}/{array.path}/{key}"):
                    corrupt.append(CorruptRange(name, start, stop, "shard file missing"))
                    continue
                try:
                    array[start:stop]
                except Exception:  # noqa: BLE001 - any decode failure is corruption; narrowed below per chunk
                    corrupt += self._locate(name, start, stop)
        return corrupt

    def _written_shards(self) -> list[bool]:
        """Per shard: does its status say it was written? A corrupt status slice counts as written (and `verify`
        reports it like any other corrupt range) rather than stopping the check."""
        status, written = self.array("status"), []
        for start, stop in self.shard_ranges():
            try:
                written.append(bool((status[start:stop] != PENDING).any()))
            except Exception:  # noqa: BLE001 - a checksum or decode failure; located in `verify`'s own pass
                written.append(True)
        return written

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


def _non_empty_folder(url: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url)
    return fs.isdir(root) and bool(fs.ls(root, detail=False))


def _write_atomically(fs, path: str, text: str) -> None:
    """Write through a `*.partial` sibling and rename it into place, so a killed write leaves no torn file."""
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    with fs.open(partial, "w") as f:
        f.write(text)
    fs.mv(partial, path)


def _remove_sidecar_reports(url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    for name in (SKIPPED_DIR, SKIPPED_REPORT):
        path = f"{root.rstrip('/')}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)
