"""The held-out part of a store (whole shards, seeded, refused when too small), each process's share of it, and the
fixed draws of its batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sur_cache.validation import DrawSettings, held_out_batches, hold_out, process_share

SHARDS = [(start, start + 4) for start in range(0, 40, 4)]  # ten shards of four samples


def test_hold_out_takes_whole_shards_chosen_by_the_seed_alone():
    complete = np.setdiff1d(np.arange(40), [1, 2, 8, 9, 10, 11])  # shard 2 holds no complete sample
    training, held = hold_out(SHARDS, complete, 0.2, seed=3)
    assert len(held) == 2 and all((u.start, u.stop) in SHARDS for u in held) and (8, 12) not in training
    assert sorted(training + [(u.start, u.stop) for u in held]) == [s for s in SHARDS if s != (8, 12)]
    for unit in held:  # every complete sample of a held-out shard, and only those
        assert unit.samples.tolist() == [i for i in complete if unit.start <= i < unit.stop]
    again = hold_out(SHARDS, complete, 0.2, seed=3)
    assert again[0] == training and [u.start for u in again[1]] == [u.start for u in held]
    others = {tuple(u.start for u in hold_out(SHARDS, complete, 0.2, seed=seed)[1]) for seed in range(8)}
    assert len(others) > 1  # the seed picks them
    assert hold_out(SHARDS, complete, 0.01, seed=3)[1]  # at least one shard for any fraction > 0
    assert hold_out(SHARDS, complete, 0.0, seed=3) == (SHARDS, [])  # no validation: every shard trains


def test_hold_out_refuses_a_store_it_would_leave_nothing_to_train_on():
    with pytest.raises(ValueError, match=r"--val-fraction 0.1 holds out 1 of the store's 1 shards"):
        hold_out(SHARDS[:1], np.arange(4), 0.1, seed=0)
    with pytest.raises(ValueError, match=r"holds out 10 of the store's 10 shards .* lower --val-fraction"):
        hold_out(SHARDS, np.arange(40), 0.99, seed=0)


def test_process_shares_are_disjoint_contiguous_and_cover_the_held_out_samples():
    _, held = hold_out(SHARDS, np.arange(40), 0.3, seed=1)
    for world in (1, 2, 3, 5):
        shares = [process_share(held, rank, world) for rank in range(world)]
        samples = [i for share in shares for unit in share for i in unit.samples.tolist()]
        assert sorted(samples) == sorted(i for u in held for i in u.samples.tolist())  # each exactly once
        for unit in (u for share in shares for u in share):
            assert unit.samples.tolist() == list(range(unit.start, unit.stop))  # one range read


class _Source:
    def fetch(self, indices, flipped):
        rows = torch.as_tensor(indices, dtype=torch.float32)[:, None, None]
        return {
            "clip_simple": rows.expand(-1, 3, 4),
            "clip_complex": rows.expand(-1, 3, 4) + 1,
            "llm": rows[:, 0].expand(-1, 6),
            "latent_mean": rows[:, None].expand(-1, 2, 2, 2),
            "latent_logvar": torch.zeros(len(indices), 2, 2, 2),
        }


def test_the_fixed_draws_of_a_sample_do_not_depend_on_its_batch():
    _, held = hold_out(SHARDS, np.arange(40), 0.3, seed=1)
    draws = DrawSettings(seed=5, scaling_factor=0.5, num_train_timesteps=1000)

    def per_sample(batch_size: int) -> dict[int, tuple]:
        found = {}
        for batch in held_out_batches(_Source(), held, batch_size, draws, torch.device("cpu")):
            for row, sample in enumerate(batch.samples.tolist()):
                found[sample] = (batch.latents[row], batch.noise[row], batch.timesteps[row])
        return found

    one, five = per_sample(1), per_sample(5)
    assert sorted(one) == sorted(i for u in held for i in u.samples.tolist())
    for sample, (latents, noise, timestep) in one.items():
        assert torch.equal(latents, five[sample][0]) and torch.equal(noise, five[sample][1])
        assert timestep == five[sample][2]
    assert not torch.equal(one[held[0].start][1], one[held[0].start + 1][1])  # each sample its own noise
    features_only = DrawSettings(seed=5, scaling_factor=0.5, num_train_timesteps=None)
    batch = next(held_out_batches(_Source(), held, 4, features_only, torch.device("cpu")))
    assert batch.latents is None and batch.noise is None and len(batch.samples) == 4
