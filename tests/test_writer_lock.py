"""One writer per store: a live holder is named, a dead one's lock is taken over; other fsspec URLs use an exclusive
lock file, S3 a lease written by conditional puts (see also tests/stages/test_extract.py for a second extract
refused while one runs)."""

from __future__ import annotations

import json
import uuid

import pytest

from sur_cache.writer_lock import LOCK_FILE, StoreLockedError, writer_lock

_HOLDER = """
import sys, time
from sur_cache.writer_lock import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_writer_lock_names_a_live_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StoreLockedError, match=rf"process {holder.pid} on host {socket.gethostname()} \(since "):
            with writer_lock(out):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert str(holder.pid) in (out / LOCK_FILE).read_text()  # its record is still there, its flock is gone
    with writer_lock(f"file://{out}"):
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    assert (out / LOCK_FILE).read_text() == ""


def test_the_writer_lock_of_an_object_store_is_an_exclusive_file(monkeypatch):
    import fsspec

    url = f"memory://sur-cache-lock-{uuid.uuid4().hex}/s.zarr"
    fs, root = fsspec.core.url_to_fs(url)
    with writer_lock(url):
        with pytest.raises(StoreLockedError, match=rf"if that process is gone, delete .*{LOCK_FILE}"):
            with writer_lock(url):
                pass
    assert not fs.exists(f"{root}/{LOCK_FILE}")  # removed on release
    import socket

    fs.pipe_file(
        f"{root}/{LOCK_FILE}", json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1, "since": "x"}).encode()
    )
    with writer_lock(url):  # that pid does not exist on this host: a stale lock, taken over
        assert json.loads(fs.cat_file(f"{root}/{LOCK_FILE}"))["pid"] != 2**22 + 1
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps({"host": "elsewhere", "pid": 1, "since": "x"}).encode())
    with pytest.raises(StoreLockedError, match="process 1 on host elsewhere"):
        with writer_lock(url):
            pass


@pytest.mark.slow
def test_the_s3_lock_is_a_lease_written_by_conditional_puts(s3_server):
    """Against a real S3 API: exactly one writer creates the lock object; a live holder is refused; a holder whose
    heartbeat stopped for a whole lease is taken over with If-Match on the stale ETag, after which the old holder
    can neither renew (its If-Match fails) nor commit (`check`), and its release leaves the new holder's lock."""
    import time

    import s3fs

    from sur_cache.locations import StorageOptions

    url = f"s3://{s3_server.new_bucket()}/s.zarr"
    options = StorageOptions(s3_server.options.items())
    fs = s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True, use_listings_cache=False)
    path = f"{url[len('s3://') :]}/{LOCK_FILE}"
    lease = 1.0
    with writer_lock(url, options, lease_seconds=lease) as first:
        with pytest.raises(StoreLockedError, match=r"leaves it for 1 s after its last heartbeat"):
            with writer_lock(url, options, lease_seconds=lease):
                pass
        first._stop.set()  # a writer that hangs: its heartbeat stops, the process lives on
        first._heartbeat.join()
        time.sleep(lease * 1.5)
        with writer_lock(url, options, lease_seconds=lease) as second:
            assert json.loads(fs.cat_file(path))["run"] == second.record["run"]
            assert not first._put(IfMatch=first.etag)  # the stale ETag no longer matches
            with pytest.raises(StoreLockedError, match="lost the writer lock"):
                first.check()
            first.release()  # lost: leaves the second writer's lock alone
            assert json.loads(fs.cat_file(path))["run"] == second.record["run"]
            second.check()
    assert not fs.exists(path)  # the second writer's release deleted its own lock
    fs.pipe_file(path, json.dumps({"host": "elsewhere", "pid": 1, "since": "x", "heartbeat": time.time()}).encode())
    with pytest.raises(StoreLockedError, match="process 1 on host elsewhere"):
        with writer_lock(url, options):  # a live heartbeat from another host: refused, whatever its pid
            pass
