"""Small steps pipeline.sh needs between the tools: settings, data split, checkpoint picking, the final summary.

    python phases.py settings --profile cpu [--set generate.num_instructions=2 ...]   # shell assignments
    python phases.py split TRAIN_JSONL OUT_DIR [--phased]  # knowledge.jsonl (phase 1) + skills.jsonl (phase 2)
    python phases.py question TEST_JSONL                # the first held-out seed question, for the chat check
    python phases.py run-yaml FILE key=value ...        # a checked train config for one phase
    python phases.py wait-server URL PID LOG            # block until a background `python -m serve` answers
    python phases.py checkpoints CKPT_DIR               # HF checkpoint folders, oldest first
    python phases.py best EVAL_DIR CKPT_DIR [--prune]   # best checkpoint by its eval JSON's overall score
    python phases.py summary OUT_DIR                    # base vs trained with 95% intervals, in words; summary.json, evaluation.png
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from config import ConfigError, exit_on_error, load_config, load_profile, parse_overrides, stage_settings
from eval import report
from eval.mt_bench import read_jsonl as eval_read_jsonl

def settings(profile: str, sets: list[str]) -> dict[str, dict]:
    """The profile's generate/mix/evaluate settings (config.stage_settings) and the train profile and overrides."""
    chosen = stage_settings(profile, sets)
    train_overrides = [s.removeprefix("train.") for s in sets if s.startswith("train.")]
    chosen["train"] = {"overrides": " ".join(shlex.quote(s) for s in train_overrides),
                       "profile": load_profile(profile).get("name", "")}
    return chosen


def print_settings(args) -> None:
    for section, values in settings(args.profile, args.set).items():
        for key, value in values.items():
            value = str(value).lower() if isinstance(value, bool) else str(value)
            print(f"{section.upper()}_{key.upper()}={shlex.quote(value)}")


def run_yaml(args) -> None:
    """Write one phase's train config and load it back, so every bad key is reported before any stage runs."""
    def typed(node):  # "3" -> 3, "true" -> true: the file reads as a user would write it
        return {k: typed(v) for k, v in node.items()} if isinstance(node, dict) else yaml.safe_load(node)

    text = "# written by pipeline.sh; run this phase alone with: python train.py --config " + args.file + "\n"
    text += yaml.safe_dump(typed(parse_overrides(args.items)), sort_keys=False)
    Path(args.file).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.file).with_suffix(".tmp")
    tmp.write_text(text)
    try:
        load_config(str(tmp))
    except ConfigError as e:
        tmp.unlink()
        where = f"{args.file} (from --profile, --model and --set train.*)"
        raise ConfigError(str(e).replace(str(tmp), where)) from None
    os.replace(tmp, args.file)


def wait_server(args) -> None:
    """Poll the server's /models until it answers; fail with its log tail if it exits or takes too long."""
    from serve.background import is_healthy, last_lines
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            raise ConfigError(f"the server (pid {args.pid}) exited before it was ready; its log {args.log}:\n"
                              + last_lines(args.log)) from None
        if is_healthy(args.url, os.environ.get("MINILAB_API_KEY")):
            return
        time.sleep(0.5)
    raise ConfigError(f"no answer from {args.url} after {args.timeout:.0f}s; its log {args.log}:\n"
                      + last_lines(args.log))


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found; run the generate stage first (./pipeline.sh --only generate)")
    return eval_read_jsonl(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    report.write_atomic(str(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def split(args) -> None:
    """Knowledge samples (phase 1 of LAB) and skill samples (phase 2); every sample lands in exactly one file. The
    single-phase mix repeats the knowledge part, so there either part may be empty; --phased needs both."""
    records = read_jsonl(args.train_jsonl)
    def is_knowledge(r):  # the leaf's kind, as sdg/taxonomy.py decided it; samples from elsewhere train skills
        return r.get("metadata", {}).get("kind") == "knowledge"
    knowledge = [r for r in records if is_knowledge(r)]
    skills = [r for r in records if not is_knowledge(r)]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("knowledge", knowledge), ("skills", skills)):
        if not part and args.phased:
            raise ConfigError(f"{args.train_jsonl} has no {name} samples; add a {name} leaf to the taxonomy "
                              "or run without --phased")
        write_jsonl(out / f"{name}.jsonl", part)
    print(f"{len(knowledge)} knowledge -> {out / 'knowledge.jsonl'}, {len(skills)} skills -> {out / 'skills.jsonl'}")


def question(args) -> None:
    """A held-out seed question, knowledge first (one line, no context): what the trained model should now know."""
    records = read_jsonl(args.test_jsonl)
    records.sort(key=lambda r: r.get("metadata", {}).get("kind") != "knowledge")
    for record in records:
        users = [m["content"] for m in record["messages"] if m["role"] == "user" and m["content"].strip()]
        if users:
            print(" ".join(users[0].split()))  # serve.chat reads one turn per line
            return
    raise ConfigError(f"{args.test_jsonl} has no user question; check the taxonomy's seed examples")


def checkpoint_dirs(ckpt_dir: str) -> list[Path]:
    """Complete HF checkpoints (config.json present), in training order."""
    root = Path(ckpt_dir) / "hf_format"
    found = [p for p in root.glob("*") if p.is_dir() and (p / "config.json").exists()]
    if not found:
        raise ConfigError(f"no HF checkpoint under {root}; run the training stage first")

    def order(p: Path):  # the best-validation-loss checkpoint (save_best_val_loss) counts as the final one
        return {"last_epoch": (1, 0), "best_val_loss": (2, 0)}.get(p.name) or (0, int(p.name.removeprefix("samples_")))
    return sorted(found, key=order)


def list_checkpoints(args) -> None:
    print("\n".join(str(p) for p in checkpoint_dirs(args.ckpt_dir)))


def best(args) -> None:
    """EVAL_DIR/NAME.json scores CKPT_DIR/hf_format/NAME; the highest overall wins (ties: the later one)."""
    scores = {}
    for ckpt in checkpoint_dirs(args.ckpt_dir):
        result_file = Path(args.eval_dir) / f"{ckpt.name}.json"
        if not result_file.exists():
            raise ConfigError(f"{result_file} is missing: checkpoint {ckpt} was not evaluated; rerun its phase")
        overall = json.loads(result_file.read_text()).get("overall")
        scores[ckpt] = float("-inf") if overall is None else overall
    winner = max(reversed(list(scores)), key=lambda p: scores[p])
    for ckpt, score in scores.items():
        shown = "no score (judge ratings unparsable)" if score == float("-inf") else f"{score:.4f}"
        print(f"{'*' if ckpt == winner else ' '} {ckpt.name}: {shown}", file=sys.stderr)
    if args.prune:
        for ckpt in scores:
            if ckpt != winner:
                shutil.rmtree(ckpt)
                print(f"pruned {ckpt}", file=sys.stderr)
    print(winner)


def evaluation_rows(out: Path) -> dict[str, dict]:
    """Every base-vs-trained score of the run: {label: {base, trained, delta, verdict, higher_is_better, result}},
    scores as {value, n, low, high} (95% interval; None where it cannot be computed)."""
    rows = {}
    heldout = out / "eval" / "heldout.json"
    for r in json.loads(heldout.read_text())["results"] if heldout.exists() else []:
        rows[f"held-out {r['metric']} ({r['leaf']})"] = {**{k: r[k] for k in ("base", "trained", "verdict",
                                                                            "higher_is_better")}, "result": str(heldout)}
    mmlu = out / "eval" / "mmlu.json"
    if mmlu.exists():  # every seed question of the taxonomy, the trained half included: a check of memory
        result = json.loads(mmlu.read_text())
        base, trained = (report.proportion(round(r["overall"] * r["questions"]), r["questions"])
                         for r in (result["base"], result))
        rows["MMLU-style accuracy (knowledge)"] = {"base": base, "trained": trained, "result": str(mmlu),
                                                   "higher_is_better": True, "verdict": report.verdict(base, trained),
                                                   "note": "all seed questions, including those trained on"}
    mt_bench = out / "eval" / "mt_bench.json"
    if mt_bench.exists():
        result = json.loads(mt_bench.read_text())
        base, trained = ({"value": r.get("overall"), "n": len(r.get("records", [])), "low": None, "high": None}
                         for r in (result.get("base") or {}, result))
        rows["MT-Bench-style score (skills)"] = {"base": base, "trained": trained, "result": str(mt_bench),
                                                 "higher_is_better": True, "verdict": "not measurable",
                                                 "note": "judge ratings carry no interval; the embedded judge is weak"}
    for row in rows.values():
        b, t = row["base"]["value"], row["trained"]["value"]
        row["delta"] = None if b is None or t is None else t - b
    return rows


def score_text(score: dict) -> str:
    if score["value"] is None:
        return "n/a"
    ci = f" [{score['low']:.3f}, {score['high']:.3f}]" if score.get("low") is not None else ""
    return f"{score['value']:.4f}{ci}"


def summary(args) -> None:
    out = Path(args.out_dir)
    evaluations = evaluation_rows(out)
    charted = {label: (row["base"], row["trained"]) for label, row in evaluations.items()
               if row["base"]["value"] is not None and row["trained"]["value"] is not None}
    if charted:
        report.plot_intervals(str(out / "evaluation.png"), charted, "accuracy (0-1) or NLL (nats/token)")
    candidates = {"final model": out / "final_model.txt", "GGUF": out / "model.gguf", "chat reply": out / "chat.txt",
                  "evaluation chart": out / "evaluation.png"}
    artifacts = {name: str(p) for name, p in candidates.items() if p.exists()}
    artifacts["training data"] = [str(p) for p in sorted((out / "data").glob("*.jsonl"))]
    artifacts["evaluation results"] = [str(p) for p in sorted(out.glob("eval/*.json"))]
    if (out / "final_model.txt").exists():
        artifacts["final model"] = (out / "final_model.txt").read_text().strip()
    artifacts["loss curves"] = [str(p) for p in sorted(out.glob("*/checkpoints/metrics.png"))]
    result = {"evaluations": evaluations, "artifacts": artifacts}
    report.write_json(str(out / "summary.json"), result)
    print("== minilab pipeline summary ==")
    for label, e in evaluations.items():
        delta = "n/a" if e["delta"] is None else f"{e['delta']:+.4f}"
        print(f"{label}: base {score_text(e['base'])} -> trained {score_text(e['trained'])} "
              f"(delta {delta}, n={e['trained']['n']}, {e['verdict']})")
    for name, path in artifacts.items():
        print(f"{name}: {', '.join(path) if isinstance(path, list) else path}")
    print(f"summary: {out / 'summary.json'}")
    for line in in_words(evaluations):
        print(line)


def in_words(evaluations: dict) -> list[str]:
    """The run's outcome as sentences: what improved, what did not, what could not be measured offline."""
    groups = {"improved": [], "worse": [], "no clear change": [], "not measurable": []}
    for label, e in evaluations.items():
        groups[e["verdict"]].append(label)
    lines = []
    if groups["improved"]:
        lines.append("Improved (95% intervals apart): " + "; ".join(groups["improved"]) + ".")
    if groups["worse"]:
        lines.append("Got worse (95% intervals apart): " + "; ".join(groups["worse"]) + ".")
    if groups["no clear change"]:
        lines.append("No clear change (intervals overlap, more held-out questions or training would tell): "
                     + "; ".join(groups["no clear change"]) + ".")
    if groups["not measurable"]:
        lines.append("Not measurable offline: " + "; ".join(groups["not measurable"]) + " (a judge model this "
                     "small gives no reliable rating; pass a stronger one with ./pipeline.sh --judge-endpoint URL "
                     "--force --only mtbench,summary).")
    if not evaluations:
        lines.append("Nothing was evaluated: run the mmlu and heldout stages (./pipeline.sh --only mmlu,heldout,summary).")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python phases.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("settings")
    s.add_argument("--profile", required=True)
    s.add_argument("--set", action="append", default=[], help="section.key=value")
    s.set_defaults(run=print_settings)
    s = sub.add_parser("split")
    s.add_argument("train_jsonl")
    s.add_argument("out_dir")
    s.add_argument("--phased", action="store_true", help="fail unless both parts have samples")
    s.set_defaults(run=split)
    s = sub.add_parser("question")
    s.add_argument("test_jsonl")
    s.set_defaults(run=question)
    s = sub.add_parser("run-yaml")
    s.add_argument("file")
    s.add_argument("items", nargs="*", help="key=value (dotted for nested keys)")
    s.set_defaults(run=run_yaml)
    s = sub.add_parser("wait-server")
    s.add_argument("url")
    s.add_argument("pid", type=int)
    s.add_argument("log")
    s.add_argument("--timeout", type=float, default=1800.0)  # vLLM may load for many minutes; a dead server fails at once
    s.set_defaults(run=wait_server)
    s = sub.add_parser("checkpoints")
    s.add_argument("ckpt_dir")
    s.set_defaults(run=list_checkpoints)
    s = sub.add_parser("best")
    s.add_argument("eval_dir")
    s.add_argument("ckpt_dir")
    s.add_argument("--prune", action="store_true", help="delete every other HF checkpoint of this phase")
    s.set_defaults(run=best)
    s = sub.add_parser("summary")
    s.add_argument("out_dir")
    s.set_defaults(run=summary)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    exit_on_error(main)
