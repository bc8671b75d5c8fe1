"""train.py end to end on real processes: 1 rank = 2 ranks = gradient accumulation, resume, checkpoints."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import checkpoint
import sampler
import train
from config import load_config


def base_args(tiny_model_dir, dataset, out_dir, **extra):
    args = {"model_path": tiny_model_dir, **dataset, "ckpt_output_dir": str(out_dir), "max_seq_len": 256,
            "effective_batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_steps": 0,
            "max_batch_len": 4096, "num_epochs": 1, "checkpoint_at_epoch": False, "keep_last_checkpoint_only": True,
            "random_seed": 5, "dtype": "float32", "num_proc": 1}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run_train(args, nproc=1, check=True, omp_threads="1", **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": omp_threads}
    if nproc == 1:
        cmd = [sys.executable, "train.py", "--config", "", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "train.py", "--config", "", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate()  # pytest-timeout bounds it
    finally:
        if proc.poll() is None:  # torchrun's workers would outlive a plain kill
            os.killpg(proc.pid, signal.SIGKILL)
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def metrics(out_dir):
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows}  # a resumed run re-logs steps after its checkpoint: keep the last


def weights(out_dir, name="last_epoch"):
    return load_file(os.path.join(out_dir, "hf_format", name, "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_one_step_same_for_one_rank_two_ranks_and_accumulation(tmp_path, tiny_model_dir, dataset):
    one = tmp_path / "one"
    one_run = run_train(base_args(tiny_model_dir, dataset, one, max_steps=1), omp_threads="3")
    accum = tmp_path / "accum"  # budget of 300 tokens forces several micro-steps
    accum_run = run_train(base_args(tiny_model_dir, dataset, accum, max_steps=1, max_batch_len=300, num_threads=1),
                          omp_threads="3")
    two = tmp_path / "two"
    two_run = run_train(base_args(tiny_model_dir, dataset, two, max_steps=1, max_batch_len=300), nproc=2)
    cores = len(os.sched_getaffinity(0))
    assert "1 process(es) on cpu, 3 CPU thread(s) each" in one_run.stdout  # a lone process keeps OMP_NUM_THREADS
    assert "1 process(es) on cpu, 1 CPU thread(s) each, attention sdpa_varlen" in accum_run.stdout  # num_threads wins
    assert f"2 process(es) on cpu, {max(1, cores // 2)} CPU thread(s) each" in two_run.stdout  # cores shared
    m1, ma, m2 = metrics(one)[1], metrics(accum)[1], metrics(two)[1]
    assert m1["num_tokens"] == ma["num_tokens"] == m2["num_tokens"]
    for m in (ma, m2):
        assert m["loss"] == pytest.approx(m1["loss"], rel=1e-6)
        assert m["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-6)
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    w1 = weights(one)
    assert any(not torch.equal(start[k], w1[k]) for k in start)  # the step changed the model
    assert_same_weights(weights(accum), w1)
    assert_same_weights(weights(two), w1)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, dataset, nproc, monkeypatch):
    common = dict(effective_batch_size=4, num_epochs=1, save_samples=4, max_batch_len=300,
                  lr_scheduler="cosine", warmup_steps=2)
    full = tmp_path / "full"
    run_train(base_args(tiny_model_dir, dataset, full, **common), nproc=nproc)
    killed = tmp_path / "killed"
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=3:kill")  # every rank SIGKILLs itself once step 3 is saved
    assert run_train(base_args(tiny_model_dir, dataset, killed, **common), nproc=nproc, check=False).returncode != 0
    assert sorted(metrics(killed)) == [1, 2, 3]
    assert checkpoint.find_resume("auto", str(killed)).name == "step_00000003"
    monkeypatch.delenv("MINILAB_TEST_HOOK")
    resumed = run_train(base_args(tiny_model_dir, dataset, killed, **common), nproc=nproc)
    assert "at step 3" in resumed.stdout
    a, b = metrics(full), metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]  # bitwise, every step
    wa, wb = weights(full), weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_settings(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    run_train(base_args(tiny_model_dir, dataset, out, max_steps=1))
    r = run_train(base_args(tiny_model_dir, dataset, out, max_steps=2, effective_batch_size=8), check=False)
    assert r.returncode == 2 and "effective_batch_size: saved 16, now 8" in r.stderr and "Traceback" not in r.stderr


def simple_plan(lengths, loss_counts, effective_batch_size, max_batch_len, world_size, seed, epoch):
    """A deliberately plain sampler: in file order, two samples per micro-batch."""
    steps = []
    for start in range(0, len(lengths), effective_batch_size):
        idx = np.arange(start, min(start + effective_batch_size, len(lengths)))
        micro = [[pair] for pair in np.array_split(idx, max(1, len(idx) // 2))]
        steps.append({"micro_batches": micro, "num_samples": len(idx), "num_loss_tokens": int(loss_counts[idx].sum())})
    return steps


def test_sampler_is_swapped_by_replacing_one_function(tmp_path, tiny_model_dir, dataset, monkeypatch):
    calls = []
    monkeypatch.setattr(sampler, "plan_epoch", lambda *a: calls.append(a) or simple_plan(*a))
    cfg = load_config(None, base_args(tiny_model_dir, dataset, tmp_path / "swap", max_steps=2,
                                      effective_batch_size=8))
    state = train.train(cfg)
    rows = metrics(tmp_path / "swap")
    assert calls and state["global_step"] == 2 and len(rows) == 2
    assert rows[1]["samples_seen"] == 8 and rows[2]["samples_seen"] == 16


def test_mock_data_loss_goes_down_and_checkpoints_load(tmp_path, tiny_tied_model_dir):
    tiny_model_dir = tiny_tied_model_dir  # a tied head must stay tied in the saved checkpoint
    from transformers import AutoModelForCausalLM
    out = tmp_path / "mock"
    args = [f"model_path={tiny_model_dir}", f"ckpt_output_dir={out}", "mock_data=true", "mock_data_len=32",
            "mock_data_samples=16", "effective_batch_size=4", "num_epochs=3", "learning_rate=3e-3",
            "save_samples=24", "dtype=float32", "lr_scheduler=constant", "checkpoint_at_epoch=false"]
    run_train(args)
    rows = metrics(out)
    assert len(rows) == 12 and rows[12]["loss"] < rows[1]["loss"] - 0.5
    for key in ("step", "epoch", "samples_seen", "loss", "lr", "grad_norm", "num_tokens", "num_loss_tokens",
                "tokens_per_s", "loss_tokens_per_s", "step_time_s", "peak_memory_gb"):
        assert key in rows[1]
    # saves trigger when samples_seen >= last save + save_samples: at 24 and 48 samples seen
    assert sorted(p.name for p in (out / "hf_format").iterdir()) == ["samples_24", "samples_48"]
    model = AutoModelForCausalLM.from_pretrained(out / "hf_format" / "samples_48")
    saved = weights(out, "samples_48")
    assert torch.equal(model.get_input_embeddings().weight, saved["model.embed_tokens.weight"])
    assert torch.equal(model.get_output_embeddings().weight, saved["model.embed_tokens.weight"])  # still tied


def test_optimizer_and_loss_are_swapped_by_editing_one_function(tmp_path, tiny_model_dir, dataset, monkeypatch):
    import model
    used = {"optimizer": 0, "loss": 0}
    plain_loss = model.loss_fn

    def sgd(m, cfg):
        used["optimizer"] += 1
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=cfg.learning_rate)

    def doubled_loss(*args, **kwargs):
        used["loss"] += 1
        return 2 * plain_loss(*args, **kwargs)
    monkeypatch.setattr(train, "build_optimizer", sgd)
    monkeypatch.setattr(model, "loss_fn", doubled_loss)
    train.train(load_config(None, base_args(tiny_model_dir, dataset, tmp_path / "swap", max_steps=1)))
    swapped = metrics(tmp_path / "swap")[1]
    run_train(base_args(tiny_model_dir, dataset, tmp_path / "plain", max_steps=1))
    assert used["optimizer"] == 1 and used["loss"] >= 1
    assert swapped["loss"] == pytest.approx(2 * metrics(tmp_path / "plain")[1]["loss"], rel=1e-5)


def test_non_finite_loss_stops_before_the_update_and_logs_plot(tmp_path, tiny_model_dir, dataset, monkeypatch):
    import logger
    import model
    out = tmp_path / "nan"
    args = base_args(tiny_model_dir, dataset, out, effective_batch_size=8, save_samples=8, tensorboard="true")
    plain_loss = model.loss_fn

    def nan_on_third_step(*a, **k):
        done = len(metrics(out)) if (out / "metrics.jsonl").exists() else 0
        return plain_loss(*a, **k) * (float("nan") if done >= 2 else 1.0)
    monkeypatch.setattr(model, "loss_fn", nan_on_third_step)
    with pytest.raises(train.TrainingError, match="loss is nan"):
        train.train(load_config(None, args))
    assert len(metrics(out)) == 2
    saved = sorted(p.name for p in (out / "full_state").iterdir())
    assert saved == ["step_00000001", "step_00000002"]  # the failed step saved nothing
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    png = logger.plot(str(out))
    assert png.exists() and png.stat().st_size > 10_000


def test_torch_compile_trains_the_same_steps(tmp_path, tiny_model_dir, dataset):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    run_train(base_args(tiny_model_dir, dataset, plain, max_steps=2, effective_batch_size=8))
    run_train(base_args(tiny_model_dir, dataset, compiled, max_steps=2, effective_batch_size=8, torch_compile=True))
    for step in (1, 2):  # the samples differ in length every step: one dynamic-shape graph serves them all
        assert metrics(compiled)[step]["loss"] == pytest.approx(metrics(plain)[step]["loss"], rel=1e-5)
    assert_same_weights(weights(compiled), weights(plain), atol=1e-5)


def test_random_init_needs_only_a_config(tmp_path, tiny_model_dir):
    shape_only = tmp_path / "shape"
    shape_only.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            os.link(os.path.join(tiny_model_dir, name), shape_only / name)
    args = [f"model_path={shape_only}", f"ckpt_output_dir={tmp_path / 'run'}", "mock_data=true", "mock_data_len=32",
            "mock_data_samples=8", "effective_batch_size=4", "num_epochs=1", "dtype=float32",
            "keep_last_checkpoint_only=true"]
    refused = run_train(args, check=False)
    assert refused.returncode == 2 and f"cannot load model '{shape_only}'" in refused.stderr
    run_train([*args, "random_init=true"])
    first = metrics(tmp_path / "run")[1]["loss"]
    vocab = json.load(open(shape_only / "config.json"))["vocab_size"]
    assert abs(first - np.log(vocab)) < 1.0  # a random model predicts about uniformly
    trained = weights(tmp_path / "run")
    pretrained = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(trained[key], pretrained[key], atol=1e-2)  # not the folder's weights


def test_dropped_samples_are_reported_at_start(tmp_path, tiny_model_dir):
    from conftest import write_jsonl
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(4)]
    rows.append({"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]})
    rows.append({"messages": [{"role": "user", "content": "only a question"}]})  # nothing to train on
    data = {"data_path": write_jsonl(tmp_path / "d.jsonl", rows), "data_output_dir": str(tmp_path / "tok")}
    r = run_train(base_args(tiny_model_dir, data, tmp_path / "run", max_steps=1, effective_batch_size=4))
    assert "data: tokenized 4 samples" in r.stdout
    assert "dropped: {'too_long': 1, 'no_loss_tokens': 1, 'invalid': 0}" in r.stdout, r.stdout


MALLINFO = """
import ctypes, sys, torch
sys.path.insert(0, {root!r})
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if {tuned}:
    import train
    assert train.setup_distributed()[2].type == "cpu"
before = libc.mallinfo2().hblkhd  # what imports mapped earlier stays mapped
x = torch.empty(64 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - before
del x
print(mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.parametrize("tuned", [False, True])
def test_cpu_training_process_keeps_freed_tensor_memory(tuned):
    """train.py's CPU process serves a 64 MiB tensor from the heap, not from fresh mmap'd pages, and keeps it after
    it is freed, so the next step reuses the pages; a plain process maps it and gives it back."""
    if not hasattr(__import__("ctypes").CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    out = subprocess.run([sys.executable, "-c", MALLINFO.format(root=str(ROOT), tuned=tuned)], capture_output=True,
                         text=True, check=True).stdout
    mapped, free_in_heap = map(int, out.split())
    if tuned:
        assert mapped == 0 and free_in_heap >= 64 << 20
    else:
        assert mapped >= 64 << 20 and free_in_heap < 64 << 20
