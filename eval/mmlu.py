"""MMLU accuracy through lm-eval, for a model loaded in process or served behind an OpenAI-compatible endpoint.

    python -m eval.mmlu --model runs/default/final --data-dir data/mmlu --few-shots 5 --output mmlu.json
    python -m eval.mmlu --model runs/default/final --base-model embedded --taxonomy taxonomy/ --few-shots 0
    python -m eval.mmlu --endpoint http://127.0.0.1:8000/v1 --model embedded --data-dir data/mmlu

Offline (--data-dir / --taxonomy) nothing touches the network; without them lm-eval downloads its standard
`mmlu` tasks. Prompts and scoring are lm-eval's MMLU template, so numbers compare with published ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from config import EMBEDDED_MODEL, ConfigError, add_profile_option, exit_on_error, fill_from_profile
from eval import report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.mmlu", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=EMBEDDED_MODEL,
                   help="HF folder (safetensors), .gguf file or 'embedded'; with --endpoint it only supplies the tokenizer")
    p.add_argument("--base-model", help="also evaluate this model and print base vs candidate")
    p.add_argument("--endpoint", help="OpenAI-compatible base URL (http://127.0.0.1:8000/v1) serving --model")
    p.add_argument("--base-endpoint", help="endpoint serving --base-model")
    p.add_argument("--tasks", help="comma list: lm-eval task names online (default: mmlu), subject names offline")
    p.add_argument("--few-shots", type=int)
    p.add_argument("--data-dir", help="local MMLU files (test, optional dev): JSONL, CSV or parquet")
    p.add_argument("--taxonomy", help="taxonomy folder: knowledge Q/As become 4-choice questions")
    p.add_argument("--seed", type=int, default=42, help="shuffles the taxonomy questions' choices")
    p.add_argument("--limit", type=int, help="at most N questions per subject (profile: mmlu_limit, 0 = all)")
    p.add_argument("--batch-size", type=int, help="in-process batch (endpoints get one request at a time)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--output", help="JSON result file; a markdown table is written next to it (.md)")
    p.add_argument("--plot", help="PNG chart of per-subject accuracy")
    add_profile_option(p, "evaluate", {"few_shots": "few_shots", "limit": "mmlu_limit", "batch_size": "batch_size"})
    args = p.parse_args(argv)
    fill_from_profile(args)
    if args.few_shots < 0 or (args.limit is not None and args.limit < 1) or args.batch_size < 1:
        raise ConfigError("--few-shots must be >= 0, --limit and --batch-size >= 1")
    if args.base_endpoint and not args.base_model:
        raise ConfigError("--base-endpoint needs --base-model (it supplies the base model's tokenizer)")
    return args


def model_source(spec: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a model argument; the embedded name becomes its cached HF folder."""
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ConfigError(f"model file '{spec}' not found")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    from model import resolve_model_path

    folder = resolve_model_path(EMBEDDED_MODEL if spec == "embedded" else spec)
    return folder, None


def load_hf(spec: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = model_source(spec)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{spec}': {e} (give an HF folder with safetensors, a .gguf file, "
                          "or 'embedded')") from None
    return model.eval(), tokenizer


def tokenizer_folder(spec: str, scratch: str) -> str:
    """lm-eval's API models load the tokenizer by path: a GGUF's tokenizer is saved as an HF folder first."""
    folder, gguf_file = model_source(spec)
    if not gguf_file:
        return folder
    from transformers import AutoTokenizer

    out = os.path.join(scratch, "tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
    return out


def endpoint_lm(base_url: str, tokenizer_dir: str):
    """lm-eval's local-completions model; scores the continuation from the end of the echoed prompt (see below)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from serve import client

    base_url = base_url.rstrip("/").removesuffix("/completions")
    _, served = client.connect(base_url, None, timeout_s=10, retries=0, role="model")

    class EchoTailCompletions(LocalCompletionsAPI):
        # llama-cpp-python pairs echoed prompt tokens with the right logprobs only when the prompt starts with
        # BOS, and drops that BOS from the echo. So: prefix BOS when the tokenizer does not add it itself, and
        # read the continuation's logprobs counted from the end, which holds whether or not BOS is echoed.
        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs):
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos)
            if not generate and self.bos_prefix and not payload["prompt"].startswith(self.bos_prefix):
                payload["prompt"] = self.bos_prefix + payload["prompt"]
            return payload

        @staticmethod
        def parse_logprobs(outputs, tokens=None, ctxlens=None, **kwargs):
            scores = []
            for out, toks, ctxlen in zip(outputs if isinstance(outputs, list) else [outputs], tokens, ctxlens):
                logprobs = out["choices"][0]["logprobs"]
                tail = slice(-(len(toks) - ctxlen) - 1, -1)  # continuation tokens; the last one is generated
                pairs = zip(logprobs["token_logprobs"][tail], logprobs["top_logprobs"][tail])
                scores.append((sum(logprobs["token_logprobs"][tail]), all(lp >= max(top.values()) for lp, top in pairs)))
            return scores

    lm = EchoTailCompletions(base_url=base_url + "/completions", model=served, tokenizer=tokenizer_dir,
                             tokenizer_backend="huggingface", tokenized_requests=False, batch_size=1, max_retries=1,
                             timeout=120, header={"Authorization": f"Bearer {client.api_key() or 'unused'}"})
    tok = lm.tokenizer
    adds_bos = tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]
    lm.bos_prefix = tok.bos_token if tok.bos_token and not adds_bos else ""
    return lm


def build_tasks(args, scratch: str) -> tuple[list[str], dict[str, str], object]:
    """(lm-eval task names, {task: subject}, TaskManager)."""
    from lm_eval.tasks import TaskManager

    if not (args.data_dir or args.taxonomy):
        return (args.tasks or "mmlu").split(","), {}, TaskManager()
    from eval.mmlu_tasks import read_mmlu_dir, write_task_configs
    from eval.taxonomy import knowledge_mmlu_rows
    from sdg.taxonomy import load_taxonomy

    subjects = read_mmlu_dir(args.data_dir) if args.data_dir else {}
    if args.taxonomy:
        rows = knowledge_mmlu_rows(load_taxonomy(args.taxonomy, fetch=False), args.seed)
        for name in dict.fromkeys(r["subject"] for r in rows):
            leaf = [r for r in rows if r["subject"] == name]
            # The first few-shot questions of a leaf become its examples, the rest are scored.
            subjects[name] = {"dev": leaf[: args.few_shots], "test": leaf[args.few_shots:]}
    if args.tasks:
        wanted = args.tasks.split(",")
        unknown = [t for t in wanted if t not in subjects]
        if unknown:
            raise ConfigError(f"unknown subject(s) {', '.join(unknown)}; the data has: {', '.join(sorted(subjects))}")
        subjects = {s: subjects[s] for s in wanted}
    group, tasks = write_task_configs(subjects, scratch, args.few_shots)
    return [group], tasks, TaskManager(include_path=scratch, include_defaults=False)


def evaluate(lm, task_names, task_subjects, task_manager, args, label: str) -> dict:
    import lm_eval
    from lm_eval import evaluator

    out = evaluator.simple_evaluate(model=lm, tasks=task_names, num_fewshot=args.few_shots, limit=args.limit,
                                    task_manager=task_manager, log_samples=False, bootstrap_iters=0,
                                    verbosity="ERROR")
    subjects = {}
    for task, counts in sorted(out["n-samples"].items()):
        metrics = out["results"][task]
        subject = task_subjects.get(task, task.removeprefix("mmlu_"))
        subjects[subject] = {"acc": metrics["acc,none"], "n": counts["effective"]}
    total = sum(s["n"] for s in subjects.values())
    overall = sum(s["acc"] * s["n"] for s in subjects.values()) / total  # micro average, as lm-eval's mmlu group
    return {"model": label, "overall": overall, "questions": total, "few_shots": args.few_shots, "limit": args.limit,
            "subjects": subjects, "versions": {"lm_eval": lm_eval.__version__}}


def run_one(spec: str, endpoint: str | None, args, tasks, scratch: str) -> dict:
    if endpoint:
        lm = endpoint_lm(endpoint, tokenizer_folder(spec, scratch))
    else:
        from lm_eval.models.huggingface import HFLM

        model, tokenizer = load_hf(spec, args.dtype)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    result = evaluate(lm, *tasks, args, spec)
    result["endpoint"] = endpoint
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.data_dir or args.taxonomy:
        # Read by datasets / huggingface_hub at import time: set before lm_eval imports them.
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="minilab-mmlu-") as scratch:
        tasks = build_tasks(args, scratch)
        result = run_one(args.model, args.endpoint, args, tasks, scratch)
        base = run_one(args.base_model, args.base_endpoint, args, tasks, scratch) if args.base_model else None
    accuracy = {name: s["acc"] for name, s in result["subjects"].items()}
    table = report.scores_table(accuracy, result["overall"], "subject")
    if base:
        base_accuracy = {name: s["acc"] for name, s in base["subjects"].items()}
        result["base"] = base
        result["comparison"] = report.comparison({**base_accuracy, "overall": base["overall"]},
                                                 {**accuracy, "overall": result["overall"]})
        table = report.comparison_table({**base_accuracy, "overall": base["overall"]},
                                        {**accuracy, "overall": result["overall"]}, "subject")
    print(table)
    print(f"MMLU accuracy {result['overall']:.4f} over {result['questions']} questions ({args.few_shots}-shot)")
    if args.output:
        report.write_json(args.output, result)
        report.write_atomic(os.path.splitext(args.output)[0] + ".md", table + "\n")
    if args.plot:
        series = {"candidate": accuracy} if not base else {"base": base_accuracy, "candidate": accuracy}
        report.plot_scores(args.plot, series, "accuracy")
    return result


if __name__ == "__main__":
    exit_on_error(lambda: main(sys.argv[1:]) and None)
