"""Stage-two step time on a GPU at SD 1.5 shapes, random weights built from configs (no download), in one run.

Rows (median ms per optimizer step, B=16, 64 x 64 latents, bf16 autocast, the UNet stored in bf16):
  unet_only      frozen UNet fwd+bwd with the gradient taken to the text embedding (the floor of any step)
  cached         the trainer's own `optimizer_step`: a synthetic store -> `FeatureLoader` (range reads, flips,
                 latent sampling) -> adapter -> UNet fwd+bwd -> the three losses -> clipping -> fused AdamW
  online         the same step with features computed per batch: VAE encoder on 512 px pixels + CLIP text
                 encoder x2 (simple and complex prompt) + UNet + adapter (the LLM is left out, as in the issue)
  features_only  `--denoise-weight 0` at B=256 and 1024 from features preloaded into GPU memory, as samples/s, loading
                 included (the loader's index_select, the adapter, both KL terms, fused AdamW)
The cached and features-only rows run once per attention backend (eager, and the fused kernel where it imports) with
--compile none, and once per other --compile mode (`reduce-overhead` on a GPU: the trainer's own
`compile_adapter_terms`) with the backend `--attention auto` picks (fused on CUDA), so that each compile is paid once.
Targets (issue 12): features_only >= 60,000 samples/s at B=256, cached <= 1.03 x unet_only.

Host cost (issue 12, item 2), rows `host_features_only` and `host_cached`, on any device (`HostCost`): per optimizer
step, the ATen operators dispatched (top-level `aten::` events of torch.profiler; of them, those of the gradient
clipping and of the AdamW step), the kernels launched (on CUDA the runtime's launch calls; on the CPU, where nothing
is launched, the operators that touch data and call no other that does, plus the C++ kernels inductor generated),
the wall time, and the time inside kernels and outside them (the host's: Python, dispatch, autograd, allocation).
On the CPU the rows run on one thread and split the step's CPU time (the VM is shared: wall time there measures the
other processes' load). The first step's time is the compile. Shapes: B=16, L=77, the adapter's 2 layers and 8 heads
at width 64 (feed-forward 64), a 64-wide LLM feature, and the SD 1.5 UNet's block structure (4 blocks, 2 layers
each, cross-attention) at channels 32 on 16 x 16 latents: the operator count is SD 1.5's, the arithmetic small
(attention over 77 and 256 tokens remains).

On a CPU the real shapes are out of reach: the GPU rows run at the tiny test shapes as a smoke test, labelled SMOKE.
Writes bench/results/train_<device>.csv and prints a table.
Usage: python bench/bench_train.py [--repeats 10] [--features-batches 256,1024] [--compile-modes none,reduce-overhead]
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
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
from sur_cache.stages.train import TrainingRun, compile_adapter_terms, optimizer_step  # noqa: E402
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
# SD 1.5's operator structure at tiny widths (the host-cost rows): L=77, B=16, 8 heads, the UNet's four blocks
HOST = Shapes(
    label="SD1.5 structure, tiny widths",
    clip={**CLIP_L, "hidden_size": 64},
    unet=dict(
        sample_size=16,
        cross_attention_dim=64,
        block_out_channels=(32, 32, 32, 32),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    vae=TINY_VAE_CONFIG,
    llm_width=64,
    resolution=64,
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


def make_run(
    source, units, shapes, unet, scheduler, attention, device, batch_size, scratch, compile_mode="none", adapter=None
) -> TrainingRun:
    """A `TrainingRun` as `setup` builds it, from in-memory parts instead of a store and an SD folder, its adapter
    and losses compiled in `compile_mode` as `--compile` does."""
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
        width=shapes.clip["hidden_size"],
        llm_width=shapes.llm_width,
        attention=attention,
        llm_proj_seed=0,
        **(adapter or {}),
    )
    adapter = SURAdapter(adapter_config).to(device).train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5, weight_decay=1e-2, fused=True)  # as setup
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    settings = LoaderSettings(
        batch_size=batch_size, seed=0, random_flip=unet is not None, latents=unet is not None, scaling_factor=0.18215
    )
    loader = FeatureLoader(source, units, settings, device)
    run = TrainingRun(
        config,
        {},
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
    compile_adapter_terms(run, compile_mode)
    return run


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


# Operators that only make views or allocate: not counted as kernels on the CPU (they touch no data).
NO_DATA_OPS = frozenset(
    "aten::" + name
    for name in (
        "empty empty_strided empty_like view _unsafe_view _reshape_alias reshape as_strided t transpose permute "
        "expand unsqueeze squeeze select slice narrow split unbind chunk detach alias lift_fresh resolve_conj "
        "resolve_neg result_type"
    ).split()
)
# The runtime calls that launch work on CUDA; a CUDA-graph replay (reduce-overhead) is one launch.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch")


@dataclass(frozen=True)
class HostCost:
    """Per optimizer step: operators dispatched (of them, the gradient clipping's and the AdamW step's), kernels
    launched, wall time, and the step's time split into the time inside those kernels and the host's share, the rest
    (Python, dispatch, autograd, allocation).

    On the CPU, where another process's load must not count, cpu_ms is the step's CPU time (one thread), split into
    kernel_ms and host_ms in the proportion the profiled steps spent inside and outside kernels; the profiler's own
    cost per event falls outside them, so host_ms is an upper bound, the more so the more operators a step has. On
    CUDA kernel_ms is the GPU's busy time and host_ms the rest of the wall time: what the host's issuing costs where
    the GPU waits for it (cpu_ms is not measured: a sync spins on the CPU)."""

    aten_ops: float
    clip_ops: float
    optimizer_ops: float
    launches: float
    wall_ms: float
    cpu_ms: float
    kernel_ms: float
    host_ms: float
    first_step_s: float = math.nan  # the first step: the compile, for a compiled run


HOST_FIELDS = (
    "aten_ops",
    "clip_ops",
    "optimizer_ops",
    "launches",
    "wall_ms",
    "cpu_ms",
    "kernel_ms",
    "host_ms",
    "first_step_s",
)
CLIP_REGION = "clip_grad_norm"  # the profiler label `label_clipping` puts around the step's gradient clipping
OPTIMIZER_REGION = "Optimizer.step#"  # the label torch.optim puts around every optimizer step (a prefix)
STEP_REGION = "bench_step"  # around each profiled step


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _is_top_level_aten(event) -> bool:
    return event.name.startswith("aten::") and not any(p.name.startswith("aten::") for p in _ancestors(event))


def _touches_data(event) -> bool:
    return "cpp_fused" in event.name or (event.name.startswith("aten::") and event.name not in NO_DATA_OPS)


def _is_cpu_kernel(event) -> bool:
    """An operator that touches data and calls no other that does (it may allocate its output through aten::empty),
    or a C++ kernel inductor generated (profiled by enable_kernel_profile)."""
    if not _touches_data(event):
        return False
    return "cpp_fused" in event.name or not any(_touches_data(child) for child in _descendants(event))


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _kernel_us(event) -> float:
    """A kernel's own time: its span less the operators it calls (allocation and views: host work)."""
    return event.cpu_time_total - sum(c.cpu_time_total for c in event.cpu_children if c.name.startswith("aten::"))


def label_clipping(run: TrainingRun) -> None:
    """Wrap the run's gradient clipping in a profiler label, so that its operators can be counted."""
    from torch.profiler import record_function

    clip = run.accelerator.clip_grad_norm_

    def labelled(*args, **kwargs):
        with record_function(CLIP_REGION):
            return clip(*args, **kwargs)

    run.accelerator.clip_grad_norm_ = labelled


def _inside(event, label: str) -> bool:
    return any(p.name.startswith(label) for p in _ancestors(event))


def median_cpu_ms(fn, repeats: int) -> float:
    """Median CPU time of this process per `fn()` call in ms (the calls are warm already)."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1e3


def host_cost(step, device: torch.device, repeats: int, profiled_steps: int = 3) -> HostCost:
    """Measure `step` (warmed up, compiled by then) without and then with torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    wall = median_ms(step, repeats, device)
    cpu = median_cpu_ms(step, repeats) if device.type == "cpu" else math.nan
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(profiled_steps):
            with record_function(STEP_REGION):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    top = [e for e in events if _is_top_level_aten(e)]
    clip, optimizer = (sum(1 for e in top if _inside(e, label)) for label in (CLIP_REGION, OPTIMIZER_REGION))
    n = profiled_steps
    if device.type == "cuda":
        launches = sum(1 for e in events if e.name in LAUNCH_CALLS)
        kernel_ms = sum(e.device_time for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / n / 1e3
        host_ms = wall - kernel_ms
    else:
        kernels = [e for e in events if _is_cpu_kernel(e)]
        profiled = sum(e.cpu_time_total for e in events if e.name == STEP_REGION)
        launches, share = len(kernels), sum(_kernel_us(e) for e in kernels) / profiled
        kernel_ms, host_ms = cpu * share, cpu * (1 - share)
    return HostCost(len(top) / n, clip / n, optimizer / n, launches / n, wall, cpu, kernel_ms, host_ms)


def host_rows(compile_modes: list[str], device: torch.device, repeats: int, scratch: Path, record) -> None:
    """The host-cost rows at HOST shapes: features-only and the cached step, features preloaded on the device (so
    the loader's reads are not in the step), per compile mode.

    On the CPU they run on one thread: a step issues its operators one after another from one host thread, as on a
    GPU, while a second intra-op thread on a shared machine measures the wait for a free core instead (a 64 x 64
    matmul took 1.3 ms on two threads against 13 us on one while the VM was loaded: docs/train.md)."""
    import torch._inductor.config

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # before the compile too: inductor's C++ kernels take their thread count from it
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's C++ kernels appear in the profile
    fields = dict(clip_width=64, llm_width=HOST.llm_width, latent_channels=4, latent_size=16, flip_variants=True)
    store = build_store(scratch / "host.zarr", 4 * HOST.batch_size, shard_rows=HOST.batch_size, shapes=fields)
    units = read_units(store.shard_ranges(), store.complete_indices())
    unet, scheduler = build_unet(HOST, device, torch.float32)
    small = {"feedforward": 64}
    try:
        for kind, model in (("host_features_only", None), ("host_cached", unet)):
            names = array_names(latents=model is not None, flips=model is not None)
            for mode in compile_modes:

                def measure(mode=mode, names=names, model=model, kind=kind) -> HostCost:
                    source = PreloadedSource(store, units, names, device)
                    run = make_run(
                        source, units, HOST, model, scheduler, "eager", device, HOST.batch_size, scratch, mode, small
                    )
                    label_clipping(run)
                    step = stepper(run)
                    started = time.perf_counter()
                    step()  # the compile
                    first = time.perf_counter() - started
                    step()  # one step on the compiled graphs
                    return replace(host_cost(step, device, repeats), first_step_s=first)

                record(kind, measure, "host", mode, batch=HOST.batch_size)
    finally:
        torch.set_num_threads(threads)


def backends(device: torch.device, mode: str) -> list[str]:
    """Eager and, where it imports, the fused kernel without --compile; compiled, the backend `auto` picks."""
    found = ["eager"]
    if device.type == "cuda":
        try:
            from sur_cache.kernels import attention_calibration  # noqa: F401

            found.append("fused")
        except ImportError as error:
            print(f"fused attention unavailable ({error}); eager only")
    return found if mode == "none" else found[-1:]


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
@click.option(
    "--compile-modes",
    default=None,
    help="Comma-separated --compile modes of the cached, features-only and host rows  "
    "[default: none,reduce-overhead on a GPU, none,default on the CPU]",
)
@click.option("--skip-gpu-rows", is_flag=True, help="Only the host-cost rows (on the CPU: skip the SMOKE rows).")
def main(repeats, features_batches, store_samples, compile_modes, skip_gpu_rows) -> None:
    features_batches = [int(b) for b in features_batches.split(",")]
    store_samples = store_samples or max(512, *features_batches)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SD15 if device.type == "cuda" else TINY
    default_modes = "none,reduce-overhead" if device.type == "cuda" else "none,default"
    modes = (compile_modes or default_modes).split(",")
    gpu_modes = modes
    if device.type != "cuda":
        print("bench_train needs a GPU for its step times; on this CPU the GPU rows run tiny shapes as a smoke test")
        repeats, features_batches, store_samples, gpu_modes = 3, [8], 32, ["none"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = RESULTS / f"train_{name.replace(' ', '_') if device.type == 'cuda' else 'cpu'}.csv"
    rows = []
    started = time.perf_counter()

    def record(what: str, measure, unit: str, mode: str, attention: str = "", batch: int = shapes.batch_size) -> None:
        """Append one row (a host row: one per HOST_FIELDS) and rewrite the CSV, so that a run stopped by its time
        limit keeps the rows it measured; a failing row (a kernel not building) is recorded."""
        label = HOST.label if unit == "host" else shapes.label
        try:
            value = measure()
        except Exception as error:  # noqa: BLE001
            print(f"  {what:<18} {attention:<6} {mode:<15} FAILED: {type(error).__name__}: {error}")
            rows.append((what, attention, mode, batch, math.nan, f"FAILED {type(error).__name__}", label))
        else:
            values = [(value, unit)] if unit != "host" else [(getattr(value, f), f) for f in HOST_FIELDS]
            for number, what_unit in values:
                rows.append((what, attention, mode, batch, round(number, 3), what_unit, label))
            shown = ", ".join(f"{number:.2f} {what_unit}" for number, what_unit in values)
            print(f"  {what:<18} {attention:<6} {mode:<15} B={batch:<4} {shown}")
        write_csv(out, rows, name)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if not skip_gpu_rows:  # first: on a GPU they hold issue 12's targets
            gpu_rows(shapes, device, dtype, store_samples, features_batches, gpu_modes, repeats, scratch, record)
        host_rows(modes, device, repeats, scratch, record)
    for line in _ratios(rows):
        print(line)
    print(f"{name}: wrote {out} in {time.perf_counter() - started:.0f} s")


def write_csv(out: Path, rows: list[tuple], device_name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "attention", "compile", "batch", "value", "unit", "shapes", "device", "torch"])
        for row in rows:
            writer.writerow([*row, device_name, torch.__version__])


def gpu_rows(shapes, device, dtype, store_samples, features_batches, modes, repeats, scratch, record) -> None:
    """UNet-only, cached and online step times, features-only samples/s (SMOKE at tiny shapes on a CPU)."""
    fields = dict(
        clip_width=shapes.clip["hidden_size"],
        llm_width=shapes.llm_width,
        latent_channels=4,
        latent_size=shapes.latent_size,
        flip_variants=True,
    )
    store = build_store(scratch / "store.zarr", store_samples, shard_rows=128, shapes=fields)
    units = read_units(store.shard_ranges(), store.complete_indices())
    unet, scheduler = build_unet(shapes, device, dtype)

    def cached(attention: str, mode: str) -> float:
        source = StoreSource(store, units, array_names(latents=True, flips=True), capacity=8, readers=1)
        run = make_run(source, units, shapes, unet, scheduler, attention, device, shapes.batch_size, scratch, mode)
        return median_ms(stepper(run), repeats, device)

    def online() -> float:
        source = OnlineFeatures(shapes, device, dtype, scratch)
        run = make_run(source, units, shapes, unet, scheduler, "eager", device, shapes.batch_size, scratch)
        return median_ms(stepper(run), repeats, device)

    def features_only(attention: str, mode: str, features_batch: int) -> float:
        source = PreloadedSource(store, units, array_names(latents=False, flips=False), device)
        run = make_run(source, units, shapes, None, None, attention, device, features_batch, scratch, mode)
        return features_batch / median_ms(stepper(run), repeats * 5, device) * 1e3

    unet_step = unet_only(unet, scheduler, shapes, device)
    record("unet_only", lambda: median_ms(unet_step, repeats, device), "ms", "none")
    for mode in modes:
        for attention in backends(device, mode):
            record("cached", partial(cached, attention, mode), "ms", mode, attention)
    record("online", online, "ms", "none", "eager")
    for features_batch in features_batches:
        for mode in modes:
            for attention in backends(device, mode):
                row = partial(features_only, attention, mode, features_batch)
                record("features_only", row, "samples/s", mode, attention, features_batch)


def _ratios(rows) -> list[str]:
    value = {(r[0], r[1], r[2]): r[4] for r in rows if r[5] in ("ms", "samples/s")}
    unet = value.get(("unet_only", "", "none"), math.nan)
    lines = [
        f"cached/unet_only ({a}, --compile {m}): {v / unet:.3f}  (target <= 1.03)"
        for (r, a, m), v in value.items()
        if r == "cached"
    ]
    online, cached = value.get(("online", "eager", "none"), math.nan), value.get(("cached", "eager", "none"), math.nan)
    lines.append(f"online/cached (eager, --compile none): {online / cached:.2f}")
    return lines


if __name__ == "__main__":
    main()
