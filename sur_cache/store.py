"""The feature store: one Zarr v3 group per extraction run, self-described by a typed manifest in its attributes.

Layout (sample axis first in every array; N = number of dataset rows that passed the metadata checks; the names in
brackets are the arrays' Zarr dimension names, one length per name across the store):

    clip_simple, clip_complex   [sample, token, clip_width]                        store dtype (token = 77)
    latent_mean, latent_logvar  [sample, latent_channel, latent_y, latent_x]       store dtype (+ *_flipped)
    llm                         [sample, llm_width]                                store dtype
                                [sample, llm_layer, llm_width] with several layers (manifest `llm_layers`)
    llm_tokens, llm_mask        [sample, token, llm_width], [sample, token]        store dtype, bool (per-token)
    sample_line                 [sample] int64                   0-based line in metadata.jsonl
    truncated                   [sample, prompt] bool            CLIP truncated the (simple, complex) prompt
    crop_offset                 [sample, crop_axis] int32        (top, left) of the crop in the resized image
    pooled_simple, pooled_complex  [sample, pooled_width]        store dtype (SDXL only: text_encoder_2's text_embeds)
    original_size               [sample, size_axis] int32        (height, width) of the image file (SDXL only)
    image_sha256, text_sha256, prompt_sha256  [sample, hash_byte] uint8   content hashes
    file_name                   [sample, file_name_byte] uint8   the image's file name, UTF-8, zero-padded
    status                      [sample] uint8                   0 pending, 1 done, 2 skipped
    commits/                    one commit marker per committed shard: `<shard>-<done>-<skipped>.json`
    commits/index.json          every marker's record in one file, written when an extract run finishes

Every array is sharded along the sample axis at `shard_rows` samples: a shard is one file, written whole by one
writer, so concurrent processes never share a file. Inside a shard, feature arrays are chunked at `chunk_rows`
samples (16 by default: whole-shard reads, what the loader does, run near the speed of one chunk per shard, while a
single random sample still decodes only 16; docs/store.md has the measurements), uncompressed by default (fp16
features barely compress), and every chunk and every shard index carries a crc32c checksum.

The manifest (`Manifest`) is the group's attributes, a few KB whatever N is: everything O(N) (names, lines, hashes)
is an array. `create` writes the manifest, every array but the status, the names, then the status array's
metadata last; a status shard file is written by its shard's commit (none: pending).

The writer of a shard writes all its arrays first, then its `status` slice, then its commit marker (the commit);
a shard without a marker is pending, whatever its status slice says, and is recomputed from scratch, so a crash at
any point loses at most the shards in flight and the result stays bit-identical to an uninterrupted run. The
markers are the store's shard-level summary: their names carry each shard's done and skipped counts, so the
resume scan, `summary` and `complete_indices` cost one folder listing (plus the markers of shards with a skipped
sample), never a read of the status array. What `inspect` needs of every marker (truncation counts, bytes) is
also gathered in the commit index, `commits/index.json`, written when extract finishes and removed by any later
commit, so inspect reads one file instead of one per shard (39k at 10M samples). Local writes go to a `*.partial`
file renamed into place (zarr's LocalStore), so a killed write never leaves a torn file; `remove_partial_files`
sweeps the leftovers. There is no fsync: a process crash is covered, a power loss may lose the page cache's last writes.

Schema 1 (sur-cache 0.1.0) kept the file names in the manifest; `sur_cache.migration.migrate` converts such a
store in place.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import typing
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from sur_cache.choices import COMPRESSIONS, DEFAULT_CHUNK_ROWS, DEFAULT_COMPRESSION, DEFAULT_SHARD_ROWS
from sur_cache.locations import filesystem, names_in, normalise_url, read_files, zarr_options
from sur_cache.shard_files import MappedShard, ShardDamage, ShardLayout, plain_layout, read_rows
from sur_cache.writer_lock import LOCK_FILE

SCHEMA_VERSION = 2  # 2: a typed manifest with a store id and field checksums, names in an array, commit markers
PENDING, DONE, SKIPPED = 0, 1, 2
SKIPPED_DIR = "skipped"  # per-writer skip reports, one JSON-lines file per shard (plus one for the metadata pass)
SKIPPED_REPORT = "skipped.jsonl"  # the merged report, rewritten at the end of each extract run
COMMITS_DIR = "commits"  # one commit marker per committed shard (see `FeatureStore.commit_shard`)
COMMIT_INDEX = f"{COMMITS_DIR}/index.json"  # the markers' records in one file (see `FeatureStore.write_commit_index`)
METADATA_PART, SHARD_PART_PREFIX = "metadata", "shard-"
FILE_NAME_ARRAY = "file_name"  # written whole by `create`, like the status; not part of a shard's writes
SAMPLE_DIMENSION = "sample"
FIELD_SHA256 = "field_sha256"  # in zarr.json beside the fields: {field: sha256 of its canonical JSON}
_SMALL_ROW_BYTES = 64  # arrays with rows this small get one chunk per shard: per-chunk overhead would dominate
_HASH_BYTES = 32
_COMMIT_NAME = re.compile(r"(\d+)-(\d+)-(\d+)\.json")


class ManifestMismatchError(ValueError):
    """An existing store was written with other settings than the ones asked for now."""


class StoreFormatError(ValueError):
    """A path is not a sur-cache store, its manifest was edited, or its data is missing, corrupt or replaced."""


# ---- the manifest ----------------------------------------------------------------------------------------------------
_STORE_OWNED = {"store_owned": True}  # field metadata: the store sets it, it is no setting, a resume never compares it


def added_field(default: Any, version: str):
    """A manifest field that stores written before sur-cache `version` lack: read from them as `default`, which must
    describe what those stores hold (a new field never reinterprets an old store's numbers)."""
    return field(default=default, metadata={"added_in": version})


@dataclass(frozen=True)
class ModelRef:
    """A model by id and revision: the hub commit, or `sha256:` over a local folder's files."""

    id: str
    revision: str


@dataclass(frozen=True)
class FileRef:
    """A file by its absolute path and the sha256 of its bytes."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Columns:
    """The metadata.jsonl keys of the simple prompt, the complex prompt and the image file name."""

    text: str
    prompt: str
    image: str


@dataclass(frozen=True)
class Manifest:
    """Every fact that decides a store's numbers and layout: the one contract between the stages.

    Written as the Zarr group's attributes by `FeatureStore.create` (`to_json` adds `schema_version` and
    `field_sha256`, a sha256 of every other field) and validated by `from_json` on every open. Every field but the
    store-owned `store_id` is a setting that a resume must match (`differences`). With a reference feature file
    instead of an LLM, `llm_model` and the model-only settings are None; with an LLM, `llm_features_file` is.
    """

    sur_cache_version: str
    # the source models
    sd_model: ModelRef
    sd_dtype: str
    # the LLM teacher
    llm_model: ModelRef | None
    llm_features_file: FileRef | None
    llm_layer: int | None  # resolved, 0-based; None with a feature file or several layers (`llm_layers`)
    llm_layer_source: str
    llm_pooling: str | None
    llm_8bit: bool | None
    llm_dtype: str | None  # with 8-bit weights it still sets the non-quantised parts
    llm_batch_size: int | None  # batched math differs in the last bits across batch compositions
    llm_per_token: bool
    # preprocessing
    resolution: int
    crop: str
    crop_seed: int
    flip_variants: bool
    batch_size: int  # of CLIP and the VAE, for the same reason as llm_batch_size
    # the dataset
    dataset_path: str
    metadata_sha256: str
    columns: Columns
    num_samples: int
    file_names_sha256: str  # of the file_name array's names (`names_sha256`), so a resume compares them in O(1)
    file_name_bytes: int  # width of the file_name array: the longest name's UTF-8 length
    # the shapes stage two checks against the SD model
    tokenizer_max_length: int
    clip_width: int
    llm_width: int
    latent_channels: int
    latent_size: int
    vae_scaling_factor: float
    # the layout
    store_dtype: str
    shard_rows: int
    chunk_rows: int
    compression: str
    # added after schema 2 (`added_field`): older stores lack them and read as these defaults
    # the layers of a multi-layer store, resolved, 0-based, ascending: `llm` is [sample, llm_layer, llm_width]; None:
    # one layer (`llm_layer`, or a feature file's), `llm` is [sample, llm_width], as every store before them
    llm_layers: tuple[int, ...] | None = added_field(None, "0.2")
    llm_chat_template: bool = added_field(False, "0.2")  # prompts went through the tokenizer's chat template
    # drawn by FeatureStore.create: a copy keeps it, a re-extraction gets a new one
    store_id: str | None = field(default=None, metadata=_STORE_OWNED)
    # the SD model's family and its SDXL-only shapes; stores before 0.2 are SD 1.x/2.x stores
    sd_kind: str = added_field("sd", "0.2")  # models.SD_KINDS: "sd" or "sdxl"
    pooled_width: int | None = added_field(None, "0.2")  # SDXL: width of pooled_simple/pooled_complex
    vae_dtype: str | None = added_field(None, "0.2")  # None: the VAE ran in sd_dtype, as before 0.2

    @property
    def vae_compute_dtype(self) -> str:
        """The dtype the VAE ran in (stage one) and runs in (`--online`)."""
        return self.vae_dtype or self.sd_dtype

    def to_json(self) -> dict[str, Any]:
        """The group attributes: every field, `schema_version`, and `field_sha256` over all of them."""
        if self.store_id is None:
            raise ValueError("a manifest is written by FeatureStore.create, which draws its store_id")
        fields = {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}
        return {**fields, FIELD_SHA256: field_digests(fields)}

    @classmethod
    def from_json(cls, attributes: dict[str, Any], url: str) -> Manifest:
        """Validate the attributes of the store at `url` and return its manifest.

        Checks, each a StoreFormatError naming `url/zarr.json`: the schema version (schema 1 names `sur-cache
        migrate`), the field checksums (an edited, removed or added field), then every field's presence and type
        (each missing, unexpected or mistyped field named).
        """
        path = f"{url.rstrip('/')}/zarr.json"
        _check_schema_version(url, path, attributes)
        _check_field_digests(path, attributes)
        fields = {key: value for key, value in attributes.items() if key not in ("schema_version", FIELD_SHA256)}
        problems = _field_problems(cls, fields, "")
        if not problems and fields["store_id"] is None:
            problems = ["store_id: expected a string, found null"]
        if problems:
            raise StoreFormatError(
                f"{path}: the manifest does not fit schema {SCHEMA_VERSION}: {'; '.join(problems)}. Restore the file "
                "from a copy of the store, or re-extract it (`sur-cache extract ... --overwrite`)"
            )
        return _build(cls, fields)

    def settings(self) -> dict[str, Any]:
        """Every field a resume must match, as JSON values."""
        values = _as_json(dataclasses.asdict(self))
        return {f.name: values[f.name] for f in dataclasses.fields(self) if not f.metadata.get("store_owned")}

    def differences(self, found: Manifest) -> list[str]:
        """One line per differing setting, `field: expected X, found Y` (this manifest expected), sorted by field."""
        want, have = self.settings(), found.settings()
        return [
            f"{key}: expected {_short(want[key])}, found {_short(have[key])}"
            for key in sorted(want)
            if want[key] != have[key]
        ]


def names_sha256(names: Sequence[str]) -> str:
    """sha256 of the file names, NUL-separated (a file name cannot hold a NUL): `Manifest.file_names_sha256`."""
    return hashlib.sha256("\0".join(names).encode()).hexdigest()


def name_bytes(names: Sequence[str]) -> int:
    """The width of the file_name array for `names`: the longest UTF-8 name, at least 1."""
    return max(1, max((len(name.encode()) for name in names), default=0))


def _check_schema_version(url: str, path: str, attributes: dict[str, Any]) -> None:
    found = attributes.get("schema_version", "<absent>")
    if found == 1:
        raise StoreFormatError(
            f"{path}: this store has schema_version 1 (written by sur-cache 0.1.0), this sur-cache reads schema "
            f"{SCHEMA_VERSION}; convert it in place with `sur-cache migrate {url}` (crash-safe: a migration that "
            "stops can be run again), or re-extract it (`sur-cache extract ... --overwrite`)"
        )
    if found != SCHEMA_VERSION:
        raise StoreFormatError(
            f"{url}: expected a sur-cache store with schema_version {SCHEMA_VERSION} in {path}, found schema_version "
            f"{found}; extract it again with this sur-cache (a new --out path, or --overwrite)"
        )


def _check_field_digests(path: str, attributes: dict[str, Any]) -> None:
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


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(hint) -> tuple[Any, bool]:
    """`(X, True)` for `X | None`, `(hint, False)` otherwise."""
    args = typing.get_args(hint)
    if type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return inner, True
    return hint, False


def _field_problems(cls, data: dict[str, Any], prefix: str) -> list[str]:
    """Every missing, unexpected or mistyped field of `data` read as the dataclass `cls`, named with `prefix`."""
    names = [f.name for f in dataclasses.fields(cls)]
    optional = {f.name for f in dataclasses.fields(cls) if "added_in" in f.metadata}
    problems = [f"missing field {prefix}{name}" for name in names if name not in data and name not in optional]
    problems += [f"unexpected field {prefix}{name}" for name in data if name not in names]
    for name in (name for name in names if name in data):
        problems += _value_problems(data[name], _hints(cls)[name], f"{prefix}{name}")
    return problems


_JSON_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _value_problems(value: Any, hint, where: str) -> list[str]:
    base, nullable = _optional(hint)
    if value is None and nullable:
        return []
    if dataclasses.is_dataclass(base):
        if isinstance(value, dict):
            return _field_problems(base, value, f"{where}.")
        expected = f"an object {{{', '.join(f.name for f in dataclasses.fields(base))}}}"
    elif typing.get_origin(base) is tuple:  # only `tuple[int, ...]` so far: a non-empty JSON list of integers
        if isinstance(value, list) and value and all(type(item) is int for item in value):
            return []
        expected = "a non-empty list of integers"
    else:
        fits = {
            bool: type(value) is bool,
            int: type(value) is int,
            float: type(value) in (int, float),
            str: type(value) is str,
        }[base]
        if fits:
            return []
        expected = _JSON_TYPES[base]
    return [f"{where}: expected {expected}{' or null' if nullable else ''}, found {_short(value, 60)}"]


def _build(cls, data: dict[str, Any]):
    """The dataclass `cls` from validated JSON `data` (nested dataclasses built too, integers as floats where typed)."""
    values = {}
    for name, value in data.items():
        base, _ = _optional(_hints(cls)[name])
        if value is not None and dataclasses.is_dataclass(base):
            value = _build(base, value)
        elif value is not None and typing.get_origin(base) is tuple:
            value = tuple(value)
        elif value is not None and base is float:
            value = float(value)
        values[name] = value
    return cls(**values)


def field_digests(fields: dict[str, Any]) -> dict[str, str]:
    """sha256 of every manifest field's canonical JSON, except the digests themselves."""
    return {key: hashlib.sha256(_canonical(value)).hexdigest() for key, value in fields.items() if key != FIELD_SHA256}


def synthetic_manifest(
    *, num_samples: int, clip_width: int, llm_width: int, latent_channels: int, latent_size: int, **fields: Any
) -> Manifest:
    """The manifest of a store of random features (benchmarks, tests): no model or dataset made them, and its
    provenance fields say so. Any other field may be given; the samples are named by `synthetic_file_names`."""
    from sur_cache import __version__
    from sur_cache.models import DEFAULT_VAE_SCALING_FACTOR

    synthetic = ModelRef("synthetic", "none")
    names = synthetic_file_names(num_samples)
    defaults = {
        "sur_cache_version": __version__,
        "sd_model": synthetic,
        "sd_dtype": "float32",
        "llm_model": synthetic,
        "llm_features_file": None,
        "llm_layer": 0,
        "llm_layer_source": "synthetic",
        "llm_pooling": "mean",
        "llm_8bit": False,
        "llm_dtype": "float32",
        "llm_batch_size": 1,
        "llm_per_token": False,
        "resolution": 8 * latent_size,
        "crop": "center",
        "crop_seed": 0,
        "flip_variants": False,
        "batch_size": 1,
        "dataset_path": "synthetic",
        "metadata_sha256": "none",
        "columns": Columns("text", "prompt", "file_name"),
        "file_names_sha256": names_sha256(names),
        "file_name_bytes": name_bytes(names),
        "tokenizer_max_length": 77,
        "vae_scaling_factor": DEFAULT_VAE_SCALING_FACTOR,
        "store_dtype": "float16",
        "shard_rows": DEFAULT_SHARD_ROWS,
        "chunk_rows": DEFAULT_CHUNK_ROWS,
        "compression": DEFAULT_COMPRESSION,
    }
    shapes = dict(clip_width=clip_width, llm_width=llm_width, latent_channels=latent_channels, latent_size=latent_size)
    merged = {**defaults, **shapes, "num_samples": num_samples, **fields}
    return Manifest(**{**merged, "chunk_rows": min(merged["chunk_rows"], merged["shard_rows"])})


def synthetic_file_names(num_samples: int) -> list[str]:
    return [f"synthetic/{index}" for index in range(num_samples)]


def synthetic_store(url: str | Path, *, overwrite: bool = False, **fields: Any) -> FeatureStore:
    """A new, empty store for random features (see `synthetic_manifest`, which takes `fields`)."""
    manifest = synthetic_manifest(**fields)
    return FeatureStore.create(url, manifest, synthetic_file_names(manifest.num_samples), overwrite=overwrite)


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the layout ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """Per-sample shape, dtype and dimension names of one array; the stored shape is `(num_samples, *row_shape)`."""

    row_shape: tuple[int, ...]
    dtype: str
    dimensions: tuple[str, ...]  # one name per row axis; each name has one length across the store

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return (SAMPLE_DIMENSION, *self.dimensions)


def array_specs(manifest: Manifest) -> dict[str, ArraySpec]:
    """The arrays a shard's writer writes, and the status last (the file_name array is `file_name_spec`)."""
    return _specs(
        length=manifest.tokenizer_max_length,
        clip_width=manifest.clip_width,
        latent=(manifest.latent_channels, manifest.latent_size, manifest.latent_size),
        llm_width=manifest.llm_width,
        dtype=manifest.store_dtype,
        flips=manifest.flip_variants,
        per_token=manifest.llm_per_token,
        pooled_width=manifest.pooled_width,
        llm_layers=None if manifest.llm_layers is None else len(manifest.llm_layers),
    )


def file_name_spec(manifest: Manifest) -> ArraySpec:
    return ArraySpec((manifest.file_name_bytes,), "uint8", ("file_name_byte",))


def _specs(
    *, length, clip_width, latent, llm_width, dtype, flips, per_token, pooled_width, llm_layers
) -> dict[str, ArraySpec]:
    clip = ArraySpec((length, clip_width), dtype, ("token", "clip_width"))
    latent = ArraySpec(latent, dtype, ("latent_channel", "latent_y", "latent_x"))
    specs = {"clip_simple": clip, "clip_complex": clip, "latent_mean": latent, "latent_logvar": latent}
    if flips:
        specs["latent_mean_flipped"] = specs["latent_logvar_flipped"] = latent
    if llm_layers is None:
        specs["llm"] = ArraySpec((llm_width,), dtype, ("llm_width",))
    else:
        specs["llm"] = ArraySpec((llm_layers, llm_width), dtype, ("llm_layer", "llm_width"))
    if per_token:
        specs["llm_tokens"] = ArraySpec((length, llm_width), dtype, ("token", "llm_width"))
        specs["llm_mask"] = ArraySpec((length,), "bool", ("token",))
    specs["sample_line"] = ArraySpec((), "int64", ())
    specs["truncated"] = ArraySpec((2,), "bool", ("prompt",))
    specs["crop_offset"] = ArraySpec((2,), "int32", ("crop_axis",))
    if pooled_width:  # SDXL: the UNet's added conditioning
        specs["pooled_simple"] = specs["pooled_complex"] = ArraySpec((pooled_width,), dtype, ("pooled_width",))
        specs["original_size"] = ArraySpec((2,), "int32", ("size_axis",))
    for name in ("image_sha256", "text_sha256", "prompt_sha256"):
        specs[name] = ArraySpec((_HASH_BYTES,), "uint8", ("hash_byte",))
    specs["status"] = ArraySpec((), "uint8", ())
    return specs


# Every array name a store can have (all options on), the status last: what `--overwrite` may remove.
_ALL_ARRAY_NAMES = (
    *_specs(
        length=1,
        clip_width=1,
        latent=(1, 1, 1),
        llm_width=1,
        dtype="float16",
        flips=True,
        per_token=True,
        pooled_width=1,
        llm_layers=None,
    ),
)[:-1] + (FILE_NAME_ARRAY, "status")


def _compressors(compression: str, itemsize: int) -> list:
    """Bytes-to-bytes codecs of one chunk: optional compression, then always a crc32c checksum."""
    if compression == "none":
        return [Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "blosc":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize), Crc32cCodec()]
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _encode_names(names: Sequence[str], width: int) -> np.ndarray:
    return np.array([name.encode() for name in names], dtype=f"S{width}").view(np.uint8).reshape(len(names), width)


def _decode_names(rows: np.ndarray) -> list[str]:
    return [name.decode() for name in np.ascontiguousarray(rows).view(f"S{rows.shape[1]}").ravel()]


# ---- recognising a store ---------------------------------------------------------------------------------------------
def _entries(fs, root: str) -> list[str]:
    """Names in the folder `root` ([] if there is none), the writer's lock file left out."""
    if not fs.isdir(root):
        return []
    return [name for name in sorted(names_in(fs, root)) if name != LOCK_FILE]


def _group_metadata(fs, root: str) -> dict[str, Any] | None:
    """The Zarr group metadata at `root` (its `zarr.json`); None when there is none.

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
    return metadata


def _group_attributes(fs, root: str) -> dict[str, Any] | None:
    metadata = _group_metadata(fs, root)
    return None if metadata is None else metadata["attributes"]


def _is_sur_cache(attributes: dict[str, Any] | None) -> bool:
    """A group sur-cache wrote: its manifest names a schema version and a store id (schema 1: its sur-cache version)."""
    if attributes is None or not isinstance(attributes.get("schema_version"), int):
        return False
    return "store_id" in attributes or (attributes["schema_version"] == 1 and "sur_cache_version" in attributes)


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
    """What `--overwrite` removes: the group's `zarr.json`, every sur-cache array, the skip reports, the commits."""
    names = [name for name in _ALL_ARRAY_NAMES if fs.isfile(f"{root}/{name}/zarr.json")]
    names += [name for name in ("zarr.json", SKIPPED_DIR, SKIPPED_REPORT, COMMITS_DIR) if fs.exists(f"{root}/{name}")]
    return names


def what_overwrite_removes(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """One phrase for messages: what `--overwrite` would remove from the store at `url`, and what it keeps."""
    url = normalise_url(url)
    fs, root = filesystem(url, storage_options)
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
    for folder, pattern in ((SKIPPED_DIR, "*.jsonl"), (COMMITS_DIR, "*.json")):
        for path in fs.glob(f"{root}/{folder}/{pattern}") + fs.glob(f"{root}/{folder}/*.partial"):
            fs.rm(path)
        _remove_if_empty(fs, f"{root}/{folder}")
    for name in (SKIPPED_REPORT, "zarr.json"):
        if fs.isfile(f"{root}/{name}"):
            fs.rm(f"{root}/{name}")


def _remove_if_empty(fs, folder: str) -> None:
    if isinstance(fs, LocalFileSystem) and fs.isdir(folder) and not fs.ls(folder):
        fs.rmdir(folder)


def _missing_status_shards(fs, root: str, num_shards: int) -> np.ndarray:
    """Indices of the status shard files that do not exist, from one listing of `status/c/`."""
    present = np.zeros(num_shards, dtype=bool)
    found = np.array([int(name) for name in names_in(fs, f"{root}/status/c") if name.isdigit()], dtype=np.int64)
    present[found[found < num_shards]] = True
    return np.flatnonzero(~present)


def _creation_interrupted(fs, root: str, attributes: dict[str, Any]) -> bool:
    """True when `create` stopped before the store was whole (an array not yet created: the status array, created
    after the names, is the last) and no sample's features were written yet: such a store holds nothing and is
    created anew instead of resumed."""
    try:
        manifest = Manifest.from_json(attributes, root)
    except StoreFormatError:
        return False  # not a manifest `create` wrote (or schema 1); `open` names what is wrong with it
    features = [name for name in array_specs(manifest) if name != "status"]
    whole = all(fs.isfile(f"{root}/{name}/zarr.json") for name in (*features, FILE_NAME_ARRAY, "status"))
    written = any(fs.exists(f"{root}/{name}/c") for name in features) or fs.exists(f"{root}/{COMMITS_DIR}")
    return not whole and not written


# ---- the shard-level summary -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardCounts:
    """Per shard of a store (numpy arrays indexed by shard): committed or not, and its samples by status."""

    committed: np.ndarray  # bool
    done: np.ndarray  # int64
    skipped: np.ndarray
    pending: np.ndarray


@dataclass(frozen=True)
class MarkerTotals:
    """What `inspect` sums over the committed shards' markers: CLIP truncations (simple, complex) and file bytes."""

    truncated: np.ndarray  # [2] int64
    bytes: Counter  # array name -> bytes of its committed shards' files


@dataclass(frozen=True)
class CommitIndex:
    """`commits/index.json` parsed: per marker it names (row k), the marker's truncation counts and file bytes."""

    markers: dict[str, int]  # marker file name -> row
    truncated: np.ndarray  # [k, 2] int64
    bytes: dict[str, np.ndarray]  # array name -> [k] int64

    @classmethod
    def parse(cls, raw: bytes) -> CommitIndex | None:
        """The index, or None if `raw` is not one (invalid JSON, a wrong shape or type, a repeated marker)."""
        try:
            data = json.loads(raw)
            markers, truncated = data["markers"], np.asarray(data["truncated"])
            columns = {str(name): np.asarray(column) for name, column in data["bytes"].items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        k = len(markers) if isinstance(markers, list) else -1
        shapes_fit = (truncated.shape == (k, 2) or k == truncated.size == 0) and all(
            column.shape == (k,) for column in columns.values()
        )
        integers = all(a.dtype.kind in "iu" or a.size == 0 for a in (truncated, *columns.values()))
        if not (shapes_fit and integers and all(isinstance(m, str) for m in markers) and len(set(markers)) == k):
            return None
        rows = {marker: row for row, marker in enumerate(markers)}
        return cls(rows, truncated.astype(np.int64).reshape(k, 2), {n: c.astype(np.int64) for n, c in columns.items()})

    def rows_of(self, markers: list[str]) -> np.ndarray:
        """Each marker's row in the index, -1 for a marker it does not name."""
        return np.array([self.markers.get(marker, -1) for marker in markers], dtype=np.int64)

    def agrees(self, row: int, record: dict[str, Any]) -> bool:
        """Whether row `row` holds what the marker's JSON `record` does."""
        return self.truncated[row].tolist() == list(record["truncated"]) and all(
            int(column[row]) == record["bytes"].get(name, 0) for name, column in self.bytes.items()
        )


def _commit_marker(shard: int, done: int, skipped: int) -> str:
    return f"{shard:08d}-{done}-{skipped}.json"


def _read_markers(fs, root: str, num_shards: int) -> np.ndarray:
    """`[k, 3]` int64 rows `(shard, done, skipped)` of the commit markers, from one listing of `commits/`.

    A shard with more than one marker (never written so, since a commit removes its old marker first) counts as
    uncommitted, and so is recomputed.
    """
    names = "\n".join(names_in(fs, f"{root}/{COMMITS_DIR}"))
    rows = np.array(_COMMIT_NAME.findall(names), dtype=np.int64).reshape(-1, 3)
    rows = rows[rows[:, 0] < num_shards]
    shards, counts = np.unique(rows[:, 0], return_counts=True)
    return rows[np.isin(rows[:, 0], shards[counts == 1])]


class FeatureStore:
    """A sur-cache feature store at a local path or fsspec URL (`file://...`, `s3://...`, `memory://...`).

    Open with `FeatureStore.open(url, mode="r")` to read, `FeatureStore.create(...)` to start one; `mode="r+"` with
    `expected=` a manifest resumes writing and refuses a store made with other settings. A writer holds
    `writer_lock(url)` for as long as it writes. `storage_options` (fsspec's, e.g. an S3 endpoint and credentials)
    reach every filesystem and zarr call; they are kept as `store.storage_options` for the loader's readers.
    """

    def __init__(
        self, url: str, group: zarr.Group, manifest: Manifest, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.url = url
        self.storage_options = storage_options
        self._group = group
        self._fs, self._root = filesystem(url, storage_options)
        self.manifest = manifest
        self.num_samples = manifest.num_samples
        self.shard_rows = manifest.shard_rows
        self.specs = array_specs(manifest)  # what a shard's writer writes, and the status
        self._arrays: dict[str, zarr.Array] = {}  # opened once: each open reads the array's zarr.json
        self._layouts: dict[str, ShardLayout | None] = {}
        self._starts = np.arange(0, self.num_samples, self.shard_rows, dtype=np.int64)
        self._lengths = np.minimum(self._starts + self.shard_rows, self.num_samples) - self._starts
        self._ranges = [(int(a), int(a + n)) for a, n in zip(self._starts, self._lengths, strict=True)]

    # ---- opening --------------------------------------------------------------------------------------------------
    @staticmethod
    def exists(url: str | Path, storage_options: Mapping[str, Any] | None = None) -> bool:
        """True when `url` holds a sur-cache store to resume or read (of this schema, or of schema 1 to migrate).

        False for nothing, an empty folder, a folder or Zarr group that is not a sur-cache store (`create` refuses
        those by name), and a store whose creation was interrupted before any sample was written (created anew).
        """
        url = normalise_url(url)
        fs, root = filesystem(url, storage_options)
        try:
            attributes = _group_attributes(fs, root)
        except StoreFormatError:
            return False
        return _is_sur_cache(attributes) and not _creation_interrupted(fs, root, attributes)

    @staticmethod
    def refuse_foreign(url: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
        """Raise unless `url` is absent, an empty folder, or a sur-cache store: what a writer may write into."""
        url = normalise_url(url)
        _refuse_foreign(url, *filesystem(url, storage_options))

    @classmethod
    def create(
        cls,
        url: str | Path,
        manifest: Manifest,
        file_names: Sequence[str],
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> FeatureStore:
        """Write the manifest (with a new store id), every (empty) array but the status, the file names, then the
        status array's metadata last (its shard files are written by the commits: a shard without one is pending).

        Refuses a folder that is not a sur-cache store, and a store unless `overwrite` (which removes only what the
        store owns) or its creation was interrupted (nothing in it was written yet).
        """
        url = normalise_url(url)
        _check_layout(manifest, file_names)
        fs, root = filesystem(url, storage_options)
        found = _refuse_foreign(url, fs, root)
        if found is not None:
            if not overwrite and not _creation_interrupted(fs, root, found):
                raise FileExistsError(
                    f"{url} already holds a sur-cache store; resume it with the same settings, or replace it: "
                    f"{what_overwrite_removes(url, storage_options)}"
                )
            _remove_owned(fs, root)
        manifest = dataclasses.replace(manifest, store_id=uuid.uuid4().hex)
        # "a": other files in the folder stay
        group = zarr.open_group(url, mode="a", attributes=manifest.to_json(), **zarr_options(storage_options))
        layout = {**array_specs(manifest), FILE_NAME_ARRAY: file_name_spec(manifest)}
        for name in (name for name in layout if name != "status"):
            _create_array(group, name, layout[name], manifest)
        store = cls(url, group, manifest, storage_options)
        store._write_file_names(file_names)
        _create_array(group, "status", layout["status"], manifest)  # last: the store is whole from here on
        return store

    def _write_file_names(self, file_names: Sequence[str], shards_per_write: int = 64) -> None:
        """The names, written a few shards at a time (memory stays small at any N)."""
        rows = shards_per_write * self.shard_rows
        width = self.manifest.file_name_bytes
        for start in range(0, self.num_samples, rows):
            stop = min(start + rows, self.num_samples)
            self._writable(FILE_NAME_ARRAY)[start:stop] = _encode_names(file_names[start:stop], width)

    @classmethod
    def open(
        cls,
        url: str | Path,
        mode: str = "r",
        expected: Manifest | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> FeatureStore:
        """Open and validate a store: its `zarr.json`, the manifest's checksums, the arrays, and `expected` if given.

        `expected` is compared setting by setting with the stored manifest; any difference raises
        ManifestMismatchError listing every differing field. Every other problem is a StoreFormatError naming the
        file and the fix.
        """
        url = normalise_url(url)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        fs, root = filesystem(url, storage_options)
        attributes = _group_attributes(fs, root)
        if attributes is None:
            raise FileNotFoundError(f"no sur-cache store at {url}; create one with `sur-cache extract --out {url}`")
        found = Manifest.from_json(attributes, url)
        if expected is not None:
            differences = expected.differences(found)
            if differences:
                raise ManifestMismatchError(
                    f"{url} was written with other settings:\n  "
                    + "\n  ".join(differences)
                    + "\nChoose a new --out path, or replace the store: "
                    + f"{what_overwrite_removes(url, storage_options)}."
                )
        try:
            group = zarr.open_group(url, mode=mode, **zarr_options(storage_options))
        except Exception as error:  # noqa: BLE001 - zarr's own validation of the metadata; any failure is format
            raise StoreFormatError(f"{url}/zarr.json cannot be opened as a Zarr group ({error}); re-extract") from None
        store = cls(url, group, found, storage_options)
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        layout = {**self.specs, FILE_NAME_ARRAY: file_name_spec(self.manifest)}
        for name, spec in layout.items():
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
            found = (tuple(array.shape), np.dtype(array.dtype), tuple(array.metadata.dimension_names or ()))
            if found != (want, np.dtype(spec.dtype), spec.dimension_names):
                raise StoreFormatError(
                    f"{self.url}: array {name!r} expected shape {want} dtype {spec.dtype} dimensions "
                    f"{spec.dimension_names}, found shape {found[0]} dtype {found[1]} dimensions {found[2]}; "
                    "re-extract the store (`sur-cache extract ... --overwrite`)"
                )

    # ---- the shard-level summary ----------------------------------------------------------------------------------
    def shard_counts(self) -> ShardCounts:
        """Every shard's counts, from the commit markers' names: one folder listing, no array read.

        A committed shard whose status shard file is missing is a StoreFormatError naming its samples: a commit
        writes the status before the marker, so that is damage (an uncommitted shard has no status file until then).
        """
        counts = self._counts(_read_markers(self._fs, self._root, len(self._ranges)))
        missing = np.intersect1d(
            _missing_status_shards(self._fs, self._root, len(self._ranges)), np.flatnonzero(counts.committed)
        )
        if len(missing):
            start, stop = self._ranges[missing[0]]
            raise StoreFormatError(
                f"{self.url}: the status of samples {start}..{stop - 1} is missing ({len(missing)} status shard "
                f"files in all), so whether they were written is unknown; `sur-cache verify {self.url}` lists the "
                "damage; re-extract with --overwrite"
            )
        return counts

    def _counts(self, markers: np.ndarray) -> ShardCounts:
        markers = markers[markers[:, 1] + markers[:, 2] == self._lengths[markers[:, 0]]]  # else not a commit of ours
        committed = np.zeros(len(self._ranges), dtype=bool)
        done, skipped = np.zeros(len(self._ranges), np.int64), np.zeros(len(self._ranges), np.int64)
        committed[markers[:, 0]], done[markers[:, 0]], skipped[markers[:, 0]] = True, markers[:, 1], markers[:, 2]
        return ShardCounts(committed, done, skipped, np.where(committed, 0, self._lengths))

    def _marker_names(self, shards: np.ndarray, counts: ShardCounts) -> list[str]:
        return [_commit_marker(int(s), int(counts.done[s]), int(counts.skipped[s])) for s in shards]

    def _marker_records(self, shards: np.ndarray, counts: ShardCounts) -> list[dict[str, Any]]:
        """The JSON records of the commit markers of `shards` (committed ones), in order."""
        paths = [f"{self._root}/{COMMITS_DIR}/{name}" for name in self._marker_names(shards, counts)]
        return json.loads(b"[" + b",".join(read_files(self._fs, paths)) + b"]")  # one parse for all: 39k at 10M

    def status(self) -> np.ndarray:
        """Every sample's status as the commits record it: a shard without a commit marker is pending.

        Reads the markers of the shards with some (not all) samples skipped, never the status array; a missing
        status shard file is a StoreFormatError (see `shard_counts`).
        """
        return self._status(self.shard_counts())

    def _status(self, counts: ShardCounts) -> np.ndarray:
        status = np.repeat(np.where(counts.done == self._lengths, DONE, SKIPPED).astype(np.uint8), self._lengths)
        status[np.repeat(~counts.committed, self._lengths)] = PENDING
        mixed = np.flatnonzero(counts.committed & (counts.done > 0) & (counts.skipped > 0))
        for shard, record in zip(mixed, self._marker_records(mixed, counts), strict=True):
            start, stop = self._ranges[shard]
            status[start:stop] = DONE
            status[start + np.asarray(record["skipped"], dtype=np.int64)] = SKIPPED
        return status

    def complete_indices(self) -> np.ndarray:
        """Sample indices whose features are written (status done), ascending."""
        return np.flatnonzero(self.status() == DONE).astype(np.int64, copy=False)  # a copy: 0.65 s at 10M

    def pending_shards(self) -> list[int]:
        """Indices of the shards not committed yet (recomputed from scratch on resume)."""
        return np.flatnonzero(~self.shard_counts().committed).tolist()

    def summary(self) -> dict[str, Any]:
        """Counts a user asks for first: samples done, pending, skipped by reason."""
        return self._summary(self.shard_counts())

    def _summary(self, counts: ShardCounts) -> dict[str, Any]:
        reasons = Counter(r["reason"] for r in self._skipped_records(counts))
        return {
            "num_samples": self.num_samples,
            "complete": int(counts.done.sum()),
            "pending": int(counts.pending.sum()),
            "skipped": dict(sorted(reasons.items())),
        }

    def truncated_counts(self) -> dict[str, int]:
        """How many done samples' simple and complex prompts CLIP truncated, from the commit markers."""
        simple, complex_ = self._marker_totals(self.shard_counts()).truncated
        return {"simple": int(simple), "complex": int(complex_)}

    @property
    def identity(self) -> dict[str, str]:
        """`{"store_id", "fingerprint"}`: equal for a copy of this store, different for a re-extracted or changed one.

        The fingerprint is a sha256 over the manifest's field checksums and every sample's status (as the commits
        record it), so it changes when any manifest field changes or a shard is committed; it reads no array.
        """
        digest = hashlib.sha256(_canonical(self.manifest.to_json()[FIELD_SHA256]))
        digest.update(self.status().tobytes())
        return {"store_id": str(self.manifest.store_id), "fingerprint": digest.hexdigest()}

    # ---- the commit index -----------------------------------------------------------------------------------------
    def write_commit_index(self) -> None:
        """Gather every commit marker's record (truncation counts, bytes of the shard's files) into
        `commits/index.json`, so that `describe` and `truncated_counts` read one file, not one per shard.

        Called by extract's main process once every process has made its commits: one writer, and no commit in
        flight. Any later commit removes the index first (`commit_shard`), so an index on disk was written after the
        last commit. It is a cache of the markers, never the commit truth: readers take which shards are committed,
        and their counts, from the listing of `commits/` as before and use the index only for the markers it names
        (reading any other marker itself); `verify` checks it against the markers.
        """
        self._check_still_this_store()
        counts = self.shard_counts()
        shards = np.flatnonzero(counts.committed)
        records = self._marker_records(shards, counts)
        index = {
            "markers": self._marker_names(shards, counts),
            "truncated": [record["truncated"] for record in records],
            "bytes": {name: [record["bytes"].get(name, 0) for record in records] for name in self.array_names},
        }
        _write_atomically(self._fs, f"{self._root}/{COMMIT_INDEX}", json.dumps(index, separators=(",", ":")))

    def has_commit_index(self) -> bool:
        return bool(self._fs.exists(f"{self._root}/{COMMIT_INDEX}"))

    def _remove_commit_index(self) -> None:
        try:
            self._fs.rm(f"{self._root}/{COMMIT_INDEX}")
        except FileNotFoundError:
            pass

    def _commit_index(self) -> CommitIndex | None:
        """The commit index, or None when there is none or it is unreadable (the markers are read instead)."""
        try:
            (raw,) = read_files(self._fs, [f"{self._root}/{COMMIT_INDEX}"])
        except FileNotFoundError:
            return None
        return CommitIndex.parse(raw)

    def _marker_totals(self, counts: ShardCounts) -> MarkerTotals:
        """The committed shards' truncation counts and file bytes (per array), summed: from the commit index for
        the markers it names, from the markers themselves for the others."""
        shards = np.flatnonzero(counts.committed)
        names = self._marker_names(shards, counts)
        truncated, stored = np.zeros(2, np.int64), Counter()
        index = self._commit_index()
        if index is not None:
            rows = index.rows_of(names)
            truncated += index.truncated[rows[rows >= 0]].sum(axis=0)
            stored.update({name: int(column[rows[rows >= 0]].sum()) for name, column in index.bytes.items()})
            shards = shards[rows < 0]
        for record in self._marker_records(shards, counts):
            truncated += np.asarray(record["truncated"], dtype=np.int64)
            stored.update(record["bytes"])
        return MarkerTotals(truncated, stored)

    def _index_disagreements(self) -> list[CorruptRange]:
        """What `verify` finds wrong with the commit index: unreadable, or a record that is not its marker's."""
        if not self.has_commit_index():
            return []
        index = self._commit_index()
        if index is None:
            return [CorruptRange(COMMIT_INDEX, 0, self.num_samples, "unreadable (inspect reads the markers instead)")]
        counts = self._counts(_read_markers(self._fs, self._root, len(self._ranges)))  # damage or not: verify lists it
        shards = np.flatnonzero(counts.committed)
        rows = index.rows_of(self._marker_names(shards, counts))
        shards, rows = shards[rows >= 0], rows[rows >= 0]
        found = []
        for shard, row, record in zip(shards, rows, self._marker_records(shards, counts), strict=True):
            if not index.agrees(int(row), record):
                start, stop = self._ranges[shard]
                found.append(CorruptRange(COMMIT_INDEX, start, stop, "its record differs from the commit marker"))
        return found

    # ---- reading --------------------------------------------------------------------------------------------------
    @property
    def array_names(self) -> list[str]:
        """Every array of the store: the shard-written ones, the file names, the status last."""
        return [name for name in self.specs if name != "status"] + [FILE_NAME_ARRAY, "status"]

    def array(self, name: str) -> zarr.Array:
        if name not in self.specs and name != FILE_NAME_ARRAY:
            raise KeyError(f"{self.url} has no array {name!r}; it has {self.array_names}")
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def file_names(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The file names of samples `[start, stop)` (all by default), as metadata.jsonl named them."""
        stop = self.num_samples if stop is None else stop
        return _decode_names(self.read([FILE_NAME_ARRAY], start, stop)[FILE_NAME_ARRAY])

    def read(
        self, names: list[str], start: int, stop: int, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Samples `[start, stop)` of each named array (contiguous reads are the fast path).

        With `out` (name -> C-contiguous `[stop - start, ...]` arrays of the array's dtype, e.g. a reader's shared
        slot) the rows are decoded into it and it is returned. Uncompressed local shards are read straight into the
        destination (`shard_files.read_rows`: one `preadv` per chunk, crc32c checked), anything else through zarr.
        Never returns zarr's fill value for written data: a missing shard file of a written shard, and any chunk
        that fails to decode (checksum), is a StoreFormatError naming the array, the samples and the fix.
        """
        out = dict(out or {})
        for name in names:
            if name not in out:
                out[name] = np.empty((stop - start, *self.array(name).shape[1:]), self.array(name).dtype)
            if not self._read_direct(name, start, stop, out[name]):
                out[name][...] = self._read_through_zarr(name, start, stop)
        return {name: out[name] for name in names}

    def _read_direct(self, name: str, start: int, stop: int, out: np.ndarray) -> bool:
        """`read` of one array from its shard files without zarr; False when its layout or a chunk needs zarr."""
        layout = self.direct_layout(name)
        if layout is None:
            return False
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
            a, b = self._ranges[shard]
            lo, hi = max(a, start), min(b, stop)
            rows = out[lo - start : hi - start]
            try:
                if not read_rows(self._shard_path(name, shard), layout, lo - a, hi - a, rows):
                    return False
            except FileNotFoundError:
                if name == FILE_NAME_ARRAY or self._shard_written(shard):
                    raise StoreFormatError(self._damage(name, a, b, "its shard file is missing")) from None
                rows[...] = 0  # a shard never written: zarr's fill value, which no scan serves as data
            except ShardDamage as error:
                raise StoreFormatError(self._damage(name, lo, hi, f"cannot be decoded: {error}")) from None
        return True

    def map_shard(self, name: str, shard: int) -> MappedShard | None:
        """Shard `shard` of array `name` mapped read-only (`shard_files.MappedShard`), or None when its layout needs
        zarr (compressed, another codec chain, not a local store). For shards with complete samples: a missing file
        is a StoreFormatError naming the array and the shard's samples, as `read` raises it."""
        layout = self.direct_layout(name)
        if layout is None:
            return None
        try:
            return MappedShard(self._shard_path(name, shard), layout)
        except (FileNotFoundError, ShardDamage) as error:
            what = (
                "its shard file is missing" if isinstance(error, FileNotFoundError) else f"cannot be decoded: {error}"
            )
            raise StoreFormatError(self._damage(name, *self._ranges[shard], what)) from None

    def damage_error(self, name: str, start: int, stop: int, error: Exception) -> StoreFormatError:
        """The error `read` raises for samples `[start, stop)` of array `name` that cannot be decoded."""
        return StoreFormatError(self._damage(name, start, stop, f"cannot be decoded: {error}"))

    def direct_layout(self, name: str) -> ShardLayout | None:
        """The array's layout for direct reads and maps (local stores only; else None), worked out once per array."""
        if name not in self._layouts:
            local = isinstance(self._fs, LocalFileSystem)
            self._layouts[name] = plain_layout(self.array(name).metadata.to_dict()) if local else None
        return self._layouts[name]

    def _read_through_zarr(self, name: str, start: int, stop: int) -> np.ndarray:
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
            if not self._shard_stored(name, shard) and (name == FILE_NAME_ARRAY or self._shard_written(shard)):
                a, b = self._ranges[shard]
                raise StoreFormatError(self._damage(name, a, b, "its shard file is missing"))
        try:
            return self.array(name)[start:stop]
        except Exception as error:  # noqa: BLE001 - any decode failure (crc32c, truncated shard) is damage
            raise StoreFormatError(self._damage(name, start, stop, f"cannot be decoded: {error}")) from error

    def _damage(self, name: str, start: int, stop: int, what: str) -> str:
        return (
            f"{self.url}: array {name!r}, samples {start}..{stop - 1}: {what}. `sur-cache verify {self.url}` lists "
            "every damaged range; re-extract the store (`sur-cache extract ... --overwrite`)"
        )

    def shard_path_template(self, name: str) -> str:
        """The path of array `name`'s shard files with `{shard}` for the shard's index, for a process that reads them
        without zarr (`check_ahead`); local stores only."""
        sentinel = "987654321"  # a shard index no store reaches; its last occurrence is the key's, not the root's
        path = self._shard_path(name, int(sentinel)).replace("{", "{{").replace("}", "}}")
        before, _, after = path.rpartition(sentinel)
        return before + "{shard}" + after

    def _shard_path(self, name: str, shard: int) -> str:
        return f"{self._root}/{_shard_key(self.array(name), shard)}"

    def _shard_stored(self, name: str, shard: int) -> bool:
        return self._fs.isfile(self._shard_path(name, shard))

    def _raw_status(self, shard: int) -> np.ndarray | None:
        """The status array's slice of `shard` as stored, or None when its file is missing or cannot be decoded."""
        if not self._shard_stored("status", shard):
            return None
        start, stop = self._ranges[shard]
        try:
            return self.array("status")[start:stop]
        except Exception:  # noqa: BLE001 - a checksum or decode failure; `verify` locates it
            return None

    def _shard_written(self, shard: int) -> bool:
        """Does shard `shard`'s status say it was written? An unreadable status counts as written; a missing one
        (a shard never committed has none) when the shard has a commit marker all the same."""
        if not self._shard_stored("status", shard):
            return bool((_read_markers(self._fs, self._root, len(self._ranges))[:, 0] == shard).any())
        raw = self._raw_status(shard)
        return raw is None or bool((raw != PENDING).any())

    def shard_ranges(self) -> list[tuple[int, int]]:
        """`(start, stop)` of every shard, in order; each is written whole by one writer (do not modify the list)."""
        return self._ranges

    def skipped_records(self) -> list[dict[str, Any]]:
        """Every skipped row reported so far, sorted by metadata line.

        The metadata pass's part always counts; a shard's part counts once the shard is committed (a part written
        just before a crash belongs to a shard that will be recomputed).
        """
        return self._skipped_records(self.shard_counts())

    def _skipped_records(self, counts: ShardCounts) -> list[dict[str, Any]]:
        folder = f"{self._root}/{SKIPPED_DIR}"
        records = []
        for name in sorted(names_in(self._fs, folder)):
            if not name.endswith(".jsonl"):
                continue  # a `.partial` leftover
            if name.startswith(SHARD_PART_PREFIX):
                shard = int(name[len(SHARD_PART_PREFIX) : -len(".jsonl")])
                if shard >= len(self._ranges) or not counts.committed[shard]:
                    continue
            with self._fs.open(f"{folder}/{name}", "r") as f:
                records += [json.loads(line) for line in f if line.strip()]
        return sorted(records, key=lambda r: (r["line"], r["reason"]))

    # ---- writing --------------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, rows: dict[str, np.ndarray], status: np.ndarray) -> None:
        """Write shard `shard` whole: every feature array, then its commit (see `write_arrays`, `commit_shard`)."""
        expected = set(self.specs) - {"status"}
        if set(rows) != expected:
            raise ValueError(f"shard {shard}: expected arrays {sorted(expected)}, got {sorted(rows)}")
        self.write_arrays(shard, rows)
        self.commit_shard(shard, status)

    def write_arrays(self, shard: int, rows: dict[str, np.ndarray]) -> None:
        """Write the whole shard `shard` of each named array; `rows[name]` is its `[stop - start, ...]` block.

        Nothing counts as written until `commit_shard`: a shard left uncommitted is recomputed from scratch.
        """
        start, stop = self._ranges[shard]
        self._check_still_this_store()
        for name in sorted(rows):
            if name == "status" or name not in self.specs:
                writable = [n for n in self.specs if n != "status"]
                raise ValueError(f"shard {shard}: cannot write {name!r}; a shard's arrays are {writable}")
            block = np.asarray(rows[name], dtype=self.specs[name].dtype)
            want = (stop - start, *self.specs[name].row_shape)
            if block.shape != want:
                raise ValueError(f"shard {shard}: {name} expected shape {want}, got {block.shape}")
            self._writable(name)[start:stop] = block

    def commit_shard(self, shard: int, status: np.ndarray) -> None:
        """Commit shard `shard` with its status (1 done, 2 skipped for every sample).

        Re-checks first that the store is still the one this object opened or created (its store id), then removes
        the shard's old commit marker (the shard is pending from here), writes its status slice, and writes the new
        marker last: its name carries the done and skipped counts, its JSON the skipped samples, the done samples'
        truncation counts and the bytes of the shard's files. A kill before the marker leaves the shard pending.
        """
        start, stop = self._ranges[shard]
        if status.shape != (stop - start,) or not np.isin(status, (DONE, SKIPPED)).all():
            raise ValueError(f"shard {shard}: status must be {stop - start} final values (1 done, 2 skipped)")
        self._check_still_this_store()
        self._remove_commit_index()  # from here the index may be stale: readers read the markers
        self._remove_commit_markers(shard)
        self._writable("status")[start:stop] = status.astype(np.uint8)
        self._write_commit_marker(shard, status)

    def _remove_commit_markers(self, shard: int) -> None:
        """Remove the commit marker of `shard`, if any, found in O(1): a marker exists only while the status slice
        holds what it was written from (a commit removes it before rewriting the slice), so its name follows from
        that slice. Only when the slice cannot be read is the folder listed."""
        folder = f"{self._root}/{COMMITS_DIR}"
        if not self._shard_stored("status", shard):
            return  # never committed: a commit writes the status before its marker, and no status is ever removed
        raw = self._raw_status(shard)
        if raw is None:
            names = [n for n in names_in(self._fs, folder) if (m := _COMMIT_NAME.fullmatch(n)) and int(m[1]) == shard]
        elif (raw == PENDING).any():
            names = []
        else:
            names = [_commit_marker(shard, int((raw == DONE).sum()), int((raw == SKIPPED).sum()))]
        for name in names:
            if self._fs.exists(f"{folder}/{name}"):
                self._fs.rm(f"{folder}/{name}")

    def _write_commit_marker(self, shard: int, status: np.ndarray) -> None:
        start, stop = self._ranges[shard]
        done = status == DONE
        truncated = self.array("truncated")[start:stop][done].sum(axis=0, dtype=np.int64)
        record = {
            "skipped": np.flatnonzero(status == SKIPPED).tolist(),
            "truncated": truncated.tolist(),
            "bytes": {name: self._shard_bytes(name, shard) for name in self.array_names},
        }
        name = _commit_marker(shard, int(done.sum()), int((status == SKIPPED).sum()))
        self._fs.makedirs(f"{self._root}/{COMMITS_DIR}", exist_ok=True)
        _write_atomically(self._fs, f"{self._root}/{COMMITS_DIR}/{name}", json.dumps(record))

    def _shard_bytes(self, name: str, shard: int) -> int:
        try:
            return int(self._fs.size(self._shard_path(name, shard)))
        except FileNotFoundError:
            return 0

    def _check_still_this_store(self) -> None:
        """Refuse to write into a store that another run replaced (a new store id) since this one opened it."""
        try:
            found = (_group_attributes(self._fs, self._root) or {}).get("store_id", "<absent>")
        except StoreFormatError:
            found = "<unreadable>"
        if found != self.manifest.store_id:
            raise StoreFormatError(
                f"{self.url} is no longer the store this run opened: its store id is {found}, this run's is "
                f"{self.manifest.store_id}, so another run replaced it; nothing more is written into it. Run one "
                "extract per --out path at a time"
            )

    def _writable(self, name: str) -> zarr.Array:
        # Write every chunk, even all-zero ones, so that `verify` can tell a missing shard from a zero one.
        return self.array(name).with_config({"write_empty_chunks": True})

    def write_skipped(self, shard: int | None, records: list[dict[str, Any]]) -> None:
        """Replace the skip report of shard `shard` (None: the metadata pass's); one writer per part, atomic."""
        self._check_still_this_store()
        part = METADATA_PART if shard is None else f"{SHARD_PART_PREFIX}{shard:06d}"
        path = f"{self._root}/{SKIPPED_DIR}/{part}.jsonl"
        if not records:
            if self._fs.exists(path):
                self._fs.rm(path)
            return
        self._fs.makedirs(f"{self._root}/{SKIPPED_DIR}", exist_ok=True)
        _write_atomically(self._fs, path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def write_skipped_report(self) -> str:
        """Merge every part into `skipped.jsonl` beside the arrays; returns its path."""
        path = f"{self._root}/{SKIPPED_REPORT}"
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.skipped_records())
        _write_atomically(self._fs, path, text)
        return path

    def remove_partial_files(self) -> int:
        """Delete the `*.partial` files a killed write left in the store's own arrays, skip reports, commit markers
        and zarr.json (never elsewhere in the folder); call it while no other process writes."""
        root = self._root
        patterns = [f"{root}/{name}/**/*.partial" for name in self.array_names]
        patterns += [f"{root}/{folder}/*.partial" for folder in (SKIPPED_DIR, COMMITS_DIR)]
        patterns += [f"{root}/zarr.*.partial", f"{root}/{SKIPPED_REPORT}.*.partial"]
        leftovers = sorted({path for pattern in patterns for path in self._fs.glob(pattern)})
        for path in leftovers:
            self._fs.rm(path)
        return len(leftovers)

    # ---- checking -------------------------------------------------------------------------------------------------
    def verify(self) -> list[CorruptRange]:
        """Read every chunk of every array back (checksums checked on decode); return what failed.

        A shard that fails is re-read one chunk at a time to name the bad sample range. A shard whose status says
        it was written (or whose status is unreadable, or missing while the shard has a commit marker) but whose
        file is gone is reported as missing, and so is a missing file-name shard. A NaN or inf in a complete
        sample's feature is reported too, so is a commit marker that disagrees with the status array, names that
        do not match the manifest's `file_names_sha256`, and a commit index that is unreadable or disagrees with a
        marker.
        """
        corrupt: list[CorruptRange] = []
        markers = {int(row[0]): row for row in _read_markers(self._fs, self._root, len(self._ranges))}
        names: list[str] | None = []
        for shard, (start, stop) in enumerate(self._ranges):
            uncommitted = shard not in markers and not self._shard_stored("status", shard)
            raw = np.zeros(stop - start, np.uint8) if uncommitted else self._raw_status(shard)  # no status: pending
            written = raw is None or bool((raw != PENDING).any())
            done = None if raw is None else raw == DONE
            for name in self.array_names:
                if not self._shard_stored(name, shard):
                    if written or name == FILE_NAME_ARRAY:
                        corrupt.append(CorruptRange(name, start, stop, "shard file missing"))
                        names = None if name == FILE_NAME_ARRAY else names
                    continue  # else never written: nothing to check
                try:
                    values = self.read([name], start, stop)[name]
                except Exception:  # noqa: BLE001 - any decode failure is corruption; narrowed below per chunk
                    corrupt += self._locate(name, start, stop)
                    names = None if name == FILE_NAME_ARRAY else names
                    continue
                if name == FILE_NAME_ARRAY and names is not None:
                    names += _decode_names(values)
                if done is not None and values.dtype.kind == "f":
                    corrupt += _non_finite(name, start, values, done)
            if shard in markers and raw is not None:
                corrupt += self._marker_disagreement(shard, markers[shard], raw)
        corrupt += self._index_disagreements()
        if names is not None and names_sha256(names) != self.manifest.file_names_sha256:
            corrupt.append(CorruptRange(FILE_NAME_ARRAY, 0, self.num_samples, "names differ from file_names_sha256"))
        order = [*self.array_names, COMMIT_INDEX]
        return sorted(corrupt, key=lambda c: (order.index(c.array), c.start))

    def _marker_disagreement(self, shard: int, marker: np.ndarray, raw: np.ndarray) -> list[CorruptRange]:
        """The status range of `shard` when its commit marker records other statuses than the status array holds."""
        counts = self._counts(marker.reshape(1, 3))
        (record,) = self._marker_records(np.array([shard]), counts)
        recorded = np.full(len(raw), DONE, np.uint8)
        recorded[np.asarray(record["skipped"], dtype=np.int64)] = SKIPPED
        if np.array_equal(recorded, raw) and marker[1] == (recorded == DONE).sum():
            return []
        start, stop = self._ranges[shard]
        return [CorruptRange("status", start, stop, "its commit marker records other statuses than the status array")]

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
        """Everything `sur-cache inspect` shows, JSON-ready; reads the commit markers (through the commit index
        where there is one), never an array's data.

        An array's `bytes_stored` is the size of its committed shards' files, as measured at each commit.
        """
        counts = self.shard_counts()
        stored = self._marker_totals(counts).bytes
        arrays = {}
        for name in self.array_names:
            array = self.array(name)
            arrays[name] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "chunks": list(array.chunks),
                "shards": list(array.shards or array.chunks),
                "dimensions": list(array.metadata.dimension_names),
                "bytes_stored": int(stored[name]),
            }
        summary = self._summary(counts)  # the same listing: describe lists `commits/` once
        return {
            "url": self.url,
            "complete": summary["complete"],
            "pending": summary["pending"],
            "skipped": summary["skipped"],
            "num_samples": self.num_samples,
            "num_shards": len(self._ranges),
            "committed_shards": int(counts.committed.sum()),
            "bytes_stored": sum(a["bytes_stored"] for a in arrays.values()),
            "manifest": self.manifest.to_json(),
            "arrays": arrays,
        }


@dataclass(frozen=True)
class CorruptRange:
    """Samples `[start, stop)` of `array` could not be read back (checksum mismatch, missing or unreadable shard)."""

    array: str
    start: int
    stop: int
    error: str


def _check_layout(manifest: Manifest, file_names: Sequence[str]) -> None:
    """Refuse a layout `create` cannot write, and names that do not fit the manifest."""
    sizes = (manifest.num_samples, manifest.shard_rows, manifest.chunk_rows)
    if min(sizes) < 1 or manifest.chunk_rows > manifest.shard_rows:
        raise ValueError(f"num_samples, shard_rows, chunk_rows must be >= 1 and chunk_rows <= shard_rows, got {sizes}")
    if manifest.compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {manifest.compression!r}")
    if len(file_names) != manifest.num_samples or names_sha256(file_names) != manifest.file_names_sha256:
        raise ValueError(
            f"{len(file_names)} file names given for a manifest of {manifest.num_samples} samples whose "
            "file_names_sha256 they must match"
        )
    if name_bytes(file_names) > manifest.file_name_bytes:
        raise ValueError(f"a file name is longer than the manifest's file_name_bytes {manifest.file_name_bytes}")


def _create_array(
    group: zarr.Group, name: str, spec: ArraySpec, manifest: Manifest, overwrite: bool = False
) -> zarr.Array:
    itemsize = np.dtype(spec.dtype).itemsize
    row_bytes = itemsize * int(np.prod(spec.row_shape, dtype=np.int64))
    rows = manifest.shard_rows if row_bytes <= _SMALL_ROW_BYTES else manifest.chunk_rows
    return group.create_array(
        name,
        shape=(manifest.num_samples, *spec.row_shape),
        dtype=spec.dtype,
        chunks=(rows, *spec.row_shape),
        shards=(manifest.shard_rows, *spec.row_shape),
        compressors=_compressors(manifest.compression, itemsize),
        fill_value=0,
        dimension_names=spec.dimension_names,
        overwrite=overwrite,  # only where the array is sur-cache's own: zarr would delete every file under it
    )


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
