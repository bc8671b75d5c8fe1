"""Multipack sampler: which samples each rank trains on, micro-step by micro-step.

An epoch is a seeded permutation cut into optimizer steps of exactly `effective_batch_size` samples (the last
step takes the remainder). Each step's samples are packed longest-first onto the least-loaded of
`world_size * micro_steps` bins of `max_batch_len` tokens (first-fit when that overflows), with as few
micro-steps as fit. The plan depends only
on (seed, epoch), so a resumed run re-plans the epoch and skips the steps it already took.

To try another sampler, replace `plan_epoch` with any function of the same signature returning the same shape.
"""
from __future__ import annotations

import heapq
import math

import numpy as np

from config import ConfigError


def plan_epoch(lengths: np.ndarray, loss_counts: np.ndarray, effective_batch_size: int, max_batch_len: int,
               world_size: int, seed: int, epoch: int) -> list[dict]:
    """Returns one dict per optimizer step:
    micro_batches[micro_step][rank] -> array of sample indices (one packed row), num_samples, num_loss_tokens."""
    check_lengths(lengths, max_batch_len)
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    return plan_steps(order, lengths, loss_counts, effective_batch_size, max_batch_len, world_size)


def plan_steps(order: np.ndarray, lengths: np.ndarray, loss_counts: np.ndarray, effective_batch_size: int,
               max_batch_len: int, world_size: int) -> list[dict]:
    """Sample indices in training order (a sample may repeat) cut into steps and packed, as plan_epoch returns."""
    steps = []
    for start in range(0, len(order), effective_batch_size):
        idx = order[start:start + effective_batch_size]
        steps.append({
            "micro_batches": pack_step(idx, lengths, max_batch_len, world_size),
            "num_samples": len(idx),
            "num_loss_tokens": int(loss_counts[idx].sum()),
        })
    return steps


def split_validation(num_samples: int, split: float, seed: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(training indices, held-out indices): a seeded draw of `split` samples (a fraction below 1, else a count).
    No split gives (None, empty), so the training plan stays exactly the one without validation."""
    count = round(split * num_samples) if split < 1 else int(split)
    if count == 0:
        return None, np.zeros(0, dtype=np.int64)
    if count >= num_samples:
        raise ConfigError(f"validation_split={split} holds out {count} of {num_samples} samples, leaving none to "
                          "train on; use a fraction such as 0.1 or a smaller count")
    held = np.sort(np.random.default_rng([seed, 0x76616C]).permutation(num_samples)[:count])  # own stream
    return np.setdiff1d(np.arange(num_samples), held), held


def restrict(plan: list[dict], indices: np.ndarray) -> list[dict]:
    """A plan made over a subset's arrays, its positions mapped back to the subset's sample indices."""
    for step in plan:
        step["micro_batches"] = [[indices[r] for r in micro] for micro in step["micro_batches"]]
    return plan


def check_lengths(lengths: np.ndarray, max_batch_len: int):
    if len(lengths) and lengths.max() > max_batch_len:
        n = int((lengths > max_batch_len).sum())
        raise ConfigError(f"{n} sample(s) are longer than max_batch_len={max_batch_len} (longest: "
                          f"{int(lengths.max())} tokens); raise max_batch_len or lower max_seq_len and re-tokenize")


def pack_step(idx: np.ndarray, lengths: np.ndarray, max_batch_len: int, world_size: int) -> list[list[np.ndarray]]:
    by_length = idx[np.argsort(-lengths[idx], kind="stable")]
    micro_steps = max(1, math.ceil(int(lengths[idx].sum()) / (world_size * max_batch_len)))
    while True:
        num_bins = micro_steps * world_size
        # balanced first; if that overflows a bin, the tighter first-fit before paying for another micro-step
        bins = _longest_first(by_length, lengths, num_bins, max_batch_len) or \
            _first_fit(by_length, lengths, num_bins, max_batch_len)
        if bins:
            break
        micro_steps += 1
    bins.sort(key=lambda b: -b[0])  # similar loads share a micro-step, so no rank waits long on another
    plan = []
    for m in range(micro_steps):
        row = [np.array(sorted(b[1]), dtype=np.int64) for b in bins[m * world_size:(m + 1) * world_size]]
        plan.append(row if m % 2 == 0 else row[::-1])  # alternate which rank gets the heavier bin
    return plan


def _longest_first(by_length: np.ndarray, lengths: np.ndarray, num_bins: int, capacity: int):
    """Each sample onto the currently lightest bin; None when some sample no longer fits."""
    heap = [(0, b) for b in range(num_bins)]
    members: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for i, n in zip(by_length.tolist(), lengths[by_length].tolist()):
        load, b = heapq.heappop(heap)
        if load + n > capacity:
            return None
        members[b].append(i)
        loads[b] = load + n
        heapq.heappush(heap, (load + n, b))
    return [(loads[b], members[b]) for b in range(num_bins)]


def _first_fit(by_length: np.ndarray, lengths: np.ndarray, num_bins: int, capacity: int):
    """Each sample into the first bin with room; None when some sample fits nowhere."""
    members: list[list[int]] = [[] for _ in range(num_bins)]
    loads = np.zeros(num_bins, dtype=np.int64)
    for i, n in zip(by_length.tolist(), lengths[by_length].tolist()):
        fits = np.flatnonzero(loads + n <= capacity)
        if not len(fits):
            return None
        members[fits[0]].append(i)
        loads[fits[0]] += n
    return [(int(loads[b]), members[b]) for b in range(num_bins)]


def packing_efficiency(steps: list[dict], lengths: np.ndarray, max_batch_len: int, world_size: int) -> float:
    """Real tokens over the token slots the plan reserves (ranks x max_batch_len x micro-steps)."""
    used = sum(int(lengths[rank_idx].sum()) for s in steps for micro in s["micro_batches"] for rank_idx in micro)
    slots = sum(len(s["micro_batches"]) for s in steps) * world_size * max_batch_len
    return used / slots if slots else 0.0
