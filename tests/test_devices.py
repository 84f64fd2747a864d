"""The one `auto` resolver of device and dtype: what `auto` and each named device resolve to on this machine, and
a named device this machine lacks refused with the fix."""

import pytest
import torch

from sur_cache.devices import DTYPE_CHOICES, resolve_device, resolve_dtype


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """`resolve_device` builds accelerate's process-wide state, as a fresh `sur-cache` process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_auto_is_accelerates_device_for_this_process():
    from accelerate import PartialState

    device = resolve_device("auto")
    assert device == PartialState().device
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_is_the_cpu_with_a_cpu_process_state():
    from accelerate import PartialState

    assert resolve_device("cpu") == torch.device("cpu") == PartialState().device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_refused_with_the_fix():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"^--device {name}: this machine has no cuda device; pass --device auto"):
            resolve_device(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_indexed_cuda_device_becomes_the_current_one():
    last = torch.cuda.device_count() - 1
    assert resolve_device(f"cuda:{last}") == torch.device("cuda", last)
    assert torch.cuda.current_device() == last
    with pytest.raises(ValueError, match=f"this machine has {last + 1} cuda device"):
        resolve_device(f"cuda:{last + 1}")


def test_a_name_torch_does_not_know_is_refused():
    with pytest.raises(ValueError, match=r"^--device 'gpu0' is not a torch device .*pass auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


def test_auto_dtype_is_half_precision_on_cuda_only():
    assert resolve_dtype("auto", torch.device("cuda")) == "float16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert [resolve_dtype(name, torch.device("cpu")) for name in DTYPE_CHOICES[1:]] == list(DTYPE_CHOICES[1:])
    with pytest.raises(ValueError, match="dtype must be one of auto, float16, bfloat16, float32, got 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))
