"""Two nodes simulated on this machine: two `torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --rdzv-backend
c10d` launches on gloo, each in its own working directory (standing for a node-local disk), sharing one store and
one run folder. Extract into one store (a local folder, and S3; and a folder through docs/scale.md's `accelerate
launch --multi_gpu --num_machines 2` line) equals a one-process run byte for byte; training gives a one-process
emulation's losses (same global batch, gradients averaged as DDP does) to 1e-5 relative; after both launchers are
killed with SIGKILL, resuming continues exactly like the uninterrupted two-node run. A node-local --out (one
folder per working directory) is stopped with an error that names the cause."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from s3_server import assert_same_files, free_port

from sur_cache.config import ExtractConfig, TrainConfig
from sur_cache.loader import FeatureLoader
from sur_cache.locations import StorageOptions
from sur_cache.stages.extract import run_extract
from sur_cache.stages.train import compute_losses, setup
from sur_cache.store import FeatureStore
from sur_cache.tiny_models import TINY_RESOLUTION
from sur_cache.train_log import read_log

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
NODES = 2
EXTRACT = {"resolution": TINY_RESOLUTION, "batch_size": 4, "shard_rows": 4, "num_workers": 0, "llm_8bit": False}
EXTRACT |= {"llm_dtype": "float32", "store_dtype": "float32", "llm_layer": 1, "device": "cpu", "progress": False}
# One micro-batch of 2 per process and step: the two nodes' global batch is 4, the emulation's two micro-batches.
TRAIN = {"batch_size": 2, "gradient_accumulation": 1, "max_steps": 3, "checkpoint_every": 2, "dropout": 0.0}
TRAIN |= {"feedforward": 64, "num_heads": 4, "read_workers": 0, "device": "cpu"}
LOSS_TOLERANCE = {"rel": 1e-5}  # DDP's all-reduce sums the two gradients in another order than one process does

# A node's worker that kills its launcher (torchrun's agent, its parent) and itself with SIGKILL once the checkpoint
# of step KILL_AFTER_STEP is sealed on every node, as a node lost at that point would be.
_KILLING_WORKER = """
import os, signal, sys
from sur_cache.stages import train
original = train.save_checkpoint
def save_then_die(run):
    folder = original(run)
    if run.step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return folder
train.save_checkpoint = save_then_die
from sur_cache.cli import main
main(sys.argv[1:])
"""


def _launch_nodes(
    tmp_path: Path,
    command: list[str],
    env: dict[str, str],
    *,
    python: bool = False,
    threads: int = 1,
    accelerate: bool = False,
) -> list:
    """Start both nodes' launchers, each in its own working directory; returns them finished.

    `threads` per process: CPU kernels reduce in a thread-count-dependent order, so a store equal byte for byte to
    the one-process run's needs that run's thread count. `accelerate`: docs/scale.md's `accelerate launch` line
    instead of torchrun (a Python `command[0]`, which accelerate runs with the interpreter)."""
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    env = {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    if accelerate:  # no user's accelerate config file is read
        env["HF_HOME"] = str(tmp_path / "hf_home")
    launchers = []
    for node in range(NODES):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        if accelerate:
            launcher = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", str(NODES)]
            launcher += ["--num_processes", str(NODES), "--machine_rank", str(node)]
            launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        else:
            launcher = [str(VENV_BIN / "torchrun"), "--nnodes", str(NODES), "--nproc-per-node", "1"]
            launcher += ["--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
            launcher += ["--rdzv-id", run_id, *([] if python else ["--no-python"])]
        launchers.append(
            subprocess.Popen(
                launcher + command,
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for launcher in launchers:
        launcher.stdout_text, launcher.stderr_text = launcher.communicate(timeout=300)
    return launchers


def _succeeded(launchers) -> None:
    for node, launcher in enumerate(launchers):
        assert launcher.returncode == 0, f"node {node}:\n{launcher.stderr_text[-3000:]}"


def _extract_args(data, out, models) -> list[str]:
    args = ["extract", "--data", str(data), "--out", str(out), "--sd", str(models.sd), "--llm", str(models.llm)]
    for key in ("resolution", "batch_size", "shard_rows", "num_workers", "llm_dtype", "store_dtype", "llm_layer"):
        args += [f"--{key.replace('_', '-')}", str(EXTRACT[key])]
    return args + ["--no-8bit", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def one_process_store(tiny_models, demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process") / "store.zarr"
    config = ExtractConfig(data=demo_dataset, out=str(out), sd=str(tiny_models.sd), llm=str(tiny_models.llm), **EXTRACT)
    run_extract(config)
    return out


def _assert_same_store(url: str, server, reference: Path) -> None:
    options = StorageOptions(server.options.items()) if server else None
    store, one = FeatureStore.open(url, storage_options=options), FeatureStore.open(reference)
    assert store.manifest.settings() == one.manifest.settings()
    assert_same_files(url, server, reference)


@pytest.mark.parametrize("where", ["shared folder", "s3", "shared folder, accelerate launch"])
def test_two_nodes_extract_the_one_process_store(
    where, request, one_process_store, tiny_models, demo_dataset, tmp_path
):
    env, server = dict(os.environ), None
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        out, env = f"s3://{server.new_bucket()}/store.zarr", server.env
    else:
        out = tmp_path / "shared" / "store.zarr"  # an absolute path both nodes see: a shared filesystem
    command = [str(VENV_BIN / "sur-cache"), *_extract_args(demo_dataset, out, tiny_models)]
    accelerate = where.endswith("accelerate launch")
    nodes = _launch_nodes(tmp_path, command, env, threads=torch.get_num_threads(), accelerate=accelerate)
    _succeeded(nodes)
    assert sum(n.stdout_text.count("done        12 of 12 samples") for n in nodes) == 1  # the main process prints
    if where == "s3":  # the credentials reached every node through the environment, and were never printed
        assert not [n for n in nodes if server.options["secret"] in n.stdout_text + n.stderr_text]
    _assert_same_store(str(out), server, one_process_store)


def test_two_nodes_extracting_into_node_local_folders_are_stopped_naming_the_shared_out(
    tiny_models, demo_dataset, tmp_path
):
    """A relative --out is a folder in each node's own working directory: the process that is not the main one
    finds no store there and says why, and the launch ends."""
    command = [str(VENV_BIN / "sur-cache"), *_extract_args(demo_dataset, "store.zarr", tiny_models)]
    nodes = _launch_nodes(tmp_path, command, dict(os.environ))
    assert [n.returncode for n in nodes] == [1, 1]
    errors = [line for n in nodes for line in n.stderr_text.splitlines() if line.startswith("Error: ")]
    assert errors == [
        "Error: process 1 finds no store at --out store.zarr, which the main process has just created: on several "
        "nodes --out must be a folder all of them see (a shared filesystem) or an s3:// URL, not a node-local disk "
        "(docs/scale.md)"
    ]


def _train_args(store, models, out, *extra) -> list[str]:
    args = ["train", "--store", str(store), "--sd", str(models.sd), "--out", str(out)]
    for key, value in TRAIN.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


def _emulated_losses(store, models, out: Path) -> list[float]:
    """Both nodes' steps in one process: rank r's micro-batch from its own loader, the gradient of the mean loss
    (what DDP's average gives), one clipped AdamW step, as `optimizer_step` does."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    config = TrainConfig(store=str(store), sd=str(models.sd), out=out, **TRAIN)
    run = setup(config)
    loaders = []
    for rank in range(NODES):
        settings = dataclasses.replace(run.loader.settings, rank=rank, world_size=NODES)
        loaders.append(FeatureLoader(run.loader.source, run.loader.units, settings, "cpu").batches())
    trainable = [p for p in run.adapter.parameters() if p.requires_grad]
    totals = []
    for _ in range(config.max_steps):
        losses = [compute_losses(run, next(batches)).total for batches in loaders]
        (sum(losses) / NODES).backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        totals.append(sum(loss.item() for loss in losses) / NODES)
    run.loader.close()
    AcceleratorState._reset_state(reset_partial_state=True)
    return totals


def _log(folder: Path) -> list[tuple]:
    return [
        (r["step"], r["denoise"], r["distill"], r["align"], r["total"]) for r in read_log(folder / "train_log.jsonl")
    ]


def test_two_nodes_train_like_one_process_and_resume_exactly_after_both_are_killed(
    one_process_store, tiny_models, tmp_path
):
    shared = tmp_path / "shared"  # --out on a filesystem both nodes see: every node writes its RNG state there
    whole = shared / "whole"
    _succeeded(
        _launch_nodes(
            tmp_path,
            [str(VENV_BIN / "sur-cache"), *_train_args(one_process_store, tiny_models, whole)],
            dict(os.environ),
        )
    )
    assert json.loads((whole / "run.json").read_text())["world_size"] == NODES
    emulated = _emulated_losses(one_process_store, tiny_models, tmp_path / "emulated")
    assert [step[-1] for step in _log(whole)] == pytest.approx(emulated, **LOSS_TOLERANCE)
    # Killed: both launchers die by SIGKILL right after the step-2 checkpoint; then both resume from it.
    broken = shared / "broken"
    worker = tmp_path / "killing_worker.py"
    worker.write_text(_KILLING_WORKER)
    env = {**os.environ, "KILL_AFTER_STEP": "2"}
    killed = _launch_nodes(
        tmp_path, [str(worker), *_train_args(one_process_store, tiny_models, broken)], env, python=True
    )
    assert [n.returncode for n in killed] == [-signal.SIGKILL] * NODES, [n.stderr_text[-2000:] for n in killed]
    assert not (broken / "adapter").exists() and (broken / "checkpoints" / "step_0000002" / "position.json").is_file()
    resume = [str(VENV_BIN / "sur-cache"), *_train_args(one_process_store, tiny_models, broken, "--resume", "latest")]
    _succeeded(_launch_nodes(tmp_path, resume, dict(os.environ)))
    assert _log(broken) == _log(whole)
