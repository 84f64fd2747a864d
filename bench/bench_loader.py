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
                chunk's crc32c (the checking process, `sur_cache.check_ahead`, started at its first batch)
  loader_host_mapped_prepared  the first epoch again, on a new source, planned 1 s before it is timed, as a training
                run prepares its loader before loading the UNet: the chunk-checking process gets that head start
                (at most 2,048 samples ahead of the loop)
  loader_host_mapped_epoch2  the same order again through the same source, files mapped and chunks checked
                (every later epoch of a run): the median of 5 passes
  loader_cpu    whole `FeatureLoader` batches on the CPU: the above plus float32 conversion and latent sampling
  text_host     `loader_host` without latents (what the features-only mode reads)
  preload_text  `PreloadedSource` build time for the text features (the features-only fast path), as samples/s
  memmap_first_pass  the floor to beat in a first epoch: the same arrays as plain `.npy` memmaps (written once
                from the store, page cache warm) opened afresh, the same samples and flips in the same order, one
                fancy-index read per array and batch; each page is mapped when first touched
  memmap        the floor to beat in every later epoch: the median of 5 more passes through them (pages mapped);
                printed with the ratio of each loader_host_reader/mapped row to its floor

It also prints how much of the store's shard files and of the memmaps the kernel maps with 2 MiB pages (which moves
the copy rates). Targets: loader >= 1,000 samples/s from a warm page cache (issue 3); loader_host_reader >= 2,000
samples/s and never below memmap (issue 14). Rows go to bench/results/loader_<host>.csv with
the 1-minute load average (on a shared machine, read CPU numbers with it).
Usage: .venv/bin/python bench/bench_loader.py [--samples 3072] [--batch-size 16] [--keep DIR]
"""

from __future__ import annotations

import csv
import mmap
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
LATER_PASSES = 5  # the `_epoch2` and `memmap` rows are the median of this many passes after the first
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


def time_fetch(
    store: FeatureStore,
    batch_size: int,
    latents: bool,
    buffer_units: int,
    readers: int = 0,
    mapped: bool = False,
    epochs: int = 1,
    setup_seconds: float = 0.0,
) -> list[float]:
    """Samples/s of each of `epochs` passes over the loader's epoch-0 order through one source. With
    `setup_seconds`, the first pass is planned that long before it is timed, as a training run prepares its loader
    and then loads its UNet (`FeatureLoader.prepare`); else each pass is planned inside its timing."""
    loader = _loader(store, batch_size, latents, buffer_units, readers, mapped)
    order, count = loader.order(0), loader.batches_per_epoch(0)
    flips = np.random.default_rng(0).random(len(order)) < 0.5
    if readers:  # start the reader process outside the timed region, as a training run does during setup
        loader.source.plan(order[:batch_size])
        loader.source.fetch(order[:batch_size], flips[:batch_size])
    if setup_seconds:
        loader.source.plan(order[: count * batch_size])
        time.sleep(setup_seconds)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        if hasattr(loader.source, "plan") and not (setup_seconds and epoch == 0):
            loader.source.plan(order[: count * batch_size])
        for k in range(count):
            part = slice(k * batch_size, (k + 1) * batch_size)
            loader.source.fetch(order[part], flips[part])
        rates.append(count * batch_size / (time.perf_counter() - started))
    loader.close()
    return rates


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


def time_memmap(store: FeatureStore, folder: Path, batch_size: int, buffer_units: int) -> list[float]:
    """Samples/s of a first pass over the loader's samples and flips, in the loader's order, read from plain memmaps
    (see `write_memmaps`) opened afresh, which maps each page as it touches it (a first epoch), and the median of
    `LATER_PASSES` more, which find them mapped (every later epoch). An untimed pass through other maps of the same
    files comes first: it leaves malloc as a long run leaves it (its threshold for returning freed blocks to the
    system raised by the batch-sized arrays), without which each batch's fresh arrays are faulted in page by page
    (measured: 4,400 against 37,000 samples/s)."""
    loader = _loader(store, batch_size, True, buffer_units)
    order, count = loader.order(0), loader.batches_per_epoch(0)
    flips = np.random.default_rng(0).random(len(order)) < 0.5
    paths = write_memmaps(store, folder, array_names(latents=True, flips=True))

    def one_pass(arrays: dict[str, np.ndarray]) -> float:
        outputs = [name for name in arrays if not name.endswith("_flipped")]
        started = time.perf_counter()
        for k in range(count):
            part = slice(k * batch_size, (k + 1) * batch_size)
            samples, flipped = order[part], flips[part]
            for name in outputs:
                rows = arrays[name][samples]
                if f"{name}_flipped" in arrays:
                    rows[flipped] = arrays[f"{name}_flipped"][samples[flipped]]
                torch.from_numpy(rows)
        return count * batch_size / (time.perf_counter() - started)

    one_pass({name: np.load(path, mmap_mode="r") for name, path in paths.items()})
    arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    rates = first_and_later([one_pass(arrays) for _ in range(1 + LATER_PASSES)])
    print(f"memmap: {huge_page_share(list(paths.values())):.0%} of the .npy files' pages mapped as 2 MiB pages")
    return rates


def first_and_later(rates: list[float]) -> list[float]:
    """The first pass's rate and the median of the later ones (single passes vary by up to 2x on a shared VM)."""
    return [rates[0], float(np.median(rates[1:]))]


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
        passes = 1 + LATER_PASSES
        rows = [
            ("store_read", time_store_read(store)),
            ("loader_host", *time_fetch(store, batch_size, latents=True, buffer_units=buffer_shards)),
            ("loader_host_reader", *time_fetch(store, batch_size, True, buffer_shards, readers=1)),
            *zip(
                ("loader_host_mapped", "loader_host_mapped_epoch2"),
                first_and_later(time_fetch(store, batch_size, True, buffer_shards, mapped=True, epochs=passes)),
                strict=True,
            ),
            (
                "loader_host_mapped_prepared",
                *time_fetch(store, batch_size, True, buffer_shards, mapped=True, setup_seconds=SETUP_SECONDS),
            ),
            ("loader_cpu", time_loader(store, batch_size, buffer_units=buffer_shards)),
            ("text_host", *time_fetch(store, batch_size, latents=False, buffer_units=buffer_shards)),
            ("preload_text", time_preload(store)),
            *zip(("memmap_first_pass", "memmap"), time_memmap(store, folder, batch_size, buffer_shards), strict=True),
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
