"""SDXL stage-two step time on a GPU at SDXL base 1.0's real shapes, random weights built from configs, in one run.

Rows (median ms per optimizer step, B=8, 1024 px = 128 x 128 latents, bf16 autocast, the UNet stored in bf16):
  unet_only  frozen SDXL UNet fwd+bwd with its added conditioning (pooled text_embeds, six time ids), the gradient
             taken to the 2048-wide text embedding (the floor of any step)
  cached     the trainer's own `optimizer_step`: a synthetic SDXL store -> `FeatureLoader` (range reads, flips,
             latent sampling, time ids) -> adapter (d=2048) -> UNet fwd+bwd -> the three losses -> fused AdamW
  online     the same step with the features computed per batch: the VAE encoder on 1024 px pixels in float32
             (SDXL's default: its VAE overflows in float16) + both text encoders (CLIP-L, OpenCLIP bigG) on the
             simple and the complex prompt + UNet + adapter (the LLM left out, as in bench_train.py)
The cached row runs once per attention backend (eager, and the fused kernel where it imports). The adapter alone at
d=2048 (eager, SDPA, fused cores) is bench_attention.py's `--widths 2048` rows (bench/device_check.sh runs both).

On a CPU it runs the same code at the tiny SDXL test shapes as a smoke test and labels every row SMOKE.
Writes bench/results/sdxl_<device>.csv and prints a table.
Usage: python bench/bench_sdxl.py [--repeats 5] [--batch-size 8]
"""

from __future__ import annotations

import csv
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import build_unet, median_ms  # noqa: E402
from sdxl_shapes import SDXL_CLIP_BIG_G, SDXL_CLIP_L, SDXL_UNET, SDXL_VAE  # noqa: E402

from sur_cache.adapter import AdapterConfig, SURAdapter  # noqa: E402
from sur_cache.config import TrainConfig  # noqa: E402
from sur_cache.loader import FeatureLoader, LoaderSettings, StoreSource, array_names, read_units  # noqa: E402
from sur_cache.models import TextEncoders, encode_prompts, encode_vae  # noqa: E402
from sur_cache.stages.train import TrainingRun, compile_adapter_terms, optimizer_step  # noqa: E402
from sur_cache.store import DONE, FeatureStore, synthetic_store  # noqa: E402
from sur_cache.tiny_models import (  # noqa: E402
    TINY_CLIP_CONFIG,
    TINY_LLM_WIDTH,
    TINY_RESOLUTION,
    TINY_SDXL_CLIP_WIDTHS,
    TINY_SDXL_POOLED_WIDTH,
    TINY_SDXL_UNET_CONFIG,
    TINY_VAE_CONFIG,
    save_clip_tokenizer,
)
from sur_cache.train_log import StepLog  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPTS = (
    "a little girl reads a book under a tree while birds sing",
    "portrait of a knight, highly detailed, digital painting, artstation, concept art",
)


@dataclass(frozen=True)
class Shapes:
    """SDXL base on a GPU, the tiny test SDXL on a CPU."""

    label: str
    clips: tuple[dict, dict]  # CLIPTextModel's and CLIPTextModelWithProjection's configs
    unet: dict
    vae: dict
    llm_width: int
    resolution: int

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def clip_width(self) -> int:
        return sum(clip["hidden_size"] for clip in self.clips)

    @property
    def pooled_width(self) -> int:
        return self.clips[1]["projection_dim"]


SDXL = Shapes("SDXL", (SDXL_CLIP_L, SDXL_CLIP_BIG_G), SDXL_UNET, SDXL_VAE, 5120, 1024)
_TINY_CLIPS = tuple(
    {"vocab_size": 49408, **TINY_CLIP_CONFIG, "hidden_size": width, "projection_dim": TINY_SDXL_POOLED_WIDTH}
    for width in TINY_SDXL_CLIP_WIDTHS
)
TINY = Shapes("SMOKE tiny", _TINY_CLIPS, TINY_SDXL_UNET_CONFIG, TINY_VAE_CONFIG, TINY_LLM_WIDTH, TINY_RESOLUTION)


def build_store(path: Path, shapes: Shapes, samples: int) -> FeatureStore:
    """A synthetic SDXL store: random features, every image 1024 x 1024 (or the smoke size) with no crop."""
    store = synthetic_store(
        str(path),
        num_samples=samples,
        clip_width=shapes.clip_width,
        llm_width=shapes.llm_width,
        latent_channels=4,
        latent_size=shapes.latent_size,
        resolution=shapes.resolution,
        sd_kind="sdxl",
        pooled_width=shapes.pooled_width,
        flip_variants=True,
        shard_rows=16,
    )
    rng = np.random.default_rng(0)
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        rows = {}
        for name, spec in store.specs.items():
            shape = (stop - start, *spec.row_shape)
            if name == "original_size":
                rows[name] = np.full(shape, shapes.resolution, dtype=spec.dtype)
            elif np.dtype(spec.dtype).kind == "f":
                rows[name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
            elif name != "status":
                rows[name] = np.zeros(shape, dtype=spec.dtype)
        store.write_shard(shard, rows, np.full(stop - start, DONE, dtype=np.uint8))
    return FeatureStore.open(str(path), mode="r")


class OnlineFeatures:
    """A `FeatureSource` computing both text encoders on both prompts and the VAE latent distribution per batch, as
    `--online` does for SDXL (the image decode left out: random pixels already on the device)."""

    def __init__(self, shapes: Shapes, batch: int, device: torch.device, dtype: torch.dtype, scratch: Path) -> None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        save_clip_tokenizer(scratch / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(scratch / "tokenizer")
        with torch.device(device):
            first = CLIPTextModel(CLIPTextConfig(**shapes.clips[0]))
            second = CLIPTextModelWithProjection(CLIPTextConfig(**shapes.clips[1]))
            encoders = tuple(e.to(dtype).eval().requires_grad_(False) for e in (first, second))
            self.vae = AutoencoderKL(**shapes.vae).float().eval().requires_grad_(False)  # SDXL: fp32 VAE
        self.text = TextEncoders("sdxl", (tokenizer, tokenizer), encoders)
        self.pixels = torch.rand(batch, 3, shapes.resolution, shapes.resolution, device=device) * 2 - 1
        self.llm = torch.randn(batch, shapes.llm_width, device=device)
        self.sizes = torch.full((batch, 2), shapes.resolution, device=device)
        self.batch = batch

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]:
        latents = encode_vae(self.vae, self.pixels)
        simple = encode_prompts(self.text, [PROMPTS[0]] * self.batch)
        return {
            "clip_simple": simple.embeddings,
            "clip_complex": encode_prompts(self.text, [PROMPTS[1]] * self.batch).embeddings,
            "llm": self.llm,
            "latent_mean": latents.mean,
            "latent_logvar": latents.logvar,
            "pooled_simple": simple.pooled,
            "original_size": self.sizes,
            "crop_offset": torch.zeros_like(self.sizes),
        }


def make_run(source, units, shapes: Shapes, unet, scheduler, attention: str, device, batch: int, scratch: Path):
    """A `TrainingRun` as `setup` builds it for an SDXL store, from in-memory parts instead of a store and a folder."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    config = TrainConfig(
        store="bench",
        sd="bench",
        out=scratch,
        batch_size=batch,
        gradient_accumulation=1,
        mixed_precision="bf16" if device.type == "cuda" else "no",
        attention=attention,
        device=device.type,
    )
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device.type == "cpu")
    adapter_config = AdapterConfig(
        width=shapes.clip_width, llm_width=shapes.llm_width, attention=attention, llm_proj_seed=0
    )
    adapter = SURAdapter(adapter_config).to(device).train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, weight_decay=1e-2, fused=device.type == "cuda")
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    settings = LoaderSettings(
        batch_size=batch, seed=0, random_flip=True, scaling_factor=0.13025, sdxl_target_size=shapes.resolution
    )
    run = TrainingRun(
        config,
        {},
        accelerator,
        FeatureLoader(source, units, settings, device),
        adapter,
        unet,
        scheduler,
        optimizer,
        get_scheduler("constant", optimizer),
        StepLog(scratch / "unused.jsonl", enabled=False),
        total_steps=10**9,
    )
    compile_adapter_terms(run, "none")  # the adapter and its KL terms, eager, as `setup` sets them
    return run


def unet_only(unet, scheduler, shapes: Shapes, batch: int, device: torch.device):
    """One frozen-UNet fwd+bwd with its added conditioning, the gradient taken to the text embedding."""
    size = shapes.latent_size
    latents = torch.randn(batch, 4, size, size, device=device)
    embedding = torch.randn(batch, 77, shapes.clip_width, device=device, requires_grad=True)
    added = {
        "text_embeds": torch.randn(batch, shapes.pooled_width, device=device, dtype=unet.dtype),
        "time_ids": torch.tensor([[shapes.resolution, shapes.resolution, 0, 0, shapes.resolution, shapes.resolution]])
        .to(device, unet.dtype)
        .expand(batch, 6),
    }

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            pred = unet(
                noisy.to(unet.dtype), timesteps, encoder_hidden_states=embedding.to(unet.dtype), added_cond_kwargs=added
            ).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        embedding.grad = None

    return step


def stepper(run: TrainingRun):
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
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed steps per row (median reported).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per step (the issue's B=8).")
def main(repeats: int, batch_size: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SDXL if device.type == "cuda" else TINY
    if device.type != "cuda":
        print(
            "bench_sdxl needs a GPU for its numbers; on this CPU it runs the tiny SDXL shapes as a smoke test (SMOKE)"
        )
        repeats, batch_size = 2, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = build_store(scratch / "store.zarr", shapes, samples=4 * batch_size)
        units = read_units(store.shard_ranges(), store.complete_indices())
        print(f"SDXL store of {store.num_samples} samples written ({time.perf_counter() - started:.0f} s)")
        unet, scheduler = build_unet(shapes, device, dtype)

        def record(what: str, measure, attention: str = "") -> None:
            """Append one row; a failing row (out of memory, a kernel that does not build) is recorded, not fatal."""
            try:
                value = measure()
            except Exception as error:  # noqa: BLE001
                print(f"  {what:<10} {attention:<6} FAILED: {type(error).__name__}: {str(error)[:200]}")
                rows.append((what, attention, batch_size, math.nan, f"FAILED {type(error).__name__}"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                return
            rows.append((what, attention, batch_size, round(value, 2), "ms"))
            print(f"  {what:<10} {attention:<6} B={batch_size:<3} {value:>10.2f} ms")

        def cached(attention: str) -> float:
            names = array_names(latents=True, flips=True, sdxl=True)
            source = StoreSource(store, units, names, capacity=8, readers=1)
            run = make_run(source, units, shapes, unet, scheduler, attention, device, batch_size, scratch)
            try:
                return median_ms(stepper(run), repeats, device)
            finally:
                source.close()

        def online() -> float:
            source = OnlineFeatures(shapes, batch_size, device, dtype, scratch)
            run = make_run(source, units, shapes, unet, scheduler, "eager", device, batch_size, scratch)
            return median_ms(stepper(run), repeats, device)

        record("unet_only", lambda: median_ms(unet_only(unet, scheduler, shapes, batch_size, device), repeats, device))
        for attention in backends(device):
            record("cached", lambda a=attention: cached(a), attention)
        record("online", online, "eager")
    value = {(r[0], r[1]): r[3] for r in rows}
    unet_ms, cached_ms = value.get(("unet_only", ""), math.nan), value.get(("cached", "eager"), math.nan)
    online_ms = value.get(("online", "eager"), math.nan)
    print(f"cached/unet_only (eager): {cached_ms / unet_ms:.3f}   online/cached: {online_ms / cached_ms:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = name.replace(" ", "_") if device.type == "cuda" else "cpu_smoke"
    out = RESULTS / f"sdxl_{label}.csv"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "attention", "batch", "value", "unit", "shapes", "device", "torch"])
        for row in rows:
            writer.writerow([*row, shapes.label, name, torch.__version__])
    print(f"{name}: wrote {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
