"""Each loss against a hand computation, and min-SNR weights against diffusers' own implementation."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from sur_cache.losses import (
    alignment_loss,
    compute_snr,
    denoising_loss,
    denoising_target,
    distillation_loss,
    kl,
)


def _hand_kl(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum over all rows of sum_j p_j (log p_j - log q_j), p = softmax(b), q = softmax(a), divided by a.shape[0]."""
    total = 0.0
    rows_a, rows_b = a.reshape(-1, a.shape[-1]).tolist(), b.reshape(-1, b.shape[-1]).tolist()
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        za, zb = sum(map(math.exp, row_a)), sum(map(math.exp, row_b))
        for va, vb in zip(row_a, row_b, strict=True):
            p = math.exp(vb) / zb
            total += p * (math.log(p) - math.log(math.exp(va) / za))
    return total / a.shape[0]


def test_kl_is_batchmean_kl_of_b_from_a():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert kl(a, b).item() == pytest.approx(_hand_kl(a, b), rel=1e-5)
    assert kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert kl(a, b).item() != pytest.approx(kl(b, a).item(), rel=1e-3)  # direction matters


def test_kl_divides_by_the_first_dimension_only():
    a, b = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    # Same rows, regrouped into 4 "samples": the sum is unchanged, the divisor goes from 2 to 4.
    assert kl(a.reshape(4, 3, 5), b.reshape(4, 3, 5)).item() == pytest.approx(kl(a, b).item() / 2, rel=1e-5)


def test_kl_is_computed_in_float32():
    a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    loss = kl(a.half(), b.half())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kl(a.half().float(), b.half().float()).item(), rel=1e-6)


def test_distillation_loss_broadcasts_the_llm_feature_over_tokens():
    projected, h = torch.randn(2, 6), torch.randn(2, 7, 6)
    expected = _hand_kl(projected[:, None, :].repeat(1, 7, 1), h)
    assert distillation_loss(projected, h).item() == pytest.approx(expected, rel=1e-5)


def test_alignment_loss_pulls_the_adapted_embedding_towards_the_complex_one():
    clip_complex = torch.randn(2, 7, 6)
    adapted = torch.randn(2, 7, 6, requires_grad=True)
    loss = alignment_loss(clip_complex, adapted)
    assert loss.item() == pytest.approx(_hand_kl(clip_complex, adapted.detach()), rel=1e-5)
    loss.backward()
    assert adapted.grad is not None and adapted.grad.abs().sum() > 0


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)


def test_denoising_target_follows_the_prediction_type():
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    timesteps = torch.tensor([10, 900])
    assert denoising_target(_scheduler("epsilon"), latents, noise, timesteps) is noise

    scheduler = _scheduler("v_prediction")
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(2, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # v = sqrt(a) eps - sqrt(1 - a) x0
    torch.testing.assert_close(denoising_target(scheduler, latents, noise, timesteps), expected)

    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        denoising_target(_scheduler("sample"), latents, noise, timesteps)


def test_compute_snr_matches_diffusers():
    scheduler = _scheduler("epsilon")
    timesteps = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(compute_snr(scheduler, timesteps), diffusers_compute_snr(scheduler, timesteps))


def test_denoising_loss_is_mean_squared_error():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert denoising_loss(pred, target).item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_loss_min_snr_weighting(prediction_type):
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    snr = torch.tensor([0.5, 5.0, 50.0])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    gamma = 5.0
    denominators = snr if prediction_type == "epsilon" else snr + 1
    weights = [min(s, gamma) / d for s, d in zip(snr.tolist(), denominators.tolist(), strict=True)]
    expected = sum(w * e for w, e in zip(weights, per_sample.tolist(), strict=True)) / 3
    loss = denoising_loss(pred, target, snr=snr, snr_gamma=gamma, prediction_type=prediction_type)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_denoising_loss_with_gamma_needs_snr():
    with pytest.raises(ValueError, match="snr_gamma is set but snr is None"):
        denoising_loss(torch.zeros(1, 4), torch.zeros(1, 4), snr_gamma=5.0)
