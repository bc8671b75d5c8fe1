"""Serving benchmark: tokens/s and p50/p95 request latency for 1, 4 and 8 concurrent clients on loopback.

    python bench/serve.py [--model FILE.gguf] [--requests-per-client 3] [--max-tokens 32]

Baseline, measured in the same run: the same requests one after another through llama-cpp-python in-process
(no HTTP). Every server figure is printed with its ratio to that baseline. Requests are bounded.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/ (its names shadow stdlib's)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import openai  # noqa: E402

from bench.common import environment  # noqa: E402
from config import embedded_gguf_path, exit_on_error  # noqa: E402
from serve.background import running_server  # noqa: E402

PROMPTS = ("The history of the printing press", "A recipe for tomato soup", "Why the sky is blue",
           "How a bicycle stays upright", "The rules of chess", "What plants need to grow",
           "How rain forms", "The life of a honeybee")



def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(latencies: list[float], tokens: int, wall_s: float) -> dict:
    return {"requests": len(latencies), "tokens": tokens, "tokens_per_s": tokens / wall_s,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95)}


def in_process_baseline(model: str, ctx: int, n_requests: int, max_tokens: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=ctx, verbose=False, n_gpu_layers=0)
    latencies, tokens = [], 0
    try:
        llm.create_completion(PROMPTS[0], max_tokens=4, temperature=0)  # warm-up, as for the server
        start = time.perf_counter()
        for i in range(n_requests):
            t0 = time.perf_counter()
            out = llm.create_completion(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0)
            latencies.append(time.perf_counter() - t0)
            tokens += out["usage"]["completion_tokens"]
    finally:
        llm.close()
    return summarize(latencies, tokens, time.perf_counter() - start)


def over_http(base_url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="bench", timeout=300, max_retries=0)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = client.completions.create(model="bench", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                        temperature=0)
        return time.perf_counter() - t0, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    return summarize([r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    model = args.model or embedded_gguf_path()
    report = {"environment": environment(("llama_cpp", "openai")), "model": model, "max_tokens": args.max_tokens, "levels": {}}
    print(json.dumps(report["environment"]))
    baseline = in_process_baseline(model, args.ctx, 2 * args.requests_per_client, args.max_tokens)
    report["baseline_in_process"] = baseline
    print(f"baseline (in-process, sequential): {baseline['tokens_per_s']:.1f} tok/s, "
          f"p50 {baseline['p50_s']:.3f}s, p95 {baseline['p95_s']:.3f}s")
    with running_server(model, ctx=args.ctx) as base_url:
        over_http(base_url, 1, 1, args.max_tokens)  # warm-up, not counted
        for clients in (1, 4, 8):
            level = over_http(base_url, clients, args.requests_per_client, args.max_tokens)
            level["throughput_vs_baseline"] = level["tokens_per_s"] / baseline["tokens_per_s"]
            level["p50_vs_baseline"] = level["p50_s"] / baseline["p50_s"]
            report["levels"][clients] = level
            print(f"{clients} client(s): {level['tokens_per_s']:.1f} tok/s "
                  f"({level['throughput_vs_baseline']:.2f}x baseline), p50 {level['p50_s']:.3f}s "
                  f"({level['p50_vs_baseline']:.2f}x), p95 {level['p95_s']:.3f}s, {level['requests']} requests")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    exit_on_error(main)
