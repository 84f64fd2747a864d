"""Stage-two loader throughput at SD 1.5 shapes, from a synthetic store written with the store's own writer.

Per sample (float16): clip_simple + clip_complex 2 x 77 x 768, latent mean + log-variance and their flipped
variants 4 x 4 x 64 x 64, a pooled LLaMA-13B feature of 5120: about 378 KB. The store is written once (shards of
`--shard-rows`), read once to warm the page cache, then timed:

  store_read    `FeatureStore.read` of every shard, all arrays (the raw range-read rate)
  loader_host   `StoreSource.fetch` in the loader's shuffled order, with flips: what a GPU run costs the host
                (the float32 conversion and the latent sampling then run on the GPU)
  loader_host_reader  the same with one reader process streaming shards ahead
  loader_host_mapped  the same gathered straight from the memory-mapped shard files (`MappedSource`, the trainer's
                default for local uncompressed stores): a first epoch, which maps every file and checks every
                chunk's crc32c
  loader_host_mapped_epoch2  the same order again through the same source: files mapped, chunks checked (every
                later epoch of a run)
  loader_cpu    whole `FeatureLoader` batches on the CPU: the above plus float32 conversion and latent sampling
  text_host     `loader_host` without latents (what the features-only mode reads)
  preload_text  `PreloadedSource` build time for the text features (the features-only fast path), as samples/s
  memmap        the floor to beat: the same arrays as plain `.npy` memmaps (written once from the store, page cache
                warm), the same samples and flips in the same order, one fancy-index read per array and batch (its
                pages mapped beforehand); printed with the ratio of each loader_host_reader/mapped row to it

Targets: loader >= 1,000 samples/s from a warm page cache (issue 3); loader_host_reader >= 2,000 samples/s and
never below memmap (issue 14). Rows go to bench/results/loader_<host>.csv with
the 1-minute load average (on a shared machine, read CPU numbers with it).
Usage: .venv/bin/python bench/bench_loader.py [--samples 3072] [--batch-size 16] [--keep DIR]
"""

from __future__ import annotations

import csv
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from sur_cache.loader import (
    FeatureLoader,
    LoaderSettings,
    MappedSource,
    PreloadedSource,
    StoreSource,
    array_names,
    read_units,
)
from sur_cache.store import DEFAULT_CHUNK_ROWS, DONE, FeatureStore, synthetic_store

SD15 = dict(clip_width=768, llm_width=5120, latent_channels=4, latent_size=64, flip_variants=True)
RESULTS = Path(__file__).parent / "results"


def build_store(
    path: Path, samples: int, shard_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS, shapes: dict = SD15
) -> FeatureStore:
    """Random features at SD 1.5 shapes (or `shapes`) written through `FeatureStore.write_shard`."""
    store = synthetic_store(str(path), num_samples=samples, shard_rows=shard_rows, chunk_rows=chunk_rows, **shapes)
    rng = np.random.default_rng(0)
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        rows = {
            name: rng.standard_normal((stop - start, *spec.row_shape), dtype=np.float32).astype(spec.dtype)
            for name, spec in store.specs.items()
            if name != "status"
        }
        store.write_shard(shard, rows, np.full(stop - start, DONE, dtype=np.uint8))
    return FeatureStore.open(str(path), mode="r")


def time_store_read(store: FeatureStore) -> float:
    started = time.perf_counter()
    for start, stop in store.shard_ranges():
        store.read(store.array_names, start, stop)
    return store.num_samples / (time.perf_counter() - started)


def _loader(
    store: FeatureStore, batch_size: int, latents: bool, buffer_units: int, readers: int = 0, mapped: bool = False
) -> FeatureLoader:
    units = read_units(store.shard_ranges(), store.complete_indices())
    names = array_names(latents=latents, flips=latents)
    source = (
        MappedSource(store, names)
        if mapped
        else StoreSource(store, units, names, capacity=2 * buffer_units, readers=readers)
    )
    settings = LoaderSettings(batch_size, seed=0, buffer_units=buffer_units, random_flip=latents, latents=latents)
    return FeatureLoader(source, units, settings, torch.device("cpu"))


def time_loader(store: FeatureStore, batch_size: int, buffer_units: int) -> float:
    loader = _loader(store, batch_size, True, buffer_units)
    count = loader.batches_per_epoch(0)
    started = time.perf_counter()
    for _, _ in zip(loader.batches(), range(count), strict=False):
        pass
    return count * batch_size / (time.perf_counter() - started)


def time_fetch(
    store: FeatureStore,
    batch_size: int,
    latents: bool,
    buffer_units: int,
    readers: int = 0,
    mapped: bool = False,
    epochs: int = 1,
) -> list[float]:
    """Samples/s of each of `epochs` passes over the loader's epoch-0 order through one source."""
    loader = _loader(store, batch_size, latents, buffer_units, readers, mapped)
    order, count = loader.order(0), loader.batches_per_epoch(0)
    flips = np.random.default_rng(0).random(len(order)) < 0.5
    if readers:  # start the reader process outside the timed region, as a training run does during setup
        loader.source.plan(order[:batch_size])
        loader.source.fetch(order[:batch_size], flips[:batch_size])
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        if hasattr(loader.source, "plan"):
            loader.source.plan(order[: count * batch_size])
        for k in range(count):
            part = slice(k * batch_size, (k + 1) * batch_size)
            loader.source.fetch(order[part], flips[part])
        rates.append(count * batch_size / (time.perf_counter() - started))
    loader.close()
    return rates


def write_memmaps(store: FeatureStore, folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Every named array as a `.npy` memmap in `folder`, copied shard by shard from the store, read once (warm)."""
    arrays = {}
    for name in names:
        spec = store.specs[name]
        path = folder / f"{name}.npy"
        array = np.lib.format.open_memmap(path, "w+", spec.dtype, (store.num_samples, *spec.row_shape))
        for start, stop in store.shard_ranges():
            array[start:stop] = store.read([name], start, stop)[name]
        array.flush()
        arrays[name] = np.load(path, mmap_mode="r")
        np.asarray(arrays[name]).sum()  # into the page cache, as the store was
    return arrays


def time_memmap(store: FeatureStore, folder: Path, batch_size: int, buffer_units: int) -> float:
    """The loader's samples and flips in the loader's order, read from plain memmaps (see `write_memmaps`)."""
    loader = _loader(store, batch_size, True, buffer_units)
    order, count = loader.order(0), loader.batches_per_epoch(0)
    flips = np.random.default_rng(0).random(len(order)) < 0.5
    arrays = write_memmaps(store, folder, array_names(latents=True, flips=True))
    outputs = [name for name in arrays if not name.endswith("_flipped")]
    started = time.perf_counter()
    for k in range(count):
        samples, flipped = order[k * batch_size : (k + 1) * batch_size], flips[k * batch_size : (k + 1) * batch_size]
        for name in outputs:
            rows = arrays[name][samples]
            if f"{name}_flipped" in arrays:
                rows[flipped] = arrays[f"{name}_flipped"][samples[flipped]]
            torch.from_numpy(rows)
    return count * batch_size / (time.perf_counter() - started)


def time_preload(store: FeatureStore) -> float:
    units = read_units(store.shard_ranges(), store.complete_indices())
    started = time.perf_counter()
    PreloadedSource(store, units, array_names(latents=False, flips=False), torch.device("cpu"))
    return store.num_samples / (time.perf_counter() - started)


@click.command()
@click.option("--samples", type=int, default=3072, help="Samples in the synthetic store (about 378 KB each).")
@click.option("--shard-rows", type=int, default=256, help="Samples per shard (the extract default).")
@click.option(
    "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="Samples per chunk inside a shard (the store's default)."
)
@click.option("--batch-size", type=int, default=16, help="Loader batch size.")
@click.option("--buffer-shards", type=int, default=4, help="Shards shuffled together.")
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="Write the store here and keep it.")
def main(samples, shard_rows, chunk_rows, batch_size, buffer_shards, keep) -> None:
    folder = keep or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    path = folder / "store.zarr"
    try:
        started = time.perf_counter()
        store = (
            FeatureStore.open(str(path))
            if keep and path.exists()
            else build_store(path, samples, shard_rows, chunk_rows)
        )
        print(
            f"store: {store.num_samples} samples, {store.describe()['bytes_stored'] / 2**30:.2f} GiB, "
            f"written in {time.perf_counter() - started:.1f} s"
        )
        time_store_read(store)  # warm the page cache
        rows = [
            ("store_read", time_store_read(store)),
            ("loader_host", *time_fetch(store, batch_size, latents=True, buffer_units=buffer_shards)),
            ("loader_host_reader", *time_fetch(store, batch_size, True, buffer_shards, readers=1)),
            *zip(
                ("loader_host_mapped", "loader_host_mapped_epoch2"),
                time_fetch(store, batch_size, True, buffer_shards, mapped=True, epochs=2),
                strict=True,
            ),
            ("loader_cpu", time_loader(store, batch_size, buffer_units=buffer_shards)),
            ("text_host", *time_fetch(store, batch_size, latents=False, buffer_units=buffer_shards)),
            ("preload_text", time_preload(store)),
            ("memmap", time_memmap(store, folder, batch_size, buffer_shards)),
        ]
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    machine = f"{platform.node()} ({os.cpu_count()} CPUs)"
    load = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"loader_{platform.node()}_chunk{chunk_rows}.csv"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["metric", "samples_per_s", "batch_size", "chunk_rows", "samples", "machine", "load_1min", "torch"]
        )
        for metric, rate in rows:
            writer.writerow(
                [
                    metric,
                    f"{rate:.0f}",
                    batch_size,
                    chunk_rows,
                    store.num_samples,
                    machine,
                    f"{load:.2f}",
                    torch.__version__,
                ]
            )
    print(f"{'metric':<20}{'samples/s':>12}   ({machine}, load {load:.2f})")
    for metric, rate in rows:
        print(f"{metric:<20}{rate:>12,.0f}")
    rates = dict(rows)
    for metric in ("loader_host_reader", "loader_host_mapped", "loader_host_mapped_epoch2"):
        print(f"{metric} / memmap = {rates[metric] / rates['memmap']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
