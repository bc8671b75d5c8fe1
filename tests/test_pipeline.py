"""pipeline.sh end to end on a tiny setting: the embedded SmolLM2 generates data, trains 1 LoRA step, is evaluated
against itself untrained, converted to GGUF, served and asked one question. The phased (LAB) loop runs on that data
with the tiny random model so it fits the CI budget. Artifacts are checked, not just the exit code."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import sample_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["--profile", "cpu",
        "--set", "generate.num_instructions=3", "--set", "generate.max_tokens=48",
        "--set", "evaluate.mmlu_limit=3", "--set", "evaluate.mt_bench_limit=1", "--set", "evaluate.max_tokens=24",
        "--set", "evaluate.judge_max_tokens=48", "--set", "evaluate.chat_max_tokens=16",
        "--set", "evaluate.heldout_max_tokens=4", "--set", "mix.knowledge_repeats=2",
        "--set", "train.max_steps=1", "--set", "train.max_seq_len=256", "--set", "train.max_batch_len=1024",
        "--set", "train.effective_batch_size=2"]


# The whole loop takes minutes: bounded per test by pytest-timeout (the module fixture counts in the first test).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def pipeline(*args, cwd=ROOT):
    proc = subprocess.Popen([str(ROOT / "pipeline.sh"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:  # a timed-out test: its servers and trainers too
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def servers_started(stderr):
    """(port, model) of every server the pipeline printed the command of."""
    return re.findall(r"^\+ python -m serve --host 127\.0\.0\.1 --port (\d+) --ctx \d+(?: --model (\S+))?$", stderr, re.M)


def assert_stopped(servers):
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for port, model in servers:
        assert f"--port {port}" not in ps, (port, model)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} ({model or 'embedded'}) still answers"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """TINY on one knowledge leaf and one skill of the sample taxonomy: every stage has work, the teacher less."""
    taxonomy = sample_leaves(tmp_path_factory.mktemp("taxonomy"), "knowledge/food/sourdough_starter",
                             "compositional_skills/writing/thank_you_notes")
    return [*TINY, "--taxonomy", str(taxonomy)]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    result = pipeline("--output-dir", str(out), *tiny)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def multiset(records):
    return Counter(json.dumps(r, sort_keys=True) for r in records)


def is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_stage_ran_and_printed_its_command(run):
    out, result = run
    for stage in ("validate", "generate", "mix", "tokenize", "train", "mmlu", "heldout", "convert", "mtbench",
                  "chat"):
        assert (out / ".done" / stage).exists(), stage
    for command in ("+ python -m sdg validate", "+ python -m sdg generate", "+ python -m sdg mix",
                    "+ python tokenize_data.py --config", "+ python train.py --config", "+ python -m eval.mmlu",
                    "+ python -m eval.heldout", "+ python -m serve.convert", "+ python -m eval.mt_bench", "+ python -m serve.chat"):
        assert command in result.stderr, command


def test_data_and_checkpoint(run):
    out, _ = run
    generated = read_jsonl(out / "data" / "generated" / "train.jsonl")
    mixed = read_jsonl(out / "data" / "train.jsonl")
    # mix.knowledge_repeats=2: every knowledge sample twice per epoch, every skill sample once, nothing else
    knowledge = [r for r in generated if r["metadata"]["kind"] == "knowledge"]
    skills = [r for r in generated if r["metadata"]["kind"] != "knowledge"]
    assert knowledge and skills
    assert multiset(mixed) == multiset(knowledge * 2 + skills)
    # chat samples end with the assistant; the leaves' documents and MMLU-format practice train as raw text
    assert all(r["messages"][-1]["content"] and (r["messages"][-1]["role"] == "assistant") ==
               (r["metadata"]["pipeline"] not in ("document", "restated_context", "multiple_choice")) for r in mixed)
    # every pipeline's samples reach the mix: the taxonomy's own always; the teacher's pairs where the weak embedded
    # teacher wrote a parsable one in 48 tokens (machine-dependent: llama.cpp's numerics differ between CPUs)
    pipelines = {r["metadata"]["pipeline"] for r in mixed}
    assert pipelines == {r["metadata"]["pipeline"] for r in generated}
    assert pipelines >= {"document", "restated_context", "seed", "multiple_choice"}
    final = Path((out / "final_model.txt").read_text().strip())
    assert final.parent == out / "train" / "checkpoints" / "hf_format"
    assert (final / "config.json").exists() and list(final.glob("*.safetensors"))
    assert (final / "adapter").is_dir()  # LoRA run: merged weights plus the adapter
    metrics = read_jsonl(out / "train" / "checkpoints" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1] and metrics[0]["loss"] > 0
    assert is_png(out / "train" / "checkpoints" / "metrics.png")


def test_gguf_eval_and_chat(run):
    out, result = run
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF"
    mmlu = json.loads((out / "eval" / "mmlu.json").read_text())
    knowledge_leaves = {r["metadata"]["leaf"] for r in read_jsonl(out / "data" / "generated" / "train.jsonl")
                        if r["metadata"]["leaf"].startswith("knowledge")}
    assert mmlu["questions"] == 3 * len(knowledge_leaves) and 0 <= mmlu["overall"] <= 1 and 0 <= mmlu["base"]["overall"] <= 1
    mt_bench = json.loads((out / "eval" / "mt_bench.json").read_text())
    assert len(mt_bench["records"]) == 1 and len(mt_bench["base"]["records"]) == 1
    for png in ("eval/mmlu.png", "eval/mt_bench.png", "evaluation.png"):
        assert is_png(out / png), png
    chat = (out / "chat.txt").read_text().splitlines()
    knowledge_seeds = [r["messages"][0]["content"] for r in read_jsonl(out / "data" / "generated" / "test.jsonl")
                       if r["metadata"]["leaf"].startswith("knowledge")]
    assert chat[0].startswith("you> ") and chat[0][5:] == knowledge_seeds[0]
    assert "".join(chat[1:]).replace("assistant>", "").strip()


def test_summary_deltas_match_eval_files(run):
    out, result = run
    summary = json.loads((out / "summary.json").read_text())
    mmlu = json.loads((out / "eval" / "mmlu.json").read_text())
    row = summary["evaluations"]["MMLU-style accuracy (knowledge)"]
    assert row["delta"] == pytest.approx(mmlu["overall"] - mmlu["base"]["overall"])
    assert f"delta {row['delta']:+.4f}" in result.stdout
    assert summary["artifacts"]["GGUF"] == str(out / "model.gguf")
    assert "== minilab pipeline summary ==" in result.stdout


def test_every_server_started_is_stopped(run, embedded_dir):
    out, result = run
    servers = servers_started(result.stderr)
    gguf = str(out / "model.gguf")
    # MT-Bench: the base as an HF folder, converted as the trained one was (not the Q4_1 file), and the trained
    # model; then the chat. Contexts sized for the stage: 4 answer turns of 24 tokens + a 48-token judgment + 1536
    assert [model for _, model in servers] == [embedded_dir, gguf, gguf]
    assert re.findall(r"--ctx (\d+)", result.stderr) == ["1680", "1680", str(16 + 1024)]
    assert_stopped(servers)


def test_rerun_resumes_by_skipping_finished_stages(run, tiny):
    out, _ = run
    before = (out / "model.gguf").stat().st_mtime_ns
    result = pipeline("--output-dir", str(out), *tiny)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done already") == 10  # every stage but the summary
    assert "+ python train.py" not in result.stderr
    assert (out / "model.gguf").stat().st_mtime_ns == before


def test_phased_training_carries_the_best_phase1_checkpoint(run, tiny, tmp_path, tiny_model_dir):
    """LAB phases on the data generated above: every checkpoint of each phase is evaluated and the best kept."""
    out, _ = run
    shutil.copytree(out / "data" / "generated", tmp_path / "data" / "generated")
    (tmp_path / ".done").mkdir()
    for stage in ("validate", "generate"):
        shutil.copy(out / ".done" / stage, tmp_path / ".done" / stage)
    # 2 steps of 1 sample, a checkpoint after each: two candidates per phase.
    result = pipeline("--output-dir", str(tmp_path), *tiny, "--model", tiny_model_dir, "--phased", "--prune",
                      "--set", "train.max_steps=2",
                      "--set", "train.effective_batch_size=1", "--set", "train.save_samples=1",
                      "--only", "mix,tokenize,phase1,phase2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    knowledge = read_jsonl(tmp_path / "data" / "phase1.jsonl")
    assert knowledge and all(r["metadata"]["leaf"].startswith("knowledge/") for r in knowledge)
    phase1_evals = sorted(p.name for p in (tmp_path / "phase1" / "eval").glob("samples_*.json"))
    assert phase1_evals == ["samples_1.json", "samples_2.json"]
    best1 = Path((tmp_path / "phase1" / "best.txt").read_text().strip())
    assert best1.is_dir() and [p.name for p in best1.parent.iterdir()] == [best1.name]  # --prune kept only the best
    scores = {p: json.loads((tmp_path / "phase1" / "eval" / p).read_text())["overall"] for p in phase1_evals}
    assert scores[best1.name + ".json"] == max(scores.values())
    assert (tmp_path / "phase2" / "run.yaml").read_text().count(f"model_path: {best1}") == 1
    phase2_evals = sorted(p.name for p in (tmp_path / "phase2" / "eval").glob("samples_*.json"))
    assert phase2_evals == ["samples_1.json", "samples_2.json"]
    final = Path((tmp_path / "final_model.txt").read_text().strip())
    assert final.parent == tmp_path / "phase2" / "checkpoints" / "hf_format" and (final / "config.json").exists()
    for stage in ("validate", "generate", "mmlu", "heldout", "convert", "mtbench", "chat", "summary"):  # not --only
        assert f"== {stage}: skipped" in result.stdout, stage
    assert result.stderr.count("+ python -m eval.mt_bench") == 2  # one per phase-2 checkpoint
    servers = servers_started(result.stderr)  # the judge (the base model), then each checkpoint in turn
    assert [model for _, model in servers] == [tiny_model_dir, *(str(final.parent / n) for n in
                                                                 ("samples_1", "samples_2"))]
    assert_stopped(servers)


def test_the_profiles_teacher_reaches_sdg_generate(tmp_path):
    from serve.background import free_port
    teacher = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the run must fail asking this teacher
    result = pipeline("--output-dir", str(tmp_path), *TINY, "--set", f"generate.endpoint={teacher}",
                      "--set", "generate.model=my-teacher", "--only", "validate,generate")
    assert f" --endpoint {teacher} --model my-teacher" in result.stderr
    assert result.returncode == 2 and f"error: teacher at {teacher} failed after retries" in result.stderr
    assert "starting the embedded SmolLM2 teacher" not in result.stderr


def test_bad_settings_are_rejected_at_start_with_every_problem(tmp_path):
    result = pipeline("--output-dir", str(tmp_path), "--profile", "cpu", "--set", "evaluate.mmlu_limt=3",
                      "--set", "generate.num_instructions=many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluate.mmlu_limt" in result.stderr and "evaluate.mmlu_limit" in result.stderr
    assert "generate.num_instructions must be a whole number" in result.stderr
    result = pipeline("--output-dir", str(tmp_path), "--profile", "cpu", "--set", "train.lora.rank=abc",
                      "--set", "train.effective_batch_size=0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'lora.rank' must be an integer" in result.stderr and "effective_batch_size must be" in result.stderr
    result = pipeline("--output-dir", str(tmp_path), "--only", "trian")
    assert result.returncode == 2 and "unknown stage 'trian'" in result.stderr
    assert not list((tmp_path / ".done").glob("*")) if (tmp_path / ".done").exists() else True


def test_profiles_have_valid_sections():
    from config import load_config
    from phases import settings
    for name in ("cpu", "single-gpu", "multi-gpu"):
        chosen = settings(name, [])
        assert chosen["generate"]["num_instructions"] > 0 and chosen["train"]["profile"] == name
        assert load_config(profile=name).profile == name
    assert settings("multi-gpu", [])["evaluate"]["phased"] is True
    assert settings("cpu", [])["evaluate"]["phased"] is False
    cpu, multi = load_config(profile="cpu"), load_config(profile="multi-gpu")
    assert cpu.lora.rank > 0 and multi.lora.rank == 0


def test_rerunning_a_stage_invalidates_later_ones_and_paths_are_relative_to_the_caller(run, tmp_path):
    out, _ = run
    shutil.copytree(out / ".done", tmp_path / "copy" / ".done")
    result = pipeline("--output-dir", "copy", "--profile", "cpu", "--force", "--only", "validate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "copy" / ".done").iterdir()) == ["validate"]
    assert (tmp_path / "copy" / "train" / "run.yaml").exists()
