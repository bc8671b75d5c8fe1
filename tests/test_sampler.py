"""Multipack sampler: coverage, budgets, determinism, efficiency, resumability."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import sampler
from config import ConfigError


def lognormal_lengths(n, seed=0, mu=5.5, cap=4096):
    return np.clip(np.random.default_rng(seed).lognormal(mu, 0.8, size=n).astype(np.int64), 8, cap)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_once_and_budgets_respected(world_size):
    lengths = lognormal_lengths(5000)
    loss_counts = lengths // 3
    steps = sampler.plan_epoch(lengths, loss_counts, 256, 4096, world_size, seed=7, epoch=0)
    seen = np.concatenate([idx for s in steps for micro in s["micro_batches"] for idx in micro])
    assert np.array_equal(np.sort(seen), np.arange(5000))  # each sample exactly once
    assert [s["num_samples"] for s in steps] == [256] * 19 + [136]  # exact batches, remainder last
    for s in steps:
        assert all(len(micro) == world_size for micro in s["micro_batches"])
        assert all(lengths[idx].sum() <= 4096 for micro in s["micro_batches"] for idx in micro)
        members = np.concatenate([idx for micro in s["micro_batches"] for idx in micro])
        assert s["num_samples"] == len(members) and s["num_loss_tokens"] == loss_counts[members].sum()


@pytest.mark.parametrize("batch,max_len,mu", [(256, 4096, 5.5), (512, 4096, 5.5), (384, 8192, 6.0)])
def test_packing_efficiency_on_lognormal_lengths(batch, max_len, mu):
    lengths = lognormal_lengths(20000, seed=1, mu=mu, cap=max_len)
    steps = sampler.plan_epoch(lengths, lengths, batch, max_len, 2, seed=0, epoch=0)
    assert sampler.packing_efficiency(steps, lengths, max_len, 2) >= 0.95


def flat(steps):
    return [i for s in steps for m in s["micro_batches"] for r in m for i in r.tolist()]


def test_deterministic_per_seed_and_epoch():
    lengths = lognormal_lengths(2000)
    plan = lambda seed, epoch: sampler.plan_epoch(lengths, lengths, 128, 4096, 2, seed, epoch)  # noqa: E731
    a, b = plan(3, 0), plan(3, 0)
    assert flat(a) == flat(b)
    assert flat(plan(3, 1)) != flat(a) and flat(plan(4, 0)) != flat(a)


def test_a_resumed_process_plans_the_same_remaining_steps(tmp_path):
    """train.py resumes by planning the epoch again in a new process and skipping to its saved step cursor, so
    the plan may depend on its arguments only: not on the global RNGs, hash order or earlier calls."""
    lengths = lognormal_lengths(2000)
    np.save(tmp_path / "lengths.npy", lengths)
    here = sampler.plan_epoch(lengths, lengths // 2, 128, 4096, 2, seed=3, epoch=1)
    resumed = """if True:
        import json, random, sys
        import numpy as np, torch
        import sampler
        random.seed(99); np.random.seed(99); torch.manual_seed(99)  # other global RNG states than the first run
        lengths = np.load(sys.argv[1])
        sampler.plan_epoch(lengths, lengths, 64, 4096, 2, seed=3, epoch=0)  # the epoch before, other settings
        steps = sampler.plan_epoch(lengths, lengths // 2, 128, 4096, 2, seed=3, epoch=1)[5:]
        print(json.dumps([{"micro_batches": [[r.tolist() for r in m] for m in s["micro_batches"]],
                           "num_samples": s["num_samples"], "num_loss_tokens": int(s["num_loss_tokens"])}
                          for s in steps]))"""
    out = subprocess.run([sys.executable, "-c", resumed, str(tmp_path / "lengths.npy")], cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True, check=True)
    rest = json.loads(out.stdout)
    assert len(rest) == len(here) - 5 > 0
    for mine, theirs in zip(here[5:], rest):
        assert [[rank.tolist() for rank in m] for m in mine["micro_batches"]] == theirs["micro_batches"]
        assert (mine["num_samples"], int(mine["num_loss_tokens"])) == (theirs["num_samples"],
                                                                       theirs["num_loss_tokens"])


def test_ranks_get_balanced_loads():
    lengths = lognormal_lengths(4096, seed=2)
    steps = sampler.plan_epoch(lengths, lengths, 512, 4096, 2, seed=0, epoch=0)
    loads = np.array([[lengths[idx].sum() for idx in micro] for s in steps for micro in s["micro_batches"]])
    assert (loads.min(axis=1) / loads.max(axis=1)).mean() > 0.9


def test_sample_longer_than_budget_is_an_error_at_start():
    lengths = np.array([100, 5000, 200])
    with pytest.raises(ConfigError, match="longer than max_batch_len=4096"):
        sampler.plan_epoch(lengths, lengths, 2, 4096, 1, 0, 0)
