"""A real S3 API on 127.0.0.1 for the tests: moto's standalone server (`moto[server]`, the dev extra) as a
subprocess on a free port, and a fresh bucket per test.

moto because it installs from PyPI with no binary or container, speaks the S3 REST API that s3fs/botocore use (so
the code under test is the production path, byte for byte), and implements conditional writes (`If-None-Match`,
`If-Match`) that the writer lock relies on. A server that does not come up is a test error with its output, never
a skip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sur-cache-test", "AWS_SECRET_ACCESS_KEY": "sur-cache-test-secret"}
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """The environment a `sur-cache` subprocess reaches the server through (botocore reads AWS_ENDPOINT_URL)."""
        return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def options(self) -> dict[str, str]:
        """The same as fsspec storage options (what `--storage-option` passes), for calls inside the test process."""
        return {
            "endpoint_url": self.endpoint,
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }

    def option_args(self) -> list[str]:
        return [arg for key, value in self.options.items() for arg in ("--storage-option", f"{key}={value}")]

    def objects(self, url: str) -> dict[str, bytes]:
        """The bytes of every object under `url` (`s3://bucket/prefix`), by its path relative to it."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True, use_listings_cache=False)
        root = url[len("s3://") :].rstrip("/")
        return {path[len(root) + 1 :]: data for path, data in fs.cat(fs.find(root)).items()}

    def new_bucket(self) -> str:
        import s3fs

        name = f"sur-cache-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.options, skip_instance_cache=True).mkdir(name)
        return name


def start_server(log_path, port: int | None = None) -> tuple[subprocess.Popen, S3Server]:
    """moto's server on 127.0.0.1 at `port` (default: a free one); a server that does not come up fails the test."""
    port = port or free_port()
    log = open(log_path, "wb")
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return process, S3Server(endpoint)
        except OSError:
            time.sleep(0.2)
    process.kill()
    process.wait()
    log.close()
    pytest.fail(f"the moto S3 server did not start on {endpoint}:\n{open(log_path).read()[-3000:]}", pytrace=False)


def store_files(url: str, server: S3Server | None = None) -> dict[str, bytes]:
    """Every file of the store at `url` (a folder, or `s3://` on `server`) by its relative path, but the writer lock
    (a folder keeps its emptied flock file, an S3 lease object is deleted on release)."""
    if url.startswith("s3://"):
        files = server.objects(url)
    else:
        files = {str(path.relative_to(url)): path.read_bytes() for path in Path(url).rglob("*") if path.is_file()}
    files.pop("writer.lock", None)
    return files


def assert_same_files(url: str, server: S3Server | None, reference: Path) -> None:
    """The store at `url` holds the files of the `reference` folder, byte for byte, except the root zarr.json, whose
    manifest holds each store's own id (compare `manifest.settings()` for the rest)."""
    files, expected = store_files(url, server), store_files(str(reference))
    assert sorted(files) == sorted(expected)
    assert [name for name in expected if name != "zarr.json" and files[name] != expected[name]] == []
