"""Recipes that read what training measures (README, "Recipes: one edit each"), each switched on by one config key.

- `sampler: loss_weighted`: an epoch draws its samples with probability proportional to each one's last loss per
  trained token (sample_stats.py keeps it), so hard samples come back more often.
- `log_grad_noise_scale: true`: the gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of
  Large-Batch Training", appendix A.1) of every step, in metrics.jsonl, from each rank's own gradient (the small
  batch) and the reduced one (the big batch).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

import sampler
from config import ConfigError


def plan_loss_weighted(lengths: np.ndarray, loss_counts: np.ndarray, effective_batch_size: int, max_batch_len: int,
                       world_size: int, seed: int, epoch: int, stats: np.ndarray) -> list[dict]:
    """As many draws as samples, with replacement, p proportional to the last loss per token; a sample not yet
    trained counts as the hardest one seen. The first epoch, where no sample has a loss, is multipack's own."""
    loss = stats["loss_per_token"]
    seen = ~np.isnan(loss)
    if not seen.any():
        return sampler.plan_epoch(lengths, loss_counts, effective_batch_size, max_batch_len, world_size, seed, epoch)
    sampler.check_lengths(lengths, max_batch_len)
    weights = np.where(seen, loss, loss[seen].max())
    order = np.random.default_rng([seed, epoch]).choice(len(lengths), size=len(lengths), p=weights / weights.sum())
    return sampler.plan_steps(order, lengths, loss_counts, effective_batch_size, max_batch_len, world_size)


SAMPLERS = {"loss_weighted": plan_loss_weighted}  # config.py's CHOICES["sampler"] names them too


class LocalGradSquare:
    """FSDP2 reduces gradients inside backward (on the last micro-step, sharding.set_grad_sync), so each rank's own
    gradient exists only as the input of that reduce-scatter: this comm (FSDPModule.set_custom_reduce_scatter)
    adds its input's squared norm, this rank's accumulated gradient, zero-padded, then reduce-scatters it as the
    default comm does, so the reduced gradient is the same bit for bit."""

    def __init__(self):
        self.sq = None

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        sq = torch.linalg.vector_norm(input_tensor, dtype=torch.float64).square()
        self.sq = sq if self.sq is None else self.sq + sq
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)

    def take(self, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
        """(world_size,) float64 with this step's sum at this rank's place, for train_step's all-reduce; resets."""
        vec = torch.zeros(world_size, dtype=torch.float64, device=device)
        if self.sq is not None:
            vec[rank] = self.sq
        self.sq = None
        return vec


def watch_local_grads(model, cfg, world_size: int) -> LocalGradSquare:
    """Install LocalGradSquare on every FSDP2 module; refuse runs whose gradients no reduce-scatter carries."""
    from torch.distributed.fsdp import FSDPModule
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    strategy = cfg.fsdp_options.sharding_strategy
    if world_size < 2 or not isinstance(model, FSDPModule) or strategy == "NO_SHARD" or \
            (strategy == "HYBRID_SHARD" and local < 2):
        raise ConfigError("log_grad_noise_scale compares each rank's gradient with the reduced one: it needs 2 or "
                          "more processes under distributed_backend=fsdp, with fsdp_options.sharding_strategy "
                          "FULL_SHARD or SHARD_GRAD_OP (or HYBRID_SHARD with 2+ processes per node)")
    comm = LocalGradSquare()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_reduce_scatter(comm)
    return comm


def grad_noise_scale(local_sq: np.ndarray, grad_norm: float, step: dict, loss_counts: np.ndarray) -> dict:
    """B_simple = tr(Sigma) / |G|^2 in trained tokens, the loss being a mean over them. Rank r holds
    world_size / N x the sum of its n_r tokens' gradients (train_step's loss_scale), so its own mean gradient is
    that x N / (world_size n_r), with E|g_r|^2 = |G|^2 + tr(Sigma) / n_r; averaged over the ranks with tokens, the
    small batch is the harmonic mean of their n_r; the big one is all N tokens, |G_big| = grad_norm (before
    clipping). Both estimates are unbiased but noisy: average each over steps before dividing, as the paper does."""
    world_size = len(local_sq)
    n = np.array([sum(int(loss_counts[micro[r]].sum()) for micro in step["micro_batches"])
                  for r in range(world_size)], dtype=np.float64)
    big, has = n.sum(), n > 0
    if has.sum() < 2:  # one rank's batch is then the whole batch: nothing to compare
        return {}
    small_sq = np.mean(local_sq[has] * (big / (world_size * n[has])) ** 2)
    small = 1 / np.mean(1 / n[has])
    big_sq = grad_norm ** 2
    sq_norm = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1 / small - 1 / big)
    return {"grad_noise_scale": float(trace / sq_norm), "grad_noise_trace": float(trace),
            "grad_noise_sq_norm": float(sq_norm)}
