"""Stage-one throughput at real model shapes, with random weights built from configs (no download).

Components, each timed per batch through the same `sur_cache.models` functions `sur-cache extract` calls:
  vae       SD 1.5 VAE encoder (`encode_vae`) on [B, 3, R, R] pixels
  clip      SD 1.5 CLIP ViT-L/14 text encoder (`encode_clip`), once per prompt kind (simple + complex = x2)
  llm       LLaMA-13B (width 5120, 40 heads, MLP 13824), LLM.int8 via `load_llm` (bitsandbytes), `encode_llm` on the
            simple prompts in batches of `--llm-batch-size` (auto: what `extract --llm-batch-size auto` picks for
            LLaMA-13B int8 beside the image pass on this GPU, 64 on a CPU) padded to the batch's longest, mean
            pooling, last layer; with the variants (default on a GPU) also at the CLIP/VAE batch size (`llm_b16`),
            at 64 if the batch differs (`llm_b64`), padded to 77 tokens (`llm_77`), and in fp16 (`llm_fp16`)
  end_to_end_sequential, end_to_end_overlapped
            the real `run_extract` into a fresh store, `--no-overlap` then `--overlap`: DataLoader workers decoding
            JPEGs -> CLIP x2 + VAE, and the LLM, the store written as extract writes it; the time is the summary's
            `encode_seconds` (the passes once their models are loaded, warm-up batch included) per CLIP/VAE batch,
            over `--shards` shards of one LLM batch each

The LLM is built with only `--llm-layers` decoder layers (saved, then loaded in 8-bit through `load_llm`, the
real path) and its time scaled by 40 / k to LLaMA-13B's 40 layers (an upper bound: the embedding lookup and the
tokenizer are counted 40 / k times); the rows say so. In the end-to-end runs the k built layers' forward runs 40 / k
times per LLM batch (the same upper bound), so that the LLM thread carries a 40-layer load while it overlaps the
image pass. Random weights have no activation outliers, so LLM.int8's fp16 outlier path runs less than with real
LLaMA weights.

Tokenizers: a character-level CLIP tokenizer (CLIP's compute does not depend on it: every prompt is padded to
77 tokens) and a word-level BPE tokenizer trained on the benchmark's prompts, so prompt lengths are close to
LLaMA's (about 1.3 tokens per word); the table reports the padded lengths.

Images are smooth random JPEGs of 1-1.5x the resolution (noise upscaled, so file sizes are photo-like).
On a CPU the defaults are reduced (64 px instead of 512, 2 LLM layers, no LLM variant rows, one timed call) and
every row says "REDUCED". The CSV records the 1-minute load average: on a shared machine, read CPU numbers with it.
Usage: .venv/bin/python bench/bench_extract.py [--device cuda] [--skip-llm] [--resolution 512] [--shards 8]
"""

from __future__ import annotations

import csv
import os
import platform
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from sd15_shapes import CLIP_L, SD15_VAE  # beside this script

from sur_cache.choices import AUTO, LLM_BATCH_SIZE_CPU
from sur_cache.config import ExtractConfig
from sur_cache.memory_plan import (
    LLMFootprint,
    image_pass_bytes,
    llm_bytes_per_prompt,
    llm_weight_bytes,
    pick_llm_batch_size,
)
from sur_cache.models import encode_clip, encode_llm, encode_vae, load_clip, load_llm, load_vae
from sur_cache.stages import extract
from sur_cache.stages.extract import default_num_workers, run_extract
from sur_cache.tiny_models import save_clip_tokenizer

LLAMA_13B = dict(
    hidden_size=5120,
    intermediate_size=13824,
    num_attention_heads=40,
    num_key_value_heads=40,
    vocab_size=32000,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
)
LLAMA_13B_LAYERS = 40
_WORDS = (
    "a woman man child dog cat old young little red blue green golden walks sits stands runs reads looks "
    "holds smiles under beside near through along in on at the with her his their a an small big quiet busy "
    "street park beach forest kitchen window garden river bridge city night morning rain snow sun light "
    "book flower hat coat bicycle tree house mountain sky"
).split()


@dataclass(frozen=True)
class BenchConfig:
    device: str
    batch_size: int
    llm_batch_size: int
    resolution: int
    llm_layers: int
    skip_llm: bool
    llm_variants: bool
    repeats: int
    shards: int
    workers: int
    out: Path

    @property
    def full_size(self) -> bool:
        """SD 1.5's 512 px on a GPU; the LLM is always extrapolated from `llm_layers` layers (the rows say so)."""
        return self.resolution == 512 and self.device.startswith("cuda")


def simple_prompts(count: int, seed: int = 0) -> list[str]:
    """Narrative prompts of 10-30 words, the length of SURD's simple prompts."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 30))) for _ in range(count)]


def complex_prompts(count: int, seed: int = 1) -> list[str]:
    """Keyword prompts long enough to be truncated at 77 CLIP tokens, like many of SURD's."""
    rng = random.Random(seed)
    return [", ".join(rng.choice(_WORDS) for _ in range(60)) for _ in range(count)]


def timed(fn, config: BenchConfig) -> float:
    """Median seconds of `fn()` after one warm-up call, synchronising the GPU around each call."""
    fn()
    times = []
    for _ in range(config.repeats):
        _sync(config.device)
        start = time.perf_counter()
        fn()
        _sync(config.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_sd(folder: Path) -> None:
    """Save a random-weight SD 1.5 text encoder + VAE (+ a tokenizer) as a diffusers-style folder, in fp32 like
    the published checkpoint; `load_clip`/`load_vae` cast on load, as they do for a user's model."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    save_clip_tokenizer(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(**CLIP_L)).save_pretrained(folder / "text_encoder")
    AutoencoderKL(**SD15_VAE).save_pretrained(folder / "vae")


def build_llm(folder: Path, layers: int, prompts: list[str], device: str) -> None:
    """Save a LLaMA-13B-shaped model with `layers` decoder layers and a word-level tokenizer for `prompts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(prompts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    ).save_pretrained(folder)
    with torch.device(device):
        model = LlamaModel(LlamaConfig(num_hidden_layers=layers, **LLAMA_13B)).half()
    model.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def write_images(
    folder: Path, count: int, resolution: int, simple: list[str], complex_: list[str], distinct: int = 128
) -> None:
    """Smooth random JPEGs, 1-1.5x the resolution on the short side (SURD's images exceed 512 px), + metadata.

    At most `distinct` files are written, the rows cycling through them: every row is still decoded on its own."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    for i in range(min(count, distinct)):
        side = int(resolution * rng.uniform(1.0, 1.5))
        noise = Image.fromarray(rng.integers(0, 256, (side // 16, side * 5 // 64, 3), dtype=np.uint8))
        noise.resize((side * 5 // 4, side), Image.Resampling.BICUBIC).save(folder / "images" / f"{i}.jpg")
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(count):
            row = {"file_name": f"images/{i % distinct}.jpg", "text": simple[i], "prompt": complex_[i]}
            f.write(json.dumps(row) + "\n")


def auto_llm_batch_size(device: str, batch_size: int, resolution: int) -> int:
    """What `extract --llm-batch-size auto` picks for LLaMA-13B in int8 beside the image pass (fp16 VAE), before
    anything is loaded: the memory plan on this GPU's free memory, LLM_BATCH_SIZE_CPU on a CPU."""
    if not device.startswith("cuda"):
        return LLM_BATCH_SIZE_CPU
    from transformers import LlamaConfig

    llama = LlamaConfig(num_hidden_layers=LLAMA_13B_LAYERS, **LLAMA_13B)
    weights = llm_weight_bytes(llama, load_in_8bit=True, dtype_bytes=2)
    footprint = LLMFootprint(weights, llm_bytes_per_prompt(5120, 13824, 40, 77))
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return pick_llm_batch_size(free, footprint, image_pass_bytes(batch_size, resolution, 2))


def _recorder(config: BenchConfig, rows: list[dict]):
    """A function that prints one row and appends it to `rows`."""

    def record(component, seconds, note=""):
        rows.append(
            {
                "component": component,
                "ms_per_batch": f"{1000 * seconds:.2f}",
                "samples_per_s": f"{config.batch_size / seconds:.2f}",
                "note": note,
            }
        )
        print(
            f"  {component:<12} {1000 * seconds:10.1f} ms/batch {config.batch_size / seconds:10.1f} samples/s  {note}"
        )

    return record


def run(config: BenchConfig) -> list[dict]:
    dtype = torch.float16 if config.device.startswith("cuda") else torch.float32
    count = config.shards * config.llm_batch_size  # the end-to-end runs: one LLM batch per shard
    simple, complex_ = simple_prompts(max(count, 64)), complex_prompts(count)  # 64: the llm_b64 row
    rows = []
    record = _recorder(config, rows)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        build_sd(scratch / "sd")
        t_vae, t_clip = _image_rows(scratch / "sd", complex_[: config.batch_size], config, dtype, record)
        t_llm = 0.0
        if not config.skip_llm:
            build_llm(scratch / "llm", config.llm_layers, simple, config.device)
            t_llm = _llm_rows(scratch / "llm", simple, config, record)
        parts = "vae + 2 x clip" + (" + llm" if not config.skip_llm else "")
        record("sum", t_vae + 2 * t_clip + t_llm, f"{parts}, one after the other, no decoding")
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the end-to-end runs load their own models, as extract does

        write_images(scratch / "data", count, config.resolution, simple, complex_)
        llm = {"llm": str(scratch / "llm")} if not config.skip_llm else {"llm_features": _feature_file(scratch)}
        repeated = f", LLM {config.llm_layers} layers x {LLAMA_13B_LAYERS // config.llm_layers}" if t_llm else ""
        for overlap in (False, True):
            extract_config = _extract_config(scratch / "data", scratch / "sd", config, overlap, **llm)
            with _llm_forward_repeated(LLAMA_13B_LAYERS // config.llm_layers):
                _record_end_to_end(extract_config, config, record, repeated)
    return rows


def run_tiny(config: BenchConfig) -> list[dict]:
    """The CPU proxy: extract of the tiny test models over the demo data, sequential then overlapped (fp32)."""
    from sur_cache.demo_data import build_demo_dataset
    from sur_cache.tiny_models import build_tiny_models

    rows = []
    record = _recorder(config, rows)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        models = build_tiny_models(scratch / "models")
        build_demo_dataset(scratch / "data", num_samples=config.shards * config.llm_batch_size)
        for overlap in (False, True):
            options = {"llm": str(models.llm), "llm_8bit": False, "llm_dtype": "float32", "store_dtype": "float32"}
            extract_config = _extract_config(scratch / "data", models.sd, config, overlap, **options)
            _record_end_to_end(extract_config, config, record, ", tiny models, demo data")
    return rows


def _extract_config(data: Path, sd: Path, config: BenchConfig, overlap: bool, **options) -> ExtractConfig:
    """`sur-cache extract` of `data` into a fresh store beside it, one LLM batch per shard."""
    return ExtractConfig(
        data=data,
        out=str(data.parent / f"store-{overlap}.zarr"),
        sd=str(sd),
        resolution=config.resolution,
        batch_size=config.batch_size,
        llm_batch_size=config.llm_batch_size,
        device=config.device,
        shard_rows=config.llm_batch_size,
        num_workers=config.workers,
        overlap=overlap,
        progress=False,
        **options,
    )


def _record_end_to_end(extract_config: ExtractConfig, config: BenchConfig, record, note: str) -> None:
    """Run extract and record its time per `batch_size` samples: the summary's `encode_seconds`, the passes once
    their models are loaded (worker start-up and the first batch included), the store written as extract does."""
    summary = run_extract(extract_config)
    mode = "overlapped (--overlap)" if extract_config.overlap else "sequential (--no-overlap)"
    count = summary["computed_now"]
    shards = f"{count} samples in shards of {extract_config.shard_rows}"
    seconds = summary["encode_seconds"] * config.batch_size / count
    record("end_to_end_" + mode.split()[0], seconds, f"run_extract {mode}, {shards}{note}")


def _image_rows(sd: Path, prompts: list[str], config: BenchConfig, dtype, record) -> tuple[float, float]:
    """The VAE on one batch of random pixels and CLIP on one batch of prompts; their models freed on return."""
    tokenizer, text_encoder = load_clip(str(sd), device=config.device, dtype=dtype)
    vae = load_vae(str(sd), device=config.device, dtype=dtype)
    pixels = torch.rand(config.batch_size, 3, config.resolution, config.resolution, device=config.device) * 2 - 1
    t_vae = timed(lambda: encode_vae(vae, pixels), config)
    record("vae", t_vae, f"{config.resolution} px, {dtype}")
    t_clip = timed(lambda: encode_clip(tokenizer, text_encoder, prompts), config)
    record("clip", t_clip, "one prompt kind, 77 tokens (x2 per sample in extract)")
    return t_vae, t_clip


def _llm_time(llm, prompts: list[str], layer: int, config: BenchConfig) -> float:
    return timed(lambda: encode_llm(*llm, prompts, layer=layer, pooling="mean"), config)


def _llm_rows(folder: Path, prompts: list[str], config: BenchConfig, record) -> float:
    """Time the k built layers and scale to LLaMA-13B's 40: `40 / k` times the k-layer time.

    That is an upper bound (the embedding lookup, tokenizer and transfers are counted 40 / k times) and, unlike
    a difference of two timings, it stays stable on a noisy, shared machine. With `llm_variants`, also: prompts
    padded to 77 tokens, the CLIP/VAE batch and 64 (int8 matmuls amortise better on larger ones), and fp16 weights
    instead of int8; the models are freed on return. Returns the 40-layer estimate of the main row (int8, the LLM
    batch, simple prompts).
    """
    k, size = config.llm_layers, config.batch_size
    llm = load_llm(str(folder), device=config.device)

    def measure(label: str, model, batch: list[str], precision: str) -> float:
        tokens = max(len(ids) for ids in model[0](batch, truncation=True, max_length=77)["input_ids"])
        built = _llm_time(model, batch, k - 1, config) * size / len(batch)  # per `size` samples
        total = built * LLAMA_13B_LAYERS / k
        note = f"{precision}, batch {len(batch)} padded to {tokens} tokens, 40 layers = 40/{k} x {1000 * built:.1f} ms"
        record(label, total, note + (f"; per {size} samples" if len(batch) != size else ""))
        return total

    main = measure("llm", llm, prompts[: config.llm_batch_size], "int8")
    if config.llm_variants:
        measure(f"llm_b{size}", llm, prompts[:size], "int8")
        if config.llm_batch_size != 64:
            measure("llm_b64", llm, prompts[:64], "int8")
        measure("llm_77", llm, [" ".join(_WORDS * 2)] * config.llm_batch_size, "int8")
        fp16 = load_llm(str(folder), load_in_8bit=False, dtype=torch.float16, device=config.device)
        measure("llm_fp16", fp16, prompts[: config.llm_batch_size], "fp16 (--no-8bit)")
        del fp16
    return main


@contextmanager
def _llm_forward_repeated(times: int):
    """Extract's LLM calls each run `times` times: k built layers stand in for k x `times` (the result is the
    last call's, the same numbers)."""
    real = extract.encode_llm

    def deeper(*args, **kwargs):
        for _ in range(times - 1):
            real(*args, **kwargs)
        return real(*args, **kwargs)

    extract.encode_llm = deeper
    try:
        yield
    finally:
        extract.encode_llm = real


def _feature_file(scratch: Path) -> Path:
    """--skip-llm: a reference {simple prompt: vector} file of zeros stands in for the LLM."""
    from sur_cache.dataset import read_metadata

    rows, _ = read_metadata(scratch / "data")
    path = scratch / "features.pt"
    torch.save({row.text: torch.zeros(LLAMA_13B["hidden_size"], dtype=torch.float16) for row in rows}, path)
    return path


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


@click.command()
@click.option(
    "--device",
    default="cuda" if torch.cuda.is_available() else "cpu",
    show_default=True,
    help="Device to run the models on.",
)
@click.option("--batch-size", default=16, show_default=True, help="Samples per CLIP/VAE batch.")
@click.option(
    "--llm-batch-size",
    default=AUTO,
    show_default=True,
    help="Prompts per LLM call and samples per end-to-end shard; auto: what extract picks for LLaMA-13B int8 here.",
)
@click.option("--resolution", type=int, default=None, help="Image side in pixels [default: 512 on a GPU, 64 on a CPU].")
@click.option(
    "--llm-layers",
    type=int,
    default=None,
    help="LLaMA-13B decoder layers actually built; 40 are extrapolated [default: 4 on a GPU, 2 on a CPU].",
)
@click.option("--skip-llm", is_flag=True, help="Leave the LLM out (VAE, CLIP and the end-to-end loop without it).")
@click.option(
    "--llm-variants/--no-llm-variants",
    default=None,
    help="Also time the LLM at 77 tokens, at 4x the batch, and in fp16 [default: on a GPU only].",
)
@click.option("--repeats", type=int, default=None, help="Timed calls per component [default: 10 GPU, 1 CPU].")
@click.option(
    "--tiny",
    is_flag=True,
    help="CPU proxy: only the end-to-end rows, with the tiny test models on the demo data (sur_cache/tiny_models.py).",
)
@click.option("--shards", type=int, default=None, help="Shards of the end-to-end extract runs [default: 8 GPU, 4 CPU].")
@click.option(
    "--workers",
    default=default_num_workers(1),
    show_default=True,
    help="DataLoader workers decoding images (extract's default).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV to write [default: bench/results/extract_<device>.csv].",
)
def main(
    device,
    batch_size,
    llm_batch_size,
    resolution,
    llm_layers,
    skip_llm,
    llm_variants,
    repeats,
    tiny,
    shards,
    workers,
    out,
):
    """Benchmark stage one (extract) per component and end to end; print a table and write a CSV."""
    gpu = device.startswith("cuda")
    name = device_name(device)
    if tiny:
        from sur_cache.tiny_models import TINY_RESOLUTION

        resolution, name = TINY_RESOLUTION, f"tiny_{name}"
    resolution = resolution or (512 if gpu else 64)
    config = BenchConfig(
        device=device,
        batch_size=batch_size,
        llm_batch_size=auto_llm_batch_size(device, batch_size, resolution)
        if llm_batch_size == AUTO
        else int(llm_batch_size),
        resolution=resolution,
        llm_layers=llm_layers or (4 if gpu else 2),
        skip_llm=skip_llm,
        llm_variants=gpu if llm_variants is None else llm_variants,
        repeats=repeats or (10 if gpu else 1),
        shards=shards or (8 if gpu else 4),
        workers=workers,
        out=out or Path(__file__).parent / "results" / f"extract_{name}.csv",
    )
    size = "tiny models" if tiny else "full size" if config.full_size else "REDUCED"
    print(
        f"bench_extract on {name} ({size}): batch {batch_size}, LLM batch {config.llm_batch_size}, "
        f"{config.resolution} px, torch {torch.__version__}"
    )
    rows = run_tiny(config) if tiny else run(config)
    facts = {
        "device": name,
        "size": size,
        "batch_size": batch_size,
        "llm_batch_size": config.llm_batch_size,
        "resolution": config.resolution,
        "torch": torch.__version__,
        "load_avg_1min": f"{os.getloadavg()[0]:.1f}",
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    with open(config.out, "w", newline="") as f:
        writer = csv.DictWriter(f, [*facts, "component", "ms_per_batch", "samples_per_s", "note"])
        writer.writeheader()
        writer.writerows({**facts, **row} for row in rows)
    print(f"wrote {config.out}")


if __name__ == "__main__":
    main()
