"""`--llm-features FILE.pt`: a file that would inflate far beyond its size is refused before anything is unpacked."""

from __future__ import annotations

import zipfile

import pytest
import torch

from sur_cache.stages.extract import load_llm_features


def _recompressed(source, target):
    """`source` (a torch.save zip archive, entries STORED) rewritten with every entry deflated."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in original.infolist():
            out.writestr(info.filename, original.read(info.filename))
    return target


def test_a_deflate_bomb_is_refused_from_the_archives_declared_sizes(tmp_path, monkeypatch):
    torch.save({"a cat": torch.zeros(4_000_000)}, tmp_path / "zeros.pt")  # 16 MB of zeros deflate to ~16 KB
    bomb = _recompressed(tmp_path / "zeros.pt", tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 100_000

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran on a file that inflates a thousandfold")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ValueError) as caught:
        load_llm_features(bomb)
    message = str(caught.value)
    assert message.startswith(f"--llm-features {bomb}: its zip archive declares 16,000,")
    assert "torch.save stores its entries uncompressed" in message and "re-save" in message


def test_a_genuine_feature_file_passes_the_size_check(tmp_path):
    torch.save({"a cat": torch.ones(8), "a dog": torch.zeros(8)}, tmp_path / "39.pt")
    table = load_llm_features(tmp_path / "39.pt")
    assert sorted(table) == ["a cat", "a dog"] and torch.equal(table["a cat"], torch.ones(8))
