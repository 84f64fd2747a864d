"""`sur-cache import-reference`: a reference checkpoint becomes a compat-mode adapter whose forward is the
reference's; bad keys, files that are no reference checkpoint, options that do not fit and a non-empty --out are
refused with one message each."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sur_cache.adapter import AdapterConfig, SURAdapter, read_adapter_config
from sur_cache.cli import main
from sur_cache.stages.import_reference import ReferenceCheckpointError, adapter_from_reference, reference_adapter_config
from sur_cache.tiny_models import randomized

L = 77


def _x(batch: int, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, L, width, generator=torch.Generator().manual_seed(seed))


# `_ReferenceAdapter` mirrors the reference implementation's structure independently of
# sur_cache.adapter: nn.TransformerEncoder over a template layer (batch_first=False, fed [B, L, d]), an attention
# block with an unused value projection, and fc with a zero weight.


class _ReferenceAttention(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.query_layer = nn.Linear(hidden_size, hidden_size)
        self.key_layer = nn.Linear(hidden_size, hidden_size)
        self.value_layer = nn.Linear(hidden_size, hidden_size)
        self.output_layer = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, query, key, value):
        scores = self.query_layer(query) @ self.key_layer(key).transpose(-2, -1) / self.hidden_size**0.5
        weighted = torch.softmax(scores, dim=-1) @ value + value
        return self.output_layer(weighted) + weighted


class _ReferenceAdapter(nn.Module):
    def __init__(self, depth, adapter_weight, width, feedforward):
        super().__init__()
        self.adapter_weight = adapter_weight
        self.encoder_layer = nn.TransformerEncoderLayer(d_model=width, nhead=8, dim_feedforward=feedforward)
        self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=depth)
        self.attention = _ReferenceAttention(width)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        encoded = self.transformer_encoder(x)
        fc_out = self.fc(self.attention(query=encoded, key=x, value=x))
        return self.adapter_weight * fc_out + (1 - self.adapter_weight) * x, encoded, fc_out


pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")


@pytest.fixture
def reference(tmp_path):
    """A randomised reference adapter (width 32, 3 layers, feed-forward 96) and its checkpoint file."""
    model = randomized(_ReferenceAdapter(depth=3, adapter_weight=0.1, width=32, feedforward=96), seed=11).eval()
    path = tmp_path / "adapter_checkpoint5000.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _import(args):
    return CliRunner().invoke(main, ["import-reference", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_import_reference_matches_the_reference_forward(reference, tmp_path, batch):
    model, path = reference
    result = _import([path, "--adapter-weight", 0.1, "--out", tmp_path / "imported", "--llm-width", 48])
    assert result.exit_code == 0, result.output

    adapter = SURAdapter.from_pretrained(tmp_path / "imported")
    assert adapter.config == AdapterConfig(
        width=32,
        llm_width=48,
        num_layers=3,
        feedforward=96,
        adapter_weight=0.1,
        reference_compat=True,
        freeze_llm_proj=True,
        llm_proj_seed=0,
    )
    x = _x(batch)
    with torch.no_grad():
        want_embedding, want_h, _ = model(x)
        got = adapter(x)
    torch.testing.assert_close(got.embedding, want_embedding, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.h, want_h, rtol=0, atol=1e-6)


def test_import_reference_gives_a_seeded_fresh_projection(reference, tmp_path):
    _, path = reference
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _import([path, "--adapter-weight", 0.1, "--out", tmp_path / name, "--llm-width", 48, "--llm-proj-seed", seed])
    a, b, c = (SURAdapter.from_pretrained(tmp_path / name).llm_proj.weight for name in "abc")
    assert a.shape == (32, 48)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_import_reference_lists_every_bad_key(reference, tmp_path):
    model, _ = reference
    state_dict = model.state_dict()
    del state_dict["attention.key_layer.bias"]
    state_dict["attention.extra.weight"] = torch.zeros(2)
    state_dict["fc.bias"] = torch.zeros(31)
    config = reference_adapter_config(state_dict, adapter_weight=0.1, llm_width=48, llm_proj_seed=0)
    with pytest.raises(ReferenceCheckpointError) as error:
        adapter_from_reference(state_dict, config)
    message = str(error.value)
    assert "(3 problems)" in message
    assert "missing: attention.key_layer.bias" in message
    assert "unknown: attention.extra.weight" in message
    assert "wrong shape: fc.bias: expected (32,), found (31,)" in message

    path = tmp_path / "bad.pt"
    torch.save(state_dict, path)
    result = CliRunner().invoke(
        main, ["import-reference", str(path), "--adapter-weight", "0.1", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1
    assert "missing: attention.key_layer.bias" in result.output and "unknown: attention.extra.weight" in result.output
    assert not (tmp_path / "x").exists()


def test_import_reference_refuses_what_is_not_a_reference_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"unet.weight": torch.zeros(3)}, path)
    result = CliRunner().invoke(
        main, ["import-reference", str(path), "--adapter-weight", "0.1", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "cannot infer the width" in result.output
    torch.save([torch.zeros(3)], path)
    result = CliRunner().invoke(
        main, ["import-reference", str(path), "--adapter-weight", "0.1", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "does not hold a state dict of tensors" in result.output
    path.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(
        main, ["import-reference", str(path), "--adapter-weight", "0.1", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1 and "cannot be read as a weights-only PyTorch checkpoint" in result.output


def test_import_reference_reports_options_that_do_not_fit_the_checkpoint(reference, tmp_path):
    _, path = reference
    args = [path, "--adapter-weight", 0.1, "--out", tmp_path / "out", "--num-heads", 5]
    result = CliRunner().invoke(main, ["import-reference", *map(str, args)])
    assert result.exit_code == 1 and "width 32 must be divisible by num_heads 5" in result.output
    assert "--num-heads" in result.output and not (tmp_path / "out").exists()


def test_import_reference_refuses_a_non_empty_output_unless_overwrite(reference, tmp_path):
    _, path = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = [path, "--adapter-weight", 0.1, "--out", out, "--llm-width", 48]
    result = CliRunner().invoke(main, ["import-reference", *map(str, args)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert _import([*args, "--overwrite"]).exit_code == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_import_reference_in_a_subprocess(reference, tmp_path):
    _, path = reference
    script = Path(sys.executable).with_name("sur-cache")
    completed = subprocess.run(
        [str(script), "import-reference", str(path), "--adapter-weight", "0.1", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert read_adapter_config(tmp_path / "out").llm_width == 5120
