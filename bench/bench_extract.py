"""Stage-one throughput at real model shapes, with random weights built from configs (no download).

Components, each timed per batch through the same `sur_cache.models` functions `sur-cache extract` calls:
  vae       SD 1.5 VAE encoder (`encode_vae`) on [B, 3, R, R] pixels
  clip      SD 1.5 CLIP ViT-L/14 text encoder (`encode_clip`), once per prompt kind (simple + complex = x2)
  llm       LLaMA-13B (width 5120, 40 heads, MLP 13824), LLM.int8 via `load_llm` (bitsandbytes), `encode_llm` on the
            simple prompts in batches of `--llm-batch-size` (64, extract's default) padded to the batch's longest,
            mean pooling, last layer; with the variants (default on a GPU) also at the CLIP/VAE batch size
            (`llm_b16`), padded to 77 tokens (`llm_77`), and in fp16 (`llm_fp16`)
  end_to_end  extract's two passes: DataLoader workers decoding JPEGs (`ImageDataset`) -> VAE -> CLIP x2 per
            batch, then the LLM over the simple prompts in LLM batches; every feature copied to the host

The LLM is built with only `--llm-layers` decoder layers (saved, then loaded in 8-bit through `load_llm`, the
real path) and its time scaled by 40 / k to LLaMA-13B's 40 layers (an upper bound: the embedding lookup and the
tokenizer are counted 40 / k times); the rows say so. The end-to-end loop runs the k built layers and adds the
extrapolated rest. Random weights have no activation outliers, so LLM.int8's fp16 outlier path runs less than
with real LLaMA weights.

Tokenizers: a character-level CLIP tokenizer (CLIP's compute does not depend on it: every prompt is padded to
77 tokens) and a word-level BPE tokenizer trained on the benchmark's prompts, so prompt lengths are close to
LLaMA's (about 1.3 tokens per word); the table reports the padded lengths.

Images are smooth random JPEGs of 1-1.5x the resolution (noise upscaled, so file sizes are photo-like).
On a CPU the defaults are reduced (64 px instead of 512, 2 LLM layers, no LLM variant rows, one timed call) and
every row says "REDUCED". The CSV records the 1-minute load average: on a shared machine, read CPU numbers with it.
Usage: .venv/bin/python bench/bench_extract.py [--device cuda] [--skip-llm] [--resolution 512]
"""

from __future__ import annotations

import csv
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from sd15_shapes import CLIP_L, SD15_VAE  # beside this script

from sur_cache.dataset import ImageDataset, read_metadata
from sur_cache.models import encode_clip, encode_llm, encode_vae, load_clip, load_llm, load_vae
from sur_cache.stages.extract import default_num_workers
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
    batches: int
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


def write_images(folder: Path, count: int, resolution: int, simple: list[str], complex_: list[str]) -> None:
    """Smooth random JPEGs, 1-1.5x the resolution on the short side (SURD's images exceed 512 px), + metadata."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(count):
            side = int(resolution * rng.uniform(1.0, 1.5))
            noise = Image.fromarray(rng.integers(0, 256, (side // 16, side * 5 // 64, 3), dtype=np.uint8))
            noise.resize((side * 5 // 4, side), Image.Resampling.BICUBIC).save(folder / "images" / f"{i}.jpg")
            f.write(json.dumps({"file_name": f"images/{i}.jpg", "text": simple[i], "prompt": complex_[i]}) + "\n")


def run(config: BenchConfig) -> list[dict]:
    dtype = torch.float16 if config.device.startswith("cuda") else torch.float32
    count = config.batch_size * (config.batches + 1)  # one untimed batch, then the timed ones
    simple, complex_ = simple_prompts(max(count, config.llm_batch_size)), complex_prompts(count)
    batch = slice(0, config.batch_size)
    rows = []

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

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        build_sd(scratch / "sd")
        tokenizer, text_encoder = load_clip(str(scratch / "sd"), device=config.device, dtype=dtype)
        vae = load_vae(str(scratch / "sd"), device=config.device, dtype=dtype)
        pixels = torch.rand(config.batch_size, 3, config.resolution, config.resolution, device=config.device) * 2 - 1
        t_vae = timed(lambda: encode_vae(vae, pixels), config)
        record("vae", t_vae, f"{config.resolution} px, {dtype}")
        t_clip = timed(lambda: encode_clip(tokenizer, text_encoder, complex_[batch]), config)
        record("clip", t_clip, "one prompt kind, 77 tokens (x2 per sample in extract)")

        llm, t_llm, t_built = None, 0.0, 0.0
        if not config.skip_llm:
            build_llm(scratch / "llm", config.llm_layers, simple, config.device)
            llm = load_llm(str(scratch / "llm"), device=config.device)
            t_llm, t_built = _llm_rows(llm, scratch / "llm", simple, config, record)
        parts = "vae + 2 x clip" + (" + llm" if llm else "")
        record("sum", t_vae + 2 * t_clip + t_llm, f"{parts}, one after the other, no decoding")

        write_images(scratch / "data", count, config.resolution, simple, complex_)
        t_e2e = _end_to_end(scratch / "data", (tokenizer, text_encoder), vae, llm, config)
        note = f"measured, extract's two passes: decode + {parts} + copy to host"
        note += f" + {1000 * (t_llm - t_built):.0f} ms/batch for the LLM layers not built" if llm else " (no LLM)"
        record("end_to_end", t_e2e + t_llm - t_built, note)
    return rows


def _llm_time(llm, prompts: list[str], layer: int, config: BenchConfig) -> float:
    return timed(lambda: encode_llm(*llm, prompts, layer=layer, pooling="mean"), config)


def _llm_rows(llm, folder: Path, prompts: list[str], config: BenchConfig, record) -> tuple[float, float]:
    """Time the k built layers and scale to LLaMA-13B's 40: `40 / k` times the k-layer time.

    That is an upper bound (the embedding lookup, tokenizer and transfers are counted 40 / k times) and, unlike
    a difference of two timings, it stays stable on a noisy, shared machine. With `llm_variants`, also: prompts
    padded to 77 tokens, a 4x larger batch (int8 matmuls amortise better), and fp16 weights instead of int8.
    Returns the 40-layer estimate and the measured k-layer time of the main row (int8, batch, simple prompts).
    """
    k, size = config.llm_layers, config.batch_size

    def measure(label: str, model, batch: list[str], precision: str) -> tuple[float, float]:
        tokens = max(len(ids) for ids in model[0](batch, truncation=True, max_length=77)["input_ids"])
        built = _llm_time(model, batch, k - 1, config) * size / len(batch)  # per `size` samples
        total = built * LLAMA_13B_LAYERS / k
        note = f"{precision}, batch {len(batch)} padded to {tokens} tokens, 40 layers = 40/{k} x {1000 * built:.1f} ms"
        record(label, total, note + (f"; per {size} samples" if len(batch) != size else ""))
        return total, built

    main = measure("llm", llm, prompts[: config.llm_batch_size], "int8")
    if config.llm_variants:
        measure(f"llm_b{size}", llm, prompts[:size], "int8")
        measure("llm_77", llm, [" ".join(_WORDS * 2)] * config.llm_batch_size, "int8")
        fp16 = load_llm(str(folder), load_in_8bit=False, dtype=torch.float16, device=config.device)
        measure("llm_fp16", fp16, prompts[: config.llm_batch_size], "fp16 (--no-8bit)")
        del fp16
    return main


def _end_to_end(data: Path, clip, vae, llm, config: BenchConfig) -> float:
    """Seconds per batch of `batch_size` samples for extract's two passes, as `sur-cache extract` runs them.

    Pass one decodes images in DataLoader workers and runs the VAE and CLIP (twice) per batch of `batch_size`;
    pass two runs the LLM over the simple prompts in batches of `llm_batch_size`. Every feature is copied back to
    the host, where the store writes it. The first batch of pass one pays for worker start-up and is not timed.
    """
    rows, _ = read_metadata(data)
    loader = torch.utils.data.DataLoader(
        ImageDataset(rows, config.resolution),
        batch_size=config.batch_size,
        num_workers=config.workers,
        pin_memory=config.device.startswith("cuda"),
    )
    timed_rows = rows[config.batch_size :]
    start = None
    for step, batch in enumerate(loader):
        if step == 1:
            _sync(config.device)
            start = time.perf_counter()
        texts = [rows[p].text for p in batch["position"].tolist()]
        prompts = [rows[p].prompt for p in batch["position"].tolist()]
        encode_vae(vae, batch["pixels"].to(config.device, non_blocking=True)).mean.cpu()
        encode_clip(*clip, texts).embeddings.cpu()
        encode_clip(*clip, prompts).embeddings.cpu()
    if llm is not None:
        texts = [row.text for row in timed_rows]
        for first in range(0, len(texts), config.llm_batch_size):
            batch_texts = texts[first : first + config.llm_batch_size]
            encode_llm(*llm, batch_texts, layer=config.llm_layers - 1).pooled.cpu()
    return (time.perf_counter() - start) * config.batch_size / len(timed_rows)


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
@click.option("--llm-batch-size", default=64, show_default=True, help="Prompts per LLM call (extract's default).")
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
@click.option("--batches", type=int, default=None, help="Timed batches in the end-to-end loop [default: 8 GPU, 1 CPU].")
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
    device, batch_size, llm_batch_size, resolution, llm_layers, skip_llm, llm_variants, repeats, batches, workers, out
):
    """Benchmark stage one (extract) per component and end to end; print a table and write a CSV."""
    gpu = device.startswith("cuda")
    name = device_name(device)
    config = BenchConfig(
        device=device,
        batch_size=batch_size,
        llm_batch_size=llm_batch_size,
        resolution=resolution or (512 if gpu else 64),
        llm_layers=llm_layers or (4 if gpu else 2),
        skip_llm=skip_llm,
        llm_variants=gpu if llm_variants is None else llm_variants,
        repeats=repeats or (10 if gpu else 1),
        batches=batches or (8 if gpu else 1),
        workers=workers,
        out=out or Path(__file__).parent / "results" / f"extract_{name}.csv",
    )
    size = "full size" if config.full_size else "REDUCED"
    print(f"bench_extract on {name} ({size}): batch {batch_size}, {config.resolution} px, torch {torch.__version__}")
    rows = run(config)
    facts = {
        "device": name,
        "size": size,
        "batch_size": batch_size,
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
