"""Per-sample training statistics for samplers that read them: each sample's last loss per trained token and the
optimizer step it was last trained at (README, "Recipes: one edit each").

A planning function asks for them by having a `stats` parameter; then train.py keeps them for the whole dataset,
updates them every step, saves them in the full state and hands each epoch the statistics it started with. One
without it (multipack's plan_epoch) is called exactly as before, and nothing here runs.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

import sampler

DTYPE = np.dtype([("loss_per_token", np.float64), ("last_step", np.int64)])


def wanted(plan_fn) -> bool:
    return "stats" in inspect.signature(plan_fn).parameters


def new(num_samples: int) -> np.ndarray:
    """Never trained: no loss (NaN), last step -1."""
    stats = np.zeros(num_samples, DTYPE)
    stats["loss_per_token"], stats["last_step"] = np.nan, -1
    return stats


def plan(plan_fn, data: dict, train_idx: np.ndarray | None, cfg, world_size: int, state: dict) -> list[dict]:
    """The epoch's plan over the training samples (train_idx, None = all); a planning function with a `stats`
    parameter also gets state["epoch_stats"], the statistics as the epoch started (saved: a resumed epoch is
    planned alike)."""
    def subset(a):
        return a if train_idx is None else a[train_idx]
    stats = {"stats": subset(state["epoch_stats"])} if wanted(plan_fn) else {}
    steps = plan_fn(subset(data["lengths"]), subset(data["loss_counts"]), cfg.effective_batch_size,
                    cfg.max_batch_len, world_size, cfg.random_seed, state["epoch"], **stats)
    return steps if train_idx is None else sampler.restrict(steps, train_idx)


def loss_sums(token_losses: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """Each packed sample's summed token losses (counts: its trained tokens, in packing order), float64, in one
    reduction whose order is fixed: the losses fill a zero-padded (samples, longest) matrix, summed along rows.
    (index_add_ is atomic on CUDA, so its rounding, and with it the next epoch's plan, could vary run to run.)"""
    rows = torch.arange(int(counts.max()), device=token_losses.device)[None] < \
        torch.as_tensor(counts, device=token_losses.device)[:, None]
    return torch.zeros(rows.shape, dtype=torch.float64, device=rows.device).masked_scatter_(
        rows, token_losses.double()).sum(1)


def place(sums: list[torch.Tensor], step: dict, rank: int, device: torch.device) -> torch.Tensor:
    """A float64 vector over the step's samples (micro-step by micro-step, rank by rank) holding this rank's sums
    at its samples' places and zeros elsewhere: summed over the ranks (train_step's all-reduce), it is
    all of them, exactly, on every rank."""
    sizes = np.array([[len(idx) for idx in micro] for micro in step["micro_batches"]])  # (micro-step, rank)
    starts = np.cumsum([0, *sizes.ravel()])[:-1].reshape(sizes.shape)
    mine = [np.arange(a, a + n) for a, n in zip(starts[:, rank], sizes[:, rank]) if n]
    vec = torch.zeros(int(sizes.sum()), dtype=torch.float64, device=device)
    if mine:
        vec[torch.as_tensor(np.concatenate(mine), device=device)] = torch.cat(sums)
    return vec


def update(stats: np.ndarray, step: dict, sums: np.ndarray, loss_counts: np.ndarray, global_step: int):
    """Record a step's all-reduced per-sample sums (place's order) as losses per token, seen at global_step."""
    idx = np.concatenate([idx for micro in step["micro_batches"] for idx in micro])
    stats["loss_per_token"][idx] = sums / loss_counts[idx]
    stats["last_step"][idx] = global_step
