"""Sampler planning time and packing efficiency on a large epoch.

    python bench/sampler.py [--samples 1000000] [--median 300] [--sigma 0.8]

Lengths are lognormal (clipped to [16, max_seq_len]). For each setting, sampler.plan_epoch plans one epoch and
the bench reports its wall time, its slot fill (sampler.packing_efficiency: real tokens over ranks x micro-steps
x max_batch_len) and its compute efficiency (real tokens over ranks x the heaviest rank's row, micro-step by
micro-step: what padding-free ranks actually spend). Baseline, same samples and steps: padded batches, each
rank's share padded to its longest sample, ranks waiting for the largest padded share; and the time of that
trivial plan (a permutation cut into batches).
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repo root instead of bench/, so `import sampler` is the trainer's sampler and not this file
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import environment, lognormal_lengths, save_result  # noqa: E402

import sampler  # noqa: E402
from config import exit_on_error  # noqa: E402

SETTINGS = [  # (effective_batch_size, max_batch_len, world_size, max_seq_len)
    (128, 8192, 8, 4096),
    (32, 4096, 1, 2048),
]


def padded_plan(lengths: np.ndarray, effective_batch_size: int, world_size: int, seed: int) -> tuple[float, float]:
    """(seconds, efficiency) of the usual padded batching of the same epoch."""
    start = time.perf_counter()
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))
    used = slots = 0
    for s in range(0, len(order), effective_batch_size):
        shares = [x for x in np.array_split(order[s:s + effective_batch_size], world_size) if len(x)]
        used += sum(int(lengths[x].sum()) for x in shares)
        # every rank computes its padded batch, then waits for the rank with the largest one
        slots += world_size * max(len(x) * int(lengths[x].max()) for x in shares)
    return time.perf_counter() - start, used / slots


def balance(steps: list[dict], lengths: np.ndarray, world_size: int) -> float:
    """Real tokens over what the ranks spend: each micro-step lasts as long as its heaviest rank's row."""
    used = slots = 0
    for s in steps:
        for micro in s["micro_batches"]:
            loads = [int(lengths[r].sum()) for r in micro]
            used += sum(loads)
            slots += world_size * max(loads)
    return used / slots


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--median", type=float, default=300, help="median sample length in tokens")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="where to write the result (default runs/bench/sampler.json)")
    args = p.parse_args()
    result = {"env": environment(), "args": vars(args), "settings": []}
    print(json.dumps(result["env"]))
    print(f"{'ebs':>4} {'max_batch_len':>13} {'ranks':>5} {'plan s':>7} {'slot fill':>9} {'packed eff':>10} "
          f"{'padded eff':>10} {'packed/padded':>13} {'plan s / padded plan s':>22}")
    for ebs, max_batch_len, world_size, max_seq_len in SETTINGS:
        lengths = lognormal_lengths(args.samples, args.median, args.sigma, 16, max_seq_len, args.seed)
        loss_counts = lengths // 2
        start = time.perf_counter()
        steps = sampler.plan_epoch(lengths, loss_counts, ebs, max_batch_len, world_size, args.seed, 0)
        plan_s = time.perf_counter() - start
        efficiency = sampler.packing_efficiency(steps, lengths, max_batch_len, world_size)
        planned = np.sort(np.concatenate([r for s in steps for m in s["micro_batches"] for r in m]))
        assert np.array_equal(planned, np.arange(len(lengths))), "the plan lost or repeated samples"
        balanced = balance(steps, lengths, world_size)
        padded_s, padded_eff = padded_plan(lengths, ebs, world_size, args.seed)
        row = {"effective_batch_size": ebs, "max_batch_len": max_batch_len, "world_size": world_size,
               "max_seq_len": max_seq_len, "steps": len(steps), "plan_s": plan_s, "packing_efficiency": efficiency,
               "compute_efficiency": balanced,
               "padded_plan_s": padded_s, "padded_efficiency": padded_eff,
               "micro_steps_per_step": float(np.mean([len(s["micro_batches"]) for s in steps]))}
        result["settings"].append(row)
        print(f"{ebs:4} {max_batch_len:13} {world_size:5} {plan_s:7.2f} {efficiency:9.1%} {balanced:10.1%} "
              f"{padded_eff:10.1%} {balanced / padded_eff:12.2f}x {plan_s / padded_s:21.2f}x")
    print(f"{args.samples} samples, lognormal lengths (median {args.median:.0f}, sigma {args.sigma})")
    print(f"saved {save_result('sampler', result, args.json)}")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
