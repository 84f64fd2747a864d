"""`--compile`'s modes: what auto resolves to, and that `none` leaves the function as it is."""

import pytest
import torch

from sur_cache.compilation import COMPILE_CHOICES, COMPILE_MODES, compiled, resolve_compile


def test_auto_is_reduce_overhead_on_cuda_and_none_on_the_cpu_and_modes_pass_through():
    assert resolve_compile("auto", "cuda") == "reduce-overhead"
    assert resolve_compile("auto", torch.device("cpu")) == "none"
    assert [resolve_compile(mode, "cpu") for mode in COMPILE_MODES] == list(COMPILE_MODES)
    with pytest.raises(ValueError, match="--compile must be one of auto, none"):
        resolve_compile("fast", "cpu")
    assert COMPILE_CHOICES[0] == "auto"


def test_none_returns_the_function_itself_and_a_mode_a_compiled_one():
    def double(x):
        return 2 * x

    assert compiled(double, "none") is double
    assert compiled(double, "default") is not double  # wrapped lazily: nothing compiles until it is called
