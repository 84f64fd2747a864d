"""The loader: seeded chunk-aware order, disjoint ranks, resume by position, flips, latent sampling, SD checks."""

from __future__ import annotations

import dataclasses
import multiprocessing

import google_crc32c
import numpy as np
import pytest
import torch

from sur_cache.loader import (
    DRAW_STREAM,
    FLIP_STREAM,
    FeatureLoader,
    LoaderSettings,
    MappedSource,
    PreloadedSource,
    StoreSource,
    array_names,
    batch_generator,
    check_manifest,
    epoch_order,
    read_units,
    sample_latents,
)
from sur_cache.models import sd_model_facts
from sur_cache.store import DONE, SKIPPED, FeatureStore, ManifestMismatchError, StoreFormatError, synthetic_store
from sur_cache.tiny_models import TINY_CLIP_WIDTH

SHAPES = dict(clip_width=TINY_CLIP_WIDTH, llm_width=6, latent_channels=4, latent_size=2)
SCALING_FACTOR = 0.18215


def make_store(path, num_samples=22, shard_rows=4, skipped=(5, 13)) -> FeatureStore:
    """A store whose every feature of sample i is filled with i (flipped latents with -i), so rows name themselves."""
    store = synthetic_store(
        path, num_samples=num_samples, shard_rows=shard_rows, store_dtype="float32", flip_variants=True, **SHAPES
    )
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        ids = np.arange(start, stop)
        rows = {}
        for name, spec in store.specs.items():
            if name == "status":
                continue
            value = -ids if name.endswith("_flipped") else ids
            rows[name] = np.broadcast_to(value.reshape(-1, *[1] * len(spec.row_shape)), (stop - start, *spec.row_shape))
        status = np.where(np.isin(ids, skipped), SKIPPED, DONE)
        store.write_shard(shard, rows, status)
    return FeatureStore.open(path, mode="r")


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def test_units_follow_shards_and_skip_incomplete_samples():
    complete = np.array([0, 1, 2, 3, 4, 6, 7, 8, 9])
    units = read_units([(0, 4), (4, 8), (8, 10)], complete)
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 10)]
    assert units[1].samples.tolist() == [4, 6, 7]
    # fewer shards than processes: shards split into contiguous pieces
    split = read_units([(0, 10)], np.arange(10), world_size=3)
    assert [(u.start, u.stop) for u in split] == [(0, 3), (3, 7), (7, 10)]
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        read_units([(0, 2)], np.array([0]), world_size=3)
    with pytest.raises(ValueError, match=r"no complete sample: re-run the `sur-cache extract` command"):
        read_units([(0, 4)], np.array([], dtype=np.int64))


def test_order_is_a_seeded_buffered_permutation():
    units = read_units([(s, s + 10) for s in range(0, 100, 10)], np.arange(100))
    order = epoch_order(units, seed=1, epoch=0, buffer_units=2)
    assert sorted(order.tolist()) == list(range(100))
    assert order.tolist() != list(range(100))
    # each run of 20 samples comes from exactly two shards: reads stay within a 2-unit buffer
    for b in range(0, 100, 20):
        assert len({int(i) // 10 for i in order[b : b + 20]}) == 2
    assert np.array_equal(order, epoch_order(units, seed=1, epoch=0, buffer_units=2))
    assert not np.array_equal(order, epoch_order(units, seed=1, epoch=1, buffer_units=2))
    assert not np.array_equal(order, epoch_order(units, seed=2, epoch=0, buffer_units=2))


def test_ranks_get_disjoint_parts_that_cover_the_store():
    units = read_units([(s, s + 4) for s in range(0, 22, 4)], np.delete(np.arange(22), [5, 13]))
    parts = [epoch_order(units, seed=0, epoch=3, rank=r, world_size=2) for r in range(2)]
    assert not set(parts[0].tolist()) & set(parts[1].tolist())
    assert sorted(parts[0].tolist() + parts[1].tolist()) == sorted(np.delete(np.arange(22), [5, 13]).tolist())


def test_batch_generator_depends_only_on_position():
    draw = lambda *p: torch.randn(3, generator=batch_generator(*p))  # noqa: E731
    assert torch.equal(draw(0, 1, 2, 0), draw(0, 1, 2, 0))
    assert not torch.equal(draw(0, 1, 2, 0), draw(0, 1, 3, 0))
    assert not torch.equal(draw(0, 1, 2, 0), draw(0, 1, 2, 1))
    assert not torch.equal(draw(0, 1, 2, 0, FLIP_STREAM), draw(0, 1, 2, 0, DRAW_STREAM))


def _loader(store, source_kind="store", readers=0, **settings) -> FeatureLoader:
    units = read_units(store.shard_ranges(), store.complete_indices(), settings.get("world_size", 1))
    names = array_names(latents=settings.get("latents", True), flips=settings.get("random_flip", False))
    if source_kind == "store":
        source = StoreSource(store, units, names, capacity=4, readers=readers)
    elif source_kind == "mapped":
        source = MappedSource(store, names)
    else:
        source = PreloadedSource(store, units, names, torch.device("cpu"))
    return FeatureLoader(
        source, units, LoaderSettings(**{"batch_size": 3, "seed": 0, "scaling_factor": 0.18215, **settings}), "cpu"
    )


@pytest.mark.parametrize("source_kind", ["store", "mapped", "preloaded"])
def test_batches_pair_every_feature_with_its_own_sample(store, source_kind):
    loader = _loader(store, source_kind, scaling_factor=1.0)
    seen = []
    for batch, _ in zip(loader.batches(), range(loader.batches_per_epoch(0)), strict=False):
        ids = torch.from_numpy(batch.samples).float()
        assert torch.equal(batch.clip_simple[:, 0, 0], ids) and torch.equal(batch.clip_complex[:, 5, 7], ids)
        assert torch.equal(batch.llm[:, -1], ids)
        seen += batch.samples.tolist()
    assert len(seen) == 18 and not {5, 13} & set(seen) and len(set(seen)) == 18  # 20 complete, batch 3 drops 2


def test_resume_from_a_position_replays_the_same_batches(store):
    loader = _loader(store, random_flip=True)
    stream = [b for b, _ in zip(loader.batches(), range(9), strict=False)]  # crosses into epoch 1 (6 batches/epoch)
    assert [(b.epoch, b.index) for b in stream][5:7] == [(0, 5), (1, 0)]
    resumed = [b for b, _ in zip(_loader(store, random_flip=True).batches(1, 1), range(2), strict=False)]
    for a, b in zip(stream[7:], resumed, strict=True):
        assert np.array_equal(a.samples, b.samples) and torch.equal(a.latents, b.latents)


def test_a_reader_process_streams_the_same_batches(store):
    plain = _loader(store, random_flip=True, buffer_units=2)
    streamed = _loader(store, readers=1, random_flip=True, buffer_units=2)
    for a, b, _ in zip(plain.batches(0, 4), streamed.batches(0, 4), range(5), strict=False):  # into epoch 1
        assert np.array_equal(a.samples, b.samples) and torch.equal(a.latents, b.latents)
        assert torch.equal(a.clip_simple, b.clip_simple) and torch.equal(a.llm, b.llm)
    readers = multiprocessing.active_children()
    assert readers
    streamed.close()  # the reader processes end now, not whenever the loader is garbage-collected
    assert not any(process.is_alive() for process in readers)


def test_prepared_batches_equal_unprepared_ones_from_any_position(store):
    """`prepare` starts the readers early; `batches` from another position plans again (else a reader process
    would hand over units out of order)."""
    plain = _loader(store, random_flip=True, buffer_units=2)
    for prepared_at, start in (((0, 2), (0, 2)), ((0, 0), (1, 1))):
        streamed = _loader(store, readers=1, random_flip=True, buffer_units=2)
        streamed.prepare(*prepared_at)
        for a, b, _ in zip(plain.batches(*start), streamed.batches(*start), range(6), strict=False):  # into epoch 1
            assert (a.epoch, a.index) == (b.epoch, b.index) and np.array_equal(a.samples, b.samples)
            assert torch.equal(a.clip_simple, b.clip_simple) and torch.equal(a.latents, b.latents)
        streamed.close()


def test_mapped_batches_equal_the_store_sources(tmp_path, random_store):
    """Same samples, order, flips and values as `StoreSource`, over two epochs, on random data whose shards hold
    several chunks (a partial last one) and more shards than the maps kept open."""
    store = random_store(tmp_path / "r.zarr", num_samples=28, shard_rows=6, chunk_rows=3)
    settings = dict(random_flip=True, buffer_units=2, batch_size=4)
    read, mapped = _loader(store, **settings), _loader(store, "mapped", **settings)
    mapped.source.max_maps = 3  # maps are closed and reopened as the epoch moves on
    count = read.batches_per_epoch(0) + read.batches_per_epoch(1)
    for a, b, _ in zip(read.batches(), mapped.batches(), range(count), strict=False):
        assert (a.epoch, a.index) == (b.epoch, b.index) and np.array_equal(a.samples, b.samples)
        for name in ("clip_simple", "clip_complex", "llm", "latents"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    flipped = np.array([True, False, True, True])
    for name, rows in mapped.source.fetch(np.array([9, 2, 17, 27]), flipped).items():
        assert torch.equal(rows, read.source.fetch(np.array([9, 2, 17, 27]), flipped)[name]), name
    assert len(mapped.source._maps) == 3
    mirror = {"latent_mean": "latent_mean_flipped", "latent_logvar": "latent_logvar_flipped"}
    for name, views in mapped.source._views.items():  # a closed map's row views are dropped (they keep it mapped)
        for key in views:
            array, sample = (mirror[name], ~key) if key < 0 else (name, key)
            assert (array, sample // 6) in mapped.source._maps, (name, key)
    mapped.close()
    assert not mapped.source._maps


def test_a_chunk_is_checked_once_per_process_unless_its_file_changes(tmp_path, monkeypatch, random_store):
    from sur_cache import shard_files

    store = random_store(tmp_path / "r.zarr", num_samples=12, shard_rows=6, chunk_rows=3)
    checks, real = [], google_crc32c.value
    monkeypatch.setattr(shard_files.google_crc32c, "value", lambda data: checks.append(1) or real(data))
    source = MappedSource(store, ["clip_simple"], max_maps=1)
    for _ in range(2):  # shard 0, shard 1 (shard 0's map closed), shard 0 again: remapped, not re-checked
        for sample in (0, 6):
            source.fetch(np.array([sample]), np.array([False]))
    assert len(checks) == 2 * (1 + 2)  # one index and one chunk per map, the chunk only on the first map
    path = tmp_path / "r.zarr" / "clip_simple" / "c" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))  # a new file: its chunks are checked again, and this one fails
    with pytest.raises(StoreFormatError, match="array 'clip_simple', samples 0..5: cannot be decoded"):
        source.fetch(np.array([1]), np.array([False]))


def test_only_plain_local_layouts_are_mapped(tmp_path, store):
    names = array_names(latents=True, flips=True)
    assert MappedSource.maps(store, names)
    compressed = synthetic_store(tmp_path / "z.zarr", num_samples=4, shard_rows=4, compression="zstd", **SHAPES)
    assert not MappedSource.maps(compressed, names)


def test_flipped_rows_come_from_the_flipped_arrays(store):
    units = read_units(store.shard_ranges(), store.complete_indices())
    source = StoreSource(store, units, array_names(latents=True, flips=True), capacity=2)
    rows = source.fetch(np.array([9, 2, 17]), np.array([True, False, True]))
    assert rows["latent_mean"][:, 0, 0, 0].tolist() == [-9, 2, -17]
    assert rows["latent_logvar"][:, 1, 1, 1].tolist() == [-9, 2, -17]
    assert rows["clip_simple"][:, 0, 0].tolist() == [9, 2, 17]  # text features have no flipped variant


def test_random_flip_draws_half_flipped_from_the_batch_generator(store):
    loader = _loader(store, random_flip=True)
    flips = []
    for batch, _ in zip(loader.batches(), range(30), strict=False):
        flip_stream = batch_generator(0, batch.epoch, batch.index, stream=FLIP_STREAM)
        flipped = (torch.rand(len(batch.samples), generator=flip_stream) < 0.5).numpy()
        generator = batch_generator(0, batch.epoch, batch.index, stream=DRAW_STREAM)
        rows = loader.source.fetch(batch.samples, flipped)
        expected = sample_latents(rows["latent_mean"], rows["latent_logvar"], SCALING_FACTOR, generator)
        assert torch.equal(batch.latents, expected)
        flips += flipped.tolist()
    assert 0.3 < np.mean(flips) < 0.7
    assert "latent_mean_flipped" not in array_names(latents=True, flips=False)


def test_sample_latents_draws_from_the_distribution_and_scales():
    mean, logvar = torch.full((4000, 4, 2, 2), 2.0), torch.full((4000, 4, 2, 2), np.log(9.0))
    latents = sample_latents(mean, logvar, 0.5, torch.Generator().manual_seed(0))
    assert abs(latents.mean().item() - 1.0) < 0.02 and abs(latents.std().item() - 1.5) < 0.02


def test_features_only_reads_no_latents(store):
    loader = _loader(store, latents=False)
    batch = next(loader.batches())
    assert batch.latents is None and loader.source.names == ["clip_simple", "clip_complex", "llm"]


def test_too_few_samples_for_a_batch_is_refused(tmp_path):
    small = make_store(tmp_path / "small.zarr", num_samples=2, shard_rows=2, skipped=())
    with pytest.raises(ValueError, match="lower --batch-size"):
        _loader(small, batch_size=3)


def test_manifest_is_checked_against_the_sd_configs(tiny_models, store):
    facts = sd_model_facts(str(tiny_models.sd))
    fitting = dataclasses.replace(store.manifest, vae_scaling_factor=facts.vae_scaling_factor)
    check_manifest(fitting, str(tiny_models.sd))
    bad = dataclasses.replace(store.manifest, clip_width=768, latent_channels=16, vae_scaling_factor=0.13025)
    with pytest.raises(ManifestMismatchError) as error:
        check_manifest(bad, str(tiny_models.sd), "s.zarr")
    for field in ("clip_width: the SD model", "latent_channels", "vae_scaling_factor"):
        assert field in str(error.value)


@pytest.mark.parametrize(
    "source_kind, readers", [("store", 0), ("store", 1), ("mapped", 0)], ids=["in-loop", "reader-process", "mapped"]
)
def test_a_damaged_shard_is_named_by_array_and_samples_never_read_as_zeros(store, tmp_path, source_kind, readers):
    from sur_cache.store import StoreFormatError

    (tmp_path / "s.zarr" / "llm" / "c" / "1" / "0").unlink()  # samples 4..7, all but 5 complete
    corrupt = tmp_path / "s.zarr" / "clip_complex" / "c" / "3" / "0" / "0"  # samples 12..15
    data = bytearray(corrupt.read_bytes())
    data[200] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    loader = _loader(store, source_kind, readers=readers)
    with pytest.raises(StoreFormatError) as error:
        for _ in zip(loader.batches(), range(4 * loader.batches_per_epoch(0)), strict=False):
            pass
    loader.close()
    message = str(error.value)
    assert "Traceback" not in message and "DataLoader worker" not in message
    assert ("array 'llm', samples 4..7: its shard file is missing" in message) or (
        "array 'clip_complex', samples 12..15: cannot be decoded" in message
    )
    assert f"sur-cache verify {store.url}" in message


def _slow_units(shard_ranges, complete, world_size=1):
    """The reference: every unit masks the whole completion array (quadratic, kept only to compare against)."""
    pieces = max(1, -(-world_size // len(shard_ranges)))
    units = []
    for start, stop in shard_ranges:
        bounds = np.linspace(start, stop, min(pieces, stop - start) + 1).round().astype(np.int64)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            samples = complete[(complete >= a) & (complete < b)]
            if len(samples):
                units.append((int(a), int(b), samples.tolist()))
    return units


@pytest.mark.parametrize("seed", range(6))
def test_read_units_equal_the_masking_reference_and_view_the_completion_array(seed):
    rng = np.random.default_rng(seed)
    num_samples, shard_rows = int(rng.integers(1, 300)), int(rng.integers(1, 40))
    shards = [(s, min(s + shard_rows, num_samples)) for s in range(0, num_samples, shard_rows)]
    status = rng.choice([0, 1, 2], num_samples, p=[0.2, 0.6, 0.2])
    status[rng.integers(num_samples)] = DONE
    complete = np.flatnonzero(status == DONE).astype(np.int64)
    for world_size in (1, 3, 2 * len(shards) + 1):
        expected = _slow_units(shards, complete, world_size)
        if len(expected) < world_size:
            continue
        units = read_units(shards, complete, world_size)
        assert [(u.start, u.stop, u.samples.tolist()) for u in units] == expected
        # linear: a unit's samples are a slice of the completion array, never a masked copy of it
        assert all(np.shares_memory(u.samples, complete) for u in units)


def test_batches_per_epoch_counts_unit_sizes_without_shuffling_every_rank(monkeypatch):
    import sur_cache.loader as loader_module

    units = read_units([(s, s + 10) for s in range(0, 95, 10)], np.delete(np.arange(95), [3, 41, 42]))
    expected = {
        world: min(len(epoch_order(units, seed=4, epoch=2, rank=r, world_size=world)) for r in range(world)) // 4
        for world in (1, 2, 3)
    }

    def no_order(*args, **kwargs):
        raise AssertionError("batches_per_epoch built a shuffled order")

    monkeypatch.setattr(loader_module, "epoch_order", no_order)
    for world, count in expected.items():
        assert loader_module.batches_per_epoch(units, batch_size=4, seed=4, epoch=2, world_size=world) == count


@pytest.mark.parametrize(("readers", "served"), [(1, 1), (2, 30)], ids=["first-batch", "mid-epoch"])
def test_close_while_a_reader_is_busy_with_a_large_read_ends_it_cleanly(tmp_path, readers, served):
    """close() after the first batch and in the middle of the epoch, while the readers read the next units (about
    30 MB each) into their slots: no error, each reader exits by itself (exit code 0, not killed by a signal), nothing
    keeps running."""
    store = synthetic_store(
        tmp_path / "big.zarr",
        num_samples=192,
        shard_rows=64,
        clip_width=768,
        llm_width=8,
        latent_channels=4,
        latent_size=8,
        store_dtype="float32",
    )
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        rows = {
            name: np.ones((stop - start, *spec.row_shape), spec.dtype)
            for name, spec in store.specs.items()
            if name != "status"
        }
        store.write_shard(shard, rows, np.full(stop - start, DONE, np.uint8))
    store = FeatureStore.open(tmp_path / "big.zarr")
    loader = _loader(store, readers=readers, buffer_units=1)
    for _ in zip(loader.batches(), range(served), strict=False):
        pass
    processes = multiprocessing.active_children()
    assert len(processes) == readers
    loader.close()
    assert [process.exitcode for process in processes] == [0] * readers
    assert loader.source._stream is None and not multiprocessing.active_children()


def test_a_reader_reusing_its_slots_never_serves_a_rewritten_unit(tmp_path):
    """16 units through a ring of 6 shared slots (capacity 4 + 2 read ahead), two epochs: every row is its own."""
    store = make_store(tmp_path / "long.zarr", num_samples=64, shard_rows=4, skipped=())
    loader = _loader(store, readers=1, buffer_units=2, random_flip=True)
    assert loader.source._ring == 6 < len(loader.units)
    for batch, _ in zip(loader.batches(), range(2 * loader.batches_per_epoch(0)), strict=False):
        ids = torch.from_numpy(batch.samples).float()
        assert torch.equal(batch.clip_simple[:, 0, 0], ids) and torch.equal(batch.llm[:, -1], ids)
    loader.close()
