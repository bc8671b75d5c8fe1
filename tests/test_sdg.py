"""sdg/: taxonomy validation, tolerant parsing, dedup, mixing, and generation against a real llama.cpp teacher."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE_TAXONOMY as SAMPLE, sample_leaves, write_jsonl

from config import ConfigError
from sdg.generate import chunk_document
from sdg.heldout import record_hash
from sdg.mix import message_problem, mix
from sdg.parse import (deduplicate, normalize, parse_answer, parse_context, parse_qa_pair, parse_question,
                       parse_score, reaches_cut)
from sdg.taxonomy import load_taxonomy, validate_taxonomy
from sdg.teacher import load_cache

# Tiny settings: the 135M teacher on 2 CPU cores writes ~50-150 tokens/s.
FAST = ["--max-tokens", "48", "--timeout", "60", "--retries", "1"]


def sdg(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sdg", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def cache_ids(out):
    """Ids of complete cache records; a line still being written (or cut by a kill) has no newline yet."""
    ids = []
    for f in sorted((Path(out) / "cache").glob("*.jsonl")):
        text = f.read_text()
        ids += [json.loads(line)["id"] for line in text[: text.rfind("\n") + 1].splitlines()]
    return ids


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- taxonomy ----------------------------------------------------------------------------------------------

def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


SEED = "  - question: Write a note number {i}.\n    answer: Here is note {i}.\n"


def test_sample_taxonomy_is_valid():
    r = sdg("validate", SAMPLE, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "4 leaves valid" in r.stdout
    kinds = {leaf.name: (leaf.kind, leaf.grounded, len(leaf.documents)) for leaf in load_taxonomy(SAMPLE)}
    assert kinds == {"compositional_skills/writing/thank_you_notes": ("skill", False, 0),
                     "compositional_skills/extraction/meeting_action_items": ("skill", True, 0),
                     "knowledge/food/sourdough_starter": ("knowledge", False, 1),
                     "knowledge/places/marrowick": ("knowledge", False, 1)}


def test_validate_reports_every_problem_with_file_and_line(tmp_path):
    write(tmp_path / "skills/typo/qna.yaml",
          "version: 3\ncreated_by: me\ntask_descripton: notes\nseed_examples:\n" + "".join(SEED.format(i=i) for i in range(5)))
    write(tmp_path / "skills/few/qna.yaml", "version: 3\ncreated_by: me\ntask_description: t\nseed_examples:\n"
          + SEED.format(i=1) + "  - question: no answer here\n  - question: q\n    answer: ''\n")
    write(tmp_path / "skills/broken/qna.yaml", "version: 3\nseed_examples:\n  - question: [unclosed\n")
    write(tmp_path / "skills/dup/qna.yaml", "version: 3\ncreated_by: me\ntask_description: t\nseed_examples:\n"
          + "".join(SEED.format(i=i) for i in range(5)) + "    answer: again\n")
    seeds = "".join(f"  - context: c{i}\n    questions_and_answers:\n" + "".join(
        f"      - question: q{i}{j}\n        answer: a{j}\n" for j in range(3)) for i in range(5))
    write(tmp_path / "knowledge/nofolder/qna.yaml", "version: 3\ncreated_by: me\ndomain: d\ndocument_outline: o\n"
          f"seed_examples:\n{seeds}document:\n  repo: missing_docs\n  patterns: ['*.md']\n")
    write(tmp_path / "knowledge/nomatch/qna.yaml", "version: 3\ncreated_by: me\ndomain: d\ndocument_outline: o\n"
          f"seed_examples:\n{seeds}document:\n  repo: docs\n  patterns:\n    - '*.md'\n")
    write(tmp_path / "knowledge/nomatch/docs/notes.txt", "plain text, not markdown")
    write(tmp_path / "knowledge/old/qna.yaml", "version: 2\ncreated_by: me\ndomain: d\ndocument_outline: o\n"
          f"seed_examples:\n{seeds}document:\n  repo: docs\n  patterns: ['*.md']\n")

    r = sdg("validate", tmp_path, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: 10 problem(s)" in r.stderr, r.stdout + r.stderr
    out = r.stdout
    expected = [
        f"{tmp_path}/skills/typo/qna.yaml:3: unknown key 'task_descripton' in top level; did you mean 'task_description'?",
        f"{tmp_path}/skills/typo/qna.yaml:1: top level is missing required key(s) 'task_description'",
        f"{tmp_path}/skills/few/qna.yaml:5: seed_examples has 3 seed examples, at least 5 are needed",
        f"{tmp_path}/skills/few/qna.yaml:7: seed_examples.1 is missing required key(s) 'answer'",
        f"{tmp_path}/skills/few/qna.yaml:9: seed_examples.2.answer is empty",
        f"{tmp_path}/skills/broken/qna.yaml:4: invalid YAML",
        f"{tmp_path}/skills/dup/qna.yaml:15: duplicate key 'answer'",
        f"{tmp_path}/knowledge/nofolder/qna.yaml:47: document.repo folder {tmp_path}/knowledge/nofolder/missing_docs does not exist",
        f"{tmp_path}/knowledge/old/qna.yaml:1: Version 2 is not supported for knowledge. Minimum supported version is 3.",
        f"{tmp_path}/knowledge/nomatch/qna.yaml:49: pattern '*.md' matches no file in {tmp_path}/knowledge/nomatch/docs; files there: notes.txt",
    ]
    for line in expected:
        assert line in out, f"missing: {line}\n--- got:\n{out}"
    assert out.count("\n") == len(expected)  # one line per problem, nothing valid left over
    with pytest.raises(ConfigError, match="10 problem"):
        load_taxonomy(tmp_path)


def test_grounded_is_decided_by_the_first_seed_as_in_instructlab(tmp_path):
    """InstructLab's schema makes `context` optional in each seed; instructlab-sdg runs the grounded pipeline when
    the first seed has one. A seed without context is no error."""
    def seeds(without):
        return "".join(SEED.format(i=i) if i == without else
                       f"  - context: notes {i}\n" + SEED.format(i=i).replace("  - question", "    question") for i in range(5))
    write(tmp_path / "g/qna.yaml", f"version: 3\ncreated_by: me\ntask_description: t\nseed_examples:\n{seeds(3)}")
    write(tmp_path / "f/qna.yaml", f"version: 3\ncreated_by: me\ntask_description: t\nseed_examples:\n{seeds(0)}")
    leaves, problems = validate_taxonomy(tmp_path)
    assert problems == [] and {leaf.name: leaf.grounded for leaf in leaves} == {"f": False, "g": True}


def test_git_options_in_document_repo_or_commit_are_refused_before_git_runs(tmp_path):
    from sdg.taxonomy import fetch_git_repo
    marker = tmp_path / "injected"
    seeds = "".join(f"  - context: c{i}\n    questions_and_answers:\n" + "".join(
        f"      - question: q{i}{j}\n        answer: a{j}\n" for j in range(3)) for i in range(5))
    write(tmp_path / "tax/knowledge/evil/qna.yaml", "version: 3\ncreated_by: me\ndomain: d\ndocument_outline: o\n"
          f"seed_examples:\n{seeds}document:\n  repo: '--upload-pack=touch {marker};://example.com/r.git'\n"
          "  commit: '--output=x'\n  patterns: ['*.md']\n")
    leaves, problems = validate_taxonomy(tmp_path / "tax", fetch=True)
    where = f"{tmp_path}/tax/knowledge/evil/qna.yaml"
    assert leaves == [] and problems == [
        f"{where}:47: document.repo '--upload-pack=touch {marker};://example.com/r.git' starts with '-' "
        "(git would read it as an option); give a git URL",
        f"{where}:48: document.commit '--output=x' is not a commit hash or a branch or tag name "
        "(letters, digits, '_', '.', '/', '-', not starting with '-')"]
    for repo, commit in ((f"--upload-pack=touch {marker}", None), ("https://example.com/r.git", "-b"),
                         ("https://example.com/r.git", "main..x"), ("ext::sh -c touch% x", None)):
        with pytest.raises(ConfigError, match="document"):
            fetch_git_repo(repo, commit)
    assert not marker.exists()


def test_each_pinned_commit_gets_its_own_checkout_and_a_newer_one_is_fetched(tmp_path, monkeypatch):
    from sdg.taxonomy import fetch_git_repo
    monkeypatch.setenv("MINILAB_CACHE", str(tmp_path / "cache"))
    origin = tmp_path / "docs"
    origin.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(origin), *args], check=True, capture_output=True, text=True).stdout

    def commit(text):
        (origin / "doc.md").write_text(text)
        git("add", "doc.md")
        git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "--quiet", "-m", text)
        return git("rev-parse", "HEAD").strip()
    git("init", "--quiet")
    first = commit("first version")
    url = origin.as_uri()
    assert (fetch_git_repo(url, first) / "doc.md").read_text() == "first version"
    second = commit("second version")  # pinned after the first clone: fetched, not an error
    assert (fetch_git_repo(url, second) / "doc.md").read_text() == "second version"
    assert (fetch_git_repo(url, first) / "doc.md").read_text() == "first version"  # its own checkout, untouched
    with pytest.raises(ConfigError, match=f"cannot fetch document repo {url} at 0123abc"):
        fetch_git_repo(url, "0123abc")


def test_missing_taxonomy_folder_is_a_clear_error(tmp_path):
    r = sdg("validate", tmp_path / "nope", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: taxonomy folder") and "Traceback" not in r.stderr


# ---- parsing, dedup, chunking ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("Question: How do I thank my boss?\nAnswer: Dear boss...", "How do I thank my boss?"),
    ("**Question 1:** Write a note to my aunt for the scarf.", "Write a note to my aunt for the scarf."),
    ("Sure! Here is a new question:\n\n2. Write a note to my teacher for extra help.", "Write a note to my teacher for extra help."),
    ("<|im_start|>Q: Thank the bus driver who waited for me.<|im_end|>", "Thank the bus driver who waited for me."),
    ("", None),
    ("Ok.", None),
])
def test_parse_question(reply, expected):
    assert parse_question(reply) == expected


def test_parse_answers_pairs_scores_contexts():
    assert parse_answer("Answer: Dear Tom, thanks!\n\nQuestion: and now?") == "Dear Tom, thanks!"
    assert parse_answer("Dear Tom,\nthanks a lot!\nBest, Sam") == "Dear Tom,\nthanks a lot!\nBest, Sam"
    assert parse_answer("  \n") is None
    assert parse_qa_pair("Here you go.\n**Question:** What is hooch?\n**Answer:** Alcohol made by hungry yeast.\n"
                         "Question: another?\nAnswer: x") == ("What is hooch?", "Alcohol made by hungry yeast.")
    assert parse_qa_pair("Q1. What temperature suits a starter?\nA1. 24 to 26 degrees.") == (
        "What temperature suits a starter?", "24 to 26 degrees.")
    assert parse_qa_pair("Question: What is a starter?\nAnswer:") is None
    assert parse_qa_pair("A starter is flour and water.") is None
    assert parse_qa_pair("A new question for the passage:\nWhat makes bread rise? The yeast's carbon dioxide.") == (
        "What makes bread rise?", "The yeast's carbon dioxide.")
    assert parse_qa_pair("What makes bread rise?") is None
    assert parse_context("Context: Ana will fix the login bug by Monday; Ben emails the vendor.\nQuestion: List items") == (
        "Ana will fix the login bug by Monday; Ben emails the vendor.")
    for reply, score in [("4", 4), ("Score: 4/5", 4), ("I rate it **5**.", 5), ("The answer gets 2 out of 5", 2),
                         ("10", None), ("3.5", None), ("The answer is incorrect.", None),
                         # a judge that echoes the instruction: its range is no score, its own verdict is
                         ('Give a score from 1 (useless or wrong) to 5 (correct and helpful). Reply in the form '
                          '"Score: N".', None),
                         ("Give a score from 1 (useless or wrong) to 5 (correct and helpful).\nScore: 4", 4),
                         ("from 1 to 5, I would say 3", 3), ("Score: 2. On reflection, Score: 5", 5)]:
        assert parse_score(reply) == score, reply


def test_a_reply_cut_at_max_tokens_is_kept_only_where_the_cut_falls_after_the_text_kept():
    cut_answer = "Question: What feeds a starter?\nAnswer: Flour and water, given every day at the same"
    assert reaches_cut(cut_answer, parse_qa_pair(cut_answer))  # the answer stops mid-sentence: dropped
    whole_pair = "Question: What feeds a starter?\nAnswer: Flour and water.\nQuestion: How warm should it"
    assert parse_qa_pair(whole_pair) == ("What feeds a starter?", "Flour and water.")
    assert not reaches_cut(whole_pair, parse_qa_pair(whole_pair))  # the model rambled on after a whole pair
    rambling = "How do I thank a colleague for covering my shift?\nAnswer: You could say that you"
    assert not reaches_cut(rambling, parse_question(rambling))
    assert reaches_cut("Dear Tom, thank you **so much** for", parse_answer("Dear Tom, thank you **so much** for"))
    assert not reaches_cut("Score: 4 because the answer", parse_score("Score: 4 because the answer"))


def test_deduplicate_exact_then_near():
    items = [{"q": "What is hooch?"}, {"q": "what is  HOOCH"}, {"q": "What is the hooch?"}, {"q": "How long to peak?"}]
    kept, exact, near = deduplicate(items, key=lambda s: s["q"], near_threshold=0.8)
    assert [k["q"] for k in kept] == ["What is hooch?", "How long to peak?"] and (exact, near) == (1, 1)
    kept, exact, near = deduplicate(items, key=lambda s: s["q"], near_threshold=1.0)
    assert len(kept) == 3 and (exact, near) == (1, 0)
    assert normalize(" What, is   HOOCH?! ") == "what is hooch"


def test_chunk_document_keeps_every_word_cuts_long_paragraphs_and_starts_chunks_at_headings():
    text = (SAMPLE / "knowledge/food/sourdough_starter/documents/sourdough_starter.md").read_text()
    chunks = chunk_document(text, words=120)
    assert " ".join(chunks).split() == text.split()  # nothing dropped, order kept
    assert len(chunks) >= 3 and all(len(c.split()) <= 120 for c in chunks)
    assert all(not c.rstrip().splitlines()[-1].startswith("#") for c in chunks)  # no heading left at a chunk's end
    for c in chunks:  # a heading opens a chunk (after the headings above it): never in the middle of one
        lines = [line for line in c.splitlines() if line.strip()]
        first_text = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        assert not any(line.startswith("#") for line in lines[first_text:]), c
    long = "# Title\n\n" + " ".join(f"Sentence {i} has five words." for i in range(30)) + "\n\n" + "word " * 50
    cut = chunk_document(long, words=40)
    assert " ".join(cut).split() == long.split() and all(len(c.split()) <= 40 + 2 for c in cut)  # + its heading
    assert cut[0].startswith("# Title\n\nSentence 0") and all(c.endswith(".") for c in cut[:-2])  # sentence ends


def test_load_cache_cuts_a_half_written_last_line(tmp_path):
    path = tmp_path / "stage.jsonl"
    path.write_text('{"id": "a", "reply": "x"}\n{"id": "b", "re')
    assert list(load_cache(path)) == ["a"]
    assert path.read_text() == '{"id": "a", "reply": "x"}\n'  # the next append starts on a clean line


# ---- mix ---------------------------------------------------------------------------------------------------

def chat(i, tag):
    return {"messages": [{"role": "user", "content": f"{tag} q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "metadata": {"leaf": tag, "pipeline": "skills"}}


def test_mix_counts_ratios_and_upsampling(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat(i, "a") for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [chat(i, "b") for i in range(4)])
    write(tmp_path / "recipe.yaml", "output: out/mixed.jsonl\nseed: 7\ndatasets:\n"
          "  - path: a.jsonl\n    ratio: 0.5\n  - path: b.jsonl\n    samples: 10\n")
    r = sdg("mix", tmp_path / "recipe.yaml", timeout=60)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(tmp_path / "out/mixed.jsonl")
    tags = [row["metadata"]["leaf"] for row in rows]
    assert tags.count("a") == 5 and tags.count("b") == 10
    b_questions = [row["messages"][0]["content"] for row in rows if row["metadata"]["leaf"] == "b"]
    assert set(b_questions) == {f"b q{i}" for i in range(4)}  # 10 of 4: two full copies plus 2 drawn
    assert len({row["messages"][0]["content"] for row in rows if row["metadata"]["leaf"] == "a"}) == 5
    assert os.listdir(tmp_path / "out") == ["mixed.jsonl"]  # no temp file left behind
    again, _ = mix(tmp_path / "recipe.yaml", tmp_path / "again.jsonl")
    assert read_jsonl(again) == rows  # the seed makes it reproducible


@pytest.mark.parametrize("recipe, data, message", [
    ("datasets:\n  - path: a.jsonl\n    ratio: 1\n    samples: 2\n", None, "exactly one of 'samples'"),
    ("datasets:\n  - path: a.jsonl\n    ratoi: 1\n", None, "unknown key 'ratoi'; did you mean 'ratio'?"),
    ("datasets:\n  - path: a.jsonl\n    samples: -1\n", None, "samples must be a whole number"),
    ("datasets:\n  - path: missing.jsonl\n    ratio: 1\n", None, "missing.jsonl' not found"),
    ("datasets:\n  - path: a.jsonl\n    ratio: 1\n", '{"messages": []}', "a.jsonl:2: expected an object with a non-empty"),
    ("datasets:\n  - path: a.jsonl\n    ratio: 1\n", "{not json", "a.jsonl:2: invalid JSON"),
    ("datasets:\n  - path: a.jsonl\n    ratio: 1\n",
     '{"messages": [{"role": "user", "content": "only a question"}]}', "a.jsonl:2: no non-empty assistant"),
])
def test_mix_bad_input_names_the_problem(tmp_path, recipe, data, message):
    write_jsonl(tmp_path / "a.jsonl", [chat(0, "a")] + ([data] if data else []))
    write(tmp_path / "recipe.yaml", recipe)
    r = sdg("mix", tmp_path / "recipe.yaml", timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "mixed.jsonl").exists()


# ---- generation against the real embedded teacher ----------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_url():
    from serve.background import running_server
    with running_server() as url:
        yield url


def server_props(url):
    """What `python -m serve` counts: completion requests received, the most open at once, its slots."""
    return json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/props", timeout=10).read())


@pytest.fixture(scope="module")
def taxonomy(tmp_path_factory):
    """One leaf of each kind: knowledge, grounded skill, freeform skill."""
    return sample_leaves(tmp_path_factory.mktemp("taxonomy"), "knowledge/food/sourdough_starter",
                         "compositional_skills/extraction/meeting_action_items",
                         "compositional_skills/writing/thank_you_notes")


@pytest.fixture(scope="module")
def generated(teacher_url, taxonomy, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdg_out")
    before = server_props(teacher_url)
    r = sdg("generate", "--taxonomy", taxonomy, "--output-dir", out, "--num-instructions", 3, "--endpoint", teacher_url,
            "--concurrency", 4, "--judge-threshold", 1, *FAST, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = server_props(teacher_url)
    return out, r, {"completion_requests": after["completion_requests"] - before["completion_requests"], "props": after}


def check_sample(row, leaves):
    from tokenize_data import parse_line
    assert message_problem(row) is None
    parse_line(json.dumps(row).encode())  # what the trainer's tokenizer step accepts
    assert row["metadata"]["leaf"] in leaves
    if row["metadata"]["pipeline"] in ("document", "restated_context", "multiple_choice"):  # raw text: a document
        # chunk, a restated context, a seed pair in an MMLU prompt
        assert [m["role"] for m in row["messages"]] == ["pretraining"]
    else:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


@pytest.mark.slow  # the embedded teacher served by llama.cpp
def test_generate_counts_are_consistent_and_output_valid(generated, taxonomy):
    out, r, server = generated
    stats = json.loads((out / "stats.json").read_text())
    leaves = {leaf.name: leaf for leaf in load_taxonomy(taxonomy)}
    assert {(leaf.kind, leaf.grounded) for leaf in leaves.values()} == {("knowledge", False), ("skill", True),
                                                                        ("skill", False)}
    assert set(stats["leaves"]) == set(leaves)
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    sent = 0
    for name, leaf_stats in stats["leaves"].items():
        stages = leaf_stats["stages"]
        first = stages["qa_pairs"] if "qa_pairs" in stages else stages.get("contexts", stages["questions"])
        assert first["requested"] == max(3, stages.get("chunks", {}).get("chunks", 0))  # every chunk asked about
        assert leaves[name].kind == "skill" or stages["chunks"]["chunks"] > 3  # more chunks than instructions
        pipeline_stages = [s for s in ("contexts", "questions", "answers", "qa_pairs", "judge") if s in stages]
        for earlier, later in zip(pipeline_stages, pipeline_stages[1:]):
            assert stages[later]["requested"] == stages[earlier].get("parsed", 0)  # every parsed reply moves on
        for stage in pipeline_stages:
            counts = stages[stage]
            assert sum(counts.get(k, 0) for k in ("parsed", "unparsable", "truncated", "failed")) == counts["requested"]
            sent += counts["requested"] - counts["cached"]
        judge = stages["judge"]
        assert judge["kept"] + judge["rejected"] == judge.get("parsed", 0)
        dedup = stages["dedup"]
        assert dedup["input"] == judge["kept"]
        assert dedup["kept"] == dedup["input"] - dedup["exact_duplicates"] - dedup["near_duplicates"] \
            - dedup["held_out_questions"]
        own = sum(stages["taxonomy"].get(k, 0) for k in ("seed_pairs", "document_chunks", "restated_contexts",
                                                          "multiple_choice"))
        assert sum(row["metadata"]["leaf"] == name for row in train) == dedup["kept"] + own == leaf_stats["samples"]
    assert stats["requests"].get("sent", 0) == sent and stats["requests"].get("cached", 0) == 0
    # the one-slot server got each request once and never more than one at a time, though --concurrency is 4
    assert server["props"]["total_slots"] == 1 and "sending 1 at once, not --concurrency 4" in r.stderr
    assert server["completion_requests"] == sent and server["props"]["max_open_requests"] == 1
    assert len(cache_ids(out)) == len(set(cache_ids(out))) == sent
    for row in train:
        check_sample(row, leaves)
        assert row["metadata"]["pipeline"] in ("seed", "document", "restated_context", "multiple_choice", {"knowledge": "knowledge"}.get(
            leaves[row["metadata"]["leaf"]].kind, "grounded_skills" if leaves[row["metadata"]["leaf"]].grounded else "skills"))
    users = [normalize(row["messages"][0]["content"]) for row in train
             if row["metadata"]["pipeline"] not in ("seed", "multiple_choice")]
    assert len(users) == len(set(users))
    seeds = sum(leaf.kind == "skill" and len(leaf.data["seed_examples"]) or sum(
        len(s["questions_and_answers"]) for s in leaf.data["seed_examples"]) for leaf in leaves.values())
    held = sum(s["held_out"] for s in stats["leaves"].values())
    assert len(test) == held and 0 < held < seeds and all(row["metadata"]["pipeline"] == "heldout" for row in test)
    assert not {record_hash(row) for row in train} & {row["metadata"]["sha256"] for row in test}  # no leak
    for row in test:
        check_sample(row, leaves)
    assert "requests sent" in r.stdout and "sourdough_starter (knowledge)" in r.stdout


@pytest.mark.slow  # the embedded teacher served by llama.cpp
def test_rerun_reuses_the_cache_and_yields_samples(generated, taxonomy, teacher_url, tmp_path, embedded_dir):
    out, _, _ = generated
    rerun = tmp_path / "rerun"
    shutil.copytree(out, rerun)
    r = sdg("generate", "--taxonomy", taxonomy, "--output-dir", rerun, "--num-instructions", 3, "--endpoint", teacher_url,
            "--judge-threshold", 0, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((rerun / "stats.json").read_text())
    assert stats["requests"].get("sent", 0) == 0 and stats["requests"]["cached"] > 0  # nothing asked twice
    train = read_jsonl(rerun / "train.jsonl")
    assert train, "without the judge every parsed answer should survive dedup into train.jsonl"
    for name, leaf_stats in stats["leaves"].items():
        assert "judge" not in leaf_stats["stages"]
        last = leaf_stats["stages"].get("answers", leaf_stats["stages"].get("qa_pairs"))
        assert leaf_stats["stages"]["dedup"]["input"] == last.get("parsed", 0)
    # The output feeds tokenize_data.py directly, also through a mix recipe.
    write(tmp_path / "recipe.yaml", f"output: mixed.jsonl\ndatasets:\n  - path: {rerun}/train.jsonl\n    ratio: 1.0\n"
          f"  - path: {rerun}/test.jsonl\n    samples: 3\n")
    mixed, _ = mix(tmp_path / "recipe.yaml")
    from tokenize_data import tokenize_dataset
    meta = tokenize_dataset(str(mixed), embedded_dir, str(tmp_path / "tokenized"), 512)
    assert meta["num_samples"] == len(train) + 3 and meta["dropped"]["invalid"] == 0 and meta["loss_tokens"] > 0


@pytest.mark.slow  # the embedded teacher served by llama.cpp
def test_a_reply_lost_in_one_run_shifts_no_other_request(generated, taxonomy, teacher_url, tmp_path):
    """Later stages are keyed by the request they came from, not by their place among the replies that parsed:
    with one question's reply made unusable, a rerun finds every other answer and judgment in the cache."""
    out, _, _ = generated
    rerun = tmp_path / "rerun"
    shutil.copytree(out, rerun)
    leaf = "compositional_skills/writing/thank_you_notes"
    questions = rerun / "cache" / f"{leaf.replace('/', '__')}.questions.jsonl"
    records = read_jsonl(questions)  # in the order asked: the one-slot server got one request at a time
    parsed = [i for i, r in enumerate(records) if parse_question(r["reply"]) is not None]
    assert len(parsed) >= 2, "needs a parsed question before another one"
    records[parsed[0]]["reply"] = ""
    write_jsonl(questions, records)
    r = sdg("generate", "--taxonomy", taxonomy, "--output-dir", rerun, "--num-instructions", 3, "--endpoint", teacher_url,
            "--judge-threshold", 1, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((rerun / "stats.json").read_text())
    assert stats["requests"].get("sent", 0) == 0
    before = json.loads((out / "stats.json").read_text())["leaves"][leaf]["stages"]
    assert stats["leaves"][leaf]["stages"]["questions"]["parsed"] == before["questions"]["parsed"] - 1


@pytest.mark.slow  # the embedded teacher served by llama.cpp
def test_kill_and_rerun_resumes_without_redoing_work(teacher_url, tmp_path):
    taxonomy = tmp_path / "taxonomy"
    shutil.copytree(SAMPLE / "compositional_skills/writing", taxonomy / "compositional_skills/writing")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdg", "generate", "--taxonomy", str(taxonomy), "--output-dir", str(out),
            "--num-instructions", "3", "--endpoint", teacher_url, "--concurrency", "4", "--judge-threshold", "0", *FAST]
    before = server_props(teacher_url)["completion_requests"]
    # killed by the test hook right after its 2nd reply reaches the cache: the same point on any machine
    killed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MINILAB_TEST_HOOK": "after_request=2:kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done_before = len(cache_ids(out))  # load_cache would drop a half-written last line; ids here parsed whole
    assert done_before == 2 and not (out / "train.jsonl").exists()  # no output that looks complete
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    ids = cache_ids(out)
    assert len(ids) == len(set(ids))  # no request was answered twice
    assert stats["requests"]["cached"] == done_before
    stages = stats["leaves"]["compositional_skills/writing/thank_you_notes"]["stages"]
    assert stats["requests"]["cached"] + stats["requests"].get("sent", 0) == sum(
        s["requested"] for k, s in stages.items() if k in ("questions", "answers"))
    # the server computed every request once, but for the one in flight when the kill came (one slot, one sent)
    computed = server_props(teacher_url)["completion_requests"] - before
    assert stats["requests"]["cached"] + stats["requests"]["sent"] <= computed <= stats["requests"]["cached"] + \
        stats["requests"]["sent"] + 1
    rows = read_jsonl(out / "train.jsonl")  # the generated pairs kept, plus the leaf's own training seeds
    assert sum(r["metadata"]["pipeline"] == "skills" for r in rows) == stages["dedup"]["kept"]
    assert len(rows) == stages["dedup"]["kept"] + stages["taxonomy"]["seed_pairs"]


@pytest.mark.slow  # the embedded teacher served by llama.cpp
@pytest.mark.parametrize("action, exit_status", [("kill", -signal.SIGKILL), ("sigint", 130)])
def test_a_stopped_run_leaves_no_reply_computing_on_the_server(teacher_url, tmp_path, action, exit_status):
    """Stopped by the test hook once the first token of its 3rd request has arrived, killed or by Ctrl-C: the
    stream's connection closes (the process's end, or the teacher closing its client as the interrupt unwinds),
    and the server stops computing that reply (cut off before its last byte) instead of finishing it."""
    taxonomy = tmp_path / "taxonomy"
    shutil.copytree(SAMPLE / "compositional_skills/writing", taxonomy / "compositional_skills/writing")
    before = server_props(teacher_url)
    killed = subprocess.run(
        [sys.executable, "-m", "sdg", "generate", "--taxonomy", str(taxonomy), "--output-dir", str(tmp_path / "out"),
         "--num-instructions", "3", "--endpoint", teacher_url, "--concurrency", "4", "--judge-threshold", "0",
         *FAST, "--max-tokens", "128"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MINILAB_TEST_HOOK": f"in_flight=3:{action}"},
        # Ctrl-C as in a terminal: a suite started in the background (`pytest &`) hands its children SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert killed.returncode == exit_status, killed.stderr[-2000:]
    for _ in range(600):  # the server notices the closed connection at its next token
        after = server_props(teacher_url)
        if after["open_requests"] == 0:
            break
        time.sleep(0.1)
    assert after["open_requests"] == 0
    assert after["completion_requests"] - before["completion_requests"] == 3  # one slot: one request at a time
    assert after["cut_requests"] - before["cut_requests"] == 1  # the 3rd, stopped; the first two answered whole


@pytest.mark.slow  # llama-cpp-python's own server
def test_replies_the_server_cuts_off_are_never_taken(tmp_path):
    """llama-cpp-python's server as users start it (interrupt_requests on, its default; no /props, so 2 requests
    go at once) ends the running reply's stream with no finish_reason whenever another request waits: each such
    reply is skipped with a warning, and only replies that say why they ended reach the cache."""
    from config import embedded_gguf_path
    from serve.background import base_url_for, free_port, stop, wait_until_healthy
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", embedded_gguf_path(),
                                   "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "true"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        url = base_url_for("127.0.0.1", port)
        wait_until_healthy(url, None, server, 180, str(tmp_path / "server.log"))
        taxonomy = tmp_path / "taxonomy"
        shutil.copytree(SAMPLE / "compositional_skills/writing", taxonomy / "compositional_skills/writing")
        r = sdg("generate", "--taxonomy", taxonomy, "--output-dir", tmp_path / "out", "--num-instructions", 3,
                "--endpoint", url, "--concurrency", 2, "--judge-threshold", 0, *FAST, timeout=600)
    finally:
        stop(server)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "was cut off by the server" in r.stdout  # the progress bar's write()
    records = [json.loads(line) for f in (tmp_path / "out" / "cache").glob("*.jsonl") for line in open(f)]
    assert records and all(rec["finish_reason"] for rec in records)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["requests"]["failed"] > 0


@pytest.mark.slow  # the embedded teacher served by llama.cpp
def test_endpoint_down_is_a_clear_error_and_keeps_work(generated, taxonomy, tmp_path):
    out, _, _ = generated
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    r = sdg("generate", "--taxonomy", taxonomy, "--output-dir", tmp_path / "fresh", "--endpoint", dead,
            "--retries", "1", "--timeout", "5", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: cannot reach the teacher at {dead} after 1 retries" in r.stderr

    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    before = {p.name: p.read_bytes() for p in (kept / "cache").iterdir()}
    train_before = (kept / "train.jsonl").read_bytes()
    # One more instruction than the finished run: its first stage needs the (dead) teacher again.
    r = sdg("generate", "--taxonomy", taxonomy, "--output-dir", kept, "--num-instructions", 4, "--endpoint", dead,
            "--model", "teacher", "--retries", "1", "--timeout", "5", "--judge-threshold", 1, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: teacher at {dead} failed after retries: APIConnectionError" in r.stderr
    assert "Work so far is kept" in r.stderr
    assert {p.name: p.read_bytes() for p in (kept / "cache").iterdir()} == before
    assert (kept / "train.jsonl").read_bytes() == train_before
