"""Fault tolerance with real processes and real signals: preemption, a kill mid-save, a crashing rank."""
import json
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


def wait_for_file(path, proc):
    """The hook's marker: the run stays parked at the named point until released, so no timing is involved
    (pytest-timeout bounds a run that never gets there)."""
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before reaching the hook"
        time.sleep(0.05)


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


def test_sigterm_saves_at_the_step_boundary_and_exits_zero(tmp_path, tiny_model_dir, dataset, uninterrupted,
                                                          monkeypatch):
    out = tmp_path / "preempted"
    args = base_args(tiny_model_dir, dataset, out, **{**COMMON, "save_samples": 0})  # only the stop saves
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=2:sigterm")  # a real SIGTERM, right after step 2
    stopped = run_train(args)
    # the request rides on the next step's all-reduce: step 3 runs, then the run saves and stops
    assert "stop requested: saved full state at step 3; exiting" in stopped.stdout
    assert sorted(metrics(out)) == [1, 2, 3]
    saved = sorted((out / "full_state").glob("step_*"))
    assert [p.name for p in saved] == ["step_00000003"] and (saved[0] / checkpoint.MARKER).exists()
    assert json.loads((saved[0] / "trainer_state.json").read_text())["global_step"] == 3  # of 8
    assert not (out / "hf_format").exists() and "done: 3 steps" in stopped.stdout  # no end-of-run save followed
    monkeypatch.delenv("MINILAB_TEST_HOOK")
    resumed = run_train(args)
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    assert_same_as(uninterrupted, out)


def test_sigusr1_to_one_rank_stops_all_ranks(tmp_path, tiny_model_dir, dataset, monkeypatch):
    out = tmp_path / "usr1"
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=2:pause@1")  # rank 1 waits; rank 0 goes on into step 3
    monkeypatch.setenv("MINILAB_TEST_HOOK_DIR", str(tmp_path))
    with open(tmp_path / "log", "w") as log_file:  # a file, not a pipe: nobody reads while waiting for the hook
        proc = run_train(base_args(tiny_model_dir, dataset, out, **{**COMMON, "save_samples": 0}), nproc=2,
                         stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_file(tmp_path / "paused_rank1", proc)
        assert not (tmp_path / "paused_rank0").exists()
        os.kill(int((tmp_path / "paused_rank1").read_text()), signal.SIGUSR1)  # to rank 1 only
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "stop requested: saved full state at step 3" in log and sorted(metrics(out)) == [1, 2, 3]
    assert [p.name for p in (out / "full_state").glob("step_*")] == ["step_00000003"]


def test_kill_during_save_keeps_the_last_good_state(tmp_path, tiny_model_dir, dataset, uninterrupted, monkeypatch):
    out = tmp_path / "midsave"
    args = base_args(tiny_model_dir, dataset, out, **COMMON)
    # SIGKILL with step 3's state written in full, COMPLETE marker included, but not yet renamed into place
    monkeypatch.setenv("MINILAB_TEST_HOOK", "inside_save=3:kill")
    killed = run_train(args, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    root = out / "full_state"
    assert (root / ".step_00000003.tmp" / checkpoint.MARKER).exists()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000002"]
    assert checkpoint.find_resume("auto", str(out)) == root / "step_00000002"
    assert not list(root.glob(".step_*.tmp"))  # the half-done save was cleaned up
    monkeypatch.delenv("MINILAB_TEST_HOOK")
    resumed = run_train(args)
    assert "at step 2" in resumed.stdout
    assert_same_as(uninterrupted, out)


def test_the_test_hook_refuses_what_it_cannot_read(monkeypatch):
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_stpe=2:kill")
    with pytest.raises(ValueError, match="cannot read 'after_stpe=2:kill'"):
        checkpoint.fault_point("after_step", 2)
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=2:explode")
    with pytest.raises(ValueError, match="actions kill, pause or a signal name"):
        checkpoint.fault_point("after_step", 1)
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=2:sigusr2@1")
    checkpoint.fault_point("after_step", 2)  # rank 0 here: not for this process, nothing happens


@pytest.mark.slow
def test_a_crashing_rank_restarts_and_resumes_under_max_restarts(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "elastic"
    env = {**os.environ, "CRASH_MARKER": str(tmp_path / "crashed"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "tests/helpers/crash_once.py", "--config", "", *base_args(tiny_model_dir, dataset, out, **COMMON)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate()  # pytest-timeout bounds it
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
