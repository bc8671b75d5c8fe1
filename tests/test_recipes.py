"""The recipes that read training statistics (recipes.py, sample_stats.py) on real processes: per-sample losses
gathered across ranks, a loss-weighted sampler that resumes bitwise, and the gradient noise scale."""
import os

import numpy as np
import pytest
import torch
from test_train import base_args, metrics, run_train, weights

import checkpoint
import recipes
import sample_stats
import sampler
import train
from config import ConfigError, load_config
from model import CausalLMWithLoss, load_model, pack


def trained_data(tiny_model_dir, dataset, tmp_path):
    cfg = load_config(None, base_args(tiny_model_dir, dataset, tmp_path / "unused"))
    return train.prepare_data(cfg, tiny_model_dir, 0)


def test_per_sample_losses_gathered_on_two_ranks_equal_each_sample_alone(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"  # several micro-steps per rank, and held-out samples the statistics never see
    run_train(base_args(tiny_model_dir, dataset, out, max_steps=1, max_batch_len=300, sampler="loss_weighted",
                        validation_split=4), nproc=2)
    stats = np.load(checkpoint.find_resume("auto", str(out)) / "sample_stats.npy")
    seen = np.flatnonzero(stats["last_step"] == 1)
    assert len(seen) == 16 and np.isnan(stats["loss_per_token"][stats["last_step"] == -1]).all()
    _, held_out = sampler.split_validation(32, 4, 5)
    assert not set(seen) & set(held_out)
    data = trained_data(tiny_model_dir, dataset, tmp_path)
    lm = load_model(tiny_model_dir, torch.float32)  # the weights before the step's update
    with torch.no_grad():
        for i in seen:
            ids, labels = train.sample(data, i)
            alone = lm(input_ids=torch.tensor(ids[None], dtype=torch.long),
                       labels=torch.tensor(labels[None], dtype=torch.long)).loss.item()
            assert stats["loss_per_token"][i] == pytest.approx(alone, rel=1e-6), i


def test_loss_weighted_sampler_resumes_bitwise_on_two_ranks(tmp_path, tiny_model_dir, dataset, monkeypatch):
    common = dict(sampler="loss_weighted", effective_batch_size=8, num_epochs=2, save_samples=8, max_batch_len=300)
    full = tmp_path / "full"
    run_train(base_args(tiny_model_dir, dataset, full, **common), nproc=2)
    killed = tmp_path / "killed"
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=6:kill")  # mid second epoch, the first weighted one
    assert run_train(base_args(tiny_model_dir, dataset, killed, **common), nproc=2, check=False).returncode != 0
    monkeypatch.delenv("MINILAB_TEST_HOOK")
    assert "at step 6" in run_train(base_args(tiny_model_dir, dataset, killed, **common), nproc=2).stdout
    a, b = metrics(full), metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]  # bitwise, every step
    wa, wb = weights(full), weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = np.load(checkpoint.find_resume("auto", str(full)) / "sample_stats.npy")
    sb = np.load(checkpoint.find_resume("auto", str(killed)) / "sample_stats.npy")
    assert np.array_equal(sa, sb)
    # the second epoch drew 32 times with replacement: some samples twice, so fewer than 32 distinct ones
    assert 0 < (sa["last_step"] > 4).sum() < 32 and not np.isnan(sa["loss_per_token"]).any()


def test_loss_weighted_draws_high_loss_samples_more_often():
    n = 4000
    lengths = np.random.default_rng(0).integers(8, 64, size=n)
    stats = sample_stats.new(n)
    stats["loss_per_token"] = np.where(np.arange(n) % 2, 3.0, 1.0)
    stats["loss_per_token"][::10] = np.nan  # never trained: counts as the hardest seen (3.0)
    plan = recipes.plan_loss_weighted(lengths, lengths - 1, 100, 2048, 2, seed=1, epoch=1, stats=stats)
    drawn = np.concatenate([idx for s in plan for micro in s["micro_batches"] for idx in micro])
    assert [s["num_samples"] for s in plan] == [100] * 40 and len(drawn) == n
    counts = np.bincount(drawn, minlength=n)
    weight = np.nan_to_num(stats["loss_per_token"], nan=3.0)
    for w in (1.0, 3.0):
        group = weight == w
        expected = n * (weight[group].sum() / weight.sum())
        assert abs(counts[group].sum() - expected) < 5 * np.sqrt(expected), w  # 5 sigma of a binomial
    per_sample = counts[weight == 3.0].mean() / counts[weight == 1.0].mean()
    assert 2.6 < per_sample < 3.4
    again = recipes.plan_loss_weighted(lengths, lengths - 1, 100, 2048, 2, seed=1, epoch=1, stats=stats)
    assert all(np.array_equal(x, y) for s, t in zip(plan, again)
               for mx, my in zip(s["micro_batches"], t["micro_batches"]) for x, y in zip(mx, my))
    stats["loss_per_token"] = np.nan  # nothing trained yet: multipack's own epoch
    first = recipes.plan_loss_weighted(lengths, lengths - 1, 100, 2048, 2, seed=1, epoch=0, stats=stats)
    multipack = sampler.plan_epoch(lengths, lengths - 1, 100, 2048, 2, 1, 0)
    assert [s["num_loss_tokens"] for s in first] == [s["num_loss_tokens"] for s in multipack]


def test_grad_noise_scale_on_two_ranks_equals_per_rank_gradients_by_hand(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"  # 300-token rows: each rank accumulates several micro-steps before the reduction
    run_train(base_args(tiny_model_dir, dataset, out, max_steps=1, max_batch_len=300, log_grad_noise_scale=True),
              nproc=2)
    logged = metrics(out)[1]
    data = trained_data(tiny_model_dir, dataset, tmp_path)
    step = sampler.plan_epoch(data["lengths"], data["loss_counts"], 16, 300, 2, 5, 0)[0]
    assert len(step["micro_batches"]) > 1
    model = CausalLMWithLoss(load_model(tiny_model_dir, torch.float32, "sdpa_varlen"))
    params = [p for p in model.parameters() if p.requires_grad]

    def mean_gradient(rank):
        """The gradient of the mean token loss over this rank's samples alone, by the model's own loss."""
        idx = np.concatenate([micro[rank] for micro in step["micro_batches"]])
        model.zero_grad()
        for i in idx:
            model(**pack([train.sample(data, i)], torch.device("cpu"), "sdpa_varlen"),
                  loss_scale=1.0 / data["loss_counts"][idx].sum()).backward()
        return torch.cat([p.grad.flatten().double() for p in params]), int(data["loss_counts"][idx].sum())
    (g0, n0), (g1, n1) = mean_gradient(0), mean_gradient(1)
    big = (n0 * g0 + n1 * g1) / (n0 + n1)  # the whole step's mean gradient
    assert logged["grad_norm"] == pytest.approx(big.norm().item(), rel=1e-6)
    # McCandlish et al.'s B_simple: small batch = one rank's (its token count, harmonic mean over ranks)
    small_sq, big_sq = (g0.square().sum() + g1.square().sum()).item() / 2, big.square().sum().item()
    b_small, b_big = 2 / (1 / n0 + 1 / n1), n0 + n1
    sq_norm = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    assert logged["grad_noise_sq_norm"] == pytest.approx(sq_norm, rel=1e-6)
    assert logged["grad_noise_trace"] == pytest.approx(trace, rel=1e-6)
    assert logged["grad_noise_scale"] == pytest.approx(trace / sq_norm, rel=1e-6)  # measured: under 1e-7


def test_recipes_refuse_what_they_cannot_do(tmp_path, tiny_model_dir, dataset):
    with pytest.raises(ConfigError, match=r"'sampler' must be one of \['multipack', 'loss_weighted'\]"):
        load_config(None, ["sampler=loss_weigted"])
    r = run_train(base_args(tiny_model_dir, dataset, tmp_path / "one", max_steps=1, log_grad_noise_scale=True),
                  check=False)
    assert r.returncode == 2 and "log_grad_noise_scale compares each rank's gradient" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "one" / "metrics.jsonl")
