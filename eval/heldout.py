"""Held-out evaluation from the taxonomy: what a trained model learned that it never saw, base vs trained.

    python -m eval.heldout --heldout OUT/generated/test.jsonl --model TRAINED --base-model embedded --output h.json

The held-out file is what `python -m sdg generate` writes to test.jsonl: seed pairs split off by content hash
before generation (sdg/heldout.py). Per knowledge leaf: multiple choice in lm-eval's MMLU format (distractors
are other held-out answers of the leaf), in letters and in lm-eval's continuation (cloze) form, and recall, the normalized answer found in a greedy free answer. Per
skill: the mean per-token negative log-likelihood of the held-out reference answers (needs no judge). Every
score carries its n and a 95% interval (Wilson for accuracies, bootstrap over samples for NLL).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from config import EMBEDDED_MODEL, ConfigError, add_profile_option, exit_on_error, fill_from_profile
from eval import report
from sdg.heldout import normalize
from sdg.taxonomy import mmlu_subject

METRICS = {"multiple choice": True, "multiple choice (cloze)": True, "recall": True, "answer NLL": False}  # higher is better?
MC_STYLES = {"multiple choice": "letters", "multiple choice (cloze)": "continuation"}  # eval.mmlu_tasks.STYLES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.heldout", description=__doc__.split("\n")[0])
    p.add_argument("--heldout", required=True, help="held-out JSONL from `python -m sdg generate` (test.jsonl)")
    p.add_argument("--model", required=True, help="trained HF folder")
    p.add_argument("--base-model", default=EMBEDDED_MODEL, help="the model before training (default: embedded)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of: {', '.join(METRICS)}")
    p.add_argument("--max-new-tokens", type=int, help="free answer length for recall (profile: heldout_max_tokens)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=42, help="shuffles the multiple-choice options")
    p.add_argument("--output", help="JSON result file (a markdown table is written next to it)")
    p.add_argument("--plot", help="PNG chart: base vs trained with intervals")
    add_profile_option(p, "evaluate", {"max_new_tokens": "heldout_max_tokens", "batch_size": "batch_size"})
    args = p.parse_args(argv)
    fill_from_profile(args)
    unknown = set(args.metrics.split(",")) - set(METRICS)
    if unknown:
        raise ConfigError(f"--metrics: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    return args


def read_heldout(path: str) -> dict[str, list[dict]]:
    """{leaf: records} of held-out records, each with metadata kind/question/answer (sdg.generate.heldout_record)."""
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found; run `python -m sdg generate` (or ./pipeline.sh --only generate)")
    leaves: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            meta = record.get("metadata", {})
            if not {"leaf", "kind", "question", "answer"} <= set(meta):
                raise ConfigError(f"{path}:{lineno}: not a held-out record (metadata needs leaf, kind, question, "
                                  "answer); regenerate it with python -m sdg generate")
            leaves.setdefault(meta["leaf"], []).append(record)
    if not leaves:
        raise ConfigError(f"{path} holds no held-out samples; the taxonomy's leaves need 2+ seed pairs each")
    return leaves


def mc_rows(leaf: str, records: list[dict], seed: int) -> list[dict]:
    """4-choice MMLU rows: the answer and 3 other held-out answers of the leaf, in a seeded order."""
    answers = list(dict.fromkeys(r["metadata"]["answer"] for r in records))
    rows = []
    for r in records:
        answer = r["metadata"]["answer"]
        pool = [a for a in answers if normalize(a) != normalize(answer)]
        if len(pool) < 3:
            return []
        rng = random.Random(f"{seed}:{leaf}:{r['metadata'].get('sha256', answer)}")
        choices = rng.sample(pool, 3) + [answer]
        rng.shuffle(choices)
        rows.append({"question": r["metadata"]["question"], "subject": mmlu_subject(leaf), "choices": choices,
                     "answer": choices.index(answer)})
    return rows


def multiple_choice(model, tokenizer, rows_by_leaf: dict[str, list[dict]], batch_size: int,
                    style: str = "letters") -> dict[str, dict]:
    """lm-eval's MMLU template of that style and its scoring (eval.mmlu_tasks) on the held-out rows, zero-shot."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.mmlu import evaluate
    from eval.mmlu_tasks import write_task_configs

    with tempfile.TemporaryDirectory(prefix="minilab-heldout-") as scratch:
        subjects = {rows[0]["subject"]: {"dev": [], "test": rows} for rows in rows_by_leaf.values()}
        group, tasks = write_task_configs(subjects, scratch, 0, style)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluate(lm, [group], tasks, TaskManager(include_path=scratch, include_defaults=False),
                       SimpleNamespace(few_shots=0, limit=None), "")
    by_subject = {rows[0]["subject"]: leaf for leaf, rows in rows_by_leaf.items()}
    return {by_subject[s]: report.proportion(round(v["acc"] * v["n"]), v["n"]) for s, v in out["subjects"].items()}


def prompt_ids(tokenizer, record: dict) -> list[int]:
    return tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def recall(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int) -> tuple[dict, list[str]]:
    """Greedy free answers; a hit when the normalized reference answer appears in the normalized reply."""
    import torch

    replies = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(records), batch_size):
        prompts = [prompt_ids(tokenizer, r) for r in records[start:start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    hits = sum(normalize(r["metadata"]["answer"]) in normalize(reply) for r, reply in zip(records, replies))
    return report.proportion(hits, len(records)), replies


def answer_nll(model, tokenizer, records: list[dict]) -> dict:
    """Mean per-token NLL of the reference answers (the assistant turn and its end-of-turn token) given the prompt."""
    import torch

    sums, counts = [], []
    for r in records:
        prompt = prompt_ids(tokenizer, r)
        full = tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
        if full[:len(prompt)] != prompt:
            raise ConfigError(f"the chat template renders {r['metadata']['leaf']}'s prompt differently alone and "
                              "inside the conversation; cannot isolate the answer tokens")
        labels = torch.tensor([-100] * len(prompt) + full[len(prompt):])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([full]), labels=labels[None]).loss  # mean over answer tokens
        n = int((labels[1:] != -100).sum())
        sums.append(loss.item() * n)
        counts.append(n)
    return report.ratio_bootstrap(sums, counts)


def score_model(spec: str, leaves: dict[str, list[dict]], args) -> tuple[dict, dict]:
    """{(leaf, metric): score} and {leaf: free replies} for one model."""
    from eval.mmlu import load_hf

    model, tokenizer = load_hf(spec, "float32")
    wanted = args.metrics.split(",")
    scores, replies = {}, {}
    knowledge = {leaf: recs for leaf, recs in leaves.items() if recs[0]["metadata"]["kind"] == "knowledge"}
    rows = {leaf: r for leaf, recs in knowledge.items() if (r := mc_rows(leaf, recs, args.seed))}
    for metric, style in MC_STYLES.items():
        if metric in wanted and rows:  # the same rows in both styles: letters and each choice's own text
            scores.update({(leaf, metric): s for leaf, s in
                           multiple_choice(model, tokenizer, rows, args.batch_size, style).items()})
    for leaf, recs in leaves.items():
        if leaf in knowledge and "recall" in wanted:
            scores[(leaf, "recall")], replies[leaf] = recall(model, tokenizer, recs, args.max_new_tokens,
                                                             args.batch_size)
        if leaf not in knowledge and "answer NLL" in wanted:
            scores[(leaf, "answer NLL")] = answer_nll(model, tokenizer, recs)
    return scores, replies


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # before lm_eval imports datasets
    leaves = read_heldout(args.heldout)
    base, _ = score_model(args.base_model, leaves, args)
    trained, replies = score_model(args.model, leaves, args)
    results = []
    for (leaf, metric), score in trained.items():
        results.append({"leaf": leaf, "metric": metric, "higher_is_better": METRICS[metric], "base": base[(leaf, metric)],
                        "trained": score, "verdict": report.verdict(base[(leaf, metric)], score, METRICS[metric])})
    result = {"model": args.model, "base_model": args.base_model, "heldout": args.heldout, "results": results,
              "replies": replies}
    table = ["| leaf | metric | n | base [95% CI] | trained [95% CI] | verdict |", "|---|---|---:|---|---|---|"]
    for r in results:
        table.append(f"| {r['leaf']} | {r['metric']} | {r['trained']['n']} | {interval(r['base'])} | "
                     f"{interval(r['trained'])} | {r['verdict']} |")
    print("\n".join(table))
    if args.output:
        report.write_json(args.output, result)
        report.write_atomic(str(Path(args.output).with_suffix(".md")), "\n".join(table) + "\n")
    if args.plot:
        report.plot_intervals(args.plot, {f"{r['leaf'].rsplit('/', 1)[-1]}: {r['metric']}": (r["base"], r["trained"])
                                          for r in results}, "accuracy (0-1) or NLL (nats/token)")
    return result


def interval(score: dict) -> str:
    if score.get("value") is None:
        return "n/a"
    if score.get("low") is None:
        return f"{score['value']:.3f}"
    return f"{score['value']:.3f} [{score['low']:.3f}, {score['high']:.3f}]"


if __name__ == "__main__":
    exit_on_error(lambda: main(sys.argv[1:]) and None)
