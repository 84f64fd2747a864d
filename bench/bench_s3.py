"""A store on S3 (moto's server on 127.0.0.1, the tests' one: tests/s3_server.py) against the same store on local
disk, in one run on one machine:

  extract        `run_extract` of the tiny models over a SURD-format demo dataset into a local folder and into
                 `s3://bucket/...`, alternated twice, best of each: samples/s (the models are tiny, so this
                 shows the storage's share)
  loader_r{N}    the training loader's host side (`StoreSource.fetch` in the shuffled order, with flips, as
                 bench_loader's loader_host) over a synthetic store at SD 1.5 shapes (about 378 KB a sample),
                 with N reader processes (0: synchronous reads in the loop), local and S3

What the ratios measure is the S3 API's per-request cost and moto's in-process storage, not a network: a real
bucket adds latency per request (tens of ms) and has more bandwidth than moto's single Python server. The
endpoint and credentials reach every process through the environment (AWS_ENDPOINT_URL, ...), as for a user.
Rows go to bench/results/s3_<host>.csv with the 1-minute load average (on a shared machine, read them with it).
Usage: .venv/bin/python bench/bench_s3.py [--samples 512] [--extract-samples 48]
"""

from __future__ import annotations

import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' S3 server helper
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import build_store, time_fetch  # noqa: E402
from s3_server import start_server  # noqa: E402

from sur_cache.config import ExtractConfig  # noqa: E402
from sur_cache.demo_data import build_demo_dataset  # noqa: E402
from sur_cache.stages.extract import run_extract  # noqa: E402
from sur_cache.store import FeatureStore  # noqa: E402
from sur_cache.tiny_models import TINY_RESOLUTION, build_tiny_models  # noqa: E402

RESULTS = Path(__file__).parent / "results"
READERS = (0, 1, 2, 4)
EXTRACT_ROUNDS = 2


def time_extract(data: Path, models, out: str) -> float:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    config = ExtractConfig(
        data=data, out=out, sd=str(models.sd), llm=str(models.llm), resolution=TINY_RESOLUTION, shard_rows=16,
        num_workers=0, llm_8bit=False, llm_dtype="float32", device="cpu", progress=False,
    )  # fmt: skip
    return run_extract(config)["samples_per_second"]


@click.command()
@click.option("--samples", type=int, default=512, help="Samples in the synthetic SD 1.5-shaped store.")
@click.option("--shard-rows", type=int, default=64, help="Samples per shard (enough shards for 4 readers).")
@click.option("--batch-size", type=int, default=16, help="Loader batch size.")
@click.option("--extract-samples", type=int, default=48, help="Images in the demo dataset that extract reads.")
def main(samples, shard_rows, batch_size, extract_samples) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_s3_"))
    process, server = start_server(folder / "moto.log")
    os.environ.update({key: server.env[key] for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")})
    os.environ.update({key: server.env[key] for key in ("AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    rows = []
    try:
        bucket = server.new_bucket()
        models = build_tiny_models(folder / "models")
        data = build_demo_dataset(folder / "data", num_samples=extract_samples)
        extracted = {"local": [], "s3": []}
        for round_ in range(EXTRACT_ROUNDS):  # alternated, best of each: the first run pays the warm-up
            for where, out in (("local", str(folder / "extract")), ("s3", f"s3://{bucket}/extract")):
                extracted[where].append(time_extract(data, models, f"{out}{round_}.zarr"))
        rows += [("extract", where, 0, max(rates)) for where, rates in extracted.items()]
        stores = {"local": str(folder / "loader.zarr"), "s3": f"s3://{bucket}/loader.zarr"}
        for where, url in stores.items():
            started = time.perf_counter()
            build_store(url, samples, shard_rows)
            print(f"{where}: wrote {samples} samples in {time.perf_counter() - started:.1f} s")
            store = FeatureStore.open(url)
            time_fetch(store, batch_size, True, 4)  # warm: the page cache, moto's memory
            for readers in READERS if where == "s3" else (0, 1):
                rows.append(("loader", where, readers, time_fetch(store, batch_size, True, 4, readers=readers)))
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    _report(rows, samples, batch_size)


def _report(rows, samples: int, batch_size: int) -> None:
    machine, load = f"{platform.node()} ({os.cpu_count()} CPUs)", os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"s3_{platform.node()}.csv"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "storage", "readers", "samples_per_s", "samples", "batch_size", "machine", "load"])
        for metric, where, readers, rate in rows:
            writer.writerow([metric, where, readers, f"{rate:.1f}", samples, batch_size, machine, f"{load:.2f}"])
    print(f"{'metric':<10}{'storage':<8}{'readers':>8}{'samples/s':>12}   ({machine}, load {load:.2f}, torch "
          f"{torch.__version__})")  # fmt: skip
    for metric, where, readers, rate in rows:
        print(f"{metric:<10}{where:<8}{readers:>8}{rate:>12,.1f}")
    rate = {(m, w, r): v for m, w, r, v in rows}
    print(f"extract s3/local = {rate['extract', 's3', 0] / rate['extract', 'local', 0]:.2f}")
    for readers in (0, 1):
        ratio = rate["loader", "s3", readers] / rate["loader", "local", readers]
        print(f"loader s3/local with {readers} readers = {ratio:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
