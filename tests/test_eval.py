"""eval/: MMLU through real lm-eval (in process, its CLI, a real llama.cpp endpoint) and MT-Bench plumbing."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, embedded_gguf_path

REPO = Path(__file__).resolve().parent.parent
MT_BENCH = REPO / "tests" / "data" / "mt_bench"  # a subset, with its license
ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

# Original questions: 2 subjects x 6 test questions, 2 dev questions each.
TEST_ROWS = [
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Mars", "Earth"], 1, "astronomy"),
    ("What is a light-year a unit of?", ["Time", "Brightness", "Distance", "Mass"], 2, "astronomy"),
    ("Which gas giant has the most prominent rings?", ["Saturn", "Jupiter", "Neptune", "Uranus"], 0, "astronomy"),
    ("What is the name of Earth's natural satellite?", ["Phobos", "Titan", "Europa", "The Moon"], 3, "astronomy"),
    ("A star's color mostly indicates its:", ["Age", "Surface temperature", "Distance", "Planets"], 1, "astronomy"),
    ("Which object is at the center of the Solar System?", ["The Sun", "Jupiter", "Earth", "Mars"], 0, "astronomy"),
    ("How many sides does a hexagon have?", ["Five", "Six", "Seven", "Eight"], 1, "elementary_mathematics"),
    ("What is 7 times 8?", ["54", "56", "58", "64"], 1, "elementary_mathematics"),
    ("Which number is prime?", ["21", "27", "29", "33"], 2, "elementary_mathematics"),
    ("What is one half of 50?", ["20", "25", "30", "35"], 1, "elementary_mathematics"),
    ("What is the sum of the angles of a triangle in degrees?", ["90", "180", "270", "360"], 1, "elementary_mathematics"),
    ("Which fraction equals 0.75?", ["1/4", "2/3", "3/4", "4/5"], 2, "elementary_mathematics"),
]
DEV_ROWS = [
    ("Which planet is known as the Red Planet?", ["Mars", "Venus", "Jupiter", "Mercury"], 0, "astronomy"),
    ("What pulls objects toward a planet?", ["Magnetism", "Friction", "Gravity", "Light"], 2, "astronomy"),
    ("What is 3 plus 4?", ["6", "7", "8", "9"], 1, "elementary_mathematics"),
    ("How many minutes are in an hour?", ["30", "50", "60", "100"], 2, "elementary_mathematics"),
]
KNOWLEDGE_QNA = """\
version: 3
domain: astronomy
created_by: tester
seed_examples:
  - context: The Moon orbits Earth about once every 27 days and has no atmosphere to speak of.
    questions_and_answers:
      - question: How long does the Moon take to orbit Earth?
        answer: About 27 days
      - question: Does the Moon have a thick atmosphere?
        answer: No, it has almost none
      - question: What does the Moon orbit?
        answer: The Earth
  - context: Mars is red because iron minerals on its surface have oxidized.
    questions_and_answers:
      - question: Why is Mars red?
        answer: Oxidized iron minerals on its surface
      - question: Which planet is called the Red Planet?
        answer: Mars
      - question: What kind of minerals color Mars?
        answer: Iron minerals
  - context: Jupiter is the largest planet of the Solar System, and its Great Red Spot is a storm bigger than Earth.
    questions_and_answers:
      - question: Which planet is the largest in the Solar System?
        answer: Jupiter
      - question: What is the Great Red Spot?
        answer: A storm bigger than Earth
      - question: Where is the Great Red Spot?
        answer: On Jupiter
  - context: Saturn has the most prominent rings of any planet, made mostly of ice and rock.
    questions_and_answers:
      - question: Which planet has the most prominent rings?
        answer: Saturn
      - question: What are Saturn's rings mostly made of?
        answer: Ice and rock
      - question: What is Saturn best known for?
        answer: Its prominent rings
  - context: Venus is the hottest planet because its thick carbon dioxide atmosphere traps heat.
    questions_and_answers:
      - question: Which planet is the hottest?
        answer: Venus
      - question: Why is Venus so hot?
        answer: Its thick carbon dioxide atmosphere traps heat
      - question: What is the atmosphere of Venus mostly made of?
        answer: Carbon dioxide
document_outline: A few facts about the Moon and Mars
document: {repo: "https://example.invalid/notes", commit: abc123, patterns: ["*.md"]}
"""
SKILL_QNA = """\
version: 3
task_description: Write a haiku
created_by: tester
seed_examples:
  - question: Write a haiku about rain.
    answer: "Soft rain on the roof\\nthe gutters hum a low song\\nnight drinks the garden"
  - question: Write a haiku about snow.
    answer: "White hush on the road\\nfootprints fill before morning\\nthe street forgets us"
  - question: Write a haiku about wind.
    answer: "The wind finds the door\\nit rattles the latch and leaves\\nleaves in the hallway"
  - question: Write a haiku about fog.
    answer: "Fog eats the harbor\\nthe foghorn calls to no one\\nboats wait in the grey"
  - question: Write a haiku about the sun.
    answer: "Morning sun on stone\\nthe cat moves with the warm patch\\nall day, inch by inch"
"""


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps({"question": q, "subject": s, "choices": c, "answer": a}) + "\n"
                            for q, c, a, s in rows))


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mmlu")
    write_jsonl(d / "test.jsonl", TEST_ROWS)
    write_jsonl(d / "dev.jsonl", DEV_ROWS)
    return d


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    p = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))


def tiny_model(folder: Path, tokenizer, seed: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> str:
    return tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer, seed=0)


@pytest.fixture(scope="module")
def taxonomy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("taxonomy")
    (root / "knowledge" / "science" / "planets").mkdir(parents=True)
    (root / "knowledge" / "science" / "planets" / "qna.yaml").write_text(KNOWLEDGE_QNA)
    (root / "compositional_skills" / "writing" / "haiku").mkdir(parents=True)
    (root / "compositional_skills" / "writing" / "haiku" / "qna.yaml").write_text(SKILL_QNA)
    return root


@pytest.fixture(scope="module")
def server_url():
    from serve.background import running_server

    with running_server(ctx=1024, startup_timeout_s=120) as url:
        yield url


def test_accuracy_equals_lm_eval_cli(tiny, mmlu_dir, tmp_path):
    from eval import mmlu
    from eval.mmlu_tasks import read_mmlu_dir, write_task_configs

    out = tmp_path / "result.json"
    ours = mmlu.main(["--model", tiny, "--data-dir", str(mmlu_dir), "--few-shots", "1", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["overall"] == ours["overall"] and set(saved["subjects"]) == {"astronomy", "elementary_mathematics"}
    assert saved["questions"] == 12 and "| **overall** |" in out.with_suffix(".md").read_text()

    tasks_dir = tmp_path / "tasks"
    group, _ = write_task_configs(read_mmlu_dir(str(mmlu_dir)), str(tasks_dir), few_shots=1)
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny}",
           "--device", "cpu", "--batch_size", "4", "--tasks", group, "--include_path", str(tasks_dir),
           "--num_fewshot", "1", "--output_path", str(tmp_path / "cli")]
    subprocess.run(cmd, env=ENV, check=True, timeout=240, capture_output=True)
    (cli_file,) = (tmp_path / "cli").rglob("results_*.json")
    cli = json.loads(cli_file.read_text())["results"]
    assert cli[group]["acc,none"] == pytest.approx(ours["overall"])
    for subject, entry in ours["subjects"].items():
        assert cli[f"{group}_{subject}"]["acc,none"] == pytest.approx(entry["acc"])


def test_tasks_reuse_lm_eval_mmlu_prompt_and_scoring(mmlu_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    from eval.mmlu_tasks import read_mmlu_dir, write_task_configs

    write_task_configs(read_mmlu_dir(str(mmlu_dir)), str(tmp_path), few_shots=2)
    ours = load_yaml(tmp_path / "minilab_mmlu_astronomy.yaml", resolve_func=False, recursive=True)
    standard = load_yaml(Path(lm_eval.__file__).parent / "tasks/mmlu/default/mmlu_astronomy.yaml",
                         resolve_func=False, recursive=True)
    for key in ("description", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "output_type",
                "fewshot_config", "test_split", "fewshot_split"):
        assert ours[key] == standard[key], key


def test_csv_and_parquet_layouts_read_like_jsonl(mmlu_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eval.mmlu_tasks import read_mmlu_dir

    (tmp_path / "csv").mkdir()
    for subject in ("astronomy", "elementary_mathematics"):  # Hendrycks-style names: SUBJECT_test.csv
        for split, rows in (("test", TEST_ROWS), ("dev", DEV_ROWS)):
            with open(tmp_path / "csv" / f"{subject}_{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["question", "choices", "answer"])  # subject comes from the file name
                writer.writerows([q, json.dumps(c), a] for q, c, a, s in rows if s == subject)
            folder = tmp_path / "parquet" / subject  # Hugging Face cais/mmlu layout
            folder.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist([{"question": q, "subject": s, "choices": c, "answer": a}
                                          for q, c, a, s in rows if s == subject])
            pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    expected = read_mmlu_dir(str(mmlu_dir))
    assert sum(len(s["test"]) for s in expected.values()) == 12
    assert read_mmlu_dir(str(tmp_path / "csv")) == expected
    assert read_mmlu_dir(str(tmp_path / "parquet")) == expected


def test_bad_mmlu_input_names_file_line_and_fix(tmp_path, mmlu_dir):
    from eval.mmlu_tasks import read_mmlu_dir

    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"],
                                                     "answer": 1}) + "\n" + json.dumps({"question": "q", "options": []}) + "\n")
    with pytest.raises(ConfigError, match=r"test.jsonl:2: missing column\(s\) choices, answer"):
        read_mmlu_dir(str(tmp_path))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"],
                                                     "answer": 4}) + "\n")
    with pytest.raises(ConfigError, match=r"test.jsonl:1: 'answer' must be the index 0-3"):
        read_mmlu_dir(str(tmp_path))
    # Entry points: one 'error:' line, exit 2, no traceback.
    for args in (["--model", str(tmp_path / "missing"), "--data-dir", str(mmlu_dir)],
                 ["--model", "embedded", "--data-dir", str(tmp_path)],
                 ["--model", "embedded", "--data-dir", str(mmlu_dir), "--few-shots", "3"]):
        proc = subprocess.run([sys.executable, "-m", "eval.mmlu", *args], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "dev question(s), fewer than --few-shots 3" in proc.stderr


def test_base_comparison_taxonomy_questions_and_plot(tiny, tokenizer, taxonomy, tmp_path):
    from eval import mmlu
    from eval.taxonomy import knowledge_mmlu_rows
    from sdg.taxonomy import load_taxonomy, qa_pairs

    leaves = load_taxonomy(taxonomy, fetch=False)
    assert [leaf.kind for leaf in leaves] == ["skill", "knowledge"]
    rows = knowledge_mmlu_rows(leaves, seed=3)
    assert rows == knowledge_mmlu_rows(load_taxonomy(taxonomy, fetch=False), seed=3)  # deterministic
    qa = qa_pairs(leaves[1])
    assert len(rows) == 15 and all(r["choices"][r["answer"]] == a["answer"] for r, a in zip(rows, qa))
    assert all(len(set(r["choices"])) == 4 for r in rows)

    base = tiny_model(tmp_path / "base", tokenizer, seed=1)
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    result = mmlu.main(["--model", tiny, "--base-model", base, "--taxonomy", str(taxonomy), "--few-shots", "1",
                        "--output", str(out), "--plot", str(png)])
    subject = "knowledge_science_planets"
    assert result["subjects"][subject]["n"] == 14 and result["base"]["subjects"][subject]["n"] == 14
    delta = result["comparison"]["delta"]["overall"]
    assert delta == pytest.approx(result["overall"] - result["base"]["overall"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "candidate" in out.with_suffix(".md").read_text()


def test_endpoint_loglikelihoods_match_in_process(server_url):
    """The echo-logprob path reads the right tokens: close to the same weights scored in process."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from eval import mmlu

    requests = [("The capital of France is", " Paris"), ("Question: 2+2=?\nA. 3\nB. 4\nAnswer:", " B")]
    model, tok = mmlu.load_hf("embedded", "float32")
    # The endpoint path puts BOS first (llama.cpp needs it to align echoed logprobs); score the same text here.
    expected = HFLM(pretrained=model, tokenizer=tok, batch_size=1).loglikelihood(
        [Instance("loglikelihood", {}, (tok.bos_token + c, x), i) for i, (c, x) in enumerate(requests)], disable_tqdm=True)
    endpoint = mmlu.endpoint_lm(server_url, mmlu.model_source("embedded")[0])
    got = endpoint.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    for (lp, greedy), (want_lp, want_greedy) in zip(got, expected):
        assert lp == pytest.approx(want_lp, abs=0.6)  # Q4_1 llama.cpp kernels vs dequantized fp32 torch
    assert got[0][1] and expected[0][1]  # " Paris" is the greedy continuation on both paths


def test_endpoint_mmlu_end_to_end(server_url, mmlu_dir, tmp_path):
    from eval import mmlu

    result = mmlu.main(["--endpoint", server_url, "--model", "embedded", "--data-dir", str(mmlu_dir),
                        "--few-shots", "0", "--limit", "1", "--output", str(tmp_path / "ep.json")])
    assert result["questions"] == 2 and result["endpoint"] == server_url
    assert set(result["subjects"]) == {"astronomy", "elementary_mathematics"}
    assert json.loads((tmp_path / "ep.json").read_text())["overall"] == result["overall"]
    with pytest.raises(ConfigError, match="cannot reach the model at"):
        from serve.background import free_port

        mmlu.main(["--endpoint", f"http://127.0.0.1:{free_port()}/v1", "--data-dir", str(mmlu_dir), "--few-shots", "0"])


def test_parse_rating():
    from eval.mt_bench import parse_rating

    assert parse_rating("Clear and correct. Rating: [[8]]") == 8.0
    assert parse_rating("[[ 7.5 ]] then, on reflection, [[2]]") == 2.0  # the last verdict counts
    assert parse_rating("Rating: 8/10") is None
    assert parse_rating("I would rate it [6].") == 6.0 and parse_rating("[[4]] not [9]") == 4.0
    assert parse_rating("[[11]]") is None and parse_rating("[[0]]") is None and parse_rating("") is None
    # a judge echoing its instructions gives no score; one that echoes and then judges gives its own
    echo = "Rate the response on a scale of 1 to 10 in exactly this form: [[N]], for example [[6]]."
    assert parse_rating(echo) is None and parse_rating("e.g. [[6]]") is None
    assert parse_rating('strictly following this format: "[[rating]]", for example: "Rating: [[5]]".') is None
    assert parse_rating(echo + " The answer is wrong. Rating: [[2]]") == 2.0


@pytest.mark.slow
def test_mt_bench_with_embedded_model_as_model_and_judge(server_url, taxonomy, tmp_path):
    from eval import mt_bench

    out = tmp_path / "mt.json"
    common = ["--model-endpoint", server_url, "--judge-endpoint", server_url, "--max-tokens", "32",
              "--judge-max-tokens", "32", "--timeout", "120"]
    result = mt_bench.main([*common, "--question-file", str(MT_BENCH / "question.jsonl"), "--reference-answers",
                            str(MT_BENCH / "reference_answer_gpt-4.jsonl"), "--limit", "2", "--output", str(out)])
    assert len(result["records"]) == 2 and result["judgments"] == 4
    writing, reasoning = result["records"]  # question 101 is graded against its reference answer
    assert [j["prompt"] for j in writing["judgments"]] == ["single-v1", "single-v1-multi-turn"]
    assert [j["prompt"] for j in reasoning["judgments"]] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert reasoning["reference"] == ["You are in second place.", "Uncertain."]
    assert all(len(r["answers"]) == 2 and all(a.strip() for a in r["answers"]) for r in result["records"])
    ratings = [j["rating"] for r in result["records"] for j in r["judgments"]]
    assert result["unparsable"] == ratings.count(None) and result["unparsable_rate"] == ratings.count(None) / 4
    assert json.loads(out.read_text())["unparsable"] == result["unparsable"] and out.with_suffix(".md").exists()

    compared = mt_bench.main([*common, "--base-endpoint", server_url, "--taxonomy", str(taxonomy), "--limit", "1"])
    assert compared["records"][0]["reference"] == ["Soft rain on the roof\nthe gutters hum a low song\nnight drinks the garden"]
    assert compared["records"][0]["judgments"][0]["prompt"] == "single-math-v1"
    assert compared["base"]["judgments"] == 1 and "comparison" in compared


@pytest.mark.slow
def test_mt_bench_killed_mid_run_resumes_from_its_cache(server_url, tmp_path):
    """One question, two turns: 2 answers and 2 judgments. Killed after the 2nd reply reaches the cache, the rerun
    asks the server only the 2 judgments (counted by the server itself) and keeps the cached answers."""
    import urllib.request

    def served():
        props = urllib.request.urlopen(server_url.removesuffix("/v1") + "/props", timeout=10).read()
        return json.loads(props)["completion_requests"]

    out = tmp_path / "mt.json"
    args = [sys.executable, "-m", "eval.mt_bench", "--model-endpoint", server_url, "--judge-endpoint", server_url,
            "--question-file", str(MT_BENCH / "question.jsonl"), "--reference-answers",
            str(MT_BENCH / "reference_answer_gpt-4.jsonl"), "--limit", "1", "--max-tokens", "16",
            "--judge-max-tokens", "16", "--output", str(out)]
    killed = subprocess.run(args, cwd=REPO, env={**ENV, "MINILAB_TEST_HOOK": "after_request=2:kill"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cached = [json.loads(line) for line in (tmp_path / "mt.cache.jsonl").read_text().splitlines()]
    assert len(cached) == 2 and not out.exists()  # both answer turns, no result that looks complete
    before = served()
    done = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert served() - before == 2  # the two judgments only
    record = json.loads(out.read_text())["records"][0]
    assert record["answers"] == [c["reply"] for c in cached] and len(record["judgments"]) == 2


def test_mt_bench_bad_input(tmp_path):
    from eval import mt_bench

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl: question 2 needs 'question_id' and 'turns'"):
        mt_bench.load_questions(str(bad), None)
    bad.write_text('{"question_id": 1, "category": "math", "turns": ["2+2?"]}\n')
    with pytest.raises(ConfigError, match="needs a reference answer; pass --reference-answers"):
        mt_bench.load_questions(str(bad), None)
    prompts = tmp_path / "p.yaml"
    prompts.write_text("single-v1: {system_prompt: s, prompt_template: t}\n")
    with pytest.raises(ConfigError, match="missing judge prompt.*single-math-v1"):
        mt_bench.load_judge_prompts(str(prompts))
    assert set(mt_bench.load_judge_prompts(str(MT_BENCH / "judge_prompts.jsonl"))) >= set(mt_bench.PROMPT_NAMES)
    # question 123 (coding) has its reference only in the GPT-4 answer file; 101 carries its own
    with pytest.raises(ConfigError, match="question 123 .coding. needs a reference answer"):
        mt_bench.load_questions(str(MT_BENCH / "question.jsonl"), None)
    questions = {q["question_id"]: q for q in mt_bench.load_questions(str(MT_BENCH / "question.jsonl"),
                                                                      str(MT_BENCH / "reference_answer_gpt-4.jsonl"))}
    assert questions[81]["reference"] is None and questions[101]["reference"][0] == "You are in second place."
    assert questions[123]["reference"][0].startswith("<!DOCTYPE html>") and len(questions[123]["reference"]) == 2
    assert set(mt_bench.load_judge_prompts(None)) == set(mt_bench.PROMPT_NAMES)
