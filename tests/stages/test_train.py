"""Stage two end to end on the tiny models: the CLI run folder, exact resume, no encoder ever loaded, online equals
cached, the fidelity options, manifest refusal, and two processes under torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sur_cache.adapter import SURAdapter
from sur_cache.cli import main
from sur_cache.config import ExtractConfig, TrainConfig
from sur_cache.loader import FeatureLoader, MappedSource, StoreSource, read_units
from sur_cache.stages.extract import run_extract
from sur_cache.stages.train import _build_loader, compute_losses, run_train, setup
from sur_cache.store import FeatureStore
from sur_cache.tiny_models import TINY_RESOLUTION
from sur_cache.train_log import read_log

VENV_BIN = Path(sys.executable).parent
SMALL_ADAPTER = {"feedforward": 64, "num_heads": 4}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator (cpu or cuda, its own precision), as a fresh `sur-cache train` process
    would; accelerate keeps one process-wide state, so reset it around each test (its own test suite does too)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def store(tiny_models, demo_dataset, tmp_path_factory):
    """A float32 store of the 12 demo samples with flipped latents, in shards of 4."""
    out = tmp_path_factory.mktemp("train_store") / "store.zarr"
    config = ExtractConfig(
        data=demo_dataset,
        out=str(out),
        sd=str(tiny_models.sd),
        llm=str(tiny_models.llm),
        resolution=TINY_RESOLUTION,
        batch_size=4,
        shard_rows=4,
        num_workers=0,
        llm_8bit=False,
        llm_dtype="float32",
        store_dtype="float32",
        llm_layer=1,
        flip_variants=True,
        progress=False,
        device="cpu",  # float32 CLIP and VAE on any machine, so online (on the CPU) recomputes the same numbers
    )
    run_extract(config)
    return out


def _config(store, tiny_models, out, **overrides) -> TrainConfig:
    options = {
        "store": str(store),
        "sd": str(tiny_models.sd),
        "out": Path(out),
        "batch_size": 2,
        "gradient_accumulation": 2,
        "max_steps": 4,
        "checkpoint_every": 2,
        "device": "cpu",
        "read_workers": 0,  # the CLI test runs a reader process (--no-mapped-reads)
        **SMALL_ADAPTER,
    }
    return TrainConfig(**{**options, **overrides})


def _cli(store, tiny_models, out, *extra) -> list[str]:
    args = ["train", "--store", str(store), "--sd", str(tiny_models.sd), "--out", str(out), "--device", "cpu"]
    args += ["--batch-size", "2", "--gradient-accumulation", "2", "--feedforward", "64", "--num-heads", "4"]
    args += ["--read-workers", "0"]
    return args + list(extra)


def _losses(folder) -> list[tuple]:
    return [
        (r["step"], r["denoise"], r["distill"], r["align"], r["total"]) for r in read_log(folder / "train_log.jsonl")
    ]


@pytest.mark.parametrize("mapped_reads, kind", [(True, MappedSource), (False, StoreSource)])
def test_a_local_uncompressed_store_is_read_through_maps_unless_told_not_to(
    store, tiny_models, tmp_path, mapped_reads, kind
):
    config = _config(store, tiny_models, tmp_path / "run", mapped_reads=mapped_reads)
    opened = FeatureStore.open(str(store), mode="r")
    accelerator = types.SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    loader = _build_loader(config, opened, accelerator, read_units(opened.shard_ranges(), opened.complete_indices()))
    assert type(loader.source) is kind
    loader.close()


def test_cli_run_writes_adapter_checkpoints_log_and_plot(store, tiny_models, tmp_path):
    out = tmp_path / "run"
    reader = ("--read-workers", "1", "--no-mapped-reads")  # the reader process; the other tests read through maps
    args = _cli(store, tiny_models, out, "--max-steps", "3", "--checkpoint-every", "2", *reader)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    adapter = SURAdapter.from_pretrained(out / "adapter")
    assert adapter.config.width == 32 and adapter.config.adapter_weight == 0.1 and adapter.config.feedforward == 64
    records = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert set(record) >= {"denoise", "distill", "align", "total", "lr", "samples_per_s", "grad_norm"}
        expected = record["denoise"] + 1e-5 * (record["distill"] + record["align"])
        assert record["total"] == pytest.approx(expected, rel=1e-5)
        assert record["lr"] == 1e-5
    # checkpoints at step 2 and at the end; each complete with adapter, accelerate state and position
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_0000002", "step_0000003"]
    position = json.loads((out / "checkpoints" / "step_0000002" / "position.json").read_text())
    assert position["step"] == 2 and position["batch"] == 4  # 2 steps x 2 micro-batches
    assert (out / "checkpoints" / "step_0000002" / "adapter" / "model.safetensors").is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["gradient_to_adapter_through_unet"] and run["attention"] == "eager" and run["samples_per_step"] == 4
    again = CliRunner().invoke(main, _cli(store, tiny_models, out, "--max-steps", "3"))
    assert again.exit_code != 0 and "--resume latest" in again.output  # a second run never mixes into the first


def test_resume_continues_exactly_like_an_uninterrupted_run(store, tiny_models, tmp_path):
    # 6 micro-batches per epoch (12 samples / batch 2): 4 steps x 2 cross into epoch 1, with random flips.
    whole = tmp_path / "whole"
    run_train(_config(store, tiny_models, whole, random_flip=True))
    assert read_log(whole / "train_log.jsonl")[-1]["epoch"] == 1
    broken = tmp_path / "broken"
    run_train(_config(store, tiny_models, broken, random_flip=True, max_steps=2))
    with open(broken / "train_log.jsonl", "a") as log:  # a step the crash left behind, after the checkpoint
        log.write(json.dumps({"step": 3, "denoise": 0, "distill": 0, "align": 0, "total": 0}) + "\n")
    # what may change on a resume changes no number: another reader, another checkpoint interval
    allowed = {"preload": "cpu", "checkpoint_every": 3}
    run_train(_config(store, tiny_models, broken, random_flip=True, resume="latest", **allowed))
    assert _losses(broken) == _losses(whole)  # exactly: same batches, draws, dropout, optimizer state
    a, b = (SURAdapter.from_pretrained(folder / "adapter").state_dict() for folder in (whole, broken))
    assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(ValueError, match="--batch-size: checkpoint 2, now 1"):
        run_train(_config(store, tiny_models, broken, random_flip=True, resume="latest", batch_size=1))


def test_a_rewritten_checkpoint_is_incomplete_until_written_whole(store, tiny_models, tmp_path, monkeypatch):
    from sur_cache import checkpoint
    from sur_cache.stages.train import find_checkpoint

    out, options = tmp_path / "run", {"max_steps": 4, "denoise_weight": 0.0, "preload": "cpu"}
    run_train(_config(store, tiny_models, out, **options))

    def crash(*args, **kwargs):
        raise RuntimeError("crash while saving")

    monkeypatch.setattr(checkpoint, "save_rng_state", crash)
    with pytest.raises(RuntimeError, match="crash while saving"):  # resumed at step 2, crashes rewriting step 4
        run_train(_config(store, tiny_models, out, resume=str(out / "checkpoints" / "step_0000002"), **options))
    assert find_checkpoint(out, "latest").name == "step_0000002"


def _forbid(monkeypatch, *targets) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("stage two must not load this model")

    for owner, name in targets:
        monkeypatch.setattr(owner, name, refuse)


def test_a_cached_run_never_loads_the_llm_clip_or_vae(store, tiny_models, tmp_path, monkeypatch):
    import diffusers
    import transformers

    # The SD folder without text encoder and VAE weights (their config.json stays): nothing can read them.
    sd = tmp_path / "sd"
    shutil.copytree(tiny_models.sd, sd)
    for sub in ("text_encoder", "vae"):
        for weights in (sd / sub).glob("*.safetensors"):
            weights.unlink()
    _forbid(
        monkeypatch,
        (transformers.CLIPTextModel, "__init__"),
        (transformers.CLIPTextModel, "from_pretrained"),
        (transformers.AutoModel, "from_pretrained"),
        (transformers.LlamaModel, "__init__"),
        (diffusers.AutoencoderKL, "__init__"),
        (diffusers.AutoencoderKL, "from_pretrained"),
    )
    config = _config(store, tiny_models, tmp_path / "run", max_steps=1)
    run_train(dataclasses.replace(config, sd=str(sd)))
    assert len(read_log(tmp_path / "run" / "train_log.jsonl")) == 1
    # features-only (from preloaded text features) skips the UNet as well, and says so in the log
    import diffusers

    _forbid(monkeypatch, (diffusers.UNet2DConditionModel, "from_pretrained"))
    run_train(dataclasses.replace(config, sd=str(sd), out=tmp_path / "features", denoise_weight=0.0, preload="cpu"))
    record = read_log(tmp_path / "features" / "train_log.jsonl")[0]
    assert record["denoise"] is None and record["total"] == pytest.approx(1e-5 * (record["distill"] + record["align"]))
    assert json.loads((tmp_path / "features" / "run.json").read_text())["features_only"]


def test_the_run_fetches_exactly_the_micro_batches_it_trains_on(store, tiny_models, tmp_path):
    from sur_cache.stages.train import train

    run = setup(_config(store, tiny_models, tmp_path / "run", max_steps=2, denoise_weight=0.0, preload="cpu"))
    fetched = []
    fetch = run.loader.source.fetch
    run.loader.source.fetch = lambda indices, flipped: fetched.append(indices.tolist()) or fetch(indices, flipped)
    train(run)
    trained = list(fetched)
    assert len(trained) == 4  # 2 steps x 2 micro-batches: no batch is read ahead past the last step
    assert trained == [b.samples.tolist() for b, _ in zip(run.loader.batches(), range(4), strict=False)]


def _first_grads(config: TrainConfig, fc_weight: torch.Tensor) -> tuple[dict, dict]:
    """Loss terms and adapter gradients of the first micro-batch, with fc.weight set (so every layer gets gradient)."""
    run = setup(config)
    adapter = run.accelerator.unwrap_model(run.adapter)
    with torch.no_grad():
        adapter.fc.weight.copy_(fc_weight)
    terms = compute_losses(run, next(run.loader.batches()))
    terms.total.backward()
    if run.unet is not None:  # the UNet stays frozen: the gradient passes through it to the adapter only
        assert all(not p.requires_grad and p.grad is None for p in run.unet.parameters())
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in adapter.parameters() if p.requires_grad}
    values = {name: value.item() for name, value in vars(terms).items() if value is not None}
    return values, {name: p.grad.clone() for name, p in adapter.named_parameters() if p.grad is not None}


def test_online_features_equal_cached_ones(store, tiny_models, demo_dataset, tmp_path):
    fc_weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    cached = _config(store, tiny_models, tmp_path / "cached", random_flip=True, dropout=0.0)
    online = dataclasses.replace(cached, out=tmp_path / "online", online=True, data=demo_dataset)
    cached_terms, cached_grads = _first_grads(cached, fc_weight)
    online_terms, online_grads = _first_grads(online, fc_weight)
    assert online_terms == pytest.approx(cached_terms, rel=1e-5, abs=1e-6)
    assert set(online_grads) == set(cached_grads) and "attention.query_layer.weight" in cached_grads
    for name, grad in cached_grads.items():
        torch.testing.assert_close(online_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_online_refuses_an_llm_of_another_width(store, tiny_models, demo_dataset, monkeypatch):
    import sur_cache.online
    from sur_cache.models import load_llm
    from sur_cache.store import FeatureStore

    def wider(*args, **kwargs):
        tokenizer, model = load_llm(*args, **kwargs)
        model.config.hidden_size = 2 * model.config.hidden_size
        return tokenizer, model

    monkeypatch.setattr(sur_cache.online, "load_llm", wider)
    manifest = FeatureStore.open(str(store), mode="r").manifest
    with pytest.raises(ValueError, match="its hidden size is 96, the store's LLM features are 48 wide"):
        sur_cache.online.OnlineSource(
            manifest, demo_dataset, str(tiny_models.sd), llm=str(tiny_models.llm), latents=False, device="cpu"
        )


def test_detach_unet_input_leaves_only_the_kl_terms_training(store, tiny_models, tmp_path):
    fc_weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) * 0.1
    base = _config(store, tiny_models, tmp_path / "a", dropout=0.0, llm_weight=1.0, align_weight=1.0)
    _, through = _first_grads(base, fc_weight)
    _, detached = _first_grads(dataclasses.replace(base, detach_unet_input=True), fc_weight)
    _, kl_only = _first_grads(dataclasses.replace(base, denoise_weight=0.0), fc_weight)
    for name in kl_only:
        torch.testing.assert_close(detached[name], kl_only[name], msg=name)
    assert not torch.allclose(through["fc.weight"], kl_only["fc.weight"])  # the UNet's gradient reached the adapter


def test_freeze_llm_proj_and_the_lr_schedule(store, tiny_models, tmp_path):
    schedule = {"lr_schedule": "cosine", "warmup_steps": 2, "max_steps": 3, "lr": 1e-2}
    run_train(_config(store, tiny_models, tmp_path / "run", freeze_llm_proj=True, **schedule))
    # linear warmup over 2 steps, then the cosine's first value: the rate each step used
    assert [r["lr"] for r in read_log(tmp_path / "run" / "train_log.jsonl")] == pytest.approx([0.0, 5e-3, 1e-2])
    trained = SURAdapter.from_pretrained(tmp_path / "run" / "adapter")
    initial = SURAdapter(dataclasses.replace(trained.config))
    assert torch.equal(trained.llm_proj.weight, initial.llm_proj.weight)
    assert not torch.equal(trained.fc.weight, initial.fc.weight)


def test_a_store_for_another_sd_model_is_refused(store, tiny_models, tmp_path):
    sd = tmp_path / "sd"
    shutil.copytree(tiny_models.sd, sd, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((sd / "text_encoder" / "config.json").read_text())
    (sd / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 768}))
    result = CliRunner().invoke(main, ["train", "--store", str(store), "--sd", str(sd), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "clip_width: the SD model" in result.output and "768" in result.output and "has 32" in result.output


def test_bad_options_are_reported_together(store, tiny_models, tmp_path):
    args = _cli(store, tiny_models, tmp_path / "r", "--batch-size", "0", "--llm", "x", "--snr-gamma", "-1")
    result = CliRunner().invoke(main, [*args, "--val-fraction", "1.5", "--val-every", "0"])
    assert result.exit_code != 0 and "invalid train options" in result.output
    for problem in (
        "--batch-size must be >= 1, got 0",
        "--llm are read by --online only",
        "--snr-gamma must be > 0",
        "--val-fraction must be in [0, 1), got 1.5",
        "--val-every must be >= 1, got 0",
    ):
        assert problem in result.output
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="pass --data DATASET_DIR"):
        _config(store, tiny_models, tmp_path / "r", online=True)
    with pytest.raises(ValueError, match="--random-flip picks flipped latents"):
        _config(store, tiny_models, tmp_path / "r", denoise_weight=0.0, random_flip=True)
    with pytest.raises(ValueError, match="--val-every validates on the held-out shards: add --val-fraction"):
        _config(store, tiny_models, tmp_path / "r", val_every=2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str]) -> None:
    """`torchrun --nproc_per_node 2 $(which sur-cache) ...`: the console script itself, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    result = subprocess.run(command + [str(VENV_BIN / "sur-cache"), *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_under_torchrun_split_the_store_and_average_their_losses(store, tiny_models, tmp_path):
    out = tmp_path / "two"
    options = ["--max-steps", "2", "--checkpoint-every", "1", "--dropout", "0", "--val-fraction", "0.34"]
    _torchrun(_cli(store, tiny_models, out, *options))
    run_record = json.loads((out / "run.json").read_text())
    assert run_record["world_size"] == 2 and run_record["samples_per_step"] == 8
    assert (out / "checkpoints" / "step_0000002" / "rng" / "process_1.json").is_file()
    # Resumed under two processes (each verifies the checkpoint and restores its own RNG file): the same step 2.
    resumed = tmp_path / "resumed"
    _torchrun(_cli(store, tiny_models, resumed, *options, "--resume", str(out / "checkpoints" / "step_0000001")))
    assert _losses(resumed) == _losses(out)[1:]
    # --compile default under two processes (DDP over gloo, the compiled adapter inside it): the eager losses and
    # validations, to rounding.
    compiled = tmp_path / "compiled"
    _torchrun(_cli(store, tiny_models, compiled, *options, "--compile", "default"))
    assert json.loads((compiled / "run.json").read_text())["compile"] == "default"
    for a, b in zip(_losses(out), _losses(compiled), strict=True):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-4)
    for a, b in zip(*(read_log(folder / "train_log.jsonl", "validation") for folder in (out, compiled)), strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-4)
    # Step 1 is fully determined by the data split: the mean over both ranks' two micro-batches, computed here with
    # one process playing each rank in turn (rank r reads its own disjoint shards).
    run = setup(_config(store, tiny_models, tmp_path / "one", dropout=0.0, **VALIDATED))
    totals = []
    for rank in range(2):
        settings = dataclasses.replace(run.loader.settings, rank=rank, world_size=2)
        loader = FeatureLoader(run.loader.source, run.loader.units, settings, "cpu")
        batches = loader.batches()
        with torch.no_grad():
            totals += [compute_losses(run, next(batches)).total.item() for _ in range(2)]
    first = read_log(out / "train_log.jsonl")[0]
    assert first["total"] == pytest.approx(sum(totals) / 4, rel=1e-5)
    # Validation: each process measured half the held-out shard and the sums were reduced; one process measuring
    # all of it with the final adapter gives the same numbers, to rounding.
    from sur_cache.stages.train import validate

    trained = SURAdapter.from_pretrained(out / "adapter")
    run.accelerator.unwrap_model(run.adapter).load_state_dict(trained.state_dict())
    run.step = 2
    final = read_log(out / "train_log.jsonl", "validation")[-1]
    alone = validate(run)
    assert final["step"] == 2 and final["samples"] == alone["samples"] == 4
    for name in ("denoise", "distill", "align", "total", "cosine_adapted_complex", "cosine_simple_complex"):
        assert final[name] == pytest.approx(alone[name], rel=1e-5), name
    run.loader.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_fused_run_resumes_to_the_same_losses(store, tiny_models, tmp_path):
    """The CUDA-only paths: bf16 autocast and UNet, the fused kernel (attention auto), fused AdamW, pinned copies,
    device-side draws, the reader process; resume matches to rounding (cuDNN backward may not be bitwise stable)."""
    options = {"device": "cuda", "mixed_precision": "bf16", "attention": "auto", "read_workers": 1, "random_flip": True}
    options |= VALIDATED  # validation under bf16 autocast, with per-sample CUDA generators
    whole = tmp_path / "whole"
    run_train(_config(store, tiny_models, whole, **options))
    assert json.loads((whole / "run.json").read_text())["attention"] == "fused"
    broken = tmp_path / "broken"
    run_train(_config(store, tiny_models, broken, max_steps=2, **options))
    run_train(_config(store, tiny_models, broken, resume="latest", **options))
    for a, b in zip(_losses(whole), _losses(broken), strict=True):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-3)
    validations = [read_log(folder / "train_log.jsonl", "validation") for folder in (whole, broken)]
    assert [r["step"] for r in validations[0]] == [r["step"] for r in validations[1]] == [2, 4]
    for a, b in zip(*validations, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-3) and math.isfinite(a["cosine_adapted_complex"])


def test_v_prediction_and_min_snr_follow_the_scheduler_config(store, tiny_models, tmp_path):
    """The denoising term of one batch, recomputed by hand from the batch's position-seeded draws."""
    from sur_cache.loader import DRAW_STREAM, batch_generator, sample_latents
    from sur_cache.losses import compute_snr

    sd = tmp_path / "sd"
    shutil.copytree(tiny_models.sd, sd, ignore=shutil.ignore_patterns("text_encoder", "vae"))
    shutil.copytree(
        tiny_models.sd / "text_encoder", sd / "text_encoder", ignore=shutil.ignore_patterns("*.safetensors")
    )
    shutil.copytree(tiny_models.sd / "vae", sd / "vae", ignore=shutil.ignore_patterns("*.safetensors"))
    scheduler_config = json.loads((sd / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = "v_prediction"
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    config = _config(store, tiny_models, tmp_path / "run", snr_gamma=5.0, dropout=0.0)
    run = setup(dataclasses.replace(config, sd=str(sd)))
    batch = next(run.loader.batches())
    with torch.no_grad():
        denoise = compute_losses(run, batch).denoise
        generator = batch_generator(0, 0, 0, stream=DRAW_STREAM)
        rows = run.loader.source.fetch(batch.samples, np.zeros(len(batch.samples), dtype=bool))
        latents = sample_latents(rows["latent_mean"].float(), rows["latent_logvar"].float(), 0.18215, generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
        scheduler = run.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = run.unet(noisy, timesteps, encoder_hidden_states=run.adapter(batch.clip_simple).embedding).sample
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=5.0) / (snr + 1)
        per_sample = ((pred - scheduler.get_velocity(latents, noise, timesteps)) ** 2).flatten(1).mean(1)
    assert scheduler.config.prediction_type == "v_prediction"
    assert denoise.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)


FEATURES_ONLY = {"denoise_weight": 0.0, "preload": "cpu"}  # no UNet: the checkpoint holds the same files, faster
# Every file accelerate's load_state reads that is or may be a pickle, as it names them.
ACCELERATE_PICKLES = (
    "custom_checkpoint_0.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "pytorch_model.bin",
    "scaler.pt",
    "sampler.bin",
    "dl_state_dict.bin",
)


class _Planted:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, target) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_resume_never_unpickles_a_file_planted_in_the_run_folder(store, tiny_models, tmp_path, monkeypatch):
    import pickle

    from sur_cache import checkpoint

    out, sentinel = tmp_path / "run", tmp_path / "pwned"
    run_train(_config(store, tiny_models, out, max_steps=2, **FEATURES_ONLY))
    folder = out / "checkpoints" / "step_0000002"
    planted = pickle.dumps(_Planted(sentinel))
    for where in (folder / "state", folder, folder / "adapter", folder / "rng"):
        where.mkdir(exist_ok=True)
        for name in ACCELERATE_PICKLES:
            (where / name).write_bytes(planted)
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or torch_load(*a, **k))
    run_train(_config(store, tiny_models, out, max_steps=3, resume="latest", **FEATURES_ONLY))
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3] and not loads
    # One of sur-cache's own files replaced by the pickle, position.json rewritten to match (as an adversary could):
    # each is refused by its reader, never unpickled.
    position = checkpoint.read_position(folder)
    for name in position.files:
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(planted)
        checkpoint.seal(folder, dataclasses.replace(position, files=checkpoint.checksums(folder, list(position.files))))
        config = _config(store, tiny_models, out, max_steps=3, resume=str(folder), **FEATURES_ONLY)
        if name.endswith("config.json"):  # the adapter's config is read by `generate` only, as JSON
            run_train(config)
        else:
            with pytest.raises(ValueError, match=f"checkpoint file {folder / name}: not"):
                run_train(config)
        (folder / name).write_bytes(original)
    assert not sentinel.exists() and not loads


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_fix(store, tiny_models, tmp_path):
    out = tmp_path / "run"
    run_train(_config(store, tiny_models, out, max_steps=2, **FEATURES_ONLY))
    folder = out / "checkpoints" / "step_0000002"
    args = _cli(store, tiny_models, out, "--max-steps", "3", "--denoise-weight", "0", "--preload", "cpu")
    args += ["--checkpoint-every", "2", "--resume", "latest"]

    def flip(data: bytes) -> bytes:
        return data[:-9] + bytes([data[-9] ^ 1]) + data[-8:]

    damages = [
        ("adapter/model.safetensors", flip, "its sha256 differs"),
        ("optimizer.safetensors", flip, "its sha256 differs"),
        ("optimizer.safetensors", lambda data: data[: len(data) // 2], "its sha256 differs"),
        ("position.json", lambda data: data[: len(data) // 2], "not valid JSON"),
    ]
    for name, damage, problem in damages:
        original = (folder / name).read_bytes()
        (folder / name).write_bytes(damage(original))
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.output.startswith(f"Error: checkpoint file {folder / name}: {problem}")
        assert "another checkpoint (--resume" in result.output and "start a new --out" in result.output
        (folder / name).write_bytes(original)
    assert CliRunner().invoke(main, args).exit_code == 0


def test_out_holding_files_of_no_sur_cache_run_is_refused(store, tiny_models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train_log.jsonl").write_text("my own notes\n")
    for resume in (None, "latest"):
        with pytest.raises(ValueError, match="holds no sur-cache run") as error:
            run_train(_config(store, tiny_models, out, max_steps=1, resume=resume, **FEATURES_ONLY))
        assert "train_log.jsonl" in str(error.value) and "sur-cache-run.json" in str(error.value)
    assert [p.name for p in out.iterdir()] == ["train_log.jsonl"]
    assert (out / "train_log.jsonl").read_text() == "my own notes\n"
    run = tmp_path / "run"  # a run folder is marked first; the same run may start over while it has no checkpoint
    run_train(_config(store, tiny_models, run, max_steps=1, checkpoint_every=5, **FEATURES_ONLY))
    assert json.loads((run / "sur-cache-run.json").read_text())["kind"] == "sur-cache train run"
    shutil.rmtree(run / "checkpoints")
    run_train(_config(store, tiny_models, run, max_steps=1, checkpoint_every=5, **FEATURES_ONLY))


def _poison(run, sample: int) -> None:
    """Make `sample`'s LLM feature NaN whenever the run fetches it."""
    fetch = run.loader.source.fetch

    def poisoned(indices, flipped):
        rows = fetch(indices, flipped)
        if sample in indices:
            rows["llm"] = rows["llm"].clone()
            rows["llm"][list(indices).index(sample)] = float("nan")
        return rows

    run.loader.source.fetch = poisoned


def test_a_non_finite_loss_stops_the_run_at_its_step_and_saves_nothing_of_it(store, tiny_models, tmp_path):
    from sur_cache.stages.train import cleanup, find_checkpoint, save_checkpoint, train

    out = tmp_path / "run"
    run = setup(_config(store, tiny_models, out, max_steps=4, checkpoint_every=1, **FEATURES_ONLY))
    batches = [b.samples.tolist() for b, _ in zip(run.loader.batches(), range(6), strict=False)]
    _poison(run, batches[5][1])  # step 3's second micro-batch (each sample comes once per epoch)
    with pytest.raises(ValueError, match=r"step 3: the loss is not finite") as error:
        train(run)
    assert f"micro-batch 2 of 2: samples {batches[5]}" in str(error.value)
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    # the weights the failed step left in memory are NaN: neither a checkpoint nor the final adapter takes them
    for save in (save_checkpoint, cleanup):
        with pytest.raises(ValueError, match="not finite"):
            save(run)
    assert find_checkpoint(out, "latest").name == "step_0000002"  # still complete: resume continues from it
    assert not (out / "adapter").exists() and not (out / "checkpoints" / "step_0000003").exists()
    run.loader.close()


def test_a_non_finite_gradient_stops_the_run(store, tiny_models, tmp_path):
    from sur_cache.stages.train import train

    run = setup(_config(store, tiny_models, tmp_path / "run", max_steps=2, **FEATURES_ONLY))
    run.accelerator.unwrap_model(run.adapter).fc.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(ValueError, match=r"step 1: the gradient norm is (inf|nan) though every loss is finite"):
        train(run)
    assert not (tmp_path / "run" / "checkpoints").exists()
    run.loader.close()


def test_resume_refuses_each_changed_setting_before_loading_anything(store, tiny_models, tmp_path, monkeypatch):
    import diffusers

    out = tmp_path / "run"
    run_train(_config(store, tiny_models, out, max_steps=2, lr_schedule="cosine"))
    _forbid(monkeypatch, (diffusers.UNet2DConditionModel, "from_pretrained"))
    changed = {"lr": 1e-2, "adapter_weight": 0.2, "denoise_weight": 0.5, "num_layers": 3, "max_steps": 3}
    with pytest.raises(ValueError) as error:
        run_train(_config(store, tiny_models, out, resume="latest", lr_schedule="cosine", **changed))
    for difference in (
        "--lr: checkpoint 1e-05, now 0.01",
        "--adapter-weight: checkpoint 0.1, now 0.2",
        "--denoise-weight: checkpoint 1.0, now 0.5",
        "--num-layers: checkpoint 2, now 3",
        "lr schedule length (--max-steps / --epochs, with --lr-schedule cosine or linear): checkpoint 2, now 3",
    ):
        assert difference in str(error.value)
    may_change = (
        "--max-steps, --epochs, --checkpoint-every, --val-every, --read-workers, --mapped-reads, --preload and "
        "--compile may"
    )
    assert may_change in str(error.value)
    monkeypatch.undo()
    copy = tmp_path / "elsewhere" / "store.zarr"  # the store is compared by its identity, not its path
    shutil.copytree(store, copy)
    run_train(_config(copy, tiny_models, out, resume="latest", max_steps=2, lr_schedule="cosine"))


def test_every_setting_a_refusal_can_name_is_a_real_train_option():
    from sur_cache.stages.train import _NOT_COMPARED_AS_TYPED, RESOLVED_SETTINGS, RESUME_MAY_CHANGE

    options = {option for param in main.commands["train"].params for option in param.opts}
    compared = {field.name for field in dataclasses.fields(TrainConfig)} - set(_NOT_COMPARED_AS_TYPED)
    named = {f"--{name.replace('_', '-')}" for name in compared | set(RESUME_MAY_CHANGE)}
    named |= {word.strip("(),") for label in RESOLVED_SETTINGS.values() for word in label.split() if "--" in word}
    assert named <= options, named - options


def test_resume_compares_the_device_type_the_device_option_resolves_to(store, tiny_models, tmp_path):
    from sur_cache.stages.train import _check_settings

    out = tmp_path / "run"
    run_train(_config(store, tiny_models, out, max_steps=2, **FEATURES_ONLY))
    resume = _config(store, tiny_models, out, max_steps=3, resume="latest", device="auto", **FEATURES_ONLY)
    if torch.cuda.is_available():  # auto is the GPU here: another device type than the checkpoint's
        with pytest.raises(ValueError, match=r"device type \(--device\): checkpoint 'cpu', now 'cuda'"):
            run_train(resume)
    else:  # auto is the CPU here: the same run as --device cpu
        run_train(resume)
        assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3]
    now = json.loads((out / "checkpoints" / "step_0000002" / "position.json").read_text())["settings"]
    _check_settings(out, {**now, "cpu": True}, now)  # an older checkpoint's --cpu flag, now compared as the device
    older = {key: value for key, value in now.items() if key not in ("val_fraction", "held_out")}
    _check_settings(out, older, now)  # a checkpoint from before --val-fraction: no validation, the same run
    with pytest.raises(ValueError, match=r"device type \(--device\): checkpoint 'cuda', now 'cpu'"):
        _check_settings(out, {**now, "device": "cuda"}, now)


VALIDATED = {"val_fraction": 0.34}  # one of the store's three shards (four samples) held out


def test_validation_never_reads_a_training_sample_and_gives_the_same_numbers_twice(store, tiny_models, tmp_path):
    from sur_cache.stages.train import optimizer_step, validate

    run = setup(_config(store, tiny_models, tmp_path / "run", **VALIDATED))
    held = {int(i) for u in run.held_out.units for i in u.samples}
    assert len(run.held_out.units) == 1 and len(held) == 4
    for world in (1, 2):  # the loader's real order, over two epochs, at every process
        for rank in range(world):
            settings = dataclasses.replace(run.loader.settings, rank=rank, world_size=world)
            loader = FeatureLoader(run.loader.source, run.loader.units, settings, "cpu")
            for epoch in range(2):
                order = set(loader.order(epoch).tolist())
                assert order and not order & held
    every = set(range(12))
    assert {int(i) for u in run.loader.units for i in u.samples} == every - held
    rng = torch.get_rng_state()
    first = validate(run)
    assert validate(run) == first  # the same call on the same adapter: exactly the same numbers
    assert torch.equal(torch.get_rng_state(), rng)  # no draw of the training's random streams
    assert first["samples"] == 4 and first["kind"] == "validation" and first["step"] == 0
    weights = first["weights"]
    expected = sum(first[term] * weights[term] for term in ("denoise", "distill", "align"))
    assert first["total"] == pytest.approx(expected, rel=1e-6)
    run.config = dataclasses.replace(run.config, batch_size=3)  # batches of 3 + 1: the same means
    means = ("denoise", "distill", "align", "total", "cosine_adapted_complex", "cosine_simple_complex")
    rebatched = validate(run)
    assert [rebatched[name] for name in means] == pytest.approx([first[name] for name in means], rel=1e-6)
    optimizer_step(run, run.loader.batches())
    run.step = 1
    trained = validate(run)
    assert trained != first and validate(run) == trained
    assert trained["cosine_adapted_complex"] != first["cosine_adapted_complex"]
    assert trained["cosine_simple_complex"] == first["cosine_simple_complex"]  # no adapter in it
    assert run.accelerator.unwrap_model(run.adapter).training  # back in training mode
    run.loader.close()


def test_validation_records_and_resume_keep_the_held_out_set(store, tiny_models, tmp_path):
    whole = tmp_path / "whole"  # 8 training samples: 2 steps an epoch; validations at 2 and 4
    args = _cli(store, tiny_models, whole, "--max-steps", "4", "--checkpoint-every", "2", "--val-fraction", "0.34")
    result = CliRunner().invoke(main, [*args, "--denoise-weight", "0", "--preload", "cpu"])
    assert result.exit_code == 0, result.output
    validations = read_log(whole / "train_log.jsonl", "validation")
    assert [r["step"] for r in validations] == [2, 4] and all(r["denoise"] is None for r in validations)
    assert [r["step"] for r in read_log(whole / "train_log.jsonl")] == [1, 2, 3, 4]
    recorded = json.loads((whole / "run.json").read_text())["validation"]
    assert recorded["fraction"] == 0.34 and recorded["every"] == 2 and recorded["samples"] == 4
    position = json.loads((whole / "checkpoints" / "step_0000002" / "position.json").read_text())
    assert position["settings"]["held_out"] == recorded["shards"] and len(recorded["shards"]) == 1
    assert (whole / "loss.png").read_bytes()[:4] == b"\x89PNG"
    broken = tmp_path / "broken"  # stopped at step 2, resumed validating every step: the same run
    run_train(_config(store, tiny_models, broken, max_steps=2, **VALIDATED, **FEATURES_ONLY))
    run_train(_config(store, tiny_models, broken, resume="latest", val_every=1, **VALIDATED, **FEATURES_ONLY))
    assert _losses(broken) == _losses(whole)
    again = {r["step"]: r for r in read_log(broken / "train_log.jsonl", "validation")}
    assert sorted(again) == [2, 3, 4] and again[2] == validations[0] and again[4] == validations[1]
    assert json.loads((broken / "run.json").read_text())["validation"]["shards"] == recorded["shards"]
    with pytest.raises(ValueError) as error:
        run_train(_config(store, tiny_models, broken, resume="latest", val_fraction=0.0, **FEATURES_ONLY))
    assert "--val-fraction: checkpoint 0.34, now 0.0" in str(error.value)
    assert "held-out shards (--val-fraction, --seed)" in str(error.value)


def test_a_store_with_too_few_shards_to_hold_one_out_is_refused(store, tiny_models, tmp_path):
    with pytest.raises(ValueError, match="holds out 3 of the store's 3 shards .* leaving none to train on"):
        setup(_config(store, tiny_models, tmp_path / "run", val_fraction=0.9, **FEATURES_ONLY))
    assert not (tmp_path / "run").exists()


def test_a_non_finite_validation_stops_the_run_naming_the_held_out_samples(store, tiny_models, tmp_path):
    from sur_cache.stages.train import validate

    run = setup(_config(store, tiny_models, tmp_path / "run", **VALIDATED, **FEATURES_ONLY))
    held = [int(i) for u in run.held_out.units for i in u.samples]
    fetch = run.held_out.source.fetch

    def poisoned(indices, flipped):
        rows = fetch(indices, flipped)
        if held[3] in indices:
            rows["clip_complex"] = torch.full_like(rows["clip_complex"], float("nan"))
        return rows

    run.held_out.source.fetch = poisoned
    with pytest.raises(ValueError, match=re.escape(f"step 0: validation is not finite (held-out samples {held[2:]})")):
        validate(run)  # batches of 2: the poisoned sample's batch is named
    run.loader.close()


# ---- the LLM teacher chosen at train time (--llm-layer) -----------------------------------------------------------


@pytest.fixture(scope="module")
def layered_store(tiny_models, demo_dataset, tmp_path_factory):
    """A float32 store of every layer of the tiny LLM (`extract --llm-layers all`): llm [12, 3, 48]."""
    out = tmp_path_factory.mktemp("layered_store") / "store.zarr"
    settings = dict(resolution=TINY_RESOLUTION, batch_size=4, shard_rows=4, num_workers=0, llm_8bit=False)
    settings.update(llm_dtype="float32", store_dtype="float32", progress=False, device="cpu")
    run_extract(
        ExtractConfig(
            data=demo_dataset,
            out=str(out),
            sd=str(tiny_models.sd),
            llm=str(tiny_models.llm),
            llm_layers="all",
            **settings,
        )
    )
    return out


def _hand_teacher(stored: torch.Tensor, choice: str | None) -> torch.Tensor:
    """docs/models.md's formulas, written out: [B, L, D] stored rows -> the teacher [B, D]."""
    if choice == "mean":
        return stored.sum(1) / stored.shape[1]
    if choice == "norm-mean":
        rms = torch.sqrt((stored**2).mean(-1, keepdim=True) + 1e-6)
        return (stored / rms).sum(1) / stored.shape[1]
    return stored[:, -1 if choice is None else int(choice)]


@pytest.mark.parametrize("choice", [None, "0", "1", "mean", "norm-mean"])
def test_each_llm_layer_choice_distils_the_documented_tensor(layered_store, tiny_models, tmp_path, choice):
    from sur_cache.losses import distillation_loss
    from sur_cache.stages.train import loss_terms
    from sur_cache.store import FeatureStore

    config = _config(layered_store, tiny_models, tmp_path / "run", denoise_weight=0.0, dropout=0.0, llm_layer=choice)
    run = setup(config)
    batch = next(run.loader.batches())
    rows = FeatureStore.open(str(layered_store)).array("llm")[:][batch.samples]
    assert rows.shape == (2, 3, 48) and np.array_equal(batch.llm.numpy(), rows)
    adapter = run.accelerator.unwrap_model(run.adapter)
    adapted = run.adapter_terms(batch.clip_simple, batch.clip_complex, run.teacher.select(batch.llm))
    terms = loss_terms(run, batch, adapted, None)
    expected = distillation_loss(adapter.project_llm(_hand_teacher(torch.from_numpy(rows), choice)), adapted[0].h)
    torch.testing.assert_close(terms.distill, expected, rtol=1e-5, atol=1e-7)


def test_a_layer_the_store_lacks_is_refused_naming_the_stored_ones(store, layered_store, tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"--llm-layer 5: .* holds LLM layers 0, 1, 2 only"):
        setup(_config(layered_store, tiny_models, tmp_path / "a", denoise_weight=0.0, llm_layer="5"))
    with pytest.raises(ValueError, match=r"--llm-layer 0: .* holds LLM layer 1 only; .*--llm-layers 1,0"):
        setup(_config(store, tiny_models, tmp_path / "b", denoise_weight=0.0, llm_layer="0"))
    assert (
        setup(_config(store, tiny_models, tmp_path / "c", denoise_weight=0.0, llm_layer="1")).teacher.position is None
    )
    with pytest.raises(ValueError, match="--llm-layer must be a stored layer's number .* got '-1'"):
        _config(store, tiny_models, tmp_path / "d", llm_layer="-1")


def test_resume_refuses_a_changed_llm_layer(layered_store, tiny_models, tmp_path):
    out = tmp_path / "run"
    run_train(_config(layered_store, tiny_models, out, max_steps=2, denoise_weight=0.0, llm_layer="mean"))
    with pytest.raises(ValueError, match="--llm-layer: checkpoint 'mean', now 'norm-mean'"):
        run_train(_config(layered_store, tiny_models, out, resume="latest", denoise_weight=0.0, llm_layer="norm-mean"))


def test_online_recomputes_every_stored_layer(layered_store, tiny_models, demo_dataset, tmp_path):
    fc_weight = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    options = dict(denoise_weight=0.0, dropout=0.0, llm_layer="norm-mean")
    cached = _config(layered_store, tiny_models, tmp_path / "cached", **options)
    online = dataclasses.replace(cached, out=tmp_path / "online", online=True, data=demo_dataset)
    cached_terms, cached_grads = _first_grads(cached, fc_weight)
    online_terms, online_grads = _first_grads(online, fc_weight)
    assert online_terms == pytest.approx(cached_terms, rel=1e-5, abs=1e-6)
    for name, grad in cached_grads.items():
        torch.testing.assert_close(online_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


CLIPPING = 1e-3  # --max-grad-norm below every gradient norm of the tiny run: each step is clipped


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses_and_resumes_exactly(store, tiny_models, tmp_path):
    """--compile default (inductor, on the CPU) against eager over 4 steps of 2 accumulated micro-batches, with the
    UNet term and a clipping that bites (every gradient norm above --max-grad-norm): equal losses and gradient norms
    to 1e-4 relative (dropout 0: compiled dropout draws its own masks). Then a compiled run with dropout, resumed
    from its step 2 into another folder: its own steps 3 and 4, to 1e-6."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    clipped = {"dropout": 0.0, "max_grad_norm": CLIPPING}
    run_train(_config(store, tiny_models, eager, compile="none", **clipped))
    graphs = _compiled_graphs()
    run_train(_config(store, tiny_models, compiled, compile="default", **clipped))
    assert _compiled_graphs() > graphs  # it really compiled (a silent fall back to eager would pass the rest)
    assert json.loads((compiled / "run.json").read_text())["compile"] == "default"
    for a, b in zip(_losses(eager), _losses(compiled), strict=True):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-4)
    norms = [[r["grad_norm"] for r in read_log(folder / "train_log.jsonl")] for folder in (eager, compiled)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4) and min(norms[1]) > CLIPPING
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_train(_config(store, tiny_models, whole, compile="default"))
    run_train(
        _config(store, tiny_models, resumed, compile="default", resume=str(whole / "checkpoints" / "step_0000002"))
    )
    assert [step[0] for step in _losses(resumed)] == [3, 4]
    for a, b in zip(_losses(whole)[2:], _losses(resumed), strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.slow
def test_compiled_features_only_bf16_run_compiles_once_and_gives_the_eager_losses(
    store, tiny_models, tmp_path, monkeypatch
):
    """Features-only (no UNet) under bf16 autocast on the CPU, --compile default against eager: the same losses and
    validations to bf16's rounding. Batches of 3 from the 8 training samples (a shard of 4 held out): each epoch's
    last partial batch of 2 is dropped, so the compiled graph, compiled once, serves all 4 epochs (a recompile is an
    error here), and validation's partial last batch (1 of 4) runs eager."""
    import torch._dynamo

    torch._dynamo.reset()  # this run compiles afresh, whatever ran before in this process
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    options = {"denoise_weight": 0.0, "mixed_precision": "bf16", "batch_size": 3, "dropout": 0.0, "val_every": 2}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_train(_config(store, tiny_models, eager, compile="none", **options, **VALIDATED))
    graphs = _compiled_graphs()
    run_train(_config(store, tiny_models, compiled, compile="default", **options, **VALIDATED))
    assert _compiled_graphs() > graphs
    steps = [read_log(folder / "train_log.jsonl") for folder in (eager, compiled)]
    assert [r["epoch"] for r in steps[1]] == [0, 1, 2, 3]  # 2 full batches an epoch, 2 micro-batches a step
    for a, b in zip(*steps, strict=True):
        assert a["denoise"] is b["denoise"] is None
        assert (a["distill"], a["align"]) == pytest.approx((b["distill"], b["align"]), rel=2e-2)
    validations = [read_log(folder / "train_log.jsonl", "validation") for folder in (eager, compiled)]
    assert [v["samples"] for v in validations[1]] == [4, 4]
    for a, b in zip(*validations, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=2e-2)
