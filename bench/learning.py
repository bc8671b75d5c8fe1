"""What one knowledge leaf teaches: train on its taxonomy samples alone (no teacher), score the held-out questions
base vs trained, time it. The README "Learning you can see" table rows come from this script.

    python bench/learning.py --leaf marrowick                                        # the cpu profile's defaults
    python bench/learning.py --taxonomy bench/user_taxonomy --leaf vorlund_instruments
    python bench/learning.py --leaf marrowick --restatements 0 --set learning_rate=5e-4 --set num_epochs=10

Training data is what `sdg generate` writes for the leaf without the teacher's pairs (sdg.generate.taxonomy_samples:
training seed pairs, document chunks and their restatements, 4-choice practice), each sample repeated as the cpu
profile's mix.knowledge_repeats says (pipeline.sh's mix); the held-out half never trains.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/ (its tokenize.py would shadow)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from bench.common import ROOT, environment, run_train_py, save_result, write_jsonl  # noqa: E402
from config import EMBEDDED_MODEL, exit_on_error, stage_settings  # noqa: E402


def leaf_data(taxonomy: str, name: str, restatements: int) -> tuple[list[dict], list[dict], dict]:
    from sdg.generate import Settings, heldout_record, taxonomy_samples
    from sdg.heldout import split_leaf
    from sdg.taxonomy import load_taxonomy

    leaves = [leaf for leaf in load_taxonomy(taxonomy) if leaf.kind == "knowledge"]
    leaf = next((leaf for leaf in leaves if leaf.name == name or leaf.name.endswith("/" + name)), None)
    if leaf is None:
        raise SystemExit(f"error: no knowledge leaf '{name}' in {taxonomy}; leaves: "
                         f"{', '.join(leaf.name for leaf in leaves) or 'none'}")
    settings = Settings(restatements=restatements)
    training_leaf, held = split_leaf(leaf)
    samples, counts = taxonomy_samples(training_leaf, settings)
    return samples, [heldout_record(p, leaf, settings) for p in held], dict(counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--taxonomy", default=str(ROOT / "sdg" / "sample_taxonomy"))
    p.add_argument("--leaf", required=True, help="a knowledge leaf's name or its last part")
    p.add_argument("--restatements", type=int, default=2, help="as sdg generate --restatements")
    p.add_argument("--knowledge-repeats", type=int, default=stage_settings("cpu")["mix"]["knowledge_repeats"],
                   help="copies of each sample per epoch (default: the cpu profile's mix.knowledge_repeats)")
    p.add_argument("--set", action="append", default=[], help="train.py override on top of --profile cpu")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="where to write the result (default runs/bench/learning.json)")
    args = p.parse_args()
    from eval.heldout import score_model

    work = Path(tempfile.mkdtemp(prefix="minilab-bench-learning-"))
    try:
        samples, held, counts = leaf_data(args.taxonomy, args.leaf, args.restatements)
        write_jsonl(work / "test.jsonl", held)
        training = write_jsonl(work / "train.jsonl", samples * args.knowledge_repeats)
        overrides = [f"model_path={args.model}", f"data_path={training}",
                     f"data_output_dir={work / 'tok'}", f"ckpt_output_dir={work / 'run'}",
                     "keep_last_checkpoint_only=true", "resume=false", *args.set]
        start = time.perf_counter()
        ran = run_train_py(["--profile", "cpu", *overrides], work / "run" / "metrics.jsonl", args.timeout)
        train_s = time.perf_counter() - start
        trained_dir = work / "run" / "hf_format" / "last_epoch"
        from eval.heldout import read_heldout
        leaves = read_heldout(str(work / "test.jsonl"))
        options = SimpleNamespace(metrics="multiple choice,multiple choice (cloze),recall", seed=42, batch_size=8,
                                  max_new_tokens=32)
        base, _ = score_model(args.model, leaves, options)
        trained, replies = score_model(str(trained_dir), leaves, options)
        total_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scores = {metric: {"base": base[(leaf, metric)], "trained": trained[(leaf, metric)]} for leaf, metric in trained}
    result = {"env": environment(("peft", "lm_eval")), "args": vars(args), "samples": counts,
              "steps": len(ran["rows"]), "train_minutes": train_s / 60, "train_and_eval_minutes": total_s / 60,
              "scores": scores, "replies": replies}
    print(f"{args.leaf}: {json.dumps(counts)}, {result['steps']} steps, train {train_s / 60:.1f} min, "
          f"with both evaluations {total_s / 60:.1f} min")
    for metric, s in scores.items():
        print(f"{metric:24} base {fraction(s['base'])}   trained {fraction(s['trained'])}")
    print(f"saved {save_result('learning', result, args.json)}")


def fraction(score: dict) -> str:
    return f"{score['correct']}/{score['n']} = {score['value']:.3f} [{score['low']:.3f}, {score['high']:.3f}]"


if __name__ == "__main__":
    exit_on_error(main)
