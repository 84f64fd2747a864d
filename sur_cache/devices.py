"""The one meaning of `--device` and of an `auto` dtype, for every stage.

`auto` is the device accelerate assigns this process: under `torchrun` or `accelerate launch` each process's own
accelerator (`cuda:LOCAL_RANK`), for a single process the CUDA device if there is one, else the CPU. The stages
build accelerate's process state through `resolve_device`, so the device they compute on and the one accelerate
prepares models for and reduces across are the same; only the CPU forms a CPU (gloo) process group.
"""

from __future__ import annotations

import torch

from sur_cache.choices import AUTO, DEVICE_HELP, DTYPE_CHOICES  # noqa: F401 - defined there, owned here
from sur_cache.models import DTYPES


def resolve_device(choice: str) -> torch.device:
    """The device this process computes on for `--device CHOICE` (see the module docstring), accelerate's state
    built to agree.

    A device type alone (`cuda`) is this process's device of that type; an indexed one (`cuda:1`) is made the
    current device, so that accelerate's `cuda` means it too, and is refused for several processes (they would
    all share it). Raises ValueError, naming `--device` and the fix, for a name torch does not know or a device
    this machine does not have.
    """
    from accelerate import PartialState

    requested = None if choice == AUTO else _parse(choice)
    on_cpu = requested.type == "cpu" if requested is not None else not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    if requested is None:
        return state.device
    if requested.type == "cpu":
        return requested
    if requested.type != state.device.type:
        raise ValueError(
            f"--device {choice}: accelerate runs this process on {state.device.type}, not {requested.type}; "
            f"pass --device {AUTO} or cpu"
        )
    if requested.index is None:
        return state.device
    if state.num_processes > 1:
        raise ValueError(
            f"--device {choice} names one device, but this launch has {state.num_processes} processes, which "
            f"would all compute on it; pass --device {AUTO} (each process its own {requested.type} device)"
        )
    getattr(torch, requested.type).set_device(requested)
    return requested


def _parse(choice: str) -> torch.device:
    """A torch device this machine has, or a ValueError that says what it has instead."""
    try:
        device = torch.device(choice)
    except RuntimeError as error:
        raise ValueError(
            f"--device {choice!r} is not a torch device ({error}); pass auto, cpu, cuda or cuda:N"
        ) from error
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    available = module is not None and hasattr(module, "is_available") and module.is_available()
    count = module.device_count() if available and hasattr(module, "device_count") else 0
    if not available or (device.index is not None and device.index >= count):
        has = f"{count} {device.type} device(s)" if available else f"no {device.type} device"
        raise ValueError(f"--device {choice}: this machine has {has}; pass --device {AUTO} or cpu")
    return device


def resolve_dtype(choice: str, device: torch.device) -> str:
    """The dtype name (a key of `models.DTYPES`, the form a manifest records) for `--*dtype CHOICE` on `device`:
    `auto` is float16 on CUDA and float32 elsewhere."""
    if choice == AUTO:
        return "float16" if torch.device(device).type == "cuda" else "float32"
    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
    return choice
