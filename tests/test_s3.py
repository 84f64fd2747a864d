"""A store in S3, through a real S3 API (moto's server, tests/s3_server.py): extract writes it, inspect, verify and
train read it, kill -9 and resume gives the local uninterrupted run's store, a second writer is refused, a corrupt
object is named; credentials reach the code through the environment and --storage-option, and are never printed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from s3_server import assert_same_files, start_server

from sur_cache.cli import main
from sur_cache.config import ExtractConfig
from sur_cache.locations import StorageOptions
from sur_cache.stages.extract import run_extract
from sur_cache.store import PENDING, FeatureStore
from sur_cache.tiny_models import TINY_RESOLUTION
from sur_cache.writer_lock import writer_lock

pytestmark = pytest.mark.slow
SUR_CACHE = str(Path(sys.executable).parent / "sur-cache")

SETTINGS = {"resolution": TINY_RESOLUTION, "batch_size": 4, "shard_rows": 4, "num_workers": 0, "llm_8bit": False}
SETTINGS |= {"llm_dtype": "float32", "store_dtype": "float32", "llm_layer": 1, "progress": False, "device": "cpu"}

# Kills the process at the second shard commit (one shard committed, the next one written but not committed).
_KILLER = """
import os, signal, sys
from sur_cache.store import FeatureStore
original, calls = FeatureStore.commit_shard, []
def killing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
FeatureStore.commit_shard = killing
from sur_cache.cli import main
main(sys.argv[1:])
"""


def _config(data, out, models, **overrides) -> ExtractConfig:
    return ExtractConfig(data=Path(data), out=str(out), sd=str(models.sd), llm=str(models.llm), **SETTINGS, **overrides)


def _cli_args(data, out, models) -> list[str]:
    args = ["extract", "--data", str(data), "--out", str(out), "--sd", str(models.sd), "--llm", str(models.llm)]
    for key in ("resolution", "batch_size", "shard_rows", "num_workers", "llm_dtype", "store_dtype", "llm_layer"):
        args += [f"--{key.replace('_', '-')}", str(SETTINGS[key])]
    return args + ["--no-8bit", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def local_reference(tiny_models, demo_dataset, tmp_path_factory):
    """An uninterrupted one-process extract into a local folder: what every S3 store must hold."""
    out = tmp_path_factory.mktemp("local") / "store.zarr"
    run_extract(_config(demo_dataset, out, tiny_models))
    return out


def _assert_same_as(url: str, server, local: Path) -> None:
    """Every object holds the local store's file byte for byte, and every manifest setting is the local store's."""
    remote = FeatureStore.open(url, storage_options=StorageOptions(server.options.items()))
    assert remote.manifest.settings() == FeatureStore.open(local).manifest.settings()
    assert_same_files(url, server, local)


@pytest.fixture
def fresh_accelerate_state():
    """`train` and `extract` in this process each build accelerate's process-wide state, as a fresh process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_extract_writes_a_store_that_inspect_verify_and_train_read(
    s3_server, local_reference, tiny_models, demo_dataset, tmp_path, monkeypatch, caplog, fresh_accelerate_state
):
    url = f"s3://{s3_server.new_bucket()}/store.zarr"
    extracted = CliRunner().invoke(main, [*_cli_args(demo_dataset, url, tiny_models), *s3_server.option_args()])
    assert extracted.exit_code == 0, extracted.output
    assert "done        12 of 12 samples" in extracted.output
    _assert_same_as(url, s3_server, local_reference)
    with monkeypatch.context() as environment:  # credentials and endpoint from the environment, as botocore reads them
        for name, value in s3_server.env.items():
            environment.setenv(name, value)
        inspected = CliRunner().invoke(main, ["inspect", url, "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["url"] == url
    verified = CliRunner().invoke(main, ["verify", url, *s3_server.option_args()])
    assert verified.exit_code == 0 and verified.output.startswith("ok: "), verified.output
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run = tmp_path / "run"
    train = ["train", "--store", url, "--sd", str(tiny_models.sd), "--out", str(run), "--device", "cpu"]
    train += ["--batch-size", "2", "--gradient-accumulation", "1", "--max-steps", "2", "--read-workers", "1"]
    train += ["--feedforward", "64", "--num-heads", "4", "--checkpoint-every", "1", *s3_server.option_args()]
    trained = CliRunner().invoke(main, train)  # one reader process, which opens the store with the same options
    assert trained.exit_code == 0, trained.output
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert "StorageOptions(endpoint_url=***, key=***, secret=***)" in (run / "run.json").read_text()
    # The secret is nowhere: no command's output, log record, file of the run folder or object of the bucket.
    outputs = [result.output for result in (extracted, inspected, verified, trained)] + [caplog.text]
    files = [path.read_bytes() for path in run.rglob("*") if path.is_file()]
    assert len(files) > 10  # run.json, the log, the adapter, two checkpoints
    _assert_secret_absent(s3_server, outputs, files + list(s3_server.objects(url).values()))


def _assert_secret_absent(server, texts: list[str], blobs: list[bytes] = ()) -> None:
    secret = server.options["secret"]
    assert not [text for text in texts if secret in text]
    assert not [blob for blob in blobs if secret.encode() in blob]


def test_kill_9_during_extract_then_resume_gives_the_local_uninterrupted_store(
    s3_server, local_reference, tiny_models, demo_dataset, tmp_path
):
    url = f"s3://{s3_server.new_bucket()}/store.zarr"
    args = _cli_args(demo_dataset, url, tiny_models)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, *args], env=s3_server.env, cwd=tmp_path, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _assert_secret_absent(s3_server, [killed.stdout, killed.stderr])  # credentials from the environment
    options = StorageOptions(s3_server.options.items())
    status = FeatureStore.open(url, storage_options=options).status()
    assert (status == PENDING).sum() == 8  # one shard of three committed
    # the dead run's lock object is still there; its process is gone from this host, so the resume takes it over
    summary = run_extract(_config(demo_dataset, url, tiny_models, storage_options=options))
    assert summary["complete"] == 12 and summary["computed_now"] == 8
    _assert_same_as(url, s3_server, local_reference)


def test_a_second_writer_is_refused_naming_the_holder(s3_server, tiny_models, demo_dataset, fresh_accelerate_state):
    import os
    import socket

    url = f"s3://{s3_server.new_bucket()}/store.zarr"
    options = StorageOptions(s3_server.options.items())
    with writer_lock(url, options):
        refused = CliRunner().invoke(main, [*_cli_args(demo_dataset, url, tiny_models), *s3_server.option_args()])
    assert refused.exit_code == 1
    assert f"is being written by process {os.getpid()} on host {socket.gethostname()}" in refused.output
    _assert_secret_absent(s3_server, [refused.output])
    assert not FeatureStore.exists(url, options)  # nothing was written


def test_verify_names_a_corrupted_object(s3_server, tiny_models, demo_dataset):
    import s3fs

    url = f"s3://{s3_server.new_bucket()}/store.zarr"
    options = StorageOptions(s3_server.options.items())
    run_extract(_config(demo_dataset, url, tiny_models, storage_options=options))
    fs = s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True)
    shard = f"{url[len('s3://') :]}/clip_simple/c/1/0/0"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside the first chunks of shard 1
    fs.pipe_file(shard, bytes(data))
    result = CliRunner().invoke(main, ["verify", url, *s3_server.option_args()])
    assert result.exit_code == 1
    assert "corrupt   clip_simple samples 4..7: " in result.output  # shards and chunks of 4 samples
    assert result.output.count("corrupt   ") == 1


def test_storage_options_hide_their_values_and_refuse_a_local_path(tmp_path):
    options = StorageOptions.parse(["key=AKIA", "secret=s3cr3t", "anon=false", 'client_kwargs={"region_name": "x"}'])
    assert dict(options) == {"key": "AKIA", "secret": "s3cr3t", "anon": False, "client_kwargs": {"region_name": "x"}}
    assert "s3cr3t" not in repr(options) and "s3cr3t" not in str(options)
    with pytest.raises(ValueError, match=r"--storage-option secret=\*\*\*: expected KEY=VALUE") as bad:
        StorageOptions.parse(["secret"])
    assert "s3cr3t" not in str(bad.value)
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "s.zarr"), "--storage-option", "secret=s3cr3t"])
    assert result.exit_code == 1 and "applies to fsspec URLs" in result.output and "s3cr3t" not in result.output


def test_a_server_that_does_not_start_fails_the_test_with_its_log(tmp_path):
    import socket

    with socket.socket() as taken:  # the port is in use, so moto's server exits at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(pytest.fail.Exception, match=rf"did not start on http://127.0.0.1:{port}:\n.*in use"):
            start_server(tmp_path / "moto.log", port=port)  # its log says why
