"""Stage-two loader throughput at SD 1.5 shapes, from a synthetic store written with the store's own writer.

Per sample (float16): clip_simple + clip_complex 2 x 77 x 768, latent mean + log-variance and their flipped
variants 4 x 4 x 64 x 64, a pooled LLaMA-13B feature of 5120: about 378 KB. The store is written once (shards of
`--shard-rows`), read once to warm the page cache, then timed:

  store_read    `FeatureStore.read` of every shard, all arrays (the raw range-read rate)
  loader_host   `StoreSource.fetch` in the loader's shuffled order, with flips: what a GPU run costs the host
                (the float32 conversion and the latent sampling then run on the GPU)
  loader_host_reader  the same with one reader process streaming shards ahead
  loader_cpu    whole `FeatureLoader` batches on the CPU: the above plus float32 conversion and latent sampling
  text_host     `loader_host` without latents (what the features-only mode reads)
  preload_text  `PreloadedSource` build time for the text features (the features-only fast path), as samples/s

The mapped loader (`MappedSource`, the trainer's default for local uncompressed stores) and its floor, plain `.npy`
memmaps of the same arrays (written once from the store, page cache warm) read with the same samples and flips in
the same order, one fancy-index read per array and batch, are measured in alternation (`mapped_against_memmap`),
each row the median of its passes, and the ratios of the pairs are printed:

  memmap_first_pass  the floor to beat in a first epoch: the memmaps opened afresh (each page mapped when touched)
  loader_host_mapped_prepared  a first epoch on a new source, which maps every file and checks every chunk's
                crc32c, planned 1 s before it is timed, as a training run prepares its loader before loading the
                UNet: the chunk-checking process (`sur_cache.check_ahead`) gets that head start
  loader_host_mapped  a first epoch planned at its first batch (one pass)
  memmap        the floor to beat in every later epoch: later passes through the same memmaps
  loader_host_mapped_epoch2  later epochs through the same source, files mapped and chunks checked

It also prints how much of the store's shard files and of the memmaps the kernel maps with 2 MiB pages (which moves
the copy rates). Targets: loader >= 1,000 samples/s from a warm page cache (issue 3); loader_host_reader >= 2,000
samples/s and the mapped loader never below memmap (issue 14). Rows go to bench/results/loader_<host>.csv with
the 1-minute load average (on a shared machine, read CPU numbers with it).
Usage: .venv/bin/python bench/bench_loader.py [--samples 3072] [--batch-size 16] [--keep DIR]
"""

from __future__ import annotations

import csv
import itertools
import mmap
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
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
PAIRS = 3  # first epochs of the mapped loader and of the memmaps, measured in alternation
LATER_PASSES = 5  # the `_epoch2` and `memmap` rows: the median of this many later passes of each, alternately
SETUP_SECONDS = 1.0  # between `prepare` and the first batch: a run loads its UNet then (SD 1.5's takes longer)


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


def time_fetch(*args, epochs: int = 1, **options) -> list[float]:
    """Samples/s of each of `epochs` passes over the loader's epoch-0 order through one source (`fetch_passes`'s
    arguments)."""
    with closing(fetch_passes(*args, **options)) as passes:
        return list(itertools.islice(passes, epochs))


def fetch_passes(
    store: FeatureStore,
    batch_size: int,
    latents: bool,
    buffer_units: int,
    readers: int = 0,
    mapped: bool = False,
    setup_seconds: float = 0.0,
) -> Iterator[float]:
    """Samples/s of one pass after another over the loader's epoch-0 order through one source, each pass planned
    inside its timing. With `setup_seconds`, the first pass is planned that long before it is timed, as a training
    run prepares its loader and then loads its UNet (`FeatureLoader.prepare`). Closing the iterator closes the loader.
    """
    loader = _loader(store, batch_size, latents, buffer_units, readers, mapped)
    order, count = loader.order(0), loader.batches_per_epoch(0)
    flips = np.random.default_rng(0).random(len(order)) < 0.5
    try:
        if readers:  # start the reader process outside the timed region, as a training run does during setup
            loader.source.plan(order[:batch_size])
            loader.source.fetch(order[:batch_size], flips[:batch_size])
        if setup_seconds:
            loader.source.plan(order[: count * batch_size])
            time.sleep(setup_seconds)
        for epoch in itertools.count():
            started = time.perf_counter()
            if hasattr(loader.source, "plan") and not (setup_seconds and epoch == 0):
                loader.source.plan(order[: count * batch_size])
            for k in range(count):
                part = slice(k * batch_size, (k + 1) * batch_size)
                loader.source.fetch(order[part], flips[part])
            yield count * batch_size / (time.perf_counter() - started)
    finally:
        loader.close()


def write_memmaps(store: FeatureStore, folder: Path, names: list[str]) -> dict[str, Path]:
    """Every named array as a `.npy` file in `folder`, copied shard by shard from the store, then read once so that
    its pages are in the page cache, as the store's are."""
    paths = {}
    for name in names:
        spec = store.specs[name]
        paths[name] = folder / f"{name}.npy"
        array = np.lib.format.open_memmap(paths[name], "w+", spec.dtype, (store.num_samples, *spec.row_shape))
        for start, stop in store.shard_ranges():
            array[start:stop] = store.read([name], start, stop)[name]
        array.flush()
        del array
        np.asarray(np.load(paths[name], mmap_mode="r")).sum()
    return paths


def memmap_passes(store: FeatureStore, paths: dict[str, Path], batch_size: int, buffer_units: int) -> Iterator[float]:
    """Samples/s of passes over the loader's samples and flips, in the loader's order, read from plain memmaps (see
    `write_memmaps`) opened afresh: the first maps each page as it touches it (a first epoch), the later ones find
    them mapped (every later epoch). One fancy-index read per array and batch, the flipped rows read over them."""
    loader = _loader(store, batch_size, True, buffer_units)
    order, count = loader.order(0), loader.batches_per_epoch(0)
    flips = np.random.default_rng(0).random(len(order)) < 0.5
    arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    outputs = [name for name in arrays if not name.endswith("_flipped")]
    while True:
        started = time.perf_counter()
        for k in range(count):
            part = slice(k * batch_size, (k + 1) * batch_size)
            samples, flipped = order[part], flips[part]
            for name in outputs:
                rows = arrays[name][samples]
                if f"{name}_flipped" in arrays:
                    rows[flipped] = arrays[f"{name}_flipped"][samples[flipped]]
                torch.from_numpy(rows)
        yield count * batch_size / (time.perf_counter() - started)


def first_pass(passes: Iterator[float]) -> float:
    """The first pass of `passes`, which are then closed."""
    with closing(passes):
        return next(passes)


def mapped_against_memmap(
    store: FeatureStore, folder: Path, batch_size: int, buffer_units: int
) -> list[tuple[str, float]]:
    """The mapped loader and its memmap floor, measured in alternation so that both see the same machine (single
    passes vary by up to 2x on a shared VM): `PAIRS` first epochs of each on fresh maps (the loader prepared as a
    training run prepares it), then `LATER_PASSES` later epochs of each, alternately; every row is the median of its
    passes, and the ratios of the pairs are printed.

    An untimed memmap pass comes first: it leaves malloc as a long run leaves it (its threshold for returning freed
    blocks to the system raised by the batch-sized arrays), without which each batch's fresh arrays are faulted in
    page by page (measured: 4,400 against 37,000 samples/s)."""
    paths = write_memmaps(store, folder, array_names(latents=True, flips=True))
    print(f"memmap: {huge_page_share(list(paths.values())):.0%} of the .npy files' pages mapped as 2 MiB pages")
    first_pass(memmap_passes(store, paths, batch_size, buffer_units))
    firsts = [
        (
            first_pass(memmap_passes(store, paths, batch_size, buffer_units)),
            first_pass(fetch_passes(store, batch_size, True, buffer_units, mapped=True, setup_seconds=SETUP_SECONDS)),
        )
        for _ in range(PAIRS)
    ]
    with (
        closing(memmap_passes(store, paths, batch_size, buffer_units)) as memmap,
        closing(fetch_passes(store, batch_size, True, buffer_units, mapped=True)) as mapped,
    ):
        next(memmap)
        unprepared = next(mapped)
        later = [(next(memmap), next(mapped)) for _ in range(LATER_PASSES)]
    for what, pairs in (("first epochs (prepared)", firsts), ("later epochs", later)):
        ratios = [loader / floor for floor, loader in pairs]
        print(
            f"mapped / memmap, {what}, pass by pass: median {np.median(ratios):.2f}, "
            f"{min(ratios):.2f}-{max(ratios):.2f} ({len(ratios)} pairs)"
        )
    return [
        ("loader_host_mapped", unprepared),
        ("loader_host_mapped_prepared", float(np.median([loader for _, loader in firsts]))),
        ("loader_host_mapped_epoch2", float(np.median([loader for _, loader in later]))),
        ("memmap_first_pass", float(np.median([floor for floor, _ in firsts]))),
        ("memmap", float(np.median([floor for floor, _ in later]))),
    ]


def huge_page_share(paths: list[Path]) -> float:
    """The share of the files' pages that the kernel maps with 2 MiB pages (`FilePmdMapped` over `Rss` of a fresh
    read-only map of each). It follows how the page cache holds them (large folios, as one large write leaves a
    file), differs between the store's shard files and the memmaps, and moves the copy rate by up to 1.5x here."""
    resident = huge = 0
    for path in paths:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        try:
            with open("/proc/self/smaps") as smaps:
                inside = False
                for line in smaps:
                    fields = line.split()
                    if "-" in fields[0] and len(fields) >= 5:
                        inside = fields[-1] == str(path)
                    elif inside and fields[0] in ("Rss:", "FilePmdMapped:"):
                        resident += int(fields[1]) if fields[0] == "Rss:" else 0
                        huge += int(fields[1]) if fields[0] == "FilePmdMapped:" else 0
        finally:
            mapped.close()
    return huge / resident if resident else 0.0


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
        shard_files = sorted(p for p in path.glob("*/c/**/*") if p.is_file())
        print(f"store: {huge_page_share(shard_files):.0%} of the shard files' pages mapped as 2 MiB pages")
        rows = [
            ("store_read", time_store_read(store)),
            ("loader_host", *time_fetch(store, batch_size, latents=True, buffer_units=buffer_shards)),
            ("loader_host_reader", *time_fetch(store, batch_size, True, buffer_shards, readers=1)),
            ("loader_cpu", time_loader(store, batch_size, buffer_units=buffer_shards)),
            ("text_host", *time_fetch(store, batch_size, latents=False, buffer_units=buffer_shards)),
            ("preload_text", time_preload(store)),
            *mapped_against_memmap(store, folder, batch_size, buffer_shards),
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
    for metric, floor in (
        ("loader_host_reader", "memmap"),
        ("loader_host_mapped", "memmap_first_pass"),
        ("loader_host_mapped_prepared", "memmap_first_pass"),
        ("loader_host_mapped_epoch2", "memmap"),
    ):
        print(f"{metric} / {floor} = {rates[metric] / rates[floor]:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
