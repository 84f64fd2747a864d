"""Stage two: a feature store -> a trained SUR-adapter, with only the frozen UNet (and the adapter) in memory.

    setup    open the store read-only, check it against --sd, build the loader, the adapter, the frozen UNet and
             noise scheduler, AdamW and the lr schedule; prepare them with accelerate; restore a checkpoint
    train    per optimizer step: `gradient_accumulation` micro-batches of
             denoise_weight * MSE(unet(noisy, t, adapter(x))) + llm_weight * distill + align_weight * align,
             gradient clipping, a JSON line; a checkpoint folder every `checkpoint_every` steps
    cleanup  save the final adapter, plot the loss curves

Supports: mixed precision (no/fp16/bf16), gradient accumulation, any number of processes (`torchrun`,
`accelerate launch`; each reads a disjoint part of the store), exact resume (`--resume PATH|latest`: the losses
after a resume equal an uninterrupted run's), the reference's detached UNet input (`--detach-unet-input`), a
features-only objective (`--denoise-weight 0`: no UNet, no latents), and `--online` (features recomputed from the
images by stage one's code, to prove the cache exact or to measure what it saves).

Never loads the LLM, the CLIP text encoder(s) or the VAE unless `--online`: the SD model is read for its UNet, its
noise scheduler, and its config files. SDXL: the UNet also gets `added_cond_kwargs` (the simple prompt's pooled
embedding and the time ids) from the store; docs/models.md says why the pooled embedding is not adapted.

Trust: the run folder is marked as sur-cache's (sur-cache-run.json) before anything else is written into it, and a
non-empty folder without the mark is refused; checkpoints are safetensors and JSON only, checksummed, verified
before use (sur_cache/checkpoint.py); a resume refuses every setting that would change the run's meaning; the run
stops at the first non-finite loss or gradient, and a non-finite adapter is never saved.

Raises ValueError for bad options, a foreign --out, a changed setting on resume or a non-finite step;
ManifestMismatchError for a store that does not fit --sd; CheckpointError (a ValueError) for a damaged checkpoint;
FileNotFoundError for a missing store or checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sur_cache import __version__, checkpoint
from sur_cache.adapter import AdapterConfig, AdapterOutput, SURAdapter, resolve_attention
from sur_cache.checkpoint import POSITION_FILE, Position
from sur_cache.compilation import compiled, mark_step, resolve_compile
from sur_cache.config import TrainConfig
from sur_cache.devices import resolve_device
from sur_cache.loader import (
    FeatureLoader,
    LoaderSettings,
    MappedSource,
    PreloadedSource,
    ReadUnit,
    StoreSource,
    array_names,
    batches_per_epoch,
    check_manifest,
    read_units,
)
from sur_cache.losses import alignment_loss, compute_snr, denoising_loss, denoising_target, distillation_loss
from sur_cache.store import FeatureStore, Manifest
from sur_cache.teacher_layers import TeacherLayer, resolve_teacher
from sur_cache.train_log import STEP, VALIDATION, StepLog, plot_losses
from sur_cache.validation import (
    COSINE_FIELDS,
    LOSS_FIELDS,
    DrawSettings,
    HeldOut,
    flat_cosine,
    held_out_batches,
    hold_out,
    process_share,
)

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
RUN_MARKER = "sur-cache-run.json"  # written first: a folder holding it is a sur-cache run, safe to write into
RUN_KIND = "sur-cache train run"
# The settings a resume may change: how long the run goes, how often it checkpoints and validates, how the store is
# read. None changes a number computed for a step that both runs share (validation draws no random number of the
# run and leaves the adapter as it was). Every other TrainConfig field is compared with the checkpoint's, some by
# what they resolve to (RESOLVED_SETTINGS).
# --compile changes how the step is computed, not what: a resume with another mode continues the same run, its
# numbers equal to rounding with dropout 0 (compiled dropout draws other masks: docs/train.md).
RESUME_MAY_CHANGE = (
    "max_steps",
    "epochs",
    "checkpoint_every",
    "val_every",
    "read_workers",
    "mapped_reads",
    "preload",
    "compile",
)
# Compared by what they resolve to, not as typed: the store by its identity (a copy resumes), --device by the device
# type it resolves to (`auto` on a CPU machine resumes a `cpu` run), --attention by the backend it picks. Keys of
# the recorded settings -> how a refusal names them.
RESOLVED_SETTINGS = {
    "store_identity": "store (--store, by its store_id and content fingerprint)",
    "device": "device type (--device)",
    "attention_backend": "attention backend (--attention)",
    "processes": "processes (torchrun / accelerate launch)",
    "lr_schedule_steps": "lr schedule length (--max-steps / --epochs, with --lr-schedule cosine or linear)",
    "held_out": "held-out shards (--val-fraction, --seed)",
}
# Settings a checkpoint of an older sur-cache does not record, and the value they had there (no validation; the
# store's single LLM layer as the teacher).
_ADDED_SETTINGS = {"val_fraction": 0.0, "held_out": [], "llm_layer": None}
# Left out of the typed settings: compared through RESOLVED_SETTINGS, or naming where the run is, not what it means.
_NOT_COMPARED_AS_TYPED = ("store", "device", "attention", "out", "resume", "storage_options")
# Recorded by checkpoints of an older sur-cache and compared no more: the `--cpu` flag, which `--device` replaced
# (the device type it resolved to is recorded as `device` and compared).
_RETIRED_SETTINGS = ("cpu",)


class NonFiniteError(ValueError):
    """A loss, a gradient or the adapter's weights went NaN or infinite."""


@dataclass
class TrainingRun:
    """Everything `setup` builds and `train` uses."""

    config: TrainConfig
    settings: dict[str, Any]  # what this run means; recorded in every checkpoint, compared on resume
    accelerator: Any
    loader: FeatureLoader
    adapter: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    unet: torch.nn.Module | None
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    log: StepLog
    total_steps: int
    step: int = 0  # optimizer steps done
    epoch: int = 0  # position of the next micro-batch
    batch: int = 0
    lookahead: Any = None  # the next micro-batch, fetched while the GPU still runs the current step
    held_out: HeldOut | None = None  # with --val-fraction: what validation reads
    teacher: TeacherLayer = dataclasses.field(default_factory=TeacherLayer)  # --llm-layer: the distillation target
    compile_mode: str = "none"  # --compile as resolved for the device
    # (clip_simple, clip_complex, llm) -> (adapter output, distill, align) of the training adapter, compiled in
    # compile_mode; setup (or a benchmark building its own run) sets it with `compile_adapter_terms`
    adapter_terms: Callable[..., tuple[AdapterOutput, torch.Tensor, torch.Tensor]] | None = None

    @property
    def samples_per_step(self) -> int:
        return self.config.batch_size * self.config.gradient_accumulation * self.accelerator.num_processes


@dataclass
class LossTerms:
    denoise: torch.Tensor | None
    distill: torch.Tensor
    align: torch.Tensor
    total: torch.Tensor


def run_train(config: TrainConfig) -> Path:
    """Train an adapter; returns the folder of the final adapter (`<out>/adapter`)."""
    run = setup(config)
    try:
        train(run)
        return cleanup(run)
    finally:
        run.loader.close()


# ------------------------------------------------------------------------------------------------------------ setup


def setup(config: TrainConfig) -> TrainingRun:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    device = resolve_device(config.device)  # builds accelerate's process state for it, before the Accelerator
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device.type == "cpu")
    out = Path(config.out)
    _check_out(out, config.resume)
    resumed = find_checkpoint(out, config.resume) if config.resume else None
    position = checkpoint.read_position(resumed) if resumed else None
    store = FeatureStore.open(config.store, mode="r", storage_options=config.storage_options)
    manifest = store.manifest
    check_manifest(manifest, config.sd, store.url)
    teacher = resolve_teacher(config.llm_layer, manifest, store.url)
    if config.random_flip and not manifest.flip_variants:
        raise ValueError(
            f"--random-flip: {store.url} holds no flipped latents; extract with --flip-variants or drop --random-flip"
        )
    complete = store.complete_indices()
    training_shards, held_out_units = hold_out(store.shard_ranges(), complete, config.val_fraction, config.seed)
    units = read_units(training_shards, complete, accelerator.num_processes)
    total_steps = _total_steps(config, units, accelerator.num_processes)
    settings = _run_settings(config, store, accelerator, total_steps, held_out_units)
    if resumed:  # before anything loads: a refused resume costs nothing
        _check_settings(resumed, position.settings, settings)
        checkpoint.verify(resumed, position, _checkpoint_files(accelerator))
    if config.features_only:
        accelerator.print("features-only: --denoise-weight 0, so the UNet is not loaded and no latent is read")
    loader = _build_loader(config, store, accelerator, units)
    loader.prepare(*((position.epoch, position.batch) if resumed else (0, 0)))  # reads ahead while the UNet loads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        adapter = SURAdapter(_adapter_config(config, manifest, accelerator.device)).train()
    unet, noise_scheduler = (None, None) if config.features_only else _load_unet(config, accelerator)
    held_out = _held_out(config, store, accelerator, held_out_units, loader, noise_scheduler)
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    # fused: one kernel for all parameters, on CUDA and on the CPU (the adapter's step is launch-bound; docs/train.md)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    # Stepped by hand once per optimizer step: accelerate's prepared scheduler would step once per process.
    lr_scheduler = _lr_scheduler(config, optimizer, total_steps)
    adapter, optimizer = accelerator.prepare(adapter, optimizer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text(json.dumps({"kind": RUN_KIND, "sur_cache_version": __version__}) + "\n")
    run = TrainingRun(
        config,
        settings,
        accelerator,
        loader,
        adapter,
        unet,
        noise_scheduler,
        optimizer,
        lr_scheduler,
        StepLog(out / LOG_FILE, enabled=accelerator.is_main_process),
        total_steps,
        held_out=held_out,
        teacher=teacher,
    )
    compile_adapter_terms(run, resolve_compile(config.compile, accelerator.device))
    # Seeded last, so that nothing setup loads (online models, the UNet) shifts the dropout stream.
    set_seed(config.seed)
    if resumed:
        _restore(run, resumed, position)
    elif accelerator.is_main_process:
        (out / LOG_FILE).unlink(missing_ok=True)
    if accelerator.is_main_process:
        (out / "run.json").write_text(json.dumps(_run_record(run), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return run


def _check_out(out: Path, resume: str | None) -> None:
    """--out is empty, new, or a sur-cache run (marked); a run with checkpoints is only continued by --resume."""
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if found and not (out / RUN_MARKER).is_file():
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ValueError(
            f"--out {out} is not empty ({shown}) and holds no sur-cache run ({RUN_MARKER} missing), so train would "
            "overwrite files it did not write; pass a new or empty --out"
        )
    if not resume and any((out / CHECKPOINTS).glob("step_*")):
        raise ValueError(
            f"--out {out} holds the checkpoints of an earlier run; continue it with --resume latest, "
            "or pass a new --out"
        )


def _run_settings(
    config: TrainConfig, store: FeatureStore, accelerator, total_steps: int, held_out: list[ReadUnit]
) -> dict[str, Any]:
    """What the run means, as JSON values: every TrainConfig field but RESUME_MAY_CHANGE, and RESOLVED_SETTINGS."""
    typed = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name not in RESUME_MAY_CHANGE + _NOT_COMPARED_AS_TYPED
    }
    for name in ("sd", "data"):  # a local folder by its absolute path, so `./sd` and `/abs/sd` compare equal
        if typed[name] is not None and Path(typed[name]).exists():
            typed[name] = str(Path(typed[name]).resolve())
    resolved = {
        "store_identity": store.identity,
        "device": accelerator.device.type,
        "attention_backend": resolve_attention(config.attention, accelerator.device),
        "processes": accelerator.num_processes,
        # cosine and linear decay over the run's length; the constant schedules do not depend on it
        "lr_schedule_steps": total_steps if config.lr_schedule != "constant" else None,
        "held_out": [[unit.start, unit.stop] for unit in held_out],
    }
    return json.loads(json.dumps({**typed, **resolved}, default=str))


def _check_settings(folder: Path, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    recorded = {**_ADDED_SETTINGS, **recorded}
    keys = list(now) + [key for key in recorded if key not in now and key not in _RETIRED_SETTINGS]
    changed = [
        f"{RESOLVED_SETTINGS.get(key, '--' + key.replace('_', '-'))}: checkpoint {recorded.get(key)!r}, "
        f"now {now.get(key)!r}"
        for key in keys
        if recorded.get(key) != now.get(key)
    ]
    if changed:
        may_change = [f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE]
        raise ValueError(
            f"--resume {folder}: these settings differ from the checkpoint's, so the resumed run would not be the "
            "same run:\n  " + "\n  ".join(changed) + "\nRun with the checkpoint's settings (its "
            f"{POSITION_FILE} lists them), or start a new --out; only {', '.join(may_change[:-1])} and "
            f"{may_change[-1]} may change on a resume."
        )


def _build_loader(config: TrainConfig, store: FeatureStore, accelerator, units: list[ReadUnit]) -> FeatureLoader:
    world, rank = accelerator.num_processes, accelerator.process_index
    names = array_names(latents=not config.features_only, flips=config.random_flip, sdxl=_is_sdxl(store.manifest))
    if config.online:
        from sur_cache.online import OnlineSource

        source = OnlineSource(
            store.manifest,
            config.data,
            config.sd,
            llm=config.llm,
            latents=not config.features_only,
            device=accelerator.device,
        )
    elif config.preload != "none":
        device = accelerator.device if config.preload == "device" else torch.device("cpu")
        source = PreloadedSource(store, units, names, device)
    elif config.mapped_reads and MappedSource.maps(store, names):
        source = MappedSource(store, names, processes_per_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    else:
        source = StoreSource(store, units, names, capacity=2 * config.buffer_shards, readers=config.read_workers)
    settings = LoaderSettings(
        batch_size=config.batch_size,
        seed=config.seed,
        buffer_units=config.buffer_shards,
        random_flip=config.random_flip,
        latents=not config.features_only,
        scaling_factor=store.manifest.vae_scaling_factor,
        rank=rank,
        world_size=world,
        sdxl_target_size=_sdxl_target_size(store.manifest),
    )
    return FeatureLoader(source, units, settings, accelerator.device)


def _is_sdxl(manifest: Manifest) -> bool:
    return manifest.sd_kind == "sdxl"


def _sdxl_target_size(manifest: Manifest) -> int | None:
    """The time ids' target size for an SDXL store (its square resolution); None for SD 1.x/2.x."""
    return manifest.resolution if _is_sdxl(manifest) else None


def _held_out(
    config: TrainConfig, store: FeatureStore, accelerator, units: list[ReadUnit], loader, noise_scheduler
) -> HeldOut | None:
    """What validation reads: this process's share of the held-out shards, read in the loop when validating (no
    reader process, no preloaded copy: validation is rare), or, online, computed by the training source itself
    (whose models are loaded once)."""
    if not units:
        return None
    share = process_share(units, accelerator.process_index, accelerator.num_processes)
    if config.online:
        source = loader.source
    else:
        names = array_names(latents=not config.features_only, flips=False, sdxl=_is_sdxl(store.manifest))
        source = StoreSource(store, share, names, capacity=2, readers=0)
    timesteps = None if noise_scheduler is None else noise_scheduler.config.num_train_timesteps
    manifest = store.manifest
    draws = DrawSettings(config.seed, manifest.vae_scaling_factor, timesteps, _sdxl_target_size(manifest))
    return HeldOut(units, share, source, draws)


def _adapter_config(config: TrainConfig, manifest: Manifest, device: torch.device) -> AdapterConfig:
    return AdapterConfig(
        width=manifest.clip_width,
        llm_width=manifest.llm_width,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        feedforward=config.feedforward,
        dropout=config.dropout,
        adapter_weight=config.adapter_weight,
        attention=resolve_attention(config.attention, device),
        reference_compat=config.reference_compat,
        freeze_llm_proj=config.freeze_llm_proj,
        llm_proj_seed=config.seed,
    )


def _load_unet(config: TrainConfig, accelerator):
    """The frozen UNet (eval, no grad, in the mixed-precision dtype) and the training noise scheduler."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    unet = UNet2DConditionModel.from_pretrained(config.sd, subfolder="unet", torch_dtype=dtype)
    unet.requires_grad_(False)
    unet.eval().to(accelerator.device)
    return unet, DDPMScheduler.from_pretrained(config.sd, subfolder="scheduler")


def _total_steps(config: TrainConfig, units: list[ReadUnit], world_size: int) -> int:
    """--max-steps; or the optimizer steps in --epochs epochs (both: whichever ends first; neither: 5000)."""

    def micro_batches(epoch: int) -> int:
        return batches_per_epoch(
            units,
            batch_size=config.batch_size,
            seed=config.seed,
            epoch=epoch,
            world_size=world_size,
            buffer_units=config.buffer_shards,
        )

    caps = []
    if config.total_steps_cap is not None:
        caps.append(config.total_steps_cap)
    if config.epochs is not None:
        caps.append(sum(micro_batches(e) for e in range(config.epochs)) // config.gradient_accumulation)
    steps = min(caps)
    if steps < 1:
        raise ValueError(
            f"--epochs {config.epochs} gives {micro_batches(0)} micro-batches per epoch, fewer than one "
            f"optimizer step of --gradient-accumulation {config.gradient_accumulation}; raise --epochs or lower it"
        )
    return steps


def _lr_scheduler(config: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    name = config.lr_schedule
    if name == "constant" and config.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=max(total_steps, 1))


def _run_record(run: TrainingRun) -> dict[str, Any]:
    config = run.config
    return {
        "sur_cache_version": __version__,
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "world_size": run.accelerator.num_processes,
        "device": str(run.accelerator.device),
        "total_steps": run.total_steps,
        "features_only": config.features_only,
        "attention": _unwrap(run).config.attention,
        "compile": run.compile_mode,
        "gradient_to_adapter_through_unet": not (config.features_only or config.detach_unet_input),
        "samples_per_step": run.samples_per_step,
        "validation": None
        if run.held_out is None
        else {
            "fraction": config.val_fraction,
            "every": config.validation_interval,
            **run.held_out.record(),
        },
    }


# ------------------------------------------------------------------------------------------------------------ train


def train(run: TrainingRun) -> None:
    """Optimizer steps from `run.step` to `run.total_steps`, logging each and checkpointing every N."""
    config, accelerator = run.config, run.accelerator
    batches = run.loader.batches(run.epoch, run.batch)
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        unit="step",
        desc="train",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    while run.step < run.total_steps:
        started = time.perf_counter()
        lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        terms, grad_norm = optimizer_step(run, batches)
        run.step += 1
        record = {
            "kind": STEP,
            "step": run.step,
            "epoch": run.epoch,
            **terms,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": run.samples_per_step / (time.perf_counter() - started),
        }
        run.log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{terms['total']:.4g}", lr=f"{record['lr']:.2e}")
        last = run.step == run.total_steps
        # Before the checkpoint of the same step: a resume from it never misses a validation, and truncating the
        # log after it drops a validation the interrupted run wrote for a later step.
        if run.held_out is not None and (run.step % config.validation_interval == 0 or last):
            run.log.write(validate(run))
        if run.step % config.checkpoint_every == 0 or last:
            save_checkpoint(run)
    bar.close()


def optimizer_step(run: TrainingRun, batches) -> tuple[dict[str, float | None], float]:
    """`gradient_accumulation` micro-batches, one clipped AdamW step; returns the mean loss terms over processes.

    Raises NonFiniteError at a non-finite loss (on any process) or gradient norm, naming the step and the samples.
    """
    config, accelerator = run.config, run.accelerator
    sums: dict[str, torch.Tensor] = {}
    finite, samples = [], []  # per micro-batch; the flags are read only when the step's loss is not finite
    for micro in range(config.gradient_accumulation):
        batch, run.lookahead = run.lookahead or next(batches), None
        last = micro == config.gradient_accumulation - 1
        with nullcontext() if last else accelerator.no_sync(run.adapter):
            with accelerator.autocast():
                terms = compute_losses(run, batch)
            accelerator.backward(terms.total / config.gradient_accumulation)
        for name, value in vars(terms).items():
            if value is not None:
                sums[name] = sums.get(name, 0.0) + value.detach().float() / config.gradient_accumulation
        finite.append(torch.isfinite(terms.total.detach()))
        samples.append(batch.samples)
        run.epoch, run.batch = batch.epoch, batch.index + 1
    trainable = [p for p in run.adapter.parameters() if p.requires_grad]
    grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
    run.optimizer.step()
    # fp16's loss scaler skips a step whose gradient overflowed (and lowers the scale): expected, not a fault
    skipped = accelerator.optimizer_step_was_skipped
    if not skipped:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # Fetch the next micro-batch before the sync below, so its host work (reads, gather, copies) overlaps this
    # step's GPU work; it is a pure function of its position, so this changes no number. None after the last step.
    if run.step + 1 < run.total_steps:
        run.lookahead = next(batches)
    # One reduction and one device sync per step for everything logged (the small steps are launch-bound).
    names = list(sums)
    values = torch.stack([sums[name] for name in names] + [torch.as_tensor(grad_norm, device=sums["total"].device)])
    values = accelerator.reduce(values.float(), reduction="mean").tolist()
    means = dict(zip(names, values, strict=False))
    if not math.isfinite(means["total"]) or not (math.isfinite(values[-1]) or skipped):
        raise NonFiniteError(_non_finite(run, means["total"], values[-1], finite, samples))
    return {name: means.get(name) for name in ("denoise", "distill", "align", "total")}, values[-1]


def _non_finite(run: TrainingRun, loss: float, grad_norm: float, finite: list[torch.Tensor], samples: list) -> str:
    """Which micro-batch of this process went non-finite (the mean over processes tells every process to stop)."""
    flags, process = torch.stack(finite).tolist(), run.accelerator.process_index
    bad = [i for i, ok in enumerate(flags) if not ok]
    if bad:
        where = "; ".join(f"micro-batch {i + 1} of {len(flags)}: samples {samples[i].tolist()}" for i in bad)
        what = f"the loss is not finite on process {process} ({where})"
    elif not math.isfinite(loss):
        what = f"the loss is not finite on another process than {process} (its own error names the samples)"
    else:
        every = [int(i) for batch in samples for i in batch]
        what = f"the gradient norm is {grad_norm} though every loss is finite (samples {every} on process {process})"
    return (
        f"step {run.step + 1}: {what}. Stopped before saving anything of this step; the last checkpoint holds "
        f"finite weights. A sample's features may be NaN or infinite (`sur-cache verify {run.config.store}` names "
        "them), or the training diverged (start a new --out with a lower --lr, or --mixed-precision bf16 rather "
        "than fp16)."
    )


def compute_losses(run: TrainingRun, batch) -> LossTerms:
    """The three terms of one micro-batch; the noise and timesteps continue the batch's seeded generator."""
    draws = None
    if run.unet is not None:
        latents, steps = batch.latents, run.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=batch.generator, device=latents.device)
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=batch.generator, device=latents.device)
        draws = (noise, timesteps)
    mark_step(run.compile_mode)
    adapted = run.adapter_terms(batch.clip_simple, batch.clip_complex, run.teacher.select(batch.llm))
    return loss_terms(run, batch, adapted, draws)


def adapter_terms(
    adapter: torch.nn.Module, projection: torch.nn.Module, clip_simple, clip_complex, llm
) -> tuple[AdapterOutput, torch.Tensor, torch.Tensor]:
    """The adapter's output and its two KL terms (distillation, alignment): what `--compile` compiles."""
    out = adapter(clip_simple)
    return out, distillation_loss(projection(llm), out.h), alignment_loss(clip_complex, out.embedding)


def compile_adapter_terms(run: TrainingRun, mode: str) -> None:
    """Set `run.adapter_terms` to `adapter_terms` of the run's (prepared) adapter, compiled in `mode`."""
    adapter, projection = run.adapter, _unwrap(run).llm_proj

    def terms(clip_simple, clip_complex, llm):
        return adapter_terms(adapter, projection, clip_simple, clip_complex, llm)

    run.compile_mode, run.adapter_terms = mode, compiled(terms, mode)


def loss_terms(
    run: TrainingRun,
    batch,
    adapted: tuple[AdapterOutput, torch.Tensor, torch.Tensor],
    draws: tuple[torch.Tensor, torch.Tensor] | None,
) -> LossTerms:
    """The terms of a batch given `adapter_terms`' result and, unless features-only, the noise and timesteps."""
    config = run.config
    out, distill, align = adapted
    total = config.llm_weight * distill + config.align_weight * align
    denoise = None
    if run.unet is not None:
        embedding = out.embedding.detach() if config.detach_unet_input else out.embedding
        denoise = denoising_term(run, batch.latents, embedding, *draws, batch.added_cond)
        total = total + config.denoise_weight * denoise
    return LossTerms(denoise, distill, align, total)


def denoising_term(
    run: TrainingRun,
    latents: torch.Tensor,
    embedding: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    added_cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MSE of the frozen UNet's prediction given the adapted embedding (epsilon or v, per the scheduler); an SDXL
    UNet also gets `added_cond` (`loader.sdxl_conditioning`)."""
    scheduler = run.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(scheduler, latents, noise, timesteps)
    dtype = run.unet.dtype
    extra = {} if added_cond is None else {"added_cond_kwargs": {k: v.to(dtype) for k, v in added_cond.items()}}
    pred = run.unet(noisy.to(dtype), timesteps, encoder_hidden_states=embedding.to(dtype), **extra).sample
    snr = compute_snr(scheduler, timesteps) if run.config.snr_gamma is not None else None
    return denoising_loss(pred, target, snr, run.config.snr_gamma, scheduler.config.prediction_type)


# ------------------------------------------------------------------------------------------------------- validation


def validate(run: TrainingRun) -> dict[str, Any]:
    """The validation record of the adapter as it is now (every process calls it: each measures its share of the
    held-out samples, and the sums are reduced). Eval mode, no gradient, fixed draws: the same adapter gives the
    same record. Raises NonFiniteError when a measure is not finite."""
    config, accelerator, adapter, held_out = run.config, run.accelerator, _unwrap(run), run.held_out
    fields = LOSS_FIELDS + COSINE_FIELDS
    sums = torch.zeros(len(fields) + 1, dtype=torch.float64, device=accelerator.device)  # + the sample count
    finite, samples = [], []  # per batch; read only when a mean is not finite
    adapter.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            batches = held_out_batches(held_out.source, held_out.share, config.batch_size, held_out.draws, sums.device)
            for batch in batches:
                teacher = run.teacher.select(batch.llm)
                adapted = adapter_terms(adapter, adapter.llm_proj, batch.clip_simple, batch.clip_complex, teacher)
                out = adapted[0]
                draws = None if batch.noise is None else (batch.noise, batch.timesteps)
                terms = loss_terms(run, batch, adapted, draws)
                losses = [getattr(terms, name) for name in LOSS_FIELDS]
                size = len(batch.samples)
                values = [torch.zeros((), device=sums.device) if v is None else v.float() * size for v in losses]
                values += [flat_cosine(out.embedding, batch.clip_complex).sum()]
                values += [flat_cosine(batch.clip_simple, batch.clip_complex).sum(), torch.tensor(float(size))]
                sums += torch.stack([v.to(sums.device, torch.float64) for v in values])
                finite.append(torch.isfinite(terms.total))
                samples.append(batch.samples)
    finally:
        adapter.train()
    totals = accelerator.reduce(sums, reduction="sum").tolist()
    means = {name: value / totals[-1] for name, value in zip(fields, totals, strict=False)}
    if not all(math.isfinite(value) for value in means.values()):
        raise NonFiniteError(_non_finite_validation(run, finite, samples))
    if run.unet is None:
        means["denoise"] = None
    weights = {"denoise": config.denoise_weight, "distill": config.llm_weight, "align": config.align_weight}
    return {
        "kind": VALIDATION,
        "step": run.step,
        "epoch": run.epoch,
        "samples": int(totals[-1]),
        **means,
        "weights": weights,
    }


def _non_finite_validation(run: TrainingRun, finite: list[torch.Tensor], samples: list) -> str:
    flags = torch.stack(finite).tolist() if finite else []
    bad = [int(i) for ok, batch in zip(flags, samples, strict=True) if not ok for i in batch]
    process = run.accelerator.process_index
    where = f"held-out samples {bad}" if bad else f"held-out samples of another process than {process}"
    return (
        f"step {run.step}: validation is not finite ({where}), though the training step was. A held-out sample's "
        f"features may be NaN or infinite (`sur-cache verify {run.config.store}` names them), or the adapter "
        "overflows in this precision (--mixed-precision bf16 rather than fp16)."
    )


def _unwrap(run: TrainingRun) -> SURAdapter:
    return run.accelerator.unwrap_model(run.adapter)


# ------------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(run: TrainingRun) -> Path:
    """`<out>/checkpoints/step_NNNNNNN/` as sur_cache/checkpoint.py describes: the main process writes the adapter,
    optimizer and lr schedule, every process its RNG states, and the main process position.json last."""
    accelerator = run.accelerator
    folder = Path(run.config.out) / CHECKPOINTS / f"step_{run.step:07d}"
    _require_finite(run, f"checkpoint {folder}")
    if accelerator.is_main_process:
        # A run resumed from an older checkpoint rewrites the later ones: incomplete until rewritten whole.
        (folder / POSITION_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.save_training_state(folder, _unwrap(run), run.optimizer, run.lr_scheduler, accelerator.scaler)
    checkpoint.save_rng_state(folder, accelerator.process_index, accelerator.device)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = checkpoint.checksums(folder, _checkpoint_files(accelerator))
        checkpoint.seal(folder, Position(run.step, run.epoch, run.batch, run.settings, files))
    accelerator.wait_for_everyone()
    return folder


def _checkpoint_files(accelerator) -> list[str]:
    return checkpoint.expected_files(accelerator.num_processes, scaler=accelerator.scaler is not None)


def _require_finite(run: TrainingRun, what: str) -> None:
    """Refuse to save an adapter with a NaN or infinite weight (every process checks: they hold the same weights)."""
    weights = _unwrap(run).state_dict()
    finite = torch.stack([torch.isfinite(w).all() for w in weights.values()]).tolist()
    bad = [name for name, ok in zip(weights, finite, strict=True) if not ok]
    if bad:
        raise NonFiniteError(
            f"step {run.step}: the adapter's weights are not finite ({', '.join(bad)}), so {what} is not written; "
            "the last checkpoint holds finite weights (--resume latest)"
        )


def find_checkpoint(out: Path, resume: str) -> Path:
    """`latest` -> the newest complete checkpoint under `<out>/checkpoints`; anything else is a checkpoint folder."""
    if resume != "latest":
        folder = Path(resume)
        if not (folder / POSITION_FILE).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: not a complete checkpoint folder ({POSITION_FILE} missing); pass "
                f"{out / CHECKPOINTS}/step_NNNNNNN or --resume latest"
            )
        return folder
    complete = sorted(p.parent for p in (Path(out) / CHECKPOINTS).glob(f"step_*/{POSITION_FILE}"))
    if not complete:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under {out / CHECKPOINTS}")
    return complete[-1]


def _restore(run: TrainingRun, folder: Path, position: Position) -> None:
    """Load a verified checkpoint whose settings match (setup checked both before building anything)."""
    accelerator = run.accelerator
    checkpoint.load_training_state(folder, _unwrap(run), run.optimizer, run.lr_scheduler, accelerator.scaler)
    checkpoint.load_rng_state(folder, accelerator.process_index, accelerator.device)
    run.step, run.epoch, run.batch = position.step, position.epoch, position.batch
    run.log.truncate_after(run.step)
    accelerator.print(f"resumed from {folder} at step {run.step} (epoch {run.epoch}, batch {run.batch})")


# ---------------------------------------------------------------------------------------------------------- cleanup


def cleanup(run: TrainingRun) -> Path:
    """Save the final adapter and plot the loss curves; returns the adapter folder."""
    accelerator = run.accelerator
    final = Path(run.config.out) / "adapter"
    accelerator.wait_for_everyone()
    _require_finite(run, f"the final adapter {final}")
    if accelerator.is_main_process:
        _unwrap(run).save_pretrained(final)
        log_path = Path(run.config.out) / LOG_FILE
        if log_path.exists() and log_path.stat().st_size:
            plot_losses(log_path, Path(run.config.out) / PLOT_FILE)
    accelerator.end_training()
    return final
