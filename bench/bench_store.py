"""Feature-store layout: compression codec and chunk size, measured on model outputs at SD 1.5 shapes.

Data (random weights built from configs, no download; fp16 as stored by default):
  clip    CLIP ViT-L/14 text encoder `last_hidden_state` [N, 77, 768] of random-length token sequences padded to 77
  latent  SD VAE encoder (4 latent channels) mean and logvar at `--latent-resolution` px of smooth random images
  llm     a [N, 5120] Gaussian stand-in for pooled LLaMA-13B features
Random weights give activations without the structure of trained ones, so real features may compress a little
differently (trained CLIP's padded positions are near copies of each other; real latents are spatially smoother).

Compression: bytes on disk / raw bytes, write and read throughput of whole shards, per codec of `sur_cache.store`.
Chunking: one uncompressed fp16 array [1024, 77, 768] (content does not matter without compression) in shards of
256 rows with 1, 16, 64 or 256-row chunks inside; times a single random row, 64 random rows, and a contiguous 256-row
range (what `sur_cache.loader` reads: whole shards, shuffled in memory). Reads hit the OS page cache (the file was
just written): these are decode and indexing costs, not disk latency; a cold disk or a network store adds a cost per
byte, which favours small chunks for single random rows.

Scale (`--scale`, issue 14): the costs that depend on the number of samples N, not on the feature width. Synthetic
stores of `--sizes` samples (1-wide features, SD 1.5's 256-row shards) are built through `FeatureStore.create` and
`write_shard`, one spawned process per shard range, every sample done. Each figure is then taken in a fresh process:

  zarr_json_bytes  the group's zarr.json (the manifest)
  open_s           `FeatureStore.open` (manifest checksums, every array's metadata)
  inspect_s        `sur-cache inspect STORE` through the CLI (describe and print; the commit index is read)
  verify_s         `sur-cache verify STORE`: with 1-wide features every array is metadata-sized, so this is the cost
                   of verifying the per-sample metadata (status, lines, hashes, flags), what stays at any width
  pending_s        `pending_shards()` on a fresh open: the resume scan of extract
  plan_s           `complete_indices`, `read_units`, `FeatureLoader(...)` and epoch 0's order: the loader's plan
  first_batch_s    open, plan, reader process start and the first batch of `sur-cache train`'s default loader
  rss_MB           the measuring process's peak resident memory
  metadata_pass_s  (at `--metadata-rows` only) extract's metadata pass (`_read_rows`) over a synthetic metadata.jsonl
  resume_scan_s    (idem) what a resume of that finished store reads before any model runs: the finished-store check
                   (`extract._finished_store`: open, the file's sha256, pending shards; the metadata pass is skipped),
                   open with the expected manifest, pending shards, summary and the skip report

Usage: python bench/bench_store.py [--parts compression,chunking] [--out bench/results/store_<machine>.csv]
       python bench/bench_store.py --scale [--sizes 100000,1000000] [--metadata-rows 1000000] [--root DIR --keep]
Rows are upserted by (bench, feature, setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from sur_cache.dataset import metadata_sha256
from sur_cache.store import DONE, FeatureStore, _compressors, synthetic_store

SHARD_ROWS = 256
# 1-wide features: the fixed costs depend on the number of samples, not on their width
SCALE_SHAPES = dict(clip_width=1, llm_width=1, latent_channels=1, latent_size=1, tokenizer_max_length=1)


def clip_outputs(samples: int, seed: int = 0) -> np.ndarray:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    model = CLIPTextModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for start in range(0, samples, 32):
        batch = min(32, samples - start)
        ids = torch.full((batch, 77), 49407)
        for row in range(batch):
            length = int(torch.randint(5, 77, (1,), generator=generator))
            ids[row, 0] = 49406
            ids[row, 1:length] = torch.randint(0, 49406, (length - 1,), generator=generator)
        with torch.no_grad():
            outputs.append(model(ids).last_hidden_state.half().numpy())
    return np.concatenate(outputs)


def latent_outputs(samples: int, resolution: int, seed: int = 0) -> np.ndarray:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    ).eval()
    outputs = []
    for start in range(0, samples, 8):
        batch = min(8, samples - start)
        coarse = torch.rand(batch, 3, 8, 8) * 2 - 1  # smooth images: upsampled 8x8 noise
        pixels = torch.nn.functional.interpolate(coarse, size=resolution, mode="bilinear")
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        outputs.append(torch.stack([dist.mean, dist.logvar], 1).half().numpy())
    return np.concatenate(outputs)


def _array(root: Path, name: str, data: np.ndarray, chunk_rows: int, compression: str):
    group = zarr.open_group(str(root), mode="a")
    return group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(chunk_rows, *data.shape[1:]),
        shards=(SHARD_ROWS, *data.shape[1:]),
        compressors=_compressors(compression, data.dtype.itemsize),
        fill_value=0,
    )


def _seconds(function, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def compression_rows(root: Path, features: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for feature, data in features.items():
        for compression in ("none", "zstd", "blosc"):
            array = _array(root, f"{feature}_{compression}", data, 1, compression)
            write = _seconds(lambda a=array, d=data: a.__setitem__(slice(None), d), repeat=1)
            read = _seconds(lambda a=array: a[:])
            mb = data.nbytes / 1e6
            rows.append(
                {
                    "bench": "compression",
                    "feature": feature,
                    "setting": compression,
                    "ratio": round(array.nbytes_stored() / data.nbytes, 4),
                    "write_MB_s": round(mb / write, 1),
                    "read_MB_s": round(mb / read, 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def chunking_rows(root: Path, rng: np.random.Generator) -> list[dict]:
    data = rng.standard_normal((4 * SHARD_ROWS, 77, 768)).astype(np.float16)
    rows = []
    for chunk_rows in (1, 16, 64, 256):
        array = _array(root, f"chunks_{chunk_rows}", data, chunk_rows, "none")
        array[:] = data
        single = rng.integers(0, len(data), 200)
        batches = [np.sort(rng.choice(len(data), 64, replace=False)) for _ in range(10)]
        one = _seconds(lambda a=array, rows=single: [a[int(i)] for i in rows]) / len(single)
        shuffled = _seconds(lambda a=array, bs=batches: [a.oindex[b] for b in bs]) / len(batches)
        contiguous = _seconds(lambda a=array: a[0:SHARD_ROWS])
        rows.append(
            {
                "bench": "chunking",
                "feature": "clip",
                "setting": f"{chunk_rows}-row chunks",
                "one_random_row_ms": round(one * 1e3, 3),
                "random_batch64_ms": round(shuffled * 1e3, 2),
                "contiguous_256_ms": round(contiguous * 1e3, 2),
            }
        )
        print(rows[-1], flush=True)
    return rows


# ---- scale ----------------------------------------------------------------------------------------------------------
def build_scale_store(url: str, samples: int, processes: int, **fields) -> float:
    """A store of `samples` done samples, written shard by shard through the store's writer; returns the seconds."""
    started = time.perf_counter()
    synthetic_store(url, num_samples=samples, shard_rows=SHARD_ROWS, **SCALE_SHAPES, **fields)
    bounds = np.linspace(0, -(-samples // SHARD_ROWS), processes + 1).round().astype(int)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:  # spawn: zarr's event loop is not fork-safe
        pool.starmap(_write_done_shards, [(url, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    FeatureStore.open(url, mode="r+").write_commit_index()  # as extract's main process does when every shard is in
    return time.perf_counter() - started


def _write_done_shards(url: str, first: int, last: int) -> None:
    store = FeatureStore.open(url, mode="r+")
    specs = {name: spec for name, spec in store.specs.items() if name != "status"}
    for shard in range(first, last):
        start, stop = shard * store.shard_rows, min((shard + 1) * store.shard_rows, store.num_samples)
        rows = {name: np.zeros((stop - start, *spec.row_shape), spec.dtype) for name, spec in specs.items()}
        rows["sample_line"] = np.arange(start, stop)
        store.write_shard(shard, rows, np.full(stop - start, DONE, np.uint8))


def _timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def _cli(*args: str) -> None:
    from click.testing import CliRunner

    from sur_cache.cli import main

    result = CliRunner().invoke(main, list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"sur-cache {' '.join(args)} failed: {result.output[-2000:]}")


def _first_batch(url: str):
    from sur_cache.config import TrainConfig
    from sur_cache.loader import FeatureLoader, LoaderSettings, StoreSource, array_names, read_units

    defaults = TrainConfig.__dataclass_fields__
    buffer_units, readers = defaults["buffer_shards"].default, defaults["read_workers"].default
    store = FeatureStore.open(url)
    units = read_units(store.shard_ranges(), store.complete_indices())
    source = StoreSource(store, units, array_names(latents=True, flips=False), 2 * buffer_units, readers=readers)
    loader = FeatureLoader(source, units, LoaderSettings(16, seed=0, buffer_units=buffer_units), torch.device("cpu"))
    next(loader.batches())
    return loader


def _plan(url: str) -> None:
    from sur_cache.loader import FeatureLoader, LoaderSettings, read_units

    store = FeatureStore.open(url)
    units = read_units(store.shard_ranges(), store.complete_indices())
    FeatureLoader(None, units, LoaderSettings(16, seed=0), torch.device("cpu")).order(0)


def measure_scale(url: str) -> dict:
    """Every fixed cost of one store, each from a fresh open (run in a fresh process, for its peak RSS)."""
    import sur_cache.cli  # noqa: F401 - imported before the clock starts: the commands are timed, not the imports

    row = {"zarr_json_bytes": os.path.getsize(Path(url) / "zarr.json")}
    row["open_s"], _ = _timed(lambda: FeatureStore.open(url))
    row["inspect_s"], _ = _timed(lambda: _cli("inspect", url))
    row["verify_s"], _ = _timed(lambda: _cli("verify", url))
    row["pending_s"], pending = _timed(lambda: FeatureStore.open(url).pending_shards())
    assert pending == [], pending
    row["plan_s"], _ = _timed(lambda: _plan(url))
    row["first_batch_s"], loader = _timed(lambda: _first_batch(url))
    loader.close()
    row["rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def write_metadata(folder: Path, rows: int, images: int = 256) -> None:
    """A SURD-style metadata.jsonl of `rows` lines over `images` real image files (shared by many rows)."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "images" / f"{i:05d}.png")
    with open(folder / "metadata.jsonl", "w") as f:
        for line in range(rows):
            record = {
                "file_name": f"images/{line % images:05d}.png",
                "text": f"a photo of thing number {line}",
                "prompt": f"thing {line}, highly detailed, artstation, golden hour",
            }
            f.write(json.dumps(record) + "\n")


def measure_metadata(data: Path, url: str) -> dict:
    from sur_cache.config import ExtractConfig
    from sur_cache.stages.extract import _finished_store, _read_rows

    config = ExtractConfig(data=data, out=url, sd="unused", llm="unused")
    seconds, _ = _timed(lambda: _read_rows(config, None))

    def resume_scan():  # what `extract` does before any model loads when the store is finished
        finished = _finished_store(config)
        assert finished is not None, "the store's metadata_sha256 is the file's: the metadata pass is skipped"
        store = FeatureStore.open(url, mode="r+", expected=finished.manifest)
        assert store.pending_shards() == []
        store.summary()
        store.skipped_records()

    return {"metadata_pass_s": seconds, "resume_scan_s": _timed(resume_scan)[0]}


def _in_fresh_process(function, *args) -> dict:
    # not a multiprocessing.Pool: its daemonic workers cannot start the loader's reader process
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def scale_rows(root: Path, sizes: list[int], metadata_rows: int, processes: int, keep: bool = False) -> list[dict]:
    """One row per size; with `keep`, a finished store of that size left in `root` by an earlier run is reused
    (its build time not measured again) and every store is kept."""
    rows = []
    for samples in sizes:
        url = str(root / f"scale_{samples}.zarr")
        row = {"bench": "scale", "feature": "store", "setting": f"N={samples}", "samples": samples}
        fields = {}
        if samples == metadata_rows:  # the store records the file's digest, as extract's would
            write_metadata(root / "data", samples)
            fields["metadata_sha256"] = metadata_sha256(root / "data")
        if not (keep and FeatureStore.exists(url) and not FeatureStore.open(url).pending_shards()):
            row["build_s"] = build_scale_store(url, samples, processes, **fields)
        elif not FeatureStore.open(url).has_commit_index():  # kept from before the index: as extract's resume does
            FeatureStore.open(url, mode="r+").write_commit_index()
        row.update(_in_fresh_process(measure_scale, url))
        if samples == metadata_rows:
            row.update(_in_fresh_process(measure_metadata, root / "data", url))
        row["load_1min"] = os.getloadavg()[0]
        row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(row, flush=True)
        rows.append(row)
        if not keep:
            shutil.rmtree(url)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="compression,chunking")
    parser.add_argument("--scale", action="store_true", help="Only the fixed costs of large stores (see above).")
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="Store sizes for --scale.")
    parser.add_argument("--metadata-rows", type=int, default=1_000_000, help="Size timing the metadata pass.")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="Writers building a store.")
    parser.add_argument("--root", type=Path, default=None, help="Folder for the scale stores (default: a temp dir).")
    parser.add_argument("--keep", action="store_true", help="--scale: keep the stores in --root and reuse them.")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--latent-samples", type=int, default=64)
    parser.add_argument("--latent-resolution", type=int, default=256)
    parser.add_argument("--machine", default=f"{platform.machine()}-{torch.get_num_threads()}threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = [] if args.scale else args.parts.split(",")
    root = args.root if args.keep and args.root else Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.root))
    rows = []
    try:
        if args.scale:
            sizes = [int(size) for size in args.sizes.split(",")]
            rows += scale_rows(root, sizes, args.metadata_rows, args.processes, args.keep)
        if "compression" in parts:
            started = time.perf_counter()
            clip = clip_outputs(args.samples)
            latent = latent_outputs(args.latent_samples, args.latent_resolution)
            llm = np.random.default_rng(0).standard_normal((args.samples, 5120)).astype(np.float16)
            print(f"built data in {time.perf_counter() - started:.0f} s", flush=True)
            rows += compression_rows(root / "c.zarr", {"clip": clip, "latent": latent, "llm": llm})
        if "chunking" in parts:
            rows += chunking_rows(root / "k.zarr", np.random.default_rng(0))
    finally:
        if not args.keep:
            shutil.rmtree(root)
    name = f"store_scale_{args.machine}.csv" if args.scale else f"store_{args.machine}.csv"
    out = args.out or Path(__file__).parent / "results" / name
    _upsert(out, [{"machine": args.machine, **row} for row in rows])
    print(f"wrote {out}")


def _upsert(path: Path, rows: list[dict]) -> None:
    """Replace rows with the same (machine, bench, feature, setting), keep the others."""
    key = lambda row: tuple(str(row.get(k)) for k in ("machine", "bench", "feature", "setting"))  # noqa: E731
    old = list(csv.DictReader(open(path))) if path.exists() else []
    new_keys = {key(row) for row in rows}
    merged = [row for row in old if key(row) not in new_keys] + rows
    fields = ["machine", "bench", "feature", "setting"]
    fields += sorted({k for row in merged for k in row if k not in fields and row.get(k) not in (None, "")})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)


if __name__ == "__main__":
    main()
