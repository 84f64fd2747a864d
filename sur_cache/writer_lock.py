"""One writer per store: the exclusive writer lock an extract run holds for its whole run.

Two extract runs writing one store would commit each other's shards into a store whose manifest describes only
one of them; so the main process of a run takes `<store>/writer.lock` before it creates or resumes the store, and
the other ranks of the same run share it (they start after the main process holds it). See `writer_lock`; the
schemes per filesystem (and what a node-local or shared filesystem means for them) are in docs/scale.md.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from sur_cache.locations import filesystem, normalise_url

LOCK_FILE = "writer.lock"  # the exclusive writer lock of an extract run (see `writer_lock`)
# An S3 lock object whose heartbeat is older than this was left by a dead writer and may be taken over. Renewed
# every quarter of it, so three renewals in a row must fail (a network outage of 90 s) before a live writer loses it.
LEASE_SECONDS = 120.0

_log = logging.getLogger(__name__)


class StoreLockedError(OSError):
    """Another extract run holds the store's writer lock."""


def _holder_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class HeldLock:
    """The lock a `with writer_lock(...)` block holds. `check()` before each commit raises StoreLockedError once the
    lock is lost (only an S3 lease can be: a writer whose heartbeat failed for a whole lease, or was taken over)."""

    def check(self) -> None:
        """Nothing to check: a local flock or an exclusive lock file is held until released."""


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
def writer_lock(
    url: str | Path, storage_options: Mapping[str, Any] | None = None, lease_seconds: float = LEASE_SECONDS
) -> Iterator[HeldLock]:
    """Hold the store's exclusive writer lock, `<store>/writer.lock`, for the `with` block; refuse if it is held.

    Local stores: `fcntl.flock` on the lock file, which names the holder (host, pid, start time). The kernel drops a
    dead process's lock, so a stale lock is taken over without any guess.

    S3 (s3fs): a lock object created with a conditional put (`If-None-Match: *`: of two writers exactly one
    creates it), naming the holder and its heartbeat, renewed every `lease_seconds / 4` with `If-Match` on its own
    ETag and deleted with `If-Match` on release. A lock whose heartbeat is older than `lease_seconds` (or whose
    process is gone from this host) was left by a dead writer: it is taken over with `If-Match` on the ETag that
    was judged stale, so of two writers taking it over one wins and the other is refused; the takeover is logged.

    Other fsspec URLs: the lock file is created with exclusive-create (`mode="xb"`, race-free only where the
    filesystem makes it atomic) and removed on release; a lock left by a dead process on this host is taken over,
    one left from another host must be deleted by hand (its holder is named).
    """
    url = normalise_url(url)
    fs, root = filesystem(url, storage_options)
    path = f"{root}/{LOCK_FILE}"
    if isinstance(fs, LocalFileSystem):
        holding = _flock(url, path)
    elif "s3" in fs.protocol:
        holding = _lease(url, fs, path, lease_seconds)
    else:
        holding = _exclusive_file(url, fs, path)
    with holding as held:
        yield held


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
            yield HeldLock()
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
        yield HeldLock()
    finally:
        fs.rm(path)


@contextmanager
def _lease(url: str, fs, path: str, lease_seconds: float) -> Iterator[HeldLock]:
    lease = _S3Lease(url, fs, path, lease_seconds)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


class _S3Lease(HeldLock):
    """The S3 writer lock: a lock object written only by conditional puts (see `writer_lock`)."""

    def __init__(self, url: str, fs, path: str, lease_seconds: float) -> None:
        self.url, self.fs, self.path, self.lease_seconds = url, fs, path, lease_seconds
        self.bucket, self.key, _ = fs.split_path(path)
        self.record = {**_holder_record(), "run": uuid.uuid4().hex, "lease_seconds": lease_seconds}
        self.etag: str | None = None
        self.renewed = 0.0  # time.monotonic() of the last successful put
        self.lost: str | None = None  # why the lock is no longer ours
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="writer-lock-heartbeat", daemon=True)

    def acquire(self) -> None:
        for _ in range(3):  # a lock released or taken over between our calls: look again
            if self._put(IfNoneMatch="*"):
                break
            found = self._current()
            if found is None:
                continue
            etag, raw = found
            if not _expired(raw):
                raise StoreLockedError(
                    _locked_message(self.url, self.path, raw) + f"; a writer that dies leaves it for "
                    f"{_lease_of(raw):.0f} s after its last heartbeat, then the next extract takes it over"
                )
            if self._put(IfMatch=etag):
                _log.warning("%s: took over the writer lock of %s (%s)", self.url, _describe_holder(raw), _why(raw))
                break
        else:
            raise StoreLockedError(f"{self.url}: the writer lock {self.path} keeps changing hands; try again")
        self._heartbeat.start()

    def _put(self, **condition: str) -> bool:
        """Write our record under `condition`; False when the condition fails (someone else's lock is there)."""
        body = json.dumps({**self.record, "heartbeat": time.time()}).encode()
        try:
            reply = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        self.etag, self.renewed = reply["ETag"], time.monotonic()
        return True

    def _current(self) -> tuple[str, bytes] | None:
        """The lock object's ETag and bytes, the ETag read first: a renewal in between makes our If-Match fail."""
        try:
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            return etag, self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                if not self._put(IfMatch=self.etag):
                    self.lost = "another extract took it over after its heartbeat stopped"
                    return
            except OSError as error:  # a network error: try again; `check` gives up after a whole lease
                _log.warning("%s: renewing the writer lock failed (%s); retrying", self.url, error)

    def check(self) -> None:
        if self.lost is None and time.monotonic() - self.renewed > self.lease_seconds:
            self.lost = f"its heartbeat could not be renewed for {self.lease_seconds:.0f} s"
        if self.lost is not None:
            raise StoreLockedError(
                f"{self.url}: this extract lost the writer lock {self.path} ({self.lost}), so it stops before "
                "committing another shard; what it committed stays valid, rerun the same command to resume"
            )

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        if self.lost is not None:
            return  # another writer's lock now: never delete it
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except FileNotFoundError:
            pass
        except OSError as error:
            if not _precondition_failed(error):
                raise
        self.fs.invalidate_cache(self.path)


def _precondition_failed(error: OSError) -> bool:
    """True for s3fs's translation of a failed `If-Match`/`If-None-Match` (HTTP 412 PreconditionFailed)."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed"


def _lease_of(raw: bytes) -> float:
    try:
        return float(json.loads(raw)["lease_seconds"])
    except (ValueError, KeyError, TypeError):
        return LEASE_SECONDS


def _expired(raw: bytes) -> bool:
    """A lock left by a dead writer: its process is gone from this host, or its heartbeat is older than its lease."""
    if _dead_local_process(raw):
        return True
    try:
        return time.time() - float(json.loads(raw)["heartbeat"]) > _lease_of(raw)
    except (ValueError, KeyError, TypeError):
        return False  # a record we cannot read is never guessed stale


def _why(raw: bytes) -> str:
    if _dead_local_process(raw):
        return "its process is gone from this host"
    return f"no heartbeat for more than {_lease_of(raw):.0f} s"


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
