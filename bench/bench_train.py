"""Stage-two step time on a GPU at SD 1.5 shapes, random weights built from configs (no download), in one run.

Rows (median ms per optimizer step, B=16, 64 x 64 latents, bf16 autocast, the UNet stored in bf16):
  unet_only      frozen UNet fwd+bwd with the gradient taken to the text embedding (the floor of any step)
  cached         the trainer's own `optimizer_step`: a synthetic store -> `FeatureLoader` (range reads, flips,
                 latent sampling) -> adapter -> UNet fwd+bwd -> the three losses -> clipping -> fused AdamW
  online         the same step with features computed per batch: VAE encoder on 512 px pixels + CLIP text
                 encoder x2 (simple and complex prompt) + UNet + adapter (the LLM is left out, as in the issue)
  features_only  `--denoise-weight 0` at B=256 and 1024 from features preloaded into GPU memory, as samples/s, loading
                 included (the loader's index_select, the adapter, both KL terms, fused AdamW)
The cached and features-only rows run once per attention backend (eager, and the fused kernel where it imports).
Targets (issue 3): cached <= 1.05 x unet_only, online >= 1.8 x cached, features_only >= 20,000 samples/s.

On a CPU the real shapes are out of reach: it runs the same code at the tiny test shapes as a smoke test and
labels every row SMOKE. Writes bench/results/train_<device>.csv and prints a table.
Usage: python bench/bench_train.py [--repeats 10] [--features-batches 256,1024]
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_loader import build_store  # noqa: E402
from sd15_shapes import CLIP_L, SD15_UNET, SD15_VAE  # noqa: E402

from sur_cache.adapter import AdapterConfig, SURAdapter  # noqa: E402
from sur_cache.config import TrainConfig  # noqa: E402
from sur_cache.loader import (  # noqa: E402
    FeatureLoader,
    LoaderSettings,
    PreloadedSource,
    StoreSource,
    array_names,
    read_units,
)
from sur_cache.models import encode_clip, encode_vae  # noqa: E402
from sur_cache.stages.train import TrainingRun, optimizer_step  # noqa: E402
from sur_cache.tiny_models import (  # noqa: E402
    TINY_CLIP_CONFIG,
    TINY_LLM_WIDTH,
    TINY_RESOLUTION,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    save_clip_tokenizer,
)
from sur_cache.train_log import StepLog  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Shapes:
    """SD 1.5 on a GPU, the tiny test models on a CPU."""

    label: str
    clip: dict
    unet: dict
    vae: dict
    llm_width: int
    resolution: int
    batch_size: int

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)


SD15 = Shapes(
    label="SD1.5",
    clip=CLIP_L,
    unet=SD15_UNET,
    vae=SD15_VAE,
    llm_width=5120,
    resolution=512,
    batch_size=16,
)
TINY = Shapes(
    label="SMOKE tiny",
    clip={"vocab_size": 49408, **TINY_CLIP_CONFIG},
    unet=TINY_UNET_CONFIG,
    vae=TINY_VAE_CONFIG,
    llm_width=TINY_LLM_WIDTH,
    resolution=TINY_RESOLUTION,
    batch_size=2,
)


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn()` in ms, after two warm-up calls, the GPU synchronised around each call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


class OnlineFeatures:
    """A `FeatureSource` computing CLIP x2 and the VAE latent distribution per batch, as `--online` does (the
    image decode is left out: random pixels already on the GPU)."""

    def __init__(self, shapes: Shapes, device: torch.device, dtype: torch.dtype, scratch: Path) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        save_clip_tokenizer(scratch / "tokenizer")
        self.tokenizer = CLIPTokenizer.from_pretrained(scratch / "tokenizer")
        with torch.device(device):
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**shapes.clip)).to(dtype).eval().requires_grad_(False)
            self.vae = AutoencoderKL(**shapes.vae).to(dtype).eval().requires_grad_(False)
        self.pixels = torch.rand(shapes.batch_size, 3, shapes.resolution, shapes.resolution, device=device) * 2 - 1
        self.llm = torch.randn(shapes.batch_size, shapes.llm_width, device=device)
        self.simple = ["a little girl reads a book under a tree while birds sing"] * shapes.batch_size
        self.complex = ["portrait of a knight, highly detailed, digital painting, artstation, concept art"] * len(
            self.simple
        )

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]:
        latents = encode_vae(self.vae, self.pixels)
        return {
            "clip_simple": encode_clip(self.tokenizer, self.text_encoder, self.simple).embeddings,
            "clip_complex": encode_clip(self.tokenizer, self.text_encoder, self.complex).embeddings,
            "llm": self.llm,
            "latent_mean": latents.mean,
            "latent_logvar": latents.logvar,
        }


def build_unet(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**shapes.unet).to(dtype).eval().requires_grad_(False)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return unet, scheduler


def make_run(source, units, shapes, unet, scheduler, attention, device, batch_size, scratch) -> TrainingRun:
    """A `TrainingRun` as `setup` builds it, from in-memory parts instead of a store and an SD folder."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    config = TrainConfig(
        store="bench",
        sd="bench",
        out=scratch,
        batch_size=batch_size,
        gradient_accumulation=1,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        denoise_weight=1.0 if unet is not None else 0.0,
        attention=attention,
        device=device.type,
    )
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device.type == "cpu")
    adapter_config = AdapterConfig(
        width=shapes.clip["hidden_size"], llm_width=shapes.llm_width, attention=attention, llm_proj_seed=0
    )
    adapter = SURAdapter(adapter_config).to(device).train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    settings = LoaderSettings(
        batch_size=batch_size, seed=0, random_flip=unet is not None, latents=unet is not None, scaling_factor=0.18215
    )
    loader = FeatureLoader(source, units, settings, device)
    return TrainingRun(
        config,
        accelerator,
        loader,
        adapter,
        unet,
        scheduler,
        optimizer,
        get_scheduler("constant", optimizer),
        StepLog(scratch / "unused.jsonl", enabled=False),
        total_steps=10**9,
    )


def unet_only(unet, scheduler, shapes: Shapes, device: torch.device):
    """One frozen-UNet fwd+bwd with the gradient taken to the text embedding."""
    size, batch = shapes.latent_size, shapes.batch_size
    latents = torch.randn(batch, 4, size, size, device=device)
    embedding = torch.randn(batch, 77, shapes.clip["hidden_size"], device=device, requires_grad=True)
    dtype = unet.dtype

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embedding.to(dtype)).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        embedding.grad = None

    return step


def stepper(run: TrainingRun):
    """One call = one optimizer step of `run`, through the trainer's own `optimizer_step`."""
    batches = run.loader.batches()
    return lambda: optimizer_step(run, batches)


def backends(device: torch.device) -> list[str]:
    found = ["eager"]
    if device.type == "cuda":
        try:
            from sur_cache.kernels import attention_calibration  # noqa: F401

            found.append("fused")
        except ImportError as error:
            print(f"fused attention unavailable ({error}); eager only")
    return found


@click.command()
@click.option("--repeats", type=int, default=10, help="Timed steps per row (median reported).")
@click.option(
    "--features-batches",
    default="256,1024",
    show_default=True,
    help="Comma-separated batches of the features-only rows.",
)
@click.option(
    "--store-samples",
    type=int,
    default=None,
    help="Samples of the synthetic store (about 378 KB each) [default: 512, or the largest features batch].",
)
def main(repeats, features_batches, store_samples) -> None:
    features_batches = [int(b) for b in features_batches.split(",")]
    store_samples = store_samples or max(512, *features_batches)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SD15 if device.type == "cuda" else TINY
    if device.type != "cuda":
        print("bench_train needs a GPU for its numbers; on this CPU it runs the tiny shapes as a smoke test (SMOKE)")
        repeats, features_batches, store_samples = 2, [8], 32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        manifest = {
            "sur_cache_version": "bench",
            "store_dtype": "float16",
            "tokenizer_max_length": 77,
            "clip_width": shapes.clip["hidden_size"],
            "llm_width": shapes.llm_width,
            "latent_channels": 4,
            "latent_size": shapes.latent_size,
            "flip_variants": True,
            "llm_per_token": False,
        }
        store = build_store(scratch / "store.zarr", store_samples, shard_rows=128, manifest=manifest)
        units = read_units(store.shard_ranges(), store.complete_indices())
        print(f"store of {store_samples} samples written ({time.perf_counter() - started:.0f} s)")
        unet, scheduler = build_unet(shapes, device, dtype)

        def record(what: str, measure, unit: str, attention: str = "", batch: int = shapes.batch_size) -> None:
            """Append one row; a failing row (say, a kernel that does not build) is recorded, not fatal."""
            try:
                value = measure()
            except Exception as error:  # noqa: BLE001
                print(f"  {what:<14} {attention:<6} FAILED: {type(error).__name__}: {error}")
                rows.append((what, attention, batch, math.nan, f"FAILED {type(error).__name__}"))
                return
            rows.append((what, attention, batch, round(value, 2), unit))
            print(f"  {what:<14} {attention:<6} B={batch:<4} {value:>10.2f} {unit}")

        def cached(attention: str) -> float:
            source = StoreSource(store, units, array_names(latents=True, flips=True), capacity=8, readers=1)
            run = make_run(source, units, shapes, unet, scheduler, attention, device, shapes.batch_size, scratch)
            return median_ms(stepper(run), repeats, device)

        def online() -> float:
            source = OnlineFeatures(shapes, device, dtype, scratch)
            run = make_run(source, units, shapes, unet, scheduler, "eager", device, shapes.batch_size, scratch)
            return median_ms(stepper(run), repeats, device)

        def features_only(attention: str, features_batch: int) -> float:
            source = PreloadedSource(store, units, array_names(latents=False, flips=False), device)
            run = make_run(source, units, shapes, None, None, attention, device, features_batch, scratch)
            return features_batch / median_ms(stepper(run), repeats * 5, device) * 1e3

        record("unet_only", lambda: median_ms(unet_only(unet, scheduler, shapes, device), repeats, device), "ms")
        for attention in backends(device):
            record("cached", lambda a=attention: cached(a), "ms", attention)
        record("online", online, "ms", "eager")
        for features_batch in features_batches:
            for attention in backends(device):
                row = partial(features_only, attention, features_batch)
                record("features_only", row, "samples/s", attention, features_batch)
    ratios = _ratios(rows)
    for line in ratios:
        print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = name.replace(" ", "_") if device.type == "cuda" else "cpu_smoke"
    out = RESULTS / f"train_{label}.csv"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "attention", "batch", "value", "unit", "shapes", "device", "torch"])
        for row in rows:
            writer.writerow([*row, shapes.label, name, torch.__version__])
    print(f"{name}: wrote {out} in {time.perf_counter() - started:.0f} s")


def _ratios(rows) -> list[str]:
    value = {(r[0], r[1]): r[3] for r in rows}
    unet = value.get(("unet_only", ""), math.nan)
    lines = [
        f"cached/unet_only ({a}): {v / unet:.3f}  (target <= 1.05)" for (r, a), v in value.items() if r == "cached"
    ]
    online, cached = value.get(("online", "eager"), math.nan), value.get(("cached", "eager"), math.nan)
    lines.append(f"online/cached (eager): {online / cached:.2f}  (target >= 1.8)")
    return lines


if __name__ == "__main__":
    main()
