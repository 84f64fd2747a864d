"""Shared fixtures: tiny models saved to a temp folder once per session, and a small SURD-format dataset."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from sur_cache.demo_data import build_demo_dataset  # noqa: E402
from sur_cache.tiny_models import build_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`TinyModels(sd=..., llm=...)`: folders loadable with the real `from_pretrained` paths."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A 12-sample SURD-format folder (read-only by convention: copy it before editing)."""
    return build_demo_dataset(tmp_path_factory.mktemp("surd") / "data", num_samples=12)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server for the session (tests/s3_server.py); each test takes its own bucket."""
    from s3_server import start_server

    process, server = start_server(tmp_path_factory.mktemp("s3_server") / "moto.log")
    yield server
    process.terminate()
    process.wait()
