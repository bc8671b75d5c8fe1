"""Tokenization throughput: tokenize_data.py against a straightforward per-sample `apply_chat_template` loop.

    python bench/tokenize.py [--samples 20000] [--median-words 200] [--num-proc 1 2]

Data: synthetic system/user/assistant conversations, lognormal lengths (a few hundred tokens), words drawn
Zipf-like from the tokenizer's own ~31k whole-word tokens, as words occur in real text. Baselines, run on the
same data in the same process, single-process as such a loop is usually written:
  chat_template_ids     apply_chat_template(messages, tokenize=True) per sample: token ids only, no loss mask
  chat_template_prefix  the same plus the usual prefix trick for the loss mask (render up to each assistant turn)
tokenize_data.py does more than the first (JSON validation, loss mask, files on disk) and is timed end to end,
tokenizer loading and worker start included.
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repo root instead of bench/, which would shadow the stdlib `tokenize` (imported by numpy via linecache)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import environment, save_result, write_jsonl  # noqa: E402

from config import exit_on_error  # noqa: E402
from model import load_tokenizer, resolve_model_path  # noqa: E402
from tokenize_data import tokenize_dataset  # noqa: E402


def vocab_conversations(tok, n: int, median_words: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    # whole-word tokens in merge order (roughly frequency order), drawn Zipf-like as words are in real text
    vocab = sorted((i, t[1:]) for t, i in tok.get_vocab().items()
                   if t.startswith("Ġ") and len(t) > 2 and t[1:].isascii() and t[1:].isalpha())
    words = [w for _, w in vocab]
    weights = 1.0 / np.arange(1, len(words) + 1)
    totals = np.clip(rng.lognormal(np.log(median_words), 0.6, n), 8, 20 * median_words).astype(int)
    rows = []
    for total in totals.tolist():
        picked = rng.choice(words, size=total, p=weights / weights.sum()).tolist()
        split = max(2, total // 4)
        rows.append({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": " ".join(picked[:split]) + "?"},
                                  {"role": "assistant", "content": " ".join(picked[split:]).capitalize() + "."}]})
    return rows


def chat_template_ids(tok, rows: list[dict]) -> int:
    return sum(len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows)


def chat_template_prefix(tok, rows: list[dict]) -> int:
    tokens = 0
    for r in rows:
        messages = r["messages"]
        ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        labels = np.full(len(ids), -100)
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = tok.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True)
                start = len(prompt["input_ids"])
                end = len(tok.apply_chat_template(messages[:k + 1], tokenize=True)["input_ids"])
                labels[start:end] = ids[start:end]
        tokens += len(ids)
    return tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--median-words", type=int, default=200)
    p.add_argument("--num-proc", type=int, nargs="+", default=[2, 1])
    p.add_argument("--model-path", default="embedded")
    p.add_argument("--json", help="where to write the result (default runs/bench/tokenize.json)")
    args = p.parse_args()
    model_path = resolve_model_path(args.model_path)
    tok = load_tokenizer(model_path)
    rows = vocab_conversations(tok, args.samples, args.median_words, seed=0)
    work = Path(tempfile.mkdtemp(prefix="minilab-bench-tok-"))
    results = {"env": environment(), "samples": args.samples, "median_words": args.median_words, "runs": {}}
    try:
        src = write_jsonl(work / "conversations.jsonl", rows)
        for n in args.num_proc:
            start = time.perf_counter()
            meta = tokenize_dataset(str(src), model_path, str(work / f"out{n}"), 1 << 20, num_proc=n)
            results["runs"][f"tokenize_data num_proc={n}"] = {"tokens": meta["total_tokens"],
                                                                "seconds": time.perf_counter() - start}
        for name, fn in (("chat_template_ids", chat_template_ids), ("chat_template_prefix", chat_template_prefix)):
            start = time.perf_counter()
            tokens = fn(tok, rows)
            results["runs"][name] = {"tokens": tokens, "seconds": time.perf_counter() - start}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["runs"]["chat_template_ids"]
    base_rate = base["tokens"] / base["seconds"]
    print(json.dumps(results["env"]))
    print(f"{args.samples} conversations, {base['tokens'] / args.samples:.0f} tokens each on average")
    print(f"{'method':32} {'tokens/s':>10} {'vs chat_template_ids':>21}")
    for name, r in results["runs"].items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["ratio"] = r["tokens_per_s"] / base_rate
        print(f"{name:32} {r['tokens_per_s']:10.0f} {r['ratio']:20.2f}x")
    print(f"saved {save_result('tokenize', results, args.json)}")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
