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

    def new_bucket(self) -> str:
        import s3fs

        name = f"sur-cache-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.options, skip_instance_cache=True).mkdir(name)
        return name


def start_server(log_path) -> tuple[subprocess.Popen, S3Server]:
    port = free_port()
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
