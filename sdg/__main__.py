"""`python -m sdg`: synthetic data from an InstructLab taxonomy.

    python -m sdg validate TAXONOMY
    python -m sdg generate --taxonomy TAXONOMY --output-dir OUT [--profile cpu] [--num-instructions N] [--endpoint URL] [--concurrency K]
    python -m sdg mix recipe.yaml [--output FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from config import ConfigError, add_profile_option, exit_on_error, fill_from_profile


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdg", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a taxonomy and report every problem with file and line")
    v.add_argument("taxonomy")
    g = sub.add_parser("generate", help="generate train/test JSONL from a taxonomy with a teacher model")
    g.add_argument("--taxonomy", required=True, help="folder of qna.yaml files (try sdg/sample_taxonomy)")
    g.add_argument("--output-dir", required=True, help="gets train.jsonl, test.jsonl, stats.json and cache/")
    g.add_argument("--num-instructions", type=int, help="generation requests per leaf")
    g.add_argument("--endpoint",
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: start the embedded model)")
    g.add_argument("--model", help="model name at the endpoint (default: the first it serves)")
    g.add_argument("--concurrency", type=int, help="requests in flight (the server's slots count too)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--retries", type=int, default=4, help="retries per request, with exponential backoff (default 4)")
    g.add_argument("--judge-threshold", type=int, help="keep pairs scored at least this, 1-5; 0 skips the judge")
    g.add_argument("--dedup-threshold", type=float, default=0.9, help="ROUGE-L F1 for near duplicates; 1 = exact only")
    g.add_argument("--max-tokens", type=int, help="tokens per generated answer")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--chunk-words", type=int, default=180, help="knowledge document chunk size in words")
    g.add_argument("--restatements", type=int, default=2,
                   help="extra copies of each knowledge context with its sentences reordered (0 = none)")
    g.add_argument("--system-prompt", default=None, help="system message for every sample (default: none)")
    g.add_argument("--prompts-dir", default=None, help="folder of edited prompt templates (default: sdg/prompts)")
    add_profile_option(g, "generate", {"num_instructions": "num_instructions", "concurrency": "concurrency",
                                       "max_tokens": "max_tokens", "judge_threshold": "judge_threshold",
                                       "endpoint": "endpoint", "model": "model"})
    m = sub.add_parser("mix", help="combine messages datasets by sample counts or ratios")
    m.add_argument("recipe")
    m.add_argument("--output", default=None, help="output JSONL (default: the recipe's 'output')")
    args = p.parse_args(argv)
    if args.command == "generate":
        fill_from_profile(args)
    return args


def check_generate_args(args):
    if args.num_instructions < 1:
        raise ConfigError(f"--num-instructions {args.num_instructions}: use 1 or more (for example 10)")
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency {args.concurrency}: use 1 or more (for example 4)")
    if args.retries < 0 or args.timeout <= 0:
        raise ConfigError("--retries must be >= 0 and --timeout > 0 (for example --retries 4 --timeout 120)")
    if not 0 <= args.judge_threshold <= 5:
        raise ConfigError(f"--judge-threshold {args.judge_threshold}: use 1-5, or 0 to skip the judge")
    if not 0 < args.dedup_threshold <= 1:
        raise ConfigError(f"--dedup-threshold {args.dedup_threshold}: use a number in (0, 1], for example 0.9")
    if args.restatements < 0:
        raise ConfigError(f"--restatements {args.restatements}: use 0 or more (for example 2)")
    if args.max_tokens < 8 or args.chunk_words < 20:
        raise ConfigError("--max-tokens must be >= 8 and --chunk-words >= 20")


def teacher_endpoint(endpoint: str | None, max_tokens: int):
    """The given endpoint, or the embedded model started through serve/ for the length of the run, with a
    context for the longest prompt (a document chunk and a seed's context with its questions) plus the reply."""
    if endpoint:
        return contextlib.nullcontext(endpoint)
    from serve.background import running_server

    print("no --endpoint: starting the embedded SmolLM2 teacher (python -m serve) on loopback", file=sys.stderr)
    return running_server(ctx=max(2048, 1536 + max_tokens))


def run_generate(args):
    from sdg.generate import PROMPTS_DIR, Settings, format_report, generate
    from sdg.taxonomy import load_taxonomy
    from sdg.teacher import connect

    check_generate_args(args)
    leaves = load_taxonomy(args.taxonomy)
    settings = Settings(num_instructions=args.num_instructions, judge_threshold=args.judge_threshold,
                        dedup_threshold=args.dedup_threshold, max_tokens=args.max_tokens, temperature=args.temperature,
                        chunk_words=args.chunk_words, restatements=args.restatements,
                        system_prompt=args.system_prompt)
    output_dir = Path(args.output_dir)
    prompts_dir = Path(args.prompts_dir) if args.prompts_dir else PROMPTS_DIR
    with teacher_endpoint(args.endpoint, args.max_tokens) as endpoint:
        teacher = connect(endpoint, args.model, output_dir / "cache", args.concurrency, args.timeout, args.retries)
        try:
            summary = generate(leaves, teacher, output_dir, settings, prompts_dir)
        except KeyboardInterrupt:
            print(f"\ninterrupted: replies so far are kept in {output_dir / 'cache'}; rerun the same command to resume",
                  file=sys.stderr)
            sys.exit(130)
    print(format_report(summary))
    print(f"wrote {output_dir / 'train.jsonl'} ({summary['train_samples']} samples), "
          f"{output_dir / 'test.jsonl'} ({summary['test_samples']}), {output_dir / 'stats.json'}")


def run_validate(args):
    from sdg.taxonomy import validate_taxonomy

    leaves, problems = validate_taxonomy(args.taxonomy)
    for problem in problems:
        print(problem)
    for leaf in leaves:
        kind = "grounded skill" if leaf.grounded else leaf.kind
        extra = f", {len(leaf.documents)} document(s)" if leaf.kind == "knowledge" else ""
        print(f"ok  {leaf.name} ({kind}, {len(leaf.data['seed_examples'])} seed examples{extra})")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in taxonomy '{args.taxonomy}'")
    print(f"{len(leaves)} leaves valid")


def run_mix(args):
    from sdg.mix import mix

    out, report = mix(args.recipe, args.output)
    for path, available, taken in report:
        if path.startswith("excluded"):
            print(f"{path}: {taken} sample(s) removed that match the {available} held-out ones")
        else:
            print(f"{path}: {taken} of {available} samples")
    print(f"wrote {out} ({sum(t for path, _, t in report if not path.startswith('excluded'))} samples)")


def main(argv=None):
    args = parse_args(argv)
    {"validate": run_validate, "generate": run_generate, "mix": run_mix}[args.command](args)


if __name__ == "__main__":
    exit_on_error(main)
