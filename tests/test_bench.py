"""The bench scripts run end to end at tiny sizes and record what they claim; speed itself is never asserted here."""
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import hardware
from config import Config


def run_bench(script, *args):
    r = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_sampler_bench_plans_every_sample_and_beats_padding(tmp_path):
    out = run_bench("sampler.py", "--samples", "3000", "--json", str(tmp_path / "s.json"))
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["env"]["cores"] >= 1 and result["env"]["torch"] in out
    for row in result["settings"]:
        assert row["steps"] == -(-3000 // row["effective_batch_size"])
        assert 0 < row["padded_efficiency"] < row["compute_efficiency"] <= 1
        assert 0 < row["packing_efficiency"] <= 1


def test_tokenize_bench_counts_the_same_tokens_in_every_method(tmp_path, embedded_dir):
    # two rounds of one tokenize_data.py run each: a process of its own, whose start-up is most of its time here
    out = run_bench("tokenize.py", "--samples", "60", "--median-words", "30", "--model-path", embedded_dir,
                    "--num-proc", "2", "--repeats", "2", "--json", str(tmp_path / "t.json"))
    result = json.loads((tmp_path / "t.json").read_text())
    runs, rounds, skipped = result["runs"], result["rounds"], result["skipped"]
    # data_process runs where instructlab.training imports; elsewhere it is skipped with the import's error
    assert ("data_process" in runs) != ("data_process" in skipped)
    if "data_process" in skipped:
        assert re.search(rf"^data_process +skipped: {re.escape(skipped['data_process'])}$", out, re.M)
    assert len(rounds) == 2 and all(set(rnd) == set(runs) for rnd in rounds)
    assert set(runs) - {"data_process"} == {"floor", "tokenize_data num_proc=2", "chat_template_ids",
                                            "chat_template_prefix"}
    for rnd in rounds:
        # the same conversations: tokenize_data.py's tokens are exactly the chat template's and the floor's
        # (data_process drops samples under 20 tokens)
        assert len({r["tokens"] for name, r in rnd.items() if name != "data_process"}) == 1
        floor = rnd["floor"]
        assert floor["seconds"] == pytest.approx(floor["render_s"] + floor["encode_batch_s"] + floor["write_s"])
        assert min(floor["render_s"], floor["encode_batch_s"], floor["write_s"], floor["start_up_s"]) > 0
        base = rnd["chat_template_ids"]
        for r in rnd.values():  # each ratio is the round's own measurement over the round's baseline
            assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
            assert r["ratio"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
            assert r["time_vs_floor"] == pytest.approx(r["seconds"] / floor["seconds"])
    for name, r in runs.items():  # the medians of two rounds (their means), each ratio the rounds' own ratios'
        for key in ("seconds", "tokens_per_s", "ratio", "time_vs_floor"):
            assert r[key] == pytest.approx(sum(rnd[name][key] for rnd in rounds) / 2, rel=1e-12)
        each = ", ".join(f"{rnd[name]['seconds']:.2f} \\({rnd[name]['time_vs_floor']:.2f}x\\)" for rnd in rounds)
        line = (rf"^{re.escape(name)} +{r['seconds']:.2f} +{r['tokens_per_s']:.0f} +{r['ratio']:.2f}x "
                rf"+{r['time_vs_floor']:.2f}x  {each}$")
        assert re.search(line, out, re.M), name
    # tokenize_data.py against the floor plus the start-up of a process that tokenizes, each round's own ratio
    ours = runs["tokenize_data num_proc=2"]
    assert ours["time_vs_floor_and_start_up"] == pytest.approx(sum(
        rnd["tokenize_data num_proc=2"]["seconds"] / (rnd["floor"]["seconds"] + rnd["floor"]["start_up_s"])
        for rnd in rounds) / 2, rel=1e-12)
    start_up = sum(rnd["floor"]["start_up_s"] for rnd in rounds) / 2
    assert re.search(rf"^tokenize_data num_proc=2 against the floor plus .*: {start_up:.2f} s\): "
                     rf"{ours['time_vs_floor_and_start_up']:.2f}x$", out, re.M)


@pytest.mark.slow
def test_train_throughput_bench_agrees_with_train_py_metrics(tmp_path, tiny_model_dir):
    out = run_bench("train_throughput.py", "--model-path", tiny_model_dir, "--samples", "12", "--median-words", "20",
                    "--effective-batch-size", "4", "--steps", "2", "--warmup", "1", "--repeats", "2", "--ladder",
                    "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    rounds = result["rounds"]
    assert len(rounds) == 2
    first_best = max(("hf_trainer_padded", "hf_trainer_flattened", "trl_sft_packed"),
                     key=rounds[0]["tokens_per_s"].get)
    for rnd in rounds:  # every method in every round; the first round's best peer again with train.py's allocator
        rates = rnd["tokens_per_s"]
        assert set(rates) == {"train.py", "raw_fwd_bwd_packed", "hf_trainer_padded", "hf_trainer_flattened",
                              "trl_sft_packed", f"{first_best}+allocator"}
        assert all(r > 0 for r in rates.values())
        assert rnd["train_py_is"] == pytest.approx({k: rates["train.py"] / v for k, v in rates.items()}, rel=1e-12)
        # the limit: the same rows before and after this round's train.py run, the timed steps of both together
        before, after = rnd["raw_steps"][1:], rnd["raw_steps_after_train_py"][1:]
        assert [t for _, t in rnd["raw_steps_after_train_py"]] == result["step_tokens"]
        assert rates["raw_fwd_bwd_packed"] == pytest.approx(sum(t for _, t in before + after)
                                                            / sum(s for s, _ in before + after), rel=1e-12)
        assert len(rnd["train_py_metrics"]) == 2  # each round trains from scratch: the timed steps 2 and 3
        assert [m["step"] for m in rnd["train_py_metrics"]] == [2, 3]
        # the Trainer's steps held exactly the plan's samples; TRL packs its own rows
        assert [t for _, t in rnd["peer_steps"]["hf_trainer_flattened"]] == result["step_tokens"]
        # train.py's logged step times against the bench's own clock (when each metrics line appeared): logged
        # times lie inside the span the outside clock saw, so they never exceed it by more than that clock's
        # error at the span's two ends; how far they fall short depends on the load, so a benchmark reports it
        assert 0 < rnd["logged_vs_outside_step_time"] <= 1 + rnd["outside_clock_error_bound"]
    # the headline figures are medians over the rounds (of two: their mean), each ratio its rounds' own ratios'
    rates, train_py_is = result["tokens_per_s"], result["train_py_is"]
    for name in rates:
        assert rates[name] == pytest.approx(sum(r["tokens_per_s"][name] for r in rounds) / 2, rel=1e-12)
        assert train_py_is[name] == pytest.approx(sum(r["train_py_is"][name] for r in rounds) / 2, rel=1e-12)
        each = ", ".join(f"{r['tokens_per_s'][name]:.1f} \\({r['train_py_is'][name]:.2f}x\\)" for r in rounds)
        assert re.search(rf"^{re.escape(name)} +{rates[name]:.1f} +{train_py_is[name]:.2f}x  {each}", out, re.M)
    best = max(("hf_trainer_padded", "hf_trainer_flattened", "trl_sft_packed"), key=rates.get)
    assert result["best_peer"] == best and result["ratio_vs_best_peer"] == train_py_is[best]
    assert result["ratio_vs_raw_fwd_bwd"] == train_py_is["raw_fwd_bwd_packed"]
    assert result["ratio_vs_best_peer_with_allocator"] == train_py_is[f"{first_best}+allocator"]
    assert result["compute_dtype"] == ("bfloat16" if hardware.cpu_has_native_bf16() else "float32")  # dtype auto
    # both packing peers keep a packed row's samples apart on CPU (position ids restart per sample)
    assert set(result["packing_leak_max_abs_logit"]) == {"hf_trainer_flattened", "trl_sft_packed"}
    assert all(leak < 1e-4 for leak in result["packing_leak_max_abs_logit"].values())
    assert len(result["ladder_raw_tokens_per_s"]) == 6 and len(result["ladder_optimizer_step_s"]) == 2
    assert len(result["step_tokens"]) == 3
    assert 0 < result["padded_batch_padding_fraction"] < 1  # lognormal lengths: padded batches carry padding
    ladder = result["ladder_raw_tokens_per_s"]  # printed over the ladder's first row: raw fwd+bwd both
    first = next(iter(ladder.values()))
    for name, rate in ladder.items():
        line = rf"^ladder \(raw fwd\+bwd\) {re.escape(name)} +{rate:.1f} tokens/s +{rate / first:.2f}x the first$"
        assert re.search(line, out, re.M), name


@pytest.mark.parametrize("script", ["tokenize.py", "train_throughput.py"])
def test_a_bench_refuses_zero_rounds_in_one_line(script):
    r = subprocess.run([sys.executable, f"bench/{script}", "--repeats", "0"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr  # imports may warn first; the error is one line
    assert r.stderr.splitlines()[-1] == "error: --repeats: 0; give 1 or more rounds"


def test_packing_leak_check_tells_a_leaking_packer_from_one_that_keeps_samples_apart(tiny_model_dir):
    """The bench's verdict on a peer's packing: a row concatenated without restarting position ids lets the second
    sample attend to the first; DataCollatorWithFlattening's position ids keep them apart."""
    from transformers import DataCollatorWithFlattening

    from bench.train_throughput import LEAK_TOLERANCE, packing_leak
    from model import load_model
    lm = load_model(tiny_model_dir, torch.float32, "sdpa").eval()
    rows = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))},
            {"input_ids": list(range(40, 52)), "labels": list(range(40, 52))}]

    def concatenated(features):  # one causal row, no sample boundaries
        return {"input_ids": torch.tensor([[t for f in features for t in f["input_ids"]]])}

    assert packing_leak(lm, concatenated, rows) > 100 * LEAK_TOLERANCE
    assert packing_leak(lm, DataCollatorWithFlattening(), rows) < LEAK_TOLERANCE / 100


@pytest.mark.slow
def test_mfu_bench_runs_train_py_and_the_padding_free_trainer_on_a_shape(tmp_path):
    out = run_bench("mfu.py", "--shape", "tiny", "--tokens-per-gpu", "256", "--seq-len", "64", "--steps", "2",
                    "--warmup", "1", "--ladder", "--json", str(tmp_path / "m.json"))
    result = json.loads((tmp_path / "m.json").read_text())
    names = [r["name"] for r in result["runs"]]
    assert names == ["default", "torch.compile", "selective activation checkpointing",
                     "full activation checkpointing", "hf_trainer_padding_free"]  # CPU: no flash-attn, one process
    for r in result["runs"]:
        assert r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["mfu"] is None  # no GPU peak to divide by on CPU
    for r in result["runs"][:-1]:
        # train.py's own step timing against the bench's clock, within that clock's error
        assert 0 < r["logged_vs_outside_step_time"] <= 1 + r["outside_clock_error_bound"]
    assert result["train_py_vs_hf_tokens_per_s"] > 0 and "train.py vs the Trainer" in out
    # the Trainer computes in the dtype train.py picks (dtype auto: bf16 autocast on a CPU with native bf16)
    assert result["runs"][-1]["bf16"] == (hardware.compute_dtype(Config(), torch.device("cpu")) == torch.bfloat16)


def test_train_py_flops_match_the_mfu_bench_formula_for_tied_and_untied_heads():
    """Two independent counts of training FLOPs: train.py's from the parameters (logged MFU) and bench/mfu.py's
    from the shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.mfu import SHAPES, shape_flops
    lengths = [10, 37, 5]
    for tied in (True, False):
        shape = {**SHAPES["tiny"], "vocab_size": 500, "tie_word_embeddings": tied}
        lm = LlamaForCausalLM(LlamaConfig(**shape))
        assert hardware.model_flops(lm, lengths) == shape_flops(shape, lengths), tied


@pytest.mark.slow
def test_learning_bench_trains_the_leaf_alone_and_scores_what_it_held_out(tmp_path, tiny_model_dir):
    out = run_bench("learning.py", "--leaf", "vorlund_instruments", "--taxonomy", str(ROOT / "bench" / "user_taxonomy"),
                    "--model", tiny_model_dir, "--set", "max_steps=2", "--set", "max_seq_len=256",
                    "--json", str(tmp_path / "l.json"))
    result = json.loads((tmp_path / "l.json").read_text())
    counts = result["samples"]
    assert counts["restated_contexts"] == 2 * 8 and counts["seed_pairs"] == 26  # 8 contexts, 2 restatements each
    assert result["steps"] == 2 and set(result["scores"]) == {"multiple choice", "multiple choice (cloze)", "recall"}
    for metric, s in result["scores"].items():
        assert s["base"]["n"] == s["trained"]["n"] == 26  # half of the leaf's 52 seed pairs
        assert re.search(rf"^{re.escape(metric)} +base {s['base']['correct']}/26 ", out, re.M)
    assert len(result["replies"]["knowledge/technology/vorlund_instruments"]) == 26
