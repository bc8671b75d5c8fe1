"""optimizer=muon on real processes (tiny Llama, real tokenizer): train.py's updates equal torch.optim.Muon on the
decoder layers' matrices plus AdamW on the rest, replayed on the very gradients the run dumped (MINILAB_DUMP_GRADS);
FSDP2 on 2 gloo ranks gathers each matrix for Newton-Schulz and matches that replay and one process; a killed and
resumed run is bitwise the uninterrupted one; what cannot work is refused by name."""
import os

import pytest
import torch
from safetensors.torch import load_file
from test_train import base_args, metrics, run_train, weights

import checkpoint
import sharding
from config import ConfigError, load_config

STEPS, LR, WD = 4, 1e-3, 0.1
# 4 samples a step, a full state after each (save_samples), micro-steps of 300 tokens, a decaying LR (the
# scheduler must drive both optimizers), weight decay on Muon's matrices and AdamW's, clipping at 1.0 on
MUON = dict(optimizer="muon", effective_batch_size=4, save_samples=4, max_batch_len=300, max_steps=STEPS,
            learning_rate=LR, weight_decay=WD, lr_scheduler="linear", warmup_steps=0)


def train_dumping_grads(tiny_model_dir, dataset, out, nproc):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILAB_DUMP_GRADS", str(out / "grads"))
        run_train(base_args(tiny_model_dir, dataset, out, **MUON), nproc=nproc)
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory, tiny_model_dir, dataset):
    return train_dumping_grads(tiny_model_dir, dataset, tmp_path_factory.mktemp("muon_one"), 1)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, tiny_model_dir, dataset):
    return train_dumping_grads(tiny_model_dir, dataset, tmp_path_factory.mktemp("muon_fsdp2"), 2)


def replay(tiny_model_dir, run):
    """The run's updates made directly by torch.optim.Muon (2-D weights in model.layers) and fused AdamW (the
    rest; no decay on 1-D), from its dumped whole gradients, clipped by its logged norm, at the linear LR."""
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    params = {k: v.clone().requires_grad_() for k, v in start.items()}
    hidden = [p for k, p in params.items() if k.startswith("model.layers.") and p.ndim == 2]
    rest = [p for p in params.values() if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.ndim == 2], "weight_decay": WD},
                               {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
                              lr=LR, betas=(0.9, 0.95), fused=True)
    logged = metrics(run)
    for step in range(1, STEPS + 1):
        grads = load_file(run / "grads" / f"grads_step_{step}.safetensors")
        for k, p in params.items():
            p.grad = grads[f"lm.{k}"]
        torch.nn.utils.clip_grads_with_norm_(list(params.values()), 1.0,
                                             torch.tensor(logged[step]["grad_norm"], dtype=torch.float64).float())
        lr = LR * (float(STEPS - step + 1) / float(STEPS))  # transformers' linear schedule, as LambdaLR has it
        assert logged[step]["lr"] == lr
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] = lr
        muon.step()
        adamw.step()
    return start, {k: p.detach() for k, p in params.items()}


def assert_same_updates(start, got, want, rtol=1e-6):
    assert got.keys() == want.keys()
    for k in want:
        expected = want[k] - start[k]
        assert expected.abs().max() > 0, k  # every parameter moved
        torch.testing.assert_close(got[k] - start[k], expected, rtol=rtol, atol=rtol * expected.abs().max().item(),
                                   msg=k)


def test_one_process_updates_are_torch_muon_plus_adamw_on_the_same_gradients(one, tiny_model_dir):
    start, want = replay(tiny_model_dir, one)
    assert_same_updates(start, weights(one), want)


def test_fsdp2_gathers_each_matrix_and_matches_the_replay_and_one_process(fsdp2, one, tiny_model_dir):
    start, want = replay(tiny_model_dir, fsdp2)  # torch.optim.Muon on the whole gradients the shards came from
    assert_same_updates(start, weights(fsdp2), want)
    a, b = metrics(one), metrics(fsdp2)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=1e-6)
    for s in a:
        # Newton-Schulz runs in bf16 (torch's Muon): the fp32-level gradient differences of 1 and 2 ranks flip a
        # few bf16 roundings of its input, each moving that matrix's update ~1%. Measured after step 1: losses
        # 6e-7 apart, grad norms 1.4e-5 (AdamW: 1e-7, 1e-8). The replay above is the exact check of FSDP2's path
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6 if s == 1 else 1e-5)
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-6 if s == 1 else 1e-4)


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_is_bitwise_the_uninterrupted_run(request, tmp_path, tiny_model_dir, dataset, nproc,
                                                          monkeypatch):
    full = request.getfixturevalue("one" if nproc == 1 else "fsdp2")
    out = tmp_path / "killed"
    args = base_args(tiny_model_dir, dataset, out, **MUON)
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=2:kill")  # every rank SIGKILLs itself once step 2 is saved
    assert run_train(args, nproc=nproc, check=False).returncode != 0
    assert checkpoint.find_resume("auto", str(out)).name == "step_00000002"
    monkeypatch.delenv("MINILAB_TEST_HOOK")
    assert "at step 2" in run_train(args, nproc=nproc).stdout
    a, b = metrics(full), metrics(out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]  # bitwise, every step
    assert [a[s]["grad_norm"] for s in a] == [b[s]["grad_norm"] for s in a]
    wa, wb = weights(full), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_state_of_the_other_optimizer_is_not_resumed(one, tiny_model_dir, dataset):
    r = run_train(base_args(tiny_model_dir, dataset, one, **{**MUON, "optimizer": "adamw", "max_steps": STEPS + 1}),
                  check=False)
    assert r.returncode == 2 and "optimizer: saved 'muon', now 'adamw'" in r.stderr and "Traceback" not in r.stderr


def test_what_cannot_work_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"config key 'optimizer' must be one of \['adamw', 'muon'\], got 'sgd'"):
        load_config(None, ["optimizer=sgd"])
    with pytest.raises(ConfigError, match="optimizer=muon .* LoRA trains low-rank factors: set lora.rank=0"):
        load_config(None, ["optimizer=muon", "lora.rank=8"])
    cfg = load_config(None, ["optimizer=muon", "distributed_backend=deepspeed"])
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO hands the optimizer flat partitions: use "
                                          "distributed_backend=fsdp"):
        sharding.check_combination(cfg, 2, torch.device("cpu"))
