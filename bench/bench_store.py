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

Usage: python bench/bench_store.py [--parts compression,chunking] [--out bench/results/store_<machine>.csv]
Rows are upserted by (bench, feature, setting).
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from sur_cache.store import _compressors

SHARD_ROWS = 256


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="compression,chunking")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--latent-samples", type=int, default=64)
    parser.add_argument("--latent-resolution", type=int, default=256)
    parser.add_argument("--machine", default=f"{platform.machine()}-{torch.get_num_threads()}threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    root = Path(tempfile.mkdtemp(prefix="bench_store_"))
    rows = []
    try:
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
        shutil.rmtree(root)
    out = args.out or Path(__file__).parent / "results" / f"store_{args.machine}.csv"
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
