"""Where a store lives: a local path, a `file://` URL, or any fsspec URL (`s3://...`, `memory://...`).

One place turns a user's `--out`/`--store` into a filesystem and a root path, names the package a protocol needs
when it is missing, and lists or reads many small files the fast way for that filesystem (the commit markers, the
skip reports). The store, the writer lock and the stages all go through it, so they agree on what a URL means.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
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


def read_files(fs, paths: list[str]) -> list[bytes]:
    """The bytes of each file in `paths`: plain reads when local, one batched `cat` elsewhere (object stores)."""
    if isinstance(fs, LocalFileSystem):
        return [Path(path).read_bytes() for path in paths]
    contents = fs.cat(paths) if paths else {}
    return [contents[path] for path in paths]
