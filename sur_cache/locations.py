"""Where a store lives: a local path, a `file://` URL, or any fsspec URL (`s3://...`, `memory://...`).

One place turns a user's `--out`/`--store` into a filesystem and a root path, names the package a protocol needs
when it is missing, and lists or reads many small files the fast way for that filesystem (the commit markers, the
skip reports). The store, the writer lock and the stages all go through it, so they agree on what a URL means.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem


class StoreURLError(ValueError):
    """A store URL that cannot be used: a protocol whose package is missing, or one that cannot outlive the process."""


_EXTRAS = {"s3": "s3"}  # fsspec protocol -> the sur-cache extra that installs its package


def normalise_url(url: str | Path) -> str:
    """A local path for `file://` URLs (so the lock, the skip reports and zarr all see one path), else `url`."""
    url = str(url)
    return LocalFileSystem._strip_protocol(url) if url.startswith("file://") else url


class StorageOptions(Mapping[str, Any]):
    """fsspec/botocore keyword arguments for a store URL (`--storage-option key=value`), whose values are never shown.

    Credentials travel here (or in the environment: `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, ...), so `repr` and
    `str` name the keys only: a run record, a log line or an error message that prints the options prints
    `key=***`. A value `true`/`false` is a boolean and one starting with `{` or `[` is JSON (for `client_kwargs`);
    every other value is a string, so a numeric secret stays a string.
    """

    def __init__(self, pairs: Iterable[tuple[str, Any]] = ()) -> None:
        self._items = tuple(sorted(dict(pairs).items()))

    @classmethod
    def parse(cls, texts: Iterable[str]) -> StorageOptions:
        """`key=value` strings (the CLI's repeatable `--storage-option`); a malformed one names its key only."""
        pairs = []
        for text in texts:
            key, sep, value = text.partition("=")
            if not sep or not key.strip():
                raise StoreURLError(
                    f"--storage-option {key.strip() or '<empty>'}=***: expected KEY=VALUE, e.g. "
                    "--storage-option endpoint_url=http://127.0.0.1:9000"
                )
            pairs.append((key.strip(), _option_value(key.strip(), value)))
        return cls(pairs)

    def __getitem__(self, key: str) -> Any:
        return dict(self._items)[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple((key, json.dumps(value, sort_keys=True)) for key, value in self._items))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return "StorageOptions(" + ", ".join(f"{key}=***" for key, _ in self._items) + ")"

    __str__ = __repr__

    def __reduce__(self):  # pickled for the loader's reader processes, as plain pairs
        return (StorageOptions, (self._items,))


def _option_value(key: str, text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            raise StoreURLError(f"--storage-option {key}=***: a value starting with {{ or [ must be JSON") from None
    return text


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root path of `url`; a protocol whose package is missing names what to install.

    `options` (fsspec storage options) are for URLs; a local path with options is refused, not silently ignored.
    """
    options = dict(options or {})
    if options and is_local(url):
        raise StoreURLError(
            f"{url} is a local path: --storage-option ({', '.join(options)}) applies to fsspec URLs (s3://...) only; "
            "drop it"
        )
    if not is_local(url):
        # No cached listings: zarr writes through an instance of its own, and the other processes of a run (or
        # other nodes) commit shards; a listing this process cached would hide them.
        options.setdefault("use_listings_cache", False)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as error:
        protocol = url.split("://", 1)[0]
        fix = f"pip install 'sur-cache[{_EXTRAS[protocol]}]'" if protocol in _EXTRAS else str(error)
        raise StoreURLError(f"{url}: {protocol}:// URLs need a package that is not installed: {fix}") from error
    return fs, root.rstrip("/")


def is_local(url: str | Path) -> bool:
    """True for a local path or `file://` URL."""
    return fsspec.core.split_protocol(str(url))[0] in (None, "file", "local")


def zarr_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments that hand `options` to `zarr.open_group` (none at all for no options: zarr refuses
    storage options for a local path)."""
    return {"storage_options": dict(options)} if options else {}


def in_process_only(url: str) -> bool:
    """True for a URL whose data lives in this process's memory and is gone when it exits (`memory://`)."""
    fs, _ = filesystem(normalise_url(url))
    return isinstance(fs, MemoryFileSystem)


def names_in(fs, folder: str) -> list[str]:
    """The names in `folder` (one listing call), [] if it does not exist.

    Local folders are listed with `os.listdir`: fsspec's local `ls` normalises every path, which costs seconds at
    the 39k shards of a 10M-sample store.
    """
    try:
        if isinstance(fs, LocalFileSystem):
            return os.listdir(folder)
        return [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(folder, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:  # not `Path.read_bytes`: its path parsing was a third of reading 39k small files
        return f.read()


def read_files(fs, paths: list[str]) -> list[bytes]:
    """The bytes of each file in `paths`: plain reads when local, one batched `cat` elsewhere (object stores)."""
    if isinstance(fs, LocalFileSystem):
        return [_read_local(path) for path in paths]
    contents = fs.cat(paths) if paths else {}
    return [contents[path] for path in paths]
