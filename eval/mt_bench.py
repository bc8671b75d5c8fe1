"""MT-Bench-style single-answer grading: the model answers two-turn questions, a judge model grades each turn 1-10.

    python -m eval.mt_bench --model-endpoint http://127.0.0.1:8000/v1 --judge-endpoint http://127.0.0.1:8001/v1 \
        --question-file mt_bench/question.jsonl --reference-answers mt_bench/reference_answer_gpt-4.jsonl
    python -m eval.mt_bench --model-endpoint URL --base-endpoint URL --judge-endpoint URL --taxonomy taxonomy/

Both endpoints are OpenAI-compatible chat servers (`python -m serve`). Judgments without a parsable [[N]] are
counted, not guessed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from statistics import mean

import yaml

from config import ConfigError, add_profile_option, exit_on_error, fill_from_profile
from eval import report
from sdg.teacher import job_id, load_cache
from serve.client import connect

DEFAULT_JUDGE_PROMPTS = Path(__file__).with_name("judge_prompts.yaml")
PROMPT_NAMES = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # graded against a reference answer, as in MT-Bench
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
RATING_SINGLE_BRACKETS = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")  # FastChat's fallback for judges that drop one
# what comes just before a rating that only repeats the prompt's example (ours, and FastChat's 'for example:
# "Rating: [[5]]"')
ECHOED_EXAMPLE = re.compile(r"(?:example|e\.g\.|form)\W{0,4}(?:rating\W{0,4})?$", re.I)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.mt_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model-endpoint", required=True, help="OpenAI-compatible base URL of the model under test")
    p.add_argument("--judge-endpoint", required=True, help="OpenAI-compatible base URL of the judge model")
    p.add_argument("--base-endpoint", help="also answer with this (base) model and compare")
    p.add_argument("--question-file", help="MT-Bench question.jsonl (question_id, category, turns[, reference])")
    p.add_argument("--taxonomy", help="taxonomy folder: seed examples become reference-graded questions")
    p.add_argument("--reference-answers", help="MT-Bench reference answer JSONL (question_id, choices[0].turns)")
    p.add_argument("--judge-prompts", help=f"judge prompts, JSONL as MT-Bench ships or YAML (default {DEFAULT_JUDGE_PROMPTS.name})")
    p.add_argument("--limit", type=int, help="first N questions only (profile: mt_bench_limit, 0 = all)")
    p.add_argument("--max-tokens", type=int, help="per answer turn")
    p.add_argument("--judge-max-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--output", help="JSON result with every answer and judgment; markdown table next to it (.md)")
    p.add_argument("--plot", help="PNG chart of per-category scores")
    p.add_argument("--cache", help="JSONL of every reply so far, so a rerun resumes (default: next to --output)")
    add_profile_option(p, "evaluate", {"limit": "mt_bench_limit", "max_tokens": "max_tokens",
                                       "judge_max_tokens": "judge_max_tokens"})
    args = p.parse_args(argv)
    fill_from_profile(args)
    if not (args.question_file or args.taxonomy):
        raise ConfigError("give --question-file FILE (MT-Bench question.jsonl) or --taxonomy DIR")
    if (args.limit is not None and args.limit < 1) or args.max_tokens < 1 or args.judge_max_tokens < 1:
        raise ConfigError("--limit, --max-tokens and --judge-max-tokens must be >= 1")
    return args


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"file '{path}' not found")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i}: invalid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(rows[-1], dict):
                    raise ConfigError(f"{path}:{i}: expected a JSON object")
    return rows


def load_questions(path: str, reference_path: str | None) -> list[dict]:
    references = {}
    if reference_path:
        for i, row in enumerate(read_jsonl(reference_path), 1):
            try:
                references[row["question_id"]] = row["choices"][0]["turns"]
            except (KeyError, IndexError, TypeError):
                raise ConfigError(f"{reference_path}: entry {i} needs question_id and choices[0].turns") from None
    questions = []
    for i, row in enumerate(read_jsonl(path), 1):
        turns = row.get("turns")
        if "question_id" not in row or not isinstance(turns, list) or not 1 <= len(turns) <= 2 \
                or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ConfigError(f"{path}: question {i} needs 'question_id' and 'turns' (a list of 1 or 2 non-empty strings)")
        reference = row.get("reference") or references.get(row["question_id"])
        category = row.get("category", "general")
        if category in REFERENCE_CATEGORIES and not reference:
            raise ConfigError(f"{path}: question {row['question_id']} ({category}) needs a reference answer; "
                              "pass --reference-answers FILE or add a 'reference' list to the question")
        questions.append({"question_id": row["question_id"], "category": category, "turns": turns,
                          "reference": reference})
    if not questions:
        raise ConfigError(f"{path} holds no questions")
    return questions


def taxonomy_questions(taxonomy_dir: str) -> list[dict]:
    from sdg.taxonomy import load_taxonomy, qa_pairs

    questions = []
    for leaf in load_taxonomy(taxonomy_dir, fetch=False):
        for i, qa in enumerate(qa_pairs(leaf), 1):
            context = f"{qa['context'].strip()}\n\n" if (qa["context"] or "").strip() else ""
            questions.append({"question_id": f"{leaf.name}/{i}", "category": leaf.name,
                              "turns": [context + qa["question"].strip()], "reference": [qa["answer"].strip()]})
    return questions


def load_judge_prompts(path: str | None) -> dict[str, dict]:
    path = path or str(DEFAULT_JUDGE_PROMPTS)
    if path.endswith((".yaml", ".yml")):
        if not os.path.isfile(path):
            raise ConfigError(f"file '{path}' not found")
        try:
            prompts = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    else:
        prompts = {row.get("name"): row for row in read_jsonl(path)}
    missing = [n for n in PROMPT_NAMES if not isinstance(prompts, dict) or not isinstance(prompts.get(n), dict)
               or not {"system_prompt", "prompt_template"} <= set(prompts[n])]
    if missing:
        raise ConfigError(f"{path}: missing judge prompt(s) {', '.join(missing)} "
                          "(each needs system_prompt and prompt_template)")
    return prompts


def parse_rating(judgment: str) -> float | None:
    """The verdict: the last [[N]] (else the last [N]) that is not the instructions' example echoed back ("... in
    this form: [[N]], for example [[6]]"); None when it is missing or outside 1-10 (counted as unparsable)."""
    text = judgment or ""
    for pattern in (RATING, RATING_SINGLE_BRACKETS):
        verdicts = [m for m in pattern.finditer(text) if not ECHOED_EXAMPLE.search(text[max(0, m.start() - 30):m.start()])]
        if verdicts:
            rating = float(verdicts[-1].group(1))
            return rating if 1 <= rating <= 10 else None
    return None


def open_cache(path: str | None) -> dict:
    """Every reply so far, keyed by what was asked (model, messages, limits): a killed or failed run resumes
    where it stopped, and a changed question or model asks again."""
    return {"path": Path(path) if path else None, "replies": load_cache(Path(path)) if path else {}, "written": 0}


def chat(endpoint, messages: list[dict], max_tokens: int, temperature: float, cache: dict, role: str) -> str:
    """One reply; `role` (candidate, base, judge) keeps two servers of same-named models apart in the cache,
    whatever port each runs on."""
    import openai

    client, model = endpoint
    key = job_id(role, model, messages, max_tokens, temperature)
    if key in cache["replies"]:
        return cache["replies"][key]["reply"]
    try:
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=temperature)
    except openai.APIError as e:
        raise ConfigError(f"request to {client.base_url} failed: {e}; replies so far are kept in {cache['path']}, "
                          "rerun the same command to resume") from None
    reply = response.choices[0].message.content or ""
    if cache["path"]:
        cache["path"].parent.mkdir(parents=True, exist_ok=True)
        with open(cache["path"], "a", encoding="utf-8") as f:  # synced line by line: a kill loses one reply at most
            f.write(json.dumps({"id": key, "reply": reply}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        cache["replies"][key] = {"reply": reply}
        cache["written"] += 1
        if os.environ.get("MINILAB_TEST_HOOK"):  # fault tests (README, "Test hooks"); imports torch
            from checkpoint import fault_point
            fault_point("after_request", cache["written"])
    return reply


def answer(endpoint, question: dict, args, cache: dict, role: str) -> list[str]:
    messages, answers = [], []
    for turn in question["turns"]:
        messages.append({"role": "user", "content": turn})
        answers.append(chat(endpoint, messages, args.max_tokens, args.temperature, cache, role))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def judge(judge_endpoint, prompts: dict, question: dict, answers: list[str], args, cache: dict) -> list[dict]:
    reference = question["reference"] or []
    fields = {"question": question["turns"][0], "answer": answers[0], "question_1": question["turns"][0],
              "answer_1": answers[0], "ref_answer_1": reference[0] if reference else ""}
    if len(answers) == 2:
        fields.update(question_2=question["turns"][1], answer_2=answers[1],
                      ref_answer_2=reference[1] if len(reference) > 1 else "")
    names = ["single-math-v1" if reference else "single-v1"]
    if len(answers) == 2:
        names.append(names[0] + "-multi-turn")
    judgments = []
    for turn, name in enumerate(names, 1):
        prompt = prompts[name]
        try:
            user = prompt["prompt_template"].format(**fields)
        except (KeyError, IndexError) as e:
            raise ConfigError(f"judge prompt '{name}' uses an unknown placeholder {e}") from None
        messages = [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]
        text = chat(judge_endpoint, messages, args.judge_max_tokens, 0.0, cache, "judge")
        judgments.append({"turn": turn, "prompt": name, "judgment": text, "rating": parse_rating(text)})
    return judgments


def run_model(endpoint, judge_endpoint, prompts, questions, args, label: str, cache: dict) -> dict:
    records = []
    for i, question in enumerate(questions, 1):
        answers = answer(endpoint, question, args, cache, label)
        records.append({**question, "answers": answers,
                        "judgments": judge(judge_endpoint, prompts, question, answers, args, cache)})
        print(f"[{label}] {i}/{len(questions)} {question['question_id']}: "
              f"{[j['rating'] for j in records[-1]['judgments']]}", flush=True)
    return {"model": endpoint[1], **summarize(records), "records": records}


def summarize(records: list[dict]) -> dict:
    judgments = [(r["category"], j) for r in records for j in r["judgments"]]
    rated = [(category, j) for category, j in judgments if j["rating"] is not None]

    def avg(values):
        return mean(values) if values else None

    categories = dict.fromkeys(r["category"] for r in records)
    return {
        "turn_1": avg([j["rating"] for _, j in rated if j["turn"] == 1]),
        "turn_2": avg([j["rating"] for _, j in rated if j["turn"] == 2]),
        "overall": avg([j["rating"] for _, j in rated]),
        "judgments": len(judgments),
        "unparsable": len(judgments) - len(rated),
        "unparsable_rate": (len(judgments) - len(rated)) / len(judgments),
        "categories": {c: avg([j["rating"] for cat, j in rated if cat == c]) for c in categories},
    }


def scored(result: dict) -> dict[str, float]:
    """Category and turn scores that have at least one parsable rating (table and chart rows)."""
    rows = {**result["categories"], "turn 1": result["turn_1"], "turn 2": result["turn_2"]}
    return {name: value for name, value in rows.items() if value is not None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    questions = taxonomy_questions(args.taxonomy) if args.taxonomy else \
        load_questions(args.question_file, args.reference_answers)
    questions = questions[: args.limit]
    prompts = load_judge_prompts(args.judge_prompts)
    model = connect(args.model_endpoint, None, args.timeout, 1, role="model")
    judge_endpoint = connect(args.judge_endpoint, None, args.timeout, 1, role="judge")
    base_endpoint = connect(args.base_endpoint, None, args.timeout, 1, role="base model") if args.base_endpoint \
        else None
    cache = open_cache(args.cache or (os.path.splitext(args.output)[0] + ".cache.jsonl" if args.output else None))
    result = run_model(model, judge_endpoint, prompts, questions, args, "candidate", cache)
    result["judge"] = judge_endpoint[1]
    table = report.scores_table(scored(result), result["overall"], "category", digits=2)
    if base_endpoint:
        result["base"] = run_model(base_endpoint, judge_endpoint, prompts, questions, args, "base", cache)
        base_scores = {**scored(result["base"]), "overall": result["base"]["overall"]}
        candidate_scores = {**scored(result), "overall": result["overall"]}
        base_scores = {k: v for k, v in base_scores.items() if v is not None}
        candidate_scores = {k: v for k, v in candidate_scores.items() if v is not None}
        result["comparison"] = report.comparison(base_scores, candidate_scores)
        table = report.comparison_table(base_scores, candidate_scores, "category", digits=2)
    print(table)
    print(f"turn 1 {result['turn_1']}, turn 2 {result['turn_2']}, overall {result['overall']}; "
          f"{result['unparsable']}/{result['judgments']} judgments unparsable ({result['unparsable_rate']:.0%})")
    if args.output:
        report.write_json(args.output, result)
        report.write_atomic(os.path.splitext(args.output)[0] + ".md", table + "\n")
    if args.plot:
        series = {"candidate": scored(result)}
        if base_endpoint:
            series = {"base": scored(result["base"]), **series}
        report.plot_scores(args.plot, series, "score (1-10)")
    return result


if __name__ == "__main__":
    exit_on_error(lambda: main(sys.argv[1:]) and None)
