"""The chunk-checking process: it spares the loop the checks it has done, in the file the loop reads, never more
than `ahead` samples past the loop, and a chunk it finds damaged or a file replaced since is still the loop's error."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from sur_cache import check_ahead, shard_files
from sur_cache.loader import MappedSource
from sur_cache.store import StoreFormatError

NAMES = ["clip_simple", "llm"]


def _wait_until(condition, seconds=60.0) -> None:
    """Poll for a state the process reaches on its own (it never goes past it without the loop)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the checking process did not get there"
        time.sleep(0.01)


def _checked(source: MappedSource, name: str, shard: int) -> list[bool]:
    """Which chunks of the shard file the process has recorded as checked, in the file as it is now."""
    path = source.store.shard_path_template(name).format(shard=shard)
    mapped = shard_files.MappedShard(path, source.store.direct_layout(name))
    tokens = source._checks.tokens(name, shard)
    result = [bool(token == mapped.token) for token in tokens]
    mapped.close()
    return result


def _count_chunk_checks(monkeypatch) -> list[int]:
    """Count the loop's crc32c calls on chunks (its shard-index checks are on bytes and not counted)."""
    calls, real = [], shard_files.google_crc32c.value

    def counted(data):
        if isinstance(data, np.ndarray):
            calls.append(1)
        return real(data)

    monkeypatch.setattr(shard_files.google_crc32c, "value", counted)
    return calls


def test_shard_path_template_names_every_shard_file(tmp_path, random_store):
    store = random_store(tmp_path / "s.zarr", num_samples=24, shard_rows=6, chunk_rows=3)
    for name in NAMES + ["latent_mean"]:
        for shard in range(4):
            assert store.shard_path_template(name).format(shard=shard) == store._shard_path(name, shard)


def test_the_process_checks_ahead_so_the_loop_does_not(tmp_path, monkeypatch, random_store):
    store = random_store(tmp_path / "s.zarr", num_samples=24, shard_rows=6, chunk_rows=3)
    source = MappedSource(store, NAMES)
    order = np.random.default_rng(1).permutation(24)
    source.plan(order)
    _wait_until(lambda: all(all(_checked(source, name, shard)) for name in NAMES for shard in range(4)))
    calls = _count_chunk_checks(monkeypatch)
    rows = source.fetch(order, np.zeros(24, bool))
    assert not calls  # every chunk was checked by the process, in these very files
    reference = store.read(NAMES, 0, 24)
    for name in NAMES:
        assert torch.equal(rows[name], torch.from_numpy(reference[name][order]))
    process = source._checks._process
    source.close()
    assert process.poll() is not None  # close ends the process


def test_the_process_stays_within_ahead_of_the_loop(tmp_path, random_store):
    store = random_store(tmp_path / "s.zarr", num_samples=24, shard_rows=6, chunk_rows=3)
    source = MappedSource(store, NAMES)
    source.ahead, source.CHECK_WINDOW = 0, 6  # one shard's samples at a time, none past those served
    order = np.concatenate([np.arange(6, 12), np.arange(0, 6), np.arange(18, 24)])  # shard 1, shard 0, shard 3
    source.plan(order)
    _wait_until(lambda: all(_checked(source, "clip_simple", 1)) and all(_checked(source, "llm", 1)))
    assert not any(_checked(source, "clip_simple", 0)) and not any(_checked(source, "llm", 0))  # not yet needed
    source.fetch(order[:6], np.zeros(6, bool))
    _wait_until(lambda: all(_checked(source, "clip_simple", 0)) and all(_checked(source, "llm", 0)))
    assert not any(_checked(source, "clip_simple", 3)) and not any(_checked(source, "clip_simple", 2))
    source.close()


def test_a_chunk_the_process_finds_damaged_is_raised_by_the_loop(tmp_path, random_store):
    store = random_store(tmp_path / "s.zarr", num_samples=24, shard_rows=6, chunk_rows=3)
    path = store.shard_path_template("clip_simple").format(shard=1)
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0xFF  # a byte of the shard's first chunk: samples 6..8
    open(path, "wb").write(bytes(data))
    source = MappedSource(store, NAMES)
    source.plan(np.arange(24))
    _wait_until(lambda: all(_checked(source, "clip_simple", 3)))  # the process went past the damage
    assert _checked(source, "clip_simple", 1) == [False, True]
    with pytest.raises(StoreFormatError, match="array 'clip_simple', samples 6..11: cannot be decoded"):
        source.fetch(np.array([7]), np.array([False]))
    source.fetch(np.array([10]), np.array([False]))  # the shard's other chunk is intact
    source.close()


def test_a_file_replaced_after_its_check_is_checked_again(tmp_path, random_store):
    store = random_store(tmp_path / "s.zarr", num_samples=24, shard_rows=6, chunk_rows=3)
    source = MappedSource(store, NAMES)
    source.plan(np.arange(24))
    _wait_until(lambda: all(all(_checked(source, name, shard)) for name in NAMES for shard in range(4)))
    path = store.shard_path_template("llm").format(shard=2)
    data = bytearray(open(path, "rb").read())
    data[5] ^= 0xFF
    open(f"{path}.new", "wb").write(bytes(data))
    os.replace(f"{path}.new", path)  # renamed into place, as the store writes: a new file
    with pytest.raises(StoreFormatError, match="array 'llm', samples 12..17: cannot be decoded"):
        source.fetch(np.array([13]), np.array([False]))
    source.close()


def test_a_process_starts_only_for_an_epoch_that_reads_a_shard_not_read_yet(tmp_path, random_store):
    store = random_store(tmp_path / "s.zarr", num_samples=24, shard_rows=6, chunk_rows=3)
    source = MappedSource(store, NAMES)
    source.plan(np.arange(12))
    assert source._checks._process is not None
    source.fetch(np.arange(12), np.zeros(12, bool))  # shards 0 and 1 read: every chunk they need is checked
    source.plan(np.arange(12)[::-1])
    assert source._checks._process is None  # a later epoch over the same shards
    source.plan(np.arange(24))
    assert source._checks._process is not None  # shards 2 and 3 are new
    source.close()


def test_a_checking_process_that_cannot_start_costs_only_speed(tmp_path, monkeypatch, random_store, caplog):
    store = random_store(tmp_path / "s.zarr", num_samples=12, shard_rows=6, chunk_rows=3)
    monkeypatch.setattr("sys.executable", str(tmp_path / "no-python"))
    source = MappedSource(store, NAMES)
    source.plan(np.arange(12))
    assert "the chunk-checking process did not start" in caplog.text
    rows = source.fetch(np.arange(12), np.zeros(12, bool))
    assert torch.equal(rows["llm"], torch.from_numpy(store.read(["llm"], 0, 12)["llm"]))
    source.close()


def test_how_far_ahead_follows_the_memory_available_split_among_the_hosts_processes(monkeypatch):
    assert check_ahead._available_bytes() > 0  # read from /proc/meminfo
    monkeypatch.setattr(check_ahead, "_available_bytes", lambda: 64 * 2**30)
    assert check_ahead.samples_ahead(2**20) == 16 * 1024  # a quarter of 64 GiB, in samples of 1 MiB
    assert check_ahead.samples_ahead(2**20, processes_per_host=4) == 4 * 1024
    assert check_ahead.samples_ahead(2**20, processes_per_host=64) == check_ahead.MIN_AHEAD
