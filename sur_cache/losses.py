"""The three training losses of the SUR-adapter (DESIGN.md section 4), each written once.

    total = denoise_weight * denoising + llm_weight * distillation + align_weight * alignment

The two KL terms use the reference's direction and reduction: `kl(a, b) = KL(softmax(b) || softmax(a))` over the
last dimension, summed over everything and divided by the batch size (dim 0), temperature 1. They are computed in
float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def kl(a: Tensor, b: Tensor) -> Tensor:
    """`KL(softmax(b) || softmax(a))` over the last dim, summed and divided by `a.shape[0]` ("batchmean")."""
    return F.kl_div(F.log_softmax(a.float(), dim=-1), F.softmax(b.float(), dim=-1), reduction="batchmean")


def distillation_loss(llm_projected: Tensor, h: Tensor) -> Tensor:
    """Pull the encoder output `h [B, L, d]` towards the projected LLM feature `[B, d]`, broadcast over the L tokens."""
    return kl(llm_projected[:, None, :].expand_as(h), h)


def alignment_loss(clip_complex: Tensor, adapted: Tensor) -> Tensor:
    """Pull the adapted simple-prompt embedding towards the complex prompt's CLIP embedding, both `[B, L, d]`."""
    return kl(clip_complex, adapted)


def denoising_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet must predict, per the scheduler's `prediction_type`: the noise, or the velocity."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"scheduler prediction_type {prediction_type!r} is not supported; expected one of {', '.join(PREDICTION_TYPES)}"
    )


def compute_snr(scheduler, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio `alpha_bar_t / (1 - alpha_bar_t)` of each timestep, from `scheduler.alphas_cumprod`."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def denoising_loss(
    pred: Tensor,
    target: Tensor,
    snr: Tensor | None = None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> Tensor:
    """MSE between the UNet prediction and the target, optionally with min-SNR-gamma weights (arXiv 2303.09556).

    With `snr_gamma`, each sample's mean squared error is weighted by `min(snr, gamma) / snr` for epsilon
    prediction and `min(snr, gamma) / (snr + 1)` for v-prediction (as diffusers' train_text_to_image.py does),
    then averaged over the batch.
    """
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    if snr is None:
        raise ValueError("denoising_loss: snr_gamma is set but snr is None; pass snr=compute_snr(scheduler, timesteps)")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    snr = snr.float()
    clipped = torch.clamp(snr, max=snr_gamma)
    weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
    return (per_sample * weights).mean()
