"""Learning you can see: validation loss, the held-out split, held-out scores with intervals, the summary."""
import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import ROOT, build_tiny_model, write_jsonl
from test_train import base_args, metrics, run_train, weights

import sampler
from eval import report
from sdg.generate import Settings, heldout_record, taxonomy_samples
from sdg.heldout import held_out_question, normalize, record_hash, split_leaf, split_pairs
from sdg.mix import mix
from sdg.taxonomy import load_taxonomy
from tokenize_data import load_tokenized

SAMPLE = ROOT / "sdg" / "sample_taxonomy"


def reference_val_loss(model_dir, dataset, held_out) -> float:
    """The held-out loss by HF's own forward(labels=...), one sample at a time: token NLL sum / token count."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = load_tokenized(dataset["data_output_dir"])
    total, count = 0.0, 0
    for i in held_out:
        a, b = data["offsets"][i], data["offsets"][i + 1]
        ids = torch.tensor(np.asarray(data["input_ids"][a:b], dtype=np.int64))[None]
        labels = torch.tensor(np.asarray(data["labels"][a:b], dtype=np.int64))[None]
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total += lm(input_ids=ids, labels=labels).loss.double().item() * n
        count += n
    return total / count


def test_validation_loss_equals_a_separate_forward_pass(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "val"
    r = run_train(base_args(tiny_model_dir, dataset, out, effective_batch_size=8, validation_split=6,
                            validation_frequency=2, save_best_val_loss=True))
    assert "26 samples, 6 held out, 4 steps" in r.stdout
    m = metrics(out)
    assert [s for s in m if "val_loss" in m[s]] == [2, 4] and m[4]["samples_seen"] == 26  # 6 never trained
    _, held_out = sampler.split_validation(32, 6, 5)
    assert len(held_out) == 6
    assert m[4]["val_loss"] == pytest.approx(reference_val_loss(out / "hf_format" / "last_epoch", dataset, held_out),
                                             rel=1e-6)
    best = min(m[2]["val_loss"], m[4]["val_loss"])
    assert reference_val_loss(out / "hf_format" / "best_val_loss", dataset, held_out) == pytest.approx(best, rel=1e-6)
    import logger
    assert logger.plot(str(out)).read_bytes()[:4] == b"\x89PNG"  # with the val_loss line on the loss axis


def test_resume_with_validation_is_bitwise_exact(tmp_path, tiny_model_dir, dataset):
    common = dict(effective_batch_size=4, save_samples=4, max_batch_len=300, validation_split=0.125,
                  validation_frequency=2)
    full = tmp_path / "full"
    run_train(base_args(tiny_model_dir, dataset, full, **common))
    cut = tmp_path / "cut"
    run_train(base_args(tiny_model_dir, dataset, cut, max_steps=3, **common))  # constant lr: same updates
    r = run_train(base_args(tiny_model_dir, dataset, cut, **common))
    assert "resumed from" in r.stdout and "at step 3" in r.stdout
    a, b = metrics(full), metrics(cut)
    assert sorted(a) == sorted(b) == list(range(1, 8))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    validated = [s for s in a if "val_loss" in a[s]]
    assert validated == [2, 4, 6, 7] and [a[s]["val_loss"] for s in validated] == [b[s]["val_loss"] for s in validated]
    wa, wb = weights(full), weights(cut)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_validation_settings_are_refused(tmp_path, tiny_model_dir, dataset):
    r = run_train(base_args(tiny_model_dir, dataset, tmp_path / "x", validation_split=32), check=False)
    assert r.returncode == 2 and "holds out 32 of 32 samples" in r.stderr and "Traceback" not in r.stderr
    r = run_train(base_args(tiny_model_dir, dataset, tmp_path / "y", save_best_val_loss=True), check=False)
    assert r.returncode == 2 and "save_best_val_loss needs held-out samples" in r.stderr


def test_heldout_split_never_reaches_training():
    leaves = load_taxonomy(SAMPLE)
    settings = Settings()
    for leaf in leaves:
        train_leaf, held = split_leaf(leaf)
        assert held, leaf.name
        samples, counts = taxonomy_samples(train_leaf, settings)
        held_records = [heldout_record(p, leaf, settings) for p in held]
        assert not {record_hash(r) for r in samples} & {r["metadata"]["sha256"] for r in held_records}
        texts = [normalize(m["content"]) for r in samples for m in r["messages"]]
        for p in held:  # not even the question text appears anywhere in training (documents hold facts only)
            assert not any(normalize(p["question"]) in t for t in texts), p["question"]
            assert held_out_question("Here is a question. " + p["question"], held)
        if leaf.kind == "knowledge":
            assert counts["document_chunks"] > 0 and all(
                r["messages"][0]["role"] == "pretraining" for r in samples if r["metadata"]["pipeline"] == "document")
            # the teacher's prompts only ever see the training seeds
            shown = [qa["question"] for s in train_leaf.data["seed_examples"] for qa in s["questions_and_answers"]]
            assert not set(shown) & {p["question"] for p in held}
    marrowick = next(leaf for leaf in leaves if leaf.name.endswith("marrowick"))
    assert len(split_leaf(marrowick)[1]) >= 20  # enough held-out questions for a visible difference


def test_split_is_by_content_and_stable():
    pairs = [{"question": f"Question {i}?", "answer": f"Answer {i}"} for i in range(40)]
    train, held = split_pairs(pairs, 0.5)
    assert len(held) == 20 and len(train) == 20
    again_train, again_held = split_pairs(list(reversed(pairs)), 0.5)  # order does not matter, content does
    assert {p["question"] for p in again_held} == {p["question"] for p in held}
    assert split_pairs(pairs[:1], 0.5) == (pairs[:1], [])


def test_mix_excludes_held_out_samples(tmp_path):
    held = [{"messages": [{"role": "user", "content": "What colour is the Amberlamp?"},
                          {"role": "assistant", "content": "Green"}]}]
    leaked = {"messages": [{"role": "user", "content": "what colour is the amberlamp"},
                           {"role": "assistant", "content": "green."}]}  # same content, other spelling
    other = {"messages": [{"role": "user", "content": "Name the ferry."}, {"role": "assistant", "content": "Kittiwake"}]}
    write_jsonl(tmp_path / "test.jsonl", held)
    write_jsonl(tmp_path / "train.jsonl", [leaked, other, other])
    (tmp_path / "r.yaml").write_text("exclude: [test.jsonl]\ndatasets:\n  - {path: train.jsonl, ratio: 1.0}\n")
    out, rows = mix(tmp_path / "r.yaml")
    mixed = [json.loads(x) for x in out.read_text().splitlines()]
    assert mixed == [other, other] and rows[-1] == ("excluded (held out)", 1, 1)


def test_intervals():
    five = report.proportion(5, 10)  # Wilson 95% for 5/10: 0.2366 to 0.7634
    assert five["value"] == 0.5 and five["low"] == pytest.approx(0.23659, abs=1e-4)
    assert five["high"] == pytest.approx(0.76341, abs=1e-4)
    zero = report.proportion(0, 10)
    assert zero["low"] == 0 and zero["high"] == pytest.approx(0.27753, abs=1e-4)
    nll = report.ratio_bootstrap([2.0, 4.0, 3.0, 5.0], [1, 2, 1, 2])
    assert nll["value"] == pytest.approx(14 / 6) and nll["low"] < nll["value"] < nll["high"] and nll["n"] == 4
    assert report.verdict(report.proportion(2, 28), report.proportion(20, 28)) == "improved"
    assert report.verdict(report.proportion(8, 28), report.proportion(11, 28)) == "no clear change"
    assert report.verdict({"value": 2.0, "low": 1.8, "high": 2.2}, {"value": 1.0, "low": 0.9, "high": 1.1},
                          higher_is_better=False) == "improved"


def test_heldout_eval_and_summary_report_n_and_intervals(tmp_path, tokenizer, monkeypatch):
    import phases
    from eval import heldout
    model = build_tiny_model(tokenizer, tmp_path / "tiny")
    settings = Settings()
    records = [heldout_record(p, leaf, settings) for leaf in load_taxonomy(SAMPLE) for p in split_leaf(leaf)[1]]
    write_jsonl(tmp_path / "test.jsonl", records)
    (tmp_path / "eval").mkdir()
    monkeypatch.setattr(sys, "argv", ["x"])
    result = heldout.main(["--heldout", str(tmp_path / "test.jsonl"), "--model", model, "--base-model", model,
                           "--max-new-tokens", "4", "--output", str(tmp_path / "eval" / "heldout.json")])
    metrics_seen = {(r["leaf"].rsplit("/", 1)[-1], r["metric"]) for r in result["results"]}
    assert {("marrowick", "multiple choice"), ("marrowick", "multiple choice (cloze)"),
            ("marrowick", "recall")} <= metrics_seen
    assert ("thank_you_notes", "answer NLL") in metrics_seen
    for r in result["results"]:
        assert r["base"] == r["trained"] and r["verdict"] == "no clear change"  # the same model twice
        assert r["trained"]["n"] == sum(x["metadata"]["leaf"] == r["leaf"] for x in records)
        assert r["trained"]["low"] <= r["trained"]["value"] <= r["trained"]["high"]
    phases.main(["summary", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["evaluations"]
    assert len(rows) == len(result["results"])
    row = rows["held-out multiple choice (knowledge/places/marrowick)"]
    assert row["trained"]["n"] >= 20 and row["delta"] == 0 and row["verdict"] == "no clear change"
    assert (tmp_path / "evaluation.png").read_bytes()[:4] == b"\x89PNG"


def test_training_choice_formats_are_what_lm_eval_scores(tmp_path):
    """The practice samples use the exact text lm-eval builds for a zero-shot MMLU question, in both forms:
    letters after the choices, and the answer's own text (continuation)."""
    import os
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager, get_task_dict

    from eval.mmlu_tasks import continuation_prompt, mmlu_prompt, write_task_configs
    row = {"question": "What colour is the light of the Amberlamp?", "subject": "knowledge_places_marrowick",
           "choices": ["Orange", "Green", "Seven", "1864"], "answer": 1}
    rendered = {}
    for style, prompt in (("letters", mmlu_prompt(row["subject"], row["question"], row["choices"])),
                          ("continuation", continuation_prompt(row["subject"], row["question"]))):
        _, tasks = write_task_configs({row["subject"]: {"dev": [], "test": [row]}}, str(tmp_path / style), 0, style)
        (name,) = tasks
        task = get_task_dict([name], TaskManager(include_path=str(tmp_path / style), include_defaults=False))[name]
        doc = next(iter(task.test_docs()))
        assert task.fewshot_context(doc, 0) == prompt
        rendered[style] = prompt + task.config.target_delimiter + task.doc_to_choice(doc)[task.doc_to_target(doc)]
    assert rendered["letters"].endswith("\nAnswer: B") and rendered["continuation"].endswith("\nAnswer: Green")
    leaf = next(leaf for leaf in load_taxonomy(SAMPLE) if leaf.name.endswith("marrowick"))
    training = split_leaf(leaf)[0]
    samples, counts = taxonomy_samples(training, Settings())
    practice = [r["messages"][0]["content"] for r in samples if r["metadata"]["pipeline"] == "multiple_choice"]
    assert len(practice) == counts["multiple_choice"] == 2 * counts["seed_pairs"]
    letters, continuation = practice[0::2], practice[1::2]
    assert all(t.startswith(mmlu_prompt(row["subject"], "", [])[:60]) and t[-2:] in (" A", " B", " C", " D")
               for t in letters)
    pairs = [(p["question"], p["answer"]) for s in training.data["seed_examples"] for p in s["questions_and_answers"]]
    assert continuation == [continuation_prompt(row["subject"], q) + " " + a for q, a in pairs]


def test_restated_contexts_keep_every_sentence_and_only_reorder():
    import re

    from sdg.generate import restate
    leaf = next(leaf for leaf in load_taxonomy(SAMPLE) if leaf.name.endswith("marrowick"))
    training = split_leaf(leaf)[0]
    contexts = [seed["context"] for seed in training.data["seed_examples"]]
    for i, context in enumerate(contexts):
        copies = restate(context, 2, f"leaf:{i}")
        assert copies == restate(context, 2, f"leaf:{i}") and len(copies) == 2  # seeded: reruns agree
        written = " ".join(context.split())
        assert all(copy != written for copy in copies) and copies[0] != copies[1]
        for copy in copies:  # the same whole sentences, nothing else
            assert sorted(copy.split()) == sorted(written.split())
            assert all(sentence in copy for sentence in re.split(r"(?<=[.!?]) ", written))
    samples, counts = taxonomy_samples(training, Settings(restatements=2))
    texts = [r["messages"][0]["content"] for r in samples if r["metadata"]["pipeline"] == "restated_context"]
    assert len(texts) == counts["restated_contexts"] == 2 * len(contexts) == 16
    assert all(r["messages"][0]["role"] == "pretraining" for r in samples if r["metadata"]["pipeline"] == "restated_context")
    without = taxonomy_samples(training, Settings(restatements=0))[1]
    assert without["restated_contexts"] == 0 and counts - Counter(restated_contexts=16) == without
    held = " ".join(normalize(p["question"]) for p in split_leaf(leaf)[1])
    assert not any(normalize(t) in held for t in texts)  # restated passages are document text, never a question


def test_cloze_multiple_choice_is_the_models_own_choice_likelihood(tmp_path, tokenizer, monkeypatch):
    """lm-eval's continuation form on the held-out rows picks, for each question, the choice whose text the model
    itself finds most likely after lm-eval's prompt: checked against a separate forward pass per choice."""
    import os
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    from eval import heldout
    from eval.mmlu_tasks import description
    model_dir = build_tiny_model(tokenizer, tmp_path / "tiny")
    leaf = next(leaf for leaf in load_taxonomy(SAMPLE) if leaf.name.endswith("marrowick"))
    records = [heldout_record(p, leaf, Settings()) for p in split_leaf(leaf)[1]]
    rows = heldout.mc_rows(leaf.name, records, 42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    for row in rows:
        prompt = tokenizer(description(row["subject"], "continuation") + f"Question: {row['question']}\nAnswer:")
        scores = []
        for choice in row["choices"]:
            ids = prompt["input_ids"] + tokenizer(" " + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
            n = len(prompt["input_ids"])
            scores.append(logprobs[n - 1:].gather(1, torch.tensor(ids[n:])[:, None]).sum().item())
        correct += int(np.argmax(scores)) == row["answer"]
    got = heldout.multiple_choice(model, tokenizer, {leaf.name: rows}, 4, "continuation")[leaf.name]
    assert got["n"] == len(rows) >= 20 and got["correct"] == correct
    letters = heldout.multiple_choice(model, tokenizer, {leaf.name: rows}, 4, "letters")[leaf.name]
    assert letters["n"] == len(rows)  # the same rows, scored by letter
