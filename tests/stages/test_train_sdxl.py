"""Stage two on a tiny SDXL store: the UNet gets the adapted embedding and the stored added conditioning; one step's
loss equals a hand-written reference; `--online` equals the cache; a cached run loads no text encoder or VAE."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sur_cache.config import TrainConfig
from sur_cache.losses import alignment_loss, distillation_loss
from sur_cache.stages.train import compute_losses, run_train, setup
from sur_cache.tiny_models import TINY_RESOLUTION, TINY_SDXL_CLIP_WIDTHS
from sur_cache.train_log import VALIDATION, read_log

WIDTH = sum(TINY_SDXL_CLIP_WIDTHS)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A fresh accelerate state per run, as each `sur-cache train` process has (see tests/stages/test_train.py)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _config(store, sd, out, **overrides) -> TrainConfig:
    options = dict(
        store=str(store),
        sd=str(sd),
        out=Path(out),
        batch_size=2,
        gradient_accumulation=2,
        max_steps=1,
        device="cpu",
        read_workers=0,
        feedforward=64,
        num_heads=4,
        dropout=0.0,
    )
    return TrainConfig(**{**options, **overrides})


def test_one_steps_loss_equals_a_hand_written_reference(sdxl_store, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sur_cache.loader import DRAW_STREAM, batch_generator, sample_latents

    run = setup(_config(sdxl_store, tiny_sdxl, tmp_path / "run"))
    adapter = run.accelerator.unwrap_model(run.adapter)
    assert adapter.config.width == WIDTH
    batch = next(run.loader.batches())
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    with torch.no_grad():
        terms = compute_losses(run, batch)
        rows = {
            name: values.float()
            for name, values in run.loader.source.fetch(batch.samples, np.zeros(2, dtype=bool)).items()
        }
        generator = batch_generator(0, 0, 0, stream=DRAW_STREAM)
        latents = sample_latents(
            rows["latent_mean"], rows["latent_logvar"], run.loader.settings.scaling_factor, generator
        )
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = torch.cat(
            [
                pipe._get_add_time_ids(
                    tuple(rows["original_size"][i].int().tolist()),
                    tuple(rows["crop_offset"][i].int().tolist()),
                    (TINY_RESOLUTION, TINY_RESOLUTION),
                    torch.float32,
                    text_encoder_projection_dim=projection,
                )
                for i in range(2)
            ]
        )
        out = adapter(rows["clip_simple"])
        noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = pipe.unet(
            noisy,
            timesteps,
            encoder_hidden_states=out.embedding,
            added_cond_kwargs={"text_embeds": rows["pooled_simple"], "time_ids": time_ids},
        ).sample
        denoise = ((pred - noise) ** 2).mean()  # the tiny SDXL predicts epsilon
        distill = distillation_loss(adapter.project_llm(rows["llm"]), out.h)
        align = alignment_loss(rows["clip_complex"], out.embedding)
    assert run.noise_scheduler.config.prediction_type == "epsilon"
    assert terms.denoise.item() == pytest.approx(denoise.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx((denoise + 1e-5 * (distill + align)).item(), rel=1e-5)


def _first_grads(config: TrainConfig, fc_weight: torch.Tensor) -> tuple[dict, dict]:
    run = setup(config)
    adapter = run.accelerator.unwrap_model(run.adapter)
    with torch.no_grad():
        adapter.fc.weight.copy_(fc_weight)
    terms = compute_losses(run, next(run.loader.batches()))
    terms.total.backward()
    values = {name: value.item() for name, value in vars(terms).items() if value is not None}
    return values, {name: p.grad.clone() for name, p in adapter.named_parameters() if p.grad is not None}


def test_online_features_equal_cached_ones(sdxl_store, tiny_sdxl, tiny_models, demo_dataset, tmp_path):
    fc_weight = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(0)) * 0.1
    cached = _config(sdxl_store, tiny_sdxl, tmp_path / "cached")
    online = dataclasses.replace(cached, out=tmp_path / "online", online=True, data=demo_dataset)
    cached_terms, cached_grads = _first_grads(cached, fc_weight)
    online_terms, online_grads = _first_grads(online, fc_weight)
    assert set(online_terms) == {"denoise", "distill", "align", "total"}
    assert online_terms == pytest.approx(cached_terms, rel=1e-5, abs=1e-6)
    assert set(online_grads) == set(cached_grads)
    for name, grad in cached_grads.items():
        torch.testing.assert_close(online_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_cached_run_never_loads_the_text_encoders_the_vae_or_the_llm(sdxl_store, tiny_sdxl, tmp_path, monkeypatch):
    """...and validates (one of the three shards held out) with the same added conditioning."""
    import diffusers
    import transformers

    sd = tmp_path / "sd"  # without the text encoders' and the VAE's weights: nothing could read them
    shutil.copytree(tiny_sdxl, sd)
    for sub in ("text_encoder", "text_encoder_2", "vae"):
        for weights in (sd / sub).glob("*.safetensors"):
            weights.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("stage two must not load this model")

    for owner in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, diffusers.AutoencoderKL):
        monkeypatch.setattr(owner, "__init__", refuse)
        monkeypatch.setattr(owner, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    run_train(_config(sdxl_store, sd, tmp_path / "run", max_steps=2, val_fraction=0.34))
    log = tmp_path / "run" / "train_log.jsonl"
    steps, validations = read_log(log), read_log(log, VALIDATION)
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["denoise"]) for r in steps)
    assert [(r["step"], r["samples"]) for r in validations] == [(2, 4)] and np.isfinite(validations[0]["denoise"])
