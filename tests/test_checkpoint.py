"""The checkpoint folder's formats: exact round trips, no pickle anywhere, and every bad file refused by name."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from sur_cache.adapter import AdapterConfig, SURAdapter
from sur_cache.checkpoint import (
    OPTIMIZER_TENSORS,
    POSITION_FILE,
    CheckpointError,
    Position,
    checksums,
    expected_files,
    load_rng_state,
    load_training_state,
    read_position,
    rng_file,
    save_rng_state,
    save_training_state,
    seal,
    verify,
)

CONFIG = AdapterConfig(width=16, llm_width=8, num_layers=1, num_heads=2, feedforward=32, attention="eager")


def _trained(steps: int, seed: int = 0):
    """An adapter, AdamW and a cosine schedule after `steps` steps on random data."""
    from diffusers.optimization import get_scheduler

    torch.manual_seed(seed)
    adapter = SURAdapter(CONFIG)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(steps):
        adapter(torch.randn(2, 77, 16)).embedding.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return adapter, optimizer, scheduler


def _scaler(growth_tracker: int) -> torch.amp.GradScaler:
    """fp16's loss scaler (on the CPU here; the run uses accelerate's on CUDA), after some steps without overflow."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0, "_growth_tracker": growth_tracker})
    return scaler


def test_training_state_round_trips_exactly(tmp_path):
    adapter, optimizer, scheduler = _trained(3)
    save_training_state(tmp_path, adapter, optimizer, scheduler, _scaler(growth_tracker=3))
    restored, restored_optimizer, restored_scheduler = _trained(0, seed=1)
    restored_scaler = _scaler(growth_tracker=0)
    load_training_state(tmp_path, restored, restored_optimizer, restored_scheduler, restored_scaler)
    assert restored_scaler.state_dict() == _scaler(growth_tracker=3).state_dict()
    assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), restored.parameters(), strict=True))
    assert restored_scheduler.state_dict() == scheduler.state_dict()
    a, b = optimizer.state_dict(), restored_optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]  # betas come back as a tuple
    for param, values in a["state"].items():
        assert all(torch.equal(value, b["state"][param][name]) for name, value in values.items())
    batch = torch.randn(2, 77, 16)
    for model, opt in ((adapter, optimizer), (restored, restored_optimizer)):  # one more identical step on both
        torch.manual_seed(5)  # the same dropout
        model(batch).embedding.square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), restored.parameters(), strict=True))


def test_rng_states_round_trip_as_json(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_rng_state(tmp_path, rank=1, device=torch.device("cpu"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng_state(tmp_path, rank=1, device=torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    json.loads((tmp_path / "rng" / "process_1.json").read_text())  # plain JSON


def _sealed(tmp_path) -> tuple[Position, list[str]]:
    adapter, optimizer, scheduler = _trained(1)
    save_training_state(tmp_path, adapter, optimizer, scheduler, None)
    save_rng_state(tmp_path, rank=0, device=torch.device("cpu"))
    names = expected_files(world_size=1, scaler=False)
    position = Position(2, 0, 8, {"lr": 1e-2}, checksums(tmp_path, names))
    seal(tmp_path, position)
    return position, names


def test_a_sealed_folder_reads_back_and_verifies(tmp_path):
    position, names = _sealed(tmp_path)
    assert read_position(tmp_path) == position
    verify(tmp_path, position, names)
    assert not (tmp_path / f"{POSITION_FILE}.tmp").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "not valid JSON, perhaps cut short by a crash"),
        (lambda text: "", "not valid JSON"),
        (lambda text: text.replace('"step": 2', '"step": "2"'), "missing or malformed: step"),
        (lambda text: text.replace('"format_version": 1', '"format_version": 7'), "format_version 7"),
        (lambda text: json.dumps({"step": 2, "epoch": 0, "batch": 8}), "not a sur-cache checkpoint position"),
    ],
)
def test_a_damaged_position_file_is_refused_naming_it(tmp_path, damage, message):
    _sealed(tmp_path)
    path = tmp_path / POSITION_FILE
    path.write_text(damage(path.read_text()))
    with pytest.raises(CheckpointError, match=message) as error:
        read_position(tmp_path)
    assert str(path) in str(error.value) and "--resume" in str(error.value) and "new --out" in str(error.value)


def test_a_changed_or_truncated_file_is_refused_naming_it(tmp_path):
    position, names = _sealed(tmp_path)
    path = tmp_path / OPTIMIZER_TENSORS
    data = path.read_bytes()
    for damaged in (data[:-10], data[:100] + bytes([data[100] ^ 1]) + data[101:]):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="sha256 differs") as error:
            verify(tmp_path, position, names)
        assert str(path) in str(error.value)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify(tmp_path, position, names)


class _Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, target) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_with_a_matching_checksum_is_refused_and_never_run(tmp_path):
    """An adversary can rewrite position.json too: the checksums are for accidents, the formats are the defence."""
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "checkpoint"
    _, names = _sealed(folder)
    for name in names:
        if name.endswith("config.json"):  # the adapter's config is read by `generate` only, as JSON
            continue
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(pickle.dumps(_Planted(sentinel)))
        position = Position(2, 0, 8, {}, checksums(folder, names))
        seal(folder, position)
        verify(folder, position, names)
        with pytest.raises(CheckpointError, match=name.split("/")[-1]):
            load_training_state(folder, *_trained(0), None)
            load_rng_state(folder, rank=0, device=torch.device("cpu"))
        (folder / name).write_bytes(original)
    assert not sentinel.exists()


def test_a_process_file_missing_from_a_checkpoint_says_that_out_must_be_shared(tmp_path):
    save_rng_state(tmp_path, 0, torch.device("cpu"))  # process 1 wrote its file on another node's disk
    with pytest.raises(FileNotFoundError, match=r"rng/process_1\.json not found\. .* --out must be a folder all"):
        checksums(tmp_path, [rng_file(0), rng_file(1)])
