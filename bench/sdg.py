"""SDG benchmark: generated samples (and teacher requests) per minute at concurrency 1, 2 and 4.

    python bench/sdg.py [--num-instructions 4] [--max-tokens 64] [--endpoint URL] [--judge-threshold 0]

Each level runs `python -m sdg generate` on the sample taxonomy into a fresh folder, so nothing comes from the
cache, against one teacher (default: the embedded SmolLM2 through serve/). Every job has a fixed seed, so all levels
ask for the same work. After an untimed warm-up run, the baseline, measured in the same run, is concurrency 1; the other levels print their ratio to it.
The judge is off by default because the tiny embedded judge rarely answers with a score.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # the repo root, not bench/ (its names shadow ours)

from bench.common import environment  # noqa: E402
from config import ConfigError, exit_on_error  # noqa: E402

LEVELS = (1, 2, 4)



def run_level(endpoint: str, concurrency: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"sdg-bench-c{concurrency}-") as out:
        cmd = [sys.executable, "-m", "sdg", "generate", "--taxonomy", str(ROOT / "sdg/sample_taxonomy"),
               "--output-dir", out, "--endpoint", endpoint, "--concurrency", str(concurrency),
               "--num-instructions", str(args.num_instructions), "--max-tokens", str(args.max_tokens),
               "--judge-threshold", str(args.judge_threshold)]
        start = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        seconds = time.perf_counter() - start
        if r.returncode != 0:
            raise ConfigError(f"generate at concurrency {concurrency} failed:\n{r.stderr[-2000:]}")
        stats = json.loads((Path(out) / "stats.json").read_text())
    minutes = seconds / 60
    return {"concurrency": concurrency, "seconds": round(seconds, 1), "samples": stats["train_samples"],
            "requests": stats["requests"].get("sent", 0), "samples_per_min": round(stats["train_samples"] / minutes, 2),
            "requests_per_min": round(stats["requests"].get("sent", 0) / minutes, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-instructions", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--judge-threshold", type=int, default=0)
    p.add_argument("--endpoint", default=None, help="teacher base URL (default: start the embedded model)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per level")
    args = p.parse_args()
    if args.endpoint:
        server = contextlib.nullcontext(args.endpoint)
    else:
        from serve.background import running_server
        server = running_server()
    with server as endpoint:
        run_level(endpoint, 1, argparse.Namespace(**{**vars(args), "num_instructions": 1}))  # warm-up, not timed
        results = [run_level(endpoint, level, args) for level in LEVELS]
    base = results[0]
    print(json.dumps({"environment": environment(("llama_cpp", "openai")), "endpoint": args.endpoint or "embedded SmolLM2 (llama.cpp)",
                      "settings": vars(args)}, indent=1))
    print(f"{'concurrency':>11} {'seconds':>8} {'samples':>8} {'requests':>9} {'samples/min':>12} {'req/min':>8} "
          f"{'ratio vs c=1 (req/min)':>23}")
    for r in results:
        ratio = r["requests_per_min"] / base["requests_per_min"] if base["requests_per_min"] else float("nan")
        print(f"{r['concurrency']:>11} {r['seconds']:>8} {r['samples']:>8} {r['requests']:>9} "
              f"{r['samples_per_min']:>12} {r['requests_per_min']:>8} {ratio:>22.2f}x")


if __name__ == "__main__":
    exit_on_error(main)
