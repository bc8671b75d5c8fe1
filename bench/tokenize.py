"""Tokenization: tokenize_data.py against the floor any tokenizer of these conversations pays, and against a
straightforward per-sample `apply_chat_template` loop.

    python bench/tokenize.py [--samples 20000] [--median-words 200] [--num-proc 2 1] [--data-process-python PY]
                             [--repeats 1]

Data: synthetic system/user/assistant conversations, lognormal lengths (a few hundred tokens), words drawn
Zipf-like from the tokenizer's own ~31k whole-word tokens, as words occur in real text. All on the same data in one
run:
  tokenize_data num_proc=N  tokenize_data.py as users run it, in its own process and timed end to end: imports,
                            tokenizer load and worker start included (JSON validation, loss masks, files on disk)
  floor                     what no tokenizer of these conversations avoids: render each with the chat template,
                            the Rust tokenizer's encode_batch of the texts on every core, the ids written with numpy;
                            and, timed apart, the start-up of a process that does it (interpreter, import
                            transformers, tokenizer load), against which tokenize_data.py is printed too
  chat_template_ids         apply_chat_template(messages, tokenize=True) per sample: token ids only, no loss mask
  chat_template_prefix      the same plus the usual prefix trick for the loss mask (render up to each assistant turn)
  data_process              instructlab.training's data_process CLI, where --data-process-python (default: this
                            one) imports it; else printed as skipped, with why. It drops samples under 20 tokens.
Each method's wall time is printed against the floor's; the baselines run in this process, single-process as such
a loop is usually written. --repeats N runs every method N times in rounds: each figure is then the median over
the rounds, each ratio the median of the rounds' own ratios (a 2-core VM's speed drifts by several percent).
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repo root instead of bench/, which would shadow the stdlib `tokenize` (imported by numpy via linecache)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import ROOT, environment, save_result, write_jsonl  # noqa: E402

from config import ConfigError, exit_on_error  # noqa: E402
from model import load_tokenizer, resolve_model_path  # noqa: E402
from tokenize_data import load_tokenized  # noqa: E402

MAX_SEQ_LEN = 1 << 20  # nothing dropped for length: every method counts every sample


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


def floor(tok, rows: list[dict], out: Path) -> dict:
    """Render, encode_batch on every core (TOKENIZERS_PARALLELISM is set for it in main), write: each part timed."""
    start = time.perf_counter()
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    rendered = time.perf_counter()
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    encoded = time.perf_counter()
    ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    out.mkdir()
    np.save(out / "input_ids.npy", np.concatenate(ids))
    np.save(out / "offsets.npy", np.concatenate([[0], np.cumsum([len(i) for i in ids])]))
    end = time.perf_counter()
    return {"tokens": sum(len(i) for i in ids), "seconds": end - start, "render_s": rendered - start,
            "encode_batch_s": encoded - rendered, "write_s": end - encoded,
            "encode_threads": int(os.environ.get("RAYON_NUM_THREADS") or 0) or os.cpu_count()}


def run_timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return seconds


def tokenize_data_cli(src: Path, model_path: str, out: Path, num_proc: int) -> dict:
    seconds = run_timed([sys.executable, "tokenize_data.py", "--config", "", f"--data-path={src}",
                         f"--model-path={model_path}", f"--data-output-dir={out}", f"--max-seq-len={MAX_SEQ_LEN}",
                         f"--num-proc={num_proc}"])
    return {"tokens": json.loads((out / "meta.json").read_text())["total_tokens"], "seconds": seconds}


def data_process_missing(python: str) -> str | None:
    """Why instructlab.training's data_process cannot run with this python (the import's error), or None."""
    r = subprocess.run([python, "-c", "import instructlab.training"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {r.returncode}"


def data_process(python: str, src: Path, model_path: str, out: Path, num_proc: int, ours: Path) -> dict:
    """Its time and tokens, and how many of its samples tokenize_data.py's output (folder `ours`) holds with the
    same input_ids and labels: data_process keeps the order but drops samples under 20 tokens."""
    seconds = run_timed([python, "-m", "instructlab.training.data_process", "--data_path", str(src),
                         "--data_output_path", str(out), "--max_seq_len", str(MAX_SEQ_LEN),
                         "--model_name_or_path", model_path, "--num_cpu_procs", str(num_proc)])
    data = load_tokenized(str(ours))
    offsets, tokens, samples, identical, i = data["offsets"], 0, 0, 0, 0
    with open(out / "data.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            tokens, samples = tokens + len(rec["input_ids"]), samples + 1
            while i + 1 < len(offsets) and data["input_ids"][offsets[i]:offsets[i + 1]].tolist() != rec["input_ids"]:
                i += 1  # a sample data_process dropped
            if i + 1 < len(offsets):
                identical += data["labels"][offsets[i]:offsets[i + 1]].tolist() == rec["labels"]
                i += 1
    return {"tokens": tokens, "seconds": seconds, "samples": samples, "identical_to_tokenize_data": identical}


def measure_round(tok, rows: list[dict], src: Path, model_path: str, work: Path, args, data_process_python) -> dict:
    """Every method once on the same conversations, in the order of the table; data_process where it imports."""
    work.mkdir()
    runs = {"floor": floor(tok, rows, work / "floor")}
    # what any process that renders with transformers pays before its first conversation: the interpreter,
    # `import transformers`, the tokenizer load (as tokenize_data.py loads it)
    runs["floor"]["start_up_s"] = run_timed([sys.executable, "-c", "import sys; from tokenize_data import "
                                             "load_tokenizer; load_tokenizer(sys.argv[1])", model_path])
    for n in args.num_proc:
        runs[f"tokenize_data num_proc={n}"] = tokenize_data_cli(src, model_path, work / f"out{n}", n)
    for name, fn in (("chat_template_ids", chat_template_ids), ("chat_template_prefix", chat_template_prefix)):
        start = time.perf_counter()
        tokens = fn(tok, rows)
        runs[name] = {"tokens": tokens, "seconds": time.perf_counter() - start}
    if data_process_python:
        n = max(args.num_proc)
        runs["data_process"] = data_process(data_process_python, src, model_path, work / "dp", n, work / f"out{n}")
    base, fl = runs["chat_template_ids"], runs["floor"]
    for r in runs.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["ratio"] = r["tokens_per_s"] / (base["tokens"] / base["seconds"])
        r["time_vs_floor"] = r["seconds"] / fl["seconds"]
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--median-words", type=int, default=200)
    p.add_argument("--num-proc", type=int, nargs="+", default=[2, 1])
    p.add_argument("--repeats", type=int, default=1, help="rounds of every method, one after another; medians")
    p.add_argument("--model-path", default="embedded")
    p.add_argument("--data-process-python", default=sys.executable,
                   help="a python that imports instructlab.training (a venv of its own is fine)")
    p.add_argument("--json", help="where to write the result (default runs/bench/tokenize.json)")
    args = p.parse_args()
    if args.repeats < 1:
        raise ConfigError(f"--repeats: {args.repeats}; give 1 or more rounds")
    # the floor encodes on every core, as a single-process tokenize_data.py does (its workers use one thread each)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    model_path = resolve_model_path(args.model_path)
    tok = load_tokenizer(model_path)
    rows = vocab_conversations(tok, args.samples, args.median_words, seed=0)
    work = Path(tempfile.mkdtemp(prefix="minilab-bench-tok-"))
    results = {"env": environment(), "samples": args.samples, "median_words": args.median_words, "skipped": {}}
    missing = data_process_missing(args.data_process_python)
    if missing:
        results["skipped"]["data_process"] = f"{args.data_process_python}: {missing}"
    try:
        src = write_jsonl(work / "conversations.jsonl", rows)
        rounds = [measure_round(tok, rows, src, model_path, work / f"round{r}", args,
                                None if missing else args.data_process_python) for r in range(args.repeats)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # each figure the median over the rounds; each ratio the median of the rounds' own ratios
    runs = {name: {key: float(np.median([rnd[name][key] for rnd in rounds]))
                   for key in ("seconds", "tokens_per_s", "ratio", "time_vs_floor")} | {"tokens": r["tokens"]}
            for name, r in rounds[0].items()}
    results.update(runs=runs, rounds=rounds)
    fl = rounds[0]["floor"]
    print(json.dumps(results["env"]))
    print(f"{args.samples} conversations, {runs['chat_template_ids']['tokens'] / args.samples:.0f} tokens each on "
          f"average; medians of {len(rounds)} round(s)")
    print(f"floor, first round: render {fl['render_s']:.2f} s + encode_batch {fl['encode_batch_s']:.2f} s on "
          f"{fl['encode_threads']} threads + write {fl['write_s']:.2f} s")
    print(f"{'method':32} {'seconds':>8} {'tokens/s':>10} {'vs chat_template_ids':>21} {'time vs floor':>14}  "
          "each round: seconds (time vs floor)")
    for name, r in runs.items():
        each = ", ".join(f"{rnd[name]['seconds']:.2f} ({rnd[name]['time_vs_floor']:.2f}x)" for rnd in rounds)
        print(f"{name:32} {r['seconds']:8.2f} {r['tokens_per_s']:10.0f} {r['ratio']:20.2f}x "
              f"{r['time_vs_floor']:13.2f}x  {each}")
    start_up = float(np.median([rnd["floor"]["start_up_s"] for rnd in rounds]))
    for name in (n for n in runs if n.startswith("tokenize_data")):
        vs = float(np.median([rnd[name]["seconds"] / (rnd["floor"]["seconds"] + rnd["floor"]["start_up_s"])
                              for rnd in rounds]))
        runs[name]["time_vs_floor_and_start_up"] = vs
        print(f"{name} against the floor plus a process's start-up (interpreter, import transformers, tokenizer "
              f"load: {start_up:.2f} s): {vs:.2f}x")
    if "data_process" in runs:
        dp = [rnd["data_process"] for rnd in rounds]
        print(f"data_process kept {dp[0]['samples']} samples; tokenize_data.py has the same input_ids and labels for "
              f"{min(d['identical_to_tokenize_data'] for d in dp)} of them")
    for name, why in results["skipped"].items():
        print(f"{name:32} skipped: {why}")
    print(f"saved {save_result('tokenize', results, args.json)}")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
