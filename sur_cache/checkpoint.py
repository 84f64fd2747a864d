"""A training checkpoint folder: what is in it, how it is written, verified and read back, never unpickled.

    step_NNNNNNN/
      adapter/model.safetensors, adapter/config.json   the adapter, loadable by `sur-cache generate`
      optimizer.safetensors                            AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
      optimizer.json                                   its param_groups and any state that is not a tensor
      scheduler.json                                   the lr scheduler's state_dict
      scaler.json                                      the fp16 GradScaler's state_dict (fp16 on CUDA only)
      rng/process_R.json                               process R's Python, NumPy, torch CPU (and its CUDA device's)
                                                       RNG states
      position.json                                    step, epoch, next batch, the run's settings and the sha256
                                                       of every file above; written last, atomically

Only safetensors and JSON, read without `torch.load` or `pickle`: a shared or downloaded run folder is data, not code.
accelerate's `save_state`/`load_state` are not used: they pickle the lr scheduler (`custom_checkpoint_0.pkl`, read
back with `weights_only=False`) and the RNG states, and a failed RNG load is only logged. A folder without
position.json is incomplete; a file whose sha256 differs from the one in position.json is refused by name before
anything is read from it, and so is a file that does not parse as what its name says.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sur_cache.adapter import CONFIG_FILE, WEIGHTS_FILE, SURAdapter

POSITION_FILE = "position.json"
FORMAT = "sur-cache checkpoint"
FORMAT_VERSION = 1
ADAPTER_FILES = (f"adapter/{WEIGHTS_FILE}", f"adapter/{CONFIG_FILE}")
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
SCHEDULER_FILE, SCALER_FILE = "scheduler.json", "scaler.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the way out."""

    def __init__(self, folder: Path, name: str, problem: str) -> None:
        super().__init__(
            f"checkpoint file {Path(folder) / name}: {problem}. Resume from another checkpoint (--resume "
            f"{Path(folder).parent}/step_NNNNNNN), or start a new --out"
        )


@dataclass(frozen=True)
class Position:
    """position.json: where the run stands, what it means, and the checksum of every other file of the folder."""

    step: int
    epoch: int
    batch: int
    settings: dict[str, Any]  # what a resume must keep (stages/train.py decides), as JSON values
    files: dict[str, str]  # path relative to the folder -> sha256


def rng_file(rank: int) -> str:
    return f"rng/process_{rank}.json"


def expected_files(world_size: int, scaler: bool) -> list[str]:
    """Every file a checkpoint of `world_size` processes holds besides position.json."""
    names = [*ADAPTER_FILES, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_FILE]
    return names + ([SCALER_FILE] if scaler else []) + [rng_file(rank) for rank in range(world_size)]


# ---------------------------------------------------------------------------------------------------------- write


def save_training_state(folder: Path, adapter: SURAdapter, optimizer, lr_scheduler, scaler) -> None:
    """The main process's part: adapter, optimizer, lr schedule and (fp16) loss scale."""
    adapter.save_pretrained(folder / "adapter")
    state = optimizer.state_dict()
    tensors, other = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(param), {})[name] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    _write_json(folder / OPTIMIZER_JSON, {"param_groups": state["param_groups"], "state": other})
    _write_json(folder / SCHEDULER_FILE, lr_scheduler.state_dict())
    if scaler is not None:
        _write_json(folder / SCALER_FILE, scaler.state_dict())


def save_rng_state(folder: Path, rank: int, device: torch.device) -> None:
    """Every process's part: the RNG states its dropout (and anything else not seeded per batch) continues from.

    On CUDA only the process's own device: reading every device's state would open a context on each GPU.
    """
    numpy_state = np.random.get_state(legacy=False)
    version, python_state, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {**numpy_state, "state": {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}},
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None,
    }
    _write_json(folder / rng_file(rank), state)


def seal(folder: Path, position: Position) -> None:
    """Write position.json (atomically, last): from now on the folder is a complete checkpoint."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(position)}
    temporary = folder / f"{POSITION_FILE}.tmp"
    with temporary.open("w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, folder / POSITION_FILE)


def checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """The sha256 of each of `names`. One missing is another process's RNG file that never reached this folder:
    the processes do not share it (train's --out on node-local disks)."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {folder}: {', '.join(missing)} not found. Every process writes its own RNG state into the "
            "checkpoint folder, so on several nodes --out must be a folder all of them see (a shared filesystem), "
            "not a node-local disk (docs/scale.md)"
        )
    return {name: _sha256(folder / name) for name in names}


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------- read


def read_position(folder: Path) -> Position:
    """position.json, validated: a half-written, hand-edited or older-format file is refused naming it."""
    record = _read_json(folder, POSITION_FILE)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        problem = "not a sur-cache checkpoint position"
        if isinstance(record, dict) and (Path(folder) / "state").is_dir():
            problem = "written by an older sur-cache whose state/ folder is pickled, which is no longer read"
        raise CheckpointError(folder, POSITION_FILE, problem)
    if record.get("format_version") != FORMAT_VERSION:
        problem = f"format_version {record.get('format_version')!r}, this sur-cache reads {FORMAT_VERSION}"
        raise CheckpointError(folder, POSITION_FILE, problem)
    counters = {name: record.get(name) for name in ("step", "epoch", "batch")}
    bad = [name for name, value in counters.items() if type(value) is not int or value < 0]
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()):
        bad.append("files")
    if not isinstance(record.get("settings"), dict):
        bad.append("settings")
    if bad:
        raise CheckpointError(folder, POSITION_FILE, f"these entries are missing or malformed: {', '.join(bad)}")
    return Position(**counters, settings=record["settings"], files=files)


def verify(folder: Path, position: Position, names: list[str]) -> None:
    """Each of `names` is recorded in position.json and its bytes still have the recorded sha256."""
    for name in names:
        if name not in position.files:
            raise CheckpointError(folder, name, f"not recorded in {POSITION_FILE}, so it cannot be verified")
        if not (Path(folder) / name).is_file():
            raise CheckpointError(folder, name, "missing")
        if _sha256(Path(folder) / name) != position.files[name]:
            problem = f"its sha256 differs from the one recorded in {POSITION_FILE}: it was changed or truncated"
            raise CheckpointError(folder, name, problem)


def load_training_state(folder: Path, adapter: SURAdapter, optimizer, lr_scheduler, scaler) -> None:
    """Read back what `save_training_state` wrote (verify the folder first) into the live objects."""
    weights = ADAPTER_FILES[0]
    _load_into(folder, weights, lambda: adapter.load_state_dict(_read_tensors(folder, weights)))
    _load_into(folder, OPTIMIZER_TENSORS, lambda: optimizer.load_state_dict(_optimizer_state(folder, optimizer)))
    _load_into(folder, SCHEDULER_FILE, lambda: lr_scheduler.load_state_dict(_read_json(folder, SCHEDULER_FILE)))
    if scaler is not None:
        _load_into(folder, SCALER_FILE, lambda: scaler.load_state_dict(_read_json(folder, SCALER_FILE)))


def load_rng_state(folder: Path, rank: int, device: torch.device) -> None:
    """Restore what `save_rng_state` wrote for process `rank`."""
    name = rng_file(rank)
    state = _read_json(folder, name)

    def restore() -> None:
        python, numpy_state = state["python"], state["numpy"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        key = np.array(numpy_state["state"]["key"], dtype=np.uint32)
        np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)

    _load_into(folder, name, restore)


def _optimizer_state(folder: Path, optimizer) -> dict[str, Any]:
    """The optimizer's state_dict from its two files; JSON lists become tuples where the live optimizer has tuples."""
    saved = _read_json(folder, OPTIMIZER_JSON)
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in _read_tensors(folder, OPTIMIZER_TENSORS).items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = tensor
    for param, values in saved["state"].items():
        state.setdefault(int(param), {}).update(values)
    live = optimizer.state_dict()["param_groups"]
    groups = [
        {key: tuple(value) if isinstance(now.get(key), tuple) else value for key, value in group.items()}
        for group, now in zip(saved["param_groups"], live, strict=True)
    ]
    return {"state": state, "param_groups": groups}


def _load_into(folder: Path, name: str, load) -> None:
    """Run `load`, turning what a malformed file makes it raise into a CheckpointError naming the file."""
    try:
        load()
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise CheckpointError(folder, name, f"does not fit this run ({type(error).__name__}: {error})") from error


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(folder) / name))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(folder, name, f"not a readable safetensors file ({error})") from error


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((Path(folder) / name).read_bytes().decode("utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(folder, name, "missing") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(folder, name, f"not valid JSON, perhaps cut short by a crash ({error})") from error
