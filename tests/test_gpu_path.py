"""What the CUDA path depends on, checked on the CPU: dtype choices and refusals, MFU's FLOP count and GPU peaks,
the loss without torch's linear_cross_entropy, the checkpoint space estimate on sharded ranks, the process
group's timeout, a SIGTERM to the torchrun agent, and bench/gpu_check.py's plan."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_sharding import ENV, args_for, metrics

import hardware
from bench.mfu import shape_flops
from config import ConfigError, load_config
from model import CausalLMWithLoss, has_linear_cross_entropy, load_model, loss_fn, pack
from sharding import apply_lora


@pytest.mark.parametrize("name,device,native,want", [
    ("auto", "cuda", True, torch.bfloat16), ("auto", "cuda", False, torch.float32),  # pre-Ampere: no bf16
    ("auto", "cpu", True, torch.bfloat16), ("auto", "cpu", False, torch.float32),
    ("float32", "cuda", True, torch.float32), ("bfloat16", "cpu", False, torch.bfloat16)])
def test_dtype_choice(name, device, native, want):
    assert hardware.choose_dtype(name, device, native) == want


def test_bf16_refused_on_a_gpu_without_it_and_fp16_without_loss_scaling():
    with pytest.raises(ConfigError, match="this GPU has no bf16 arithmetic; use dtype=float32"):
        hardware.choose_dtype("bfloat16", "cuda", False)
    import sharding
    with pytest.raises(ConfigError, match="dtype=float16 needs loss scaling"):
        sharding.check_combination(load_config(None, {"dtype": "float16"}), 1, torch.device("cpu"))
    sharding.check_combination(load_config(None, {"dtype": "float16", "distributed_backend": "deepspeed"}), 2,
                               torch.device("cpu"))  # DeepSpeed scales the loss itself


@pytest.mark.parametrize("device_name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", None),
    ("NVIDIA H1000", None)])
def test_gpu_peak_by_whole_name(device_name, peak):
    assert hardware.peak_bf16_flops(device_name) == peak


def tiny_shape(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    return {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size")}


def test_model_flops_count_frozen_weights_at_4_per_token(tiny_model_dir):
    """Full fine-tuning: 6 per weight and token (bench/mfu.py's count from the shape alone). LoRA: the frozen base
    4 (forward and the input's gradient), the adapters 6. QLoRA: the 4-bit weights at their unpacked size."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    lengths = [100, 37, 250]
    shape = tiny_shape(tiny_model_dir)
    attention = 6 * shape["num_hidden_layers"] * shape["hidden_size"] * sum(n * n for n in lengths)
    full = hardware.model_flops(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lengths)
    assert full == shape_flops(shape, lengths)
    base_per_token = (full - attention) / 6 / sum(lengths)  # the matmul weights
    lora = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_config(None, {"lora": {"rank": 8}}))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapters > 0
    assert hardware.model_flops(lora, lengths) == pytest.approx(
        (4 * base_per_token + 6 * adapters) * sum(lengths) + attention, rel=1e-12)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    assert any(p.dtype == torch.uint8 for p in quantized.parameters())  # packed
    for p in quantized.parameters():
        p.requires_grad_(False)
    assert hardware.model_flops(quantized, lengths) == pytest.approx(4 * base_per_token * sum(lengths) + attention,
                                                                  rel=1e-12)


def packed_loss(lm, seed=0):
    rng = np.random.default_rng(seed)
    samples = [(ids, ids) for ids in (rng.integers(0, 1000, n) for n in (30, 7, 64))]
    batch = pack(samples, torch.device("cpu"), "sdpa_varlen")
    return CausalLMWithLoss(lm)(**batch, loss_scale=1.0 / (29 + 6 + 63))


def test_loss_without_linear_cross_entropy_falls_back_to_logits(tiny_model_dir, monkeypatch):
    """torch before 2.13 (requirements admit 2.9) has no F.linear_cross_entropy: the plain path gives the same."""
    lm = load_model(tiny_model_dir, torch.float32, "sdpa_varlen")
    assert has_linear_cross_entropy()  # this torch has it
    fused = packed_loss(lm)
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    assert not has_linear_cross_entropy()
    plain = packed_loss(lm)
    assert plain.item() == pytest.approx(fused.item(), rel=1e-6)


def test_autocast_projects_fp32_hidden_states_in_the_compute_dtype():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False)
    hidden, targets = torch.randn(1, 40, 32), torch.randint(0, 500, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn(hidden, head, targets, 1.0)
        cast_first = loss_fn(hidden.bfloat16(), head, targets, 1.0)
    fp32 = loss_fn(hidden, head, targets, 1.0)
    assert autocast.item() == cast_first.item() != fp32.item()


WORKER = """
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import checkpoint, sharding, train
from config import load_config
from model import CausalLMWithLoss
cfg = load_config(None, sys.argv[2:])
rank, world_size, device = train.setup_distributed(1, cfg.distributed_timeout_minutes)
lm = sharding.load_lm(sys.argv[1], cfg, rank, world_size, torch.float32, "sdpa_varlen")
model, _ = sharding.prepare(CausalLMWithLoss(lm), cfg, device, world_size, torch.float32,
                            lambda m: train.build_optimizer(m, cfg))
timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
# one file per rank: two ranks printing at once can interleave their lines on a busy machine
with open(f"{out}/rank{{rank}}.json", "w") as f:
    json.dump({{"hf": checkpoint.needed_bytes(model, torch.bfloat16), "full": checkpoint.needed_bytes(model),
               "timeout_s": timeout}}, f)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("backend", [{"distributed_backend": "fsdp"},
                                     {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 3}],
                         ids=["fsdp", "zero3"])
def test_save_space_estimate_is_the_whole_model_on_every_rank(tmp_path, tiny_model_dir, backend):
    """A DTensor's numel is global and a ZeRO-3 partition's is 0 (ds_numel is whole): every rank estimates the
    whole model once, not world_size times, nor nothing. The group's timeout is the configured one."""
    from transformers import AutoModelForCausalLM
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(worker), tiny_model_dir, "distributed_timeout_minutes=7",
                        *[f"{k}={v}" for k, v in backend.items()]],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert results == [{"hf": 2 * numel, "full": (4 + 8) * numel, "timeout_s": 420.0}] * 2


def test_sigterm_to_the_torchrun_agent_saves_the_full_state_only(tmp_path, tiny_model_dir, dataset):
    """Preemption as a scheduler does it: SIGTERM to torchrun itself, which forwards it to its workers and kills
    them after its grace period. The step in progress finishes, the sharded full state is saved (no HF export,
    so it fits the grace period) and the run stops early. Rank 0 waits at a named point until the signal."""
    out = tmp_path / "run"
    args = args_for(tiny_model_dir, dataset, out, max_steps=0, num_epochs=3, effective_batch_size=4)
    env = {**ENV, "MINILAB_TEST_HOOK": "after_step=2:pause@0", "MINILAB_TEST_HOOK_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "train.py", "--config", "", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused_rank0").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the agent, not a worker
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    total = 3 * 8  # 32 samples, 4 a step, 3 epochs
    assert "stop requested: saved full state at step 3" in log, log[-3000:]
    assert sorted(metrics(out)) == [1, 2, 3] and 3 < total
    saved = out / "full_state" / "step_00000003"
    assert (saved / "COMPLETE").exists() and len(list(saved.glob("*.distcp"))) == 2  # one shard per rank
    assert not (out / "hf_format").exists()


def test_gpu_check_dry_run_plans_every_check():
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from bench.gpu_check import BACKENDS, CHECKS
    for name in CHECKS:
        assert name in r.stdout
    assert len(BACKENDS) == 8 and "dry run: 16 checks planned, nothing run" in r.stdout
    assert "[would skip: flash_attn not installed]" in r.stdout  # reported, never passed
    assert "--nproc-per-node=1 train.py" in r.stdout and "deepspeed_options.zero_stage=3" in r.stdout
    bad = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--only", "flash"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown check(s) ['flash']" in bad.stderr


def test_gpu_check_without_cuda_says_so_and_passes():
    r = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and "no CUDA device here" in r.stdout
