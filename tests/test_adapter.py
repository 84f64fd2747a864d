"""SURAdapter: shapes, init, gradients, attention backends, reference-compat mode, save/load (the import of reference
checkpoints is tested in tests/stages/test_import_reference.py)."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sur_cache.adapter import (
    AdapterConfig,
    AdapterOutput,
    SURAdapter,
    calibrate,
    read_adapter_config,
    resolve_attention,
)
from sur_cache.losses import alignment_loss, distillation_loss
from sur_cache.tiny_models import randomized

L = 77


def _config(width=32, **overrides) -> AdapterConfig:
    return AdapterConfig(width=width, llm_width=48, feedforward=64, **overrides)


def _x(batch: int, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, L, width, generator=torch.Generator().manual_seed(seed))


def _fused_or_skip():
    """The fused backend: the Triton kernel on CUDA; on the CPU, in this process, the kernel package's PyTorch
    fallback (the interpreter needs TRITON_INTERPRET=1 before import: see the subprocess test below)."""
    try:
        from sur_cache.kernels import attention_calibration
    except ImportError as error:
        pytest.skip(f"fused backend unavailable: sur_cache.kernels.attention_calibration cannot be imported ({error})")
    return attention_calibration


@pytest.mark.parametrize("reference_compat", [False, True])
@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_shapes(batch, width, reference_compat):
    adapter = SURAdapter(_config(width, reference_compat=reference_compat))
    out = adapter(_x(batch, width))
    assert isinstance(out, AdapterOutput)
    assert out.embedding.shape == out.h.shape == (batch, L, width)
    assert adapter.project_llm(torch.randn(batch, 48)).shape == (batch, width)


def test_fresh_adapter_ignores_encoder_and_calibration():
    """fc.weight starts at zero (as in the reference), so the output is (1 - w) x + w fc.bias whatever R is."""
    adapter = SURAdapter(_config(adapter_weight=0.25)).eval()
    x = _x(2)
    expected = 0.75 * x + 0.25 * adapter.fc.bias
    torch.testing.assert_close(adapter(x).embedding, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        adapter.attention.query_layer.weight.add_(1.0)
        adapter.transformer_encoder.layers[0].linear1.weight.add_(1.0)
    torch.testing.assert_close(adapter(x).embedding, expected, rtol=0, atol=1e-6)
    assert torch.count_nonzero(adapter.fc.weight) == 0


def _training_loss(adapter: SURAdapter, x: torch.Tensor) -> torch.Tensor:
    out = adapter(x)
    llm = torch.randn(x.shape[0], adapter.config.llm_width, generator=torch.Generator().manual_seed(3))
    complex_embedding = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    return alignment_loss(complex_embedding, out.embedding) + distillation_loss(adapter.project_llm(llm), out.h)


def test_gradients_reach_every_parameter_once_fc_leaves_zero():
    adapter = SURAdapter(_config(dropout=0.0))
    x = _x(2)
    _training_loss(adapter, x).backward()
    calibration = {f"attention.{name}" for name, _ in adapter.attention.named_parameters()}
    for name, parameter in adapter.named_parameters():
        if name in calibration:  # behind the zero fc.weight: exactly no gradient on the first step
            assert torch.count_nonzero(parameter.grad) == 0, name
        else:
            assert torch.count_nonzero(parameter.grad) > 0, name

    torch.optim.SGD(adapter.parameters(), lr=1.0).step()
    adapter.zero_grad()
    _training_loss(adapter, x).backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None and torch.count_nonzero(parameter.grad) > 0, name


def test_frozen_llm_projection_gets_no_gradient_and_is_saved(tmp_path):
    adapter = SURAdapter(_config(freeze_llm_proj=True, dropout=0.0))
    assert not adapter.llm_proj.weight.requires_grad and not adapter.llm_proj.bias.requires_grad
    _training_loss(adapter, _x(2)).backward()
    assert adapter.llm_proj.weight.grad is None and adapter.llm_proj.bias.grad is None
    loaded = SURAdapter.from_pretrained(adapter.save_pretrained(tmp_path / "adapter"))
    assert not loaded.llm_proj.weight.requires_grad
    torch.testing.assert_close(loaded.llm_proj.weight, adapter.llm_proj.weight, rtol=0, atol=0)


def test_llm_proj_seed_makes_the_projection_reproducible():
    torch.manual_seed(0)
    first = SURAdapter(_config(llm_proj_seed=7))
    torch.manual_seed(123)
    second = SURAdapter(_config(llm_proj_seed=7))
    other = SURAdapter(_config(llm_proj_seed=8))
    torch.testing.assert_close(first.llm_proj.weight, second.llm_proj.weight, rtol=0, atol=0)
    assert not torch.equal(first.llm_proj.weight, other.llm_proj.weight)


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_calibrate_backends_match_eager(backend):
    if backend == "fused":
        _fused_or_skip()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, L, 64, generator=generator, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(3, L, 64, generator=generator)

    def run(name):
        out = calibrate(q, k, v, name)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    for got, want in zip(run(backend), run("eager"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calibrate_eager_is_the_formula():
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    scores = torch.einsum("bid,bjd->bij", q, k) / math.sqrt(8)
    expected = torch.einsum("bij,bjd->bid", scores.softmax(-1), v) + v
    torch.testing.assert_close(calibrate(q, k, v, "eager"), expected)


def _eager_and(backend: str) -> tuple[SURAdapter, SURAdapter]:
    """An eager adapter with random weights and the same weights behind `backend`'s calibration core."""
    if backend == "fused":
        _fused_or_skip()
    eager = randomized(SURAdapter(_config(dropout=0.0)))
    other = SURAdapter(_config(dropout=0.0, attention=backend))
    other.load_state_dict(eager.state_dict())
    return eager, other


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_adapter_backends_agree(backend):
    eager, other = _eager_and(backend)
    x = _x(2)
    torch.testing.assert_close(other(x).embedding, eager(x).embedding, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "fused"])
def test_adapter_backends_under_autocast(backend):
    """Under autocast q, k are bf16 and v = x stays fp32; each backend must cope and stay as close as eager."""
    eager, other = _eager_and(backend)
    x = _x(2)
    exact = eager(x).embedding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_low, other_low = eager(x).embedding, other(x).embedding
    other_low.float().sum().backward()
    assert other.attention.query_layer.weight.grad is not None
    eager_error = (eager_low.float() - exact).abs().max().item()
    assert (other_low.float() - exact).abs().max().item() <= 2 * eager_error + 1e-3


_INTERPRETED_FUSED_CHECK = """
import json, sys, torch
from sur_cache.adapter import AdapterConfig, SURAdapter
import sur_cache.kernels
assert sys.modules["sur_cache.kernels.attention_calibration"].TRITON_INTERPRETER
torch.manual_seed(0)
eager = SURAdapter(AdapterConfig(width=32, llm_width=8, feedforward=64, dropout=0.0))
for parameter in eager.parameters():
    torch.nn.init.normal_(parameter, std=0.2)
fused = SURAdapter(AdapterConfig(width=32, llm_width=8, feedforward=64, dropout=0.0, attention="fused"))
fused.load_state_dict(eager.state_dict())
x = torch.randn(2, 77, 32)
errors = {"embedding": (fused(x).embedding - eager(x).embedding).abs().max().item()}
eager(x).embedding.square().sum().backward()
fused(x).embedding.square().sum().backward()
for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
    if name.startswith("llm_proj."):  # not part of the adapter's forward
        continue
    errors[name] = ((a.grad - b.grad).abs() / (1 + b.grad.abs())).max().item()
print(json.dumps(errors))
"""


@pytest.mark.slow
@pytest.mark.interpreter
def test_fused_backend_runs_the_triton_kernel_in_the_interpreter(tmp_path):
    """The adapter through the real Triton kernels (interpreted on the CPU), forward and every gradient."""
    _fused_or_skip()
    completed = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_FUSED_CHECK],
        cwd=tmp_path,  # keeps the repository's kernels/ folder off sys.path
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    errors = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(errors) == 1 + len(list(SURAdapter(_config()).parameters())) - 2  # all but llm_proj.{weight,bias}
    assert max(errors.values()) < 1e-4, errors


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention must be one of eager, sdpa, fused, got 'flash'"):
        _config(attention="flash")
    with pytest.raises(ValueError, match="got 'flash'"):
        calibrate(*(torch.zeros(1, 2, 4) for _ in range(3)), backend="flash")


def test_resolve_attention():
    assert resolve_attention("auto", "cpu") == "eager"
    assert resolve_attention("auto", "cuda") == "fused"
    assert resolve_attention("sdpa", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="--attention"):
        resolve_attention("flash", "cpu")


def test_config_validation_lists_every_problem():
    with pytest.raises(ValueError, match="width 30 must be divisible by num_heads 8.*dropout must be in"):
        AdapterConfig(width=30, llm_width=48, dropout=1.5)


def test_compat_mode_at_batch_one_transforms_each_token_on_its_own():
    compat = randomized(SURAdapter(_config(dropout=0.0, reference_compat=True)))
    tokens = SURAdapter(_config(dropout=0.0))
    tokens.load_state_dict(compat.state_dict())
    x = _x(1)
    out = compat(x)
    # Per-token processing: 77 sequences of length 1 through the token-attending encoder.
    h_per_token = tokens.transformer_encoder(x.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(out.h, h_per_token, rtol=1e-5, atol=1e-6)
    calibrated = compat.attention(h_per_token, x, "eager")
    w = compat.config.adapter_weight
    torch.testing.assert_close(out.embedding, w * compat.fc(calibrated) + (1 - w) * x, rtol=1e-5, atol=1e-6)


def test_compat_mode_mixes_the_batch_and_token_mode_does_not():
    compat = randomized(SURAdapter(_config(dropout=0.0, reference_compat=True)))
    tokens = SURAdapter(_config(dropout=0.0))
    tokens.load_state_dict(compat.state_dict())
    x = _x(3)
    assert not torch.allclose(compat(x).h, tokens(x).h, atol=1e-3)

    changed = x.clone()
    changed[2] += 1.0
    assert not torch.allclose(compat(changed).embedding[0], compat(x).embedding[0], atol=1e-4)
    torch.testing.assert_close(tokens(changed).embedding[:2], tokens(x).embedding[:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference_compat", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, reference_compat):
    config = _config(adapter_weight=0.3, reference_compat=reference_compat, freeze_llm_proj=True, llm_proj_seed=5)
    adapter = randomized(SURAdapter(config)).eval()
    folder = adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    weights_sha256 = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert saved == {"format_version": 1, "weights_sha256": weights_sha256, **dataclasses.asdict(config)}

    loaded = SURAdapter.from_pretrained(folder)
    assert loaded.config == config and not loaded.training
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = _x(2)
    assert torch.equal(loaded(x).embedding, adapter(x).embedding)
    assert SURAdapter.from_pretrained(folder, attention="sdpa").config.attention == "sdpa"


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing.*sur-cache import-reference"):
        SURAdapter.from_pretrained(tmp_path / "nowhere")
    folder = SURAdapter(_config()).save_pretrained(tmp_path / "adapter")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        read_adapter_config(folder)
    (folder / "config.json").write_text(json.dumps({**raw, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        read_adapter_config(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        read_adapter_config(folder)


def _saved_adapter(folder, seed=0) -> Path:
    return randomized(SURAdapter(_config()), seed).save_pretrained(folder)


def _drop_weights_checksum(folder: Path) -> None:
    """Make `folder` look saved by a sur-cache that did not record the weights' sha256 yet."""
    raw = json.loads((folder / "config.json").read_text())
    del raw["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("damage", "checksum", "found"),
    [
        ("garbage", True, "sha256 differs"),
        ("truncated", True, "sha256 differs"),
        ("flipped_byte", True, "sha256 differs"),
        ("garbage", False, "not a readable safetensors file"),
        ("truncated", False, "not a readable safetensors file"),
    ],
)
def test_from_pretrained_refuses_corrupt_weights_naming_the_file(tmp_path, damage, checksum, found):
    folder = _saved_adapter(tmp_path / "adapter")
    if not checksum:
        _drop_weights_checksum(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "garbage":
        data = bytearray(b"not a safetensors file at all")
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # inside the tensor data: safetensors itself cannot notice, the weights would load silently wrong
        data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights}.*{found}.*another copy of the adapter .* or train it again"):
        SURAdapter.from_pretrained(folder)


def test_from_pretrained_accepts_an_adapter_saved_without_a_weights_checksum(tmp_path):
    """Folders written before config.json recorded the weights' sha256 still load (there is nothing to check)."""
    folder = _saved_adapter(tmp_path / "adapter")
    _drop_weights_checksum(folder)
    assert SURAdapter.from_pretrained(folder).config == _config()


def test_from_pretrained_refuses_weights_that_do_not_fit_the_config(tmp_path):
    folder = _saved_adapter(tmp_path / "adapter")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "num_layers": 3, "feedforward": 128}))
    with pytest.raises(ValueError) as caught:
        SURAdapter.from_pretrained(folder)
    message = str(caught.value)
    assert str(folder / "model.safetensors") in message and str(folder / "config.json") in message
    assert "missing: transformer_encoder.layers.2.linear1.weight" in message
    assert "wrong shape: transformer_encoder.layers.0.linear1.weight: expected (128, 32), found (64, 32)" in message


def test_from_pretrained_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    adapter = randomized(SURAdapter(_config()))
    with torch.no_grad():
        adapter.attention.key_layer.weight[3, 1] = float("nan")
        adapter.fc.bias[0] = float("inf")
    folder = adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(
        ValueError, match=r"not finite.*attention\.key_layer\.weight \(1 of 1024\), fc\.bias \(1 of 32\)"
    ):
        SURAdapter.from_pretrained(folder)
