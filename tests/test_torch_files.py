"""A `.pt` file whose zip archive declares far more than its size is refused before torch unpacks it, by the helper
and by both commands that read a foreign `.pt` file (`extract --llm-features`, `import-reference`)."""

from __future__ import annotations

import zipfile

import pytest
import torch
from click.testing import CliRunner

from sur_cache.cli import main
from sur_cache.stages.extract import load_llm_features
from sur_cache.torch_files import refuse_inflating_archive


@pytest.fixture
def bomb(tmp_path):
    """A torch.save file of 16 MB of zeros with every entry deflated: about 16 KB that unpack to 16 MB."""
    torch.save({"a cat": torch.zeros(4_000_000)}, tmp_path / "zeros.pt")
    target = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tmp_path / "zeros.pt") as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    assert target.stat().st_size < 100_000
    return target


@pytest.fixture
def torch_load_must_not_run(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("torch.load ran on a file that inflates a thousandfold")

    monkeypatch.setattr(torch, "load", never)


def test_an_inflating_archive_is_refused_from_its_declared_sizes(bomb):
    with pytest.raises(ValueError) as caught:
        refuse_inflating_archive(bomb, "--llm-features")
    message = str(caught.value)
    assert message.startswith(f"--llm-features {bomb}: its zip archive declares 16,000,")
    assert "at most 4x accepted" in message and "torch.save stores its entries uncompressed" in message


def test_genuine_files_pass(tmp_path):
    torch.save({"a cat": torch.ones(8), "a dog": torch.zeros(8)}, tmp_path / "39.pt")
    refuse_inflating_archive(tmp_path / "39.pt", "--llm-features")
    torch.save({"a cat": torch.ones(8)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    refuse_inflating_archive(tmp_path / "legacy.pt", "--llm-features")  # not a zip archive: nothing to inflate
    table = load_llm_features(tmp_path / "39.pt")
    assert sorted(table) == ["a cat", "a dog"] and torch.equal(table["a cat"], torch.ones(8))


def test_llm_features_refuses_it_before_torch_load(bomb, torch_load_must_not_run):
    with pytest.raises(ValueError, match=rf"^--llm-features {bomb}: its zip archive declares"):
        load_llm_features(bomb)


def test_import_reference_refuses_it_before_torch_load(bomb, tmp_path, torch_load_must_not_run):
    args = ["import-reference", str(bomb), "--adapter-weight", "0.1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: CHECKPOINT {bomb}: its zip archive declares"), result.output
    assert not (tmp_path / "out").exists()
