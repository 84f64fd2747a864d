"""One writer per store: the exclusive writer lock an extract run holds for its whole run.

Two extract runs writing one store would commit each other's shards into a store whose manifest describes only
one of them; so the main process of a run takes `<store>/writer.lock` before it creates or resumes the store, and
the other ranks of the same run share it (they start after the main process holds it). See `writer_lock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from sur_cache.locations import filesystem, normalise_url

LOCK_FILE = "writer.lock"  # the exclusive writer lock of an extract run (see `writer_lock`)


class StoreLockedError(OSError):
    """Another extract run holds the store's writer lock."""


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
    url = normalise_url(url)
    fs, root = filesystem(url)
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
