"""Fault tolerance with real processes and real signals: preemption, a kill mid-save, a crashing rank."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from test_train import base_args, metrics, run_train, weights

import checkpoint
from config import ConfigError

COMMON = dict(effective_batch_size=4, save_samples=4, max_batch_len=300, lr_scheduler="cosine", warmup_steps=2)


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, dataset):
    out = tmp_path_factory.mktemp("full")
    run_train(base_args(tiny_model_dir, dataset, out, **COMMON))
    return out


def assert_same_as(reference, out):
    a, b = metrics(reference), metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    wa, wb = weights(reference), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tmp_path, tiny_model_dir, dataset, uninterrupted):
    out = tmp_path / "preempted"
    args = base_args(tiny_model_dir, dataset, out, **{**COMMON, "save_samples": 0})  # only the stop saves
    proc = run_train(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-2000:]
    saved = sorted((out / "full_state").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / checkpoint.MARKER).exists()
    assert int(saved[0].name.split("_")[1]) == len(metrics(out)) < 8 and "stop requested" in log
    run_train(args)
    assert_same_as(uninterrupted, out)


def test_sigusr1_to_one_rank_stops_all_ranks(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "usr1"
    proc = run_train(base_args(tiny_model_dir, dataset, out, **{**COMMON, "save_samples": 0}), nproc=2,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2)
    workers = subprocess.run(["pgrep", "-f", f"ckpt_output_dir={out} ", "-P", str(proc.pid)],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0
    assert len(list((out / "full_state").glob("step_*"))) == 1


def test_kill_during_save_keeps_the_last_good_state(tmp_path, tiny_model_dir, dataset, uninterrupted):
    out = tmp_path / "midsave"
    args = base_args(tiny_model_dir, dataset, out, **COMMON)
    proc = run_train(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    root = out / "full_state"
    # the third save is being written: its temp folder exists and two complete states are there
    wait_for(lambda: root.exists() and len(list(root.glob("step_*"))) >= 2 and list(root.glob(".step_*.tmp")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = list(root.glob(".step_*.tmp"))
    assert stale, "the kill did not land inside a save"
    found = checkpoint.find_resume("auto", str(out))
    assert (found / checkpoint.MARKER).exists() and not list(root.glob(".step_*.tmp"))  # cleaned up
    run_train(args)
    assert_same_as(uninterrupted, out)


def test_a_crashing_rank_restarts_and_resumes_under_max_restarts(tmp_path, tiny_model_dir, dataset, uninterrupted):
    out = tmp_path / "elastic"
    env = {**os.environ, "CRASH_MARKER": str(tmp_path / "crashed"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "tests/helpers/crash_once.py", "--config", "", *base_args(tiny_model_dir, dataset, out, **COMMON)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = stdout + stderr
    assert proc.returncode == 0, log[-3000:]
    assert (tmp_path / "crashed").exists() and "injected crash" in log and "resumed from" in log
    ref = tmp_path / "ref"
    run_train(base_args(tiny_model_dir, dataset, ref, **COMMON), nproc=2)
    assert_same_as(ref, out)


def test_resume_refuses_other_data_and_model(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    run_train(base_args(tiny_model_dir, dataset, out, max_steps=1))
    other = tmp_path / "other.jsonl"
    other.write_text(open(dataset["data_path"]).read().replace("fact", "story"))
    r = run_train(base_args(tiny_model_dir, {"data_path": str(other), "data_output_dir": str(tmp_path / "tok2")},
                            out, max_steps=2), check=False)
    assert r.returncode == 2 and "data_sha256: saved" in r.stderr and "resume=false" in r.stderr


def test_free_space_is_checked_before_a_save(tmp_path):
    with pytest.raises(ConfigError, match="not enough disk space .* GiB free"):
        checkpoint.check_free_space(tmp_path, 1 << 60)
