"""Validation during training: which part of the store is held out, how its batches are drawn, what is measured.

Held out: whole shards (the store's read units at one process), `round(val_fraction * shards)` of them and at least
one, picked by a permutation seeded by `--seed` alone. Training is built from the other shards only, so it never
reads a held-out sample; the choice depends on the seed and the store, never on the number of processes.

Fixed draws: every held-out sample draws its latent noise, diffusion noise and timestep from its own generator,
seeded by `(seed, sample)`. Two evaluations of the same adapter see the same numbers, whatever the training step,
the batch size or the number of processes (each process takes a contiguous piece of every held-out shard).

Measured, as means over the held-out samples: the three loss terms and their weighted total (each batch's mean
times its size, summed, so batching does not change the mean), and the cosine of adapter(simple) and of
CLIP(simple) to CLIP(complex), each embedding flattened over its `[L, d]` tokens (`flat_cosine`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sur_cache.loader import FeatureSource, ReadUnit, read_units, sample_latents, sdxl_conditioning

_HOLD_OUT_STREAM = 0x686F6C64  # "hold": keys the held-out choice apart from the loader's (seed, epoch) streams
_DRAW_STREAM = 0x76616C  # "val": keys each held-out sample's fixed draws
LOSS_FIELDS = ("denoise", "distill", "align", "total")
COSINE_FIELDS = ("cosine_adapted_complex", "cosine_simple_complex")


def hold_out(
    shard_ranges: list[tuple[int, int]], complete: np.ndarray, fraction: float, seed: int
) -> tuple[list[tuple[int, int]], list[ReadUnit]]:
    """`(training shard ranges, held-out units)`: with `fraction` 0, every shard trains and none is held out.

    Only shards holding a complete sample count. Raises ValueError when the store has fewer than two such shards
    or when the fraction would leave none to train on.
    """
    if fraction == 0:
        return list(shard_ranges), []
    shards = read_units(shard_ranges, complete, 1)
    count = max(1, int(fraction * len(shards) + 0.5))
    if count >= len(shards):
        raise ValueError(
            f"--val-fraction {fraction} holds out {count} of the store's {len(shards)} shards with complete "
            "samples, leaving none to train on: whole shards are held out, so lower --val-fraction, or extract "
            "the store with a smaller --shard-rows (more shards)"
        )
    chosen = np.sort(np.random.default_rng([seed, _HOLD_OUT_STREAM]).permutation(len(shards))[:count])
    held = set(chosen.tolist())
    training = [(shard.start, shard.stop) for i, shard in enumerate(shards) if i not in held]
    return training, [shards[i] for i in chosen]


def process_share(units: list[ReadUnit], rank: int, world_size: int) -> list[ReadUnit]:
    """Process `rank`'s disjoint piece of the held-out samples: a contiguous part of every unit (one range read)."""
    share = []
    for unit in units:
        piece = np.array_split(unit.samples, world_size)[rank]
        if len(piece):
            share.append(ReadUnit(int(piece[0]), int(piece[-1]) + 1, piece))
    return share


@dataclass
class HeldOutBatch:
    """Held-out samples on the training device, with their fixed draws (`latents`, `noise`, `timesteps` are None
    in the features-only mode)."""

    samples: np.ndarray
    clip_simple: torch.Tensor
    clip_complex: torch.Tensor
    llm: torch.Tensor
    latents: torch.Tensor | None
    noise: torch.Tensor | None
    timesteps: torch.Tensor | None
    added_cond: dict[str, torch.Tensor] | None = None  # SDXL: `loader.sdxl_conditioning`


@dataclass(frozen=True)
class DrawSettings:
    """What the fixed draws need: `num_train_timesteps` None means features-only (no latent, no noise)."""

    seed: int
    scaling_factor: float
    num_train_timesteps: int | None
    sdxl_target_size: int | None = None  # SDXL stores: the time ids' target size


def sample_generator(seed: int, sample: int, device: torch.device) -> torch.Generator:
    """The generator of one held-out sample's draws, the same at every evaluation."""
    state = np.random.SeedSequence([seed, _DRAW_STREAM, sample]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def held_out_batches(
    source: FeatureSource, units: list[ReadUnit], batch_size: int, draws: DrawSettings, device: torch.device
) -> Iterator[HeldOutBatch]:
    """Every sample of `units` once, ascending, in batches of `batch_size` (the last one may be smaller)."""
    samples = np.concatenate([u.samples for u in units]) if units else np.empty(0, dtype=np.int64)
    for first in range(0, len(samples), batch_size):
        indices = samples[first : first + batch_size]
        rows = source.fetch(indices, np.zeros(len(indices), dtype=bool))
        features = {name: rows[name].to(device).float() for name in rows}
        latents = noise = timesteps = added_cond = None
        if draws.num_train_timesteps is not None:
            latents, noise, timesteps = _fixed_draws(features, indices, draws, device)
            if draws.sdxl_target_size is not None:
                added_cond = sdxl_conditioning(features, draws.sdxl_target_size)
        yield HeldOutBatch(
            indices,
            features["clip_simple"],
            features["clip_complex"],
            features["llm"],
            latents,
            noise,
            timesteps,
            added_cond,
        )


def _fixed_draws(features: dict, indices: np.ndarray, draws: DrawSettings, device: torch.device) -> tuple:
    """Per sample, from its own generator: the latent's noise, then the diffusion noise, then the timestep."""
    latents, noise, timesteps = [], [], []
    for row, sample in enumerate(indices.tolist()):
        generator = sample_generator(draws.seed, sample, device)
        mean, logvar = features["latent_mean"][row : row + 1], features["latent_logvar"][row : row + 1]
        latents.append(sample_latents(mean, logvar, draws.scaling_factor, generator))
        noise.append(torch.randn(mean.shape, generator=generator, device=device))
        timesteps.append(torch.randint(0, draws.num_train_timesteps, (1,), generator=generator, device=device))
    return torch.cat(latents), torch.cat(noise), torch.cat(timesteps)


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, the cosine of two `[B, L, d]` embeddings flattened to `[B, L * d]` (float32)."""
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


@dataclass
class HeldOut:
    """The run's held-out part: every held-out unit (the same on all processes), this process's share of it, the
    source its features come from, and the fixed draws' settings."""

    units: list[ReadUnit]
    share: list[ReadUnit]
    source: FeatureSource
    draws: DrawSettings

    @property
    def num_samples(self) -> int:
        return sum(len(u.samples) for u in self.units)

    def record(self) -> dict:
        """What run.json and the checkpoints' settings say about it: the held-out shards as `[start, stop]`."""
        return {"shards": [[u.start, u.stop] for u in self.units], "samples": self.num_samples}
