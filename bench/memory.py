"""Peak memory per rank and tokens/s of every sharding mode, on the embedded SmolLM2-135M-Instruct, in one table.

    python bench/memory.py [--nproc 2] [--steps 4] [--warmup 1] [--seq-len 128] [--batch 8] [--dtype auto]
                           [--modes a,b,...]

Each mode is a real train.py run (torchrun, --nproc processes; QLoRA and the baseline run one) on the same mock
data. Peak host memory per rank is each worker's VmHWM (peak resident set), read from /proc while it runs; on
CUDA the run's logged peak_memory_gb (rank 0's max_memory_allocated) is shown too. tokens/s counts the steps after
--warmup. Ratios are against `none` (one process, full fine-tuning) measured in the same run.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/ (its names shadow ours)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench.common import ROOT, environment, save_result  # noqa: E402
from config import ConfigError, exit_on_error  # noqa: E402

FULL = {"lora.rank": 0}
LORA = {"lora.rank": 16, "lora.alpha": 32}
MODES = {  # name -> (processes: 1 or the --nproc, overrides)
    "none": (1, {**FULL, "distributed_backend": "none"}),
    "fsdp_full_shard": (0, {**FULL, "fsdp_options.sharding_strategy": "FULL_SHARD"}),
    "fsdp_shard_grad_op": (0, {**FULL, "fsdp_options.sharding_strategy": "SHARD_GRAD_OP"}),
    "fsdp_no_shard": (0, {**FULL, "fsdp_options.sharding_strategy": "NO_SHARD"}),
    "fsdp_full_shard_ckpt_full": (0, {**FULL, "activation_checkpointing": "full"}),
    "fsdp_full_shard_ckpt_selective": (0, {**FULL, "activation_checkpointing": "selective"}),
    "deepspeed_zero2": (0, {**FULL, "distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 2}),
    "deepspeed_zero3": (0, {**FULL, "distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 3}),
    "lora_fsdp": (0, LORA),
    "lora_deepspeed_zero3": (0, {**LORA, "distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 3}),
    "qlora_nf4": (1, {**LORA, "lora.quantize_data_type": "nf4", "distributed_backend": "none"}),
}


def peak_rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def worker_pids(pid: int) -> list[int]:
    """The processes under pid (torchrun's workers), found through /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for t in os.listdir(f"/proc/{p}/task")
                        for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def run_mode(name: str, nproc: int, overrides: dict, args, out_dir: Path) -> dict:
    settings = {"model_path": "embedded", "mock_data": True, "mock_data_len": args.seq_len,
                "mock_data_samples": args.batch * (args.steps + 1), "effective_batch_size": args.batch,
                "max_seq_len": args.seq_len, "max_batch_len": args.seq_len * args.batch,
                "max_steps": args.steps, "dtype": args.dtype,
                "ckpt_output_dir": str(out_dir), "checkpoint_at_epoch": False, "save_samples": 0,
                "resume": "false", "learning_rate": 1e-5, **overrides}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "train.py", "--config", "", *[f"{k}={v}" for k, v in settings.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(out_dir.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, float] = {}
    deadline = time.monotonic() + args.timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise ConfigError(f"{name} ran past {args.timeout}s; lower --steps or --seq-len")
            pids = worker_pids(proc.pid) if nproc > 1 else [proc.pid]
            for pid in pids:
                peaks[pid] = max(peaks.get(pid, 0.0), peak_rss_gb(pid))
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    if proc.returncode != 0:
        tail = out_dir.with_suffix(".log").read_text()[-2000:]
        raise ConfigError(f"mode {name} failed (exit {proc.returncode}):\n{tail}")
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")][args.warmup:]
    per_rank = sorted((v for v in peaks.values() if v > 0.05), reverse=True)[:nproc]  # workers, not helpers
    return {"mode": name, "processes": nproc, "peak_rss_gb_per_rank": [round(v, 3) for v in per_rank],
            "logged_peak_memory_gb": rows[-1]["peak_memory_gb"] if rows else None,
            "tokens_per_s": sum(r["num_tokens"] for r in rows) / sum(r["step_time_s"] for r in rows),
            "loss_first_timed_step": rows[0]["loss"] if rows else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="samples per optimizer step, all ranks together")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mode")
    p.add_argument("--dtype", default="auto", help="train.py's dtype for every mode (auto: as users run it)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    if "none" not in modes:
        modes.insert(0, "none")  # the baseline every ratio is against
    if args.steps <= args.warmup:
        raise ConfigError("--steps must be larger than --warmup: no step would be timed")
    env = environment()
    print(json.dumps(env))
    print(f"\n{'mode':24} {'procs':>5} {'peak RSS/rank GiB':>20} {'vs none':>8} {'tokens/s':>9} {'vs none':>8}")
    results = []
    with tempfile.TemporaryDirectory(prefix="minilab-memory-") as tmp:
        for name in modes:  # each row as soon as it is measured; `none` comes first
            nproc, overrides = MODES[name]
            r = run_mode(name, nproc or args.nproc, overrides, args, Path(tmp) / name)
            base = (results or [r])[0]
            r["peak_ratio_vs_none"] = max(r["peak_rss_gb_per_rank"]) / max(base["peak_rss_gb_per_rank"])
            r["tokens_per_s_ratio_vs_none"] = r["tokens_per_s"] / base["tokens_per_s"]
            results.append(r)
            ranks = "/".join(f"{v:.2f}" for v in r["peak_rss_gb_per_rank"])
            print(f"{r['mode']:24} {r['processes']:>5} {ranks:>20} {r['peak_ratio_vs_none']:>7.2f}x "
                  f"{r['tokens_per_s']:>9.0f} {r['tokens_per_s_ratio_vs_none']:>7.2f}x", flush=True)
    out = save_result("memory", {"environment": env, "settings": vars(args), "results": results})
    print(f"saved {out}")


if __name__ == "__main__":
    exit_on_error(main)
