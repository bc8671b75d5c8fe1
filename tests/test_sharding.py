"""Backends on real processes (gloo, 2 ranks, tiny Llama with the real tokenizer): two optimizer steps give the same
losses, gradient norms, per-parameter gradients (dumped by the MINILAB_DUMP_GRADS hook) and weights under none, FSDP2
(every strategy, 2 nodes over loopback) and DeepSpeed ZeRO-2/3, with clipping on and off, and when a rank gets no
sample; LoRA and QLoRA train and merge; checkpoints keep the base model's dtype; refused combinations say why."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TOPICS, build_tiny_model
from safetensors.torch import load_file

import sharding
from config import ConfigError, load_config

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
FP32 = 1e-6  # relative: what fp32 gives when only the order of the sums differs


def args_for(model_dir, dataset, out_dir, **extra):
    args = {"model_path": model_dir, **dataset, "ckpt_output_dir": str(out_dir), "max_seq_len": 256,
            "effective_batch_size": 16, "learning_rate": 1e-3, "lr_scheduler": "constant", "max_batch_len": 300,
            "num_epochs": 1, "checkpoint_at_epoch": False, "keep_last_checkpoint_only": True, "random_seed": 5,
            "dtype": "float32", "num_proc": 1, "max_steps": 1}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def communicate(procs, timeout=400):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:  # torchrun's workers would outlive a plain kill
                os.killpg(p.pid, signal.SIGKILL)
    return outs


def run(args, nproc=1, check=True, torchrun=None, dump_grads=False):
    """train.py under torchrun (nproc > 1, or torchrun=True), else plain python; dump_grads: the gradients of every
    step go to ckpt_output_dir/grads."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if (nproc > 1 if torchrun is None else torchrun) else [sys.executable]
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("ckpt_output_dir="))
    env = {**ENV, "MINILAB_DUMP_GRADS": os.path.join(out_dir, "grads")} if dump_grads else ENV
    proc = subprocess.Popen([*launcher, "train.py", "--config", "", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    (out, err), = communicate([proc])
    if check:
        assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return proc.returncode, out, err


def metrics(out_dir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl")))}


def hf(out_dir, name="last_epoch", file="model.safetensors"):
    return load_file(os.path.join(out_dir, "hf_format", name, file))


def assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def rel(a, b) -> float:
    """Relative difference; absolute where the reference is all zeros (LoRA's A before B has moved)."""
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1.0 if not b.any() else 0.0)).item()


def assert_same_step(out_dir, ref_dir, ref_name="samples_16", step=1):
    got, want = metrics(out_dir)[step], metrics(ref_dir)[step]
    assert got["num_tokens"] == want["num_tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=FP32)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=FP32)
    assert_close(hf(out_dir), hf(ref_dir, ref_name))


def assert_same_training(out_dir, ref_dir, steps=(1, 2), ref_name="samples_32", grad_rtol=FP32):
    """Every step's loss, gradient norm and each parameter's whole gradient, then the weights after the last.
    Adam's first step is nearly sign(grad) x lr, so equal weights alone would hide a gradient's scale; a clipping
    factor shows in the weights after step 2, where Adam's moments mix step 1's clipped gradient with step 2's."""
    for step in steps:
        assert_same_step(out_dir, ref_dir, ref_name, step)
        got = load_file(os.path.join(out_dir, "grads", f"grads_step_{step}.safetensors"))
        want = load_file(os.path.join(ref_dir, "grads", f"grads_step_{step}.safetensors"))
        assert got.keys() == want.keys() and len(want) > 0
        errors = {k: rel(got[k], want[k]) for k in want}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= grad_rtol, f"step {step}: {worst} gradient differs by {errors[worst]:.2e}"


def reference_run(tmp_path_factory, tiny_model_dir, dataset, name, **extra):
    """One process, no sharding, 2 steps: HF folders after step 1 (samples_16) and step 2 (samples_32)."""
    out = tmp_path_factory.mktemp(name)
    run(args_for(tiny_model_dir, dataset, out, max_steps=2, save_samples=16, keep_last_checkpoint_only=False,
                 **extra), dump_grads=True)
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(start[k], v) for k, v in hf(out, "samples_16").items())  # the step moved weights
    return out


CLIP = 0.5  # the gradient norm of these steps is about 3.7: clipping scales every gradient


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, dataset):
    out = reference_run(tmp_path_factory, tiny_model_dir, dataset, "ref", max_grad_norm=CLIP)
    assert all(r["grad_norm"] > 2 * CLIP for r in metrics(out).values())
    return out


@pytest.fixture(scope="module")
def reference_unclipped(tmp_path_factory, tiny_model_dir, dataset):
    return reference_run(tmp_path_factory, tiny_model_dir, dataset, "ref_unclipped", max_grad_norm=0)


ZERO2 = {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 2}
ZERO3 = {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 3}


@pytest.mark.parametrize("extra", [
    {"fsdp_options.sharding_strategy": "FULL_SHARD"},
    {"fsdp_options.sharding_strategy": "SHARD_GRAD_OP"},
    {"fsdp_options.sharding_strategy": "NO_SHARD"},
    {"fsdp_options.prefetch_layers": 2, "activation_checkpointing": "selective"},
    {"fsdp_options.prefetch_layers": 0, "activation_checkpointing": "full"},
    ZERO2], ids=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "prefetch2_selective_ac", "prefetch0_full_ac", "zero2"])
def test_two_clipped_steps_match_single_process(tmp_path, tiny_model_dir, dataset, reference, extra):
    run(args_for(tiny_model_dir, dataset, tmp_path, max_steps=2, max_grad_norm=CLIP, **extra), nproc=2,
        dump_grads=True)
    assert_same_training(tmp_path, reference)


@pytest.mark.parametrize("extra", [{"fsdp_options.sharding_strategy": "FULL_SHARD"}, ZERO2, ZERO3],
                         ids=["FULL_SHARD", "zero2", "zero3"])
def test_two_unclipped_steps_match_single_process(tmp_path, tiny_model_dir, dataset, reference_unclipped, extra):
    run(args_for(tiny_model_dir, dataset, tmp_path, max_steps=2, max_grad_norm=0, **extra), nproc=2,
        dump_grads=True)
    assert_same_training(tmp_path, reference_unclipped)


@pytest.mark.parametrize("extra", [{"distributed_backend": "fsdp"}, ZERO2], ids=["fsdp", "zero2"])
def test_torchrun_one_process_runs_the_chosen_backend(tmp_path, tiny_model_dir, dataset, reference, extra):
    """One GPU runs the same FSDP2 / DeepSpeed code as eight: torchrun with 1 process honours the backend."""
    _, out, _ = run(args_for(tiny_model_dir, dataset, tmp_path, max_steps=2, max_grad_norm=CLIP, **extra),
                    torchrun=True, dump_grads=True)
    assert "1 process(es) on cpu" in out and f"backend {extra['distributed_backend']}" in out
    assert_same_training(tmp_path, reference)
    _, plain, _ = run(args_for(tiny_model_dir, dataset, tmp_path / "plain", **extra))
    assert "backend none" in plain  # a plain `python train.py` keeps no backend


def test_deepspeed_zero3_matches_then_resumes_from_its_own_checkpoint(tmp_path, tiny_model_dir, dataset, reference):
    common = {"max_grad_norm": CLIP, **ZERO3}
    run(args_for(tiny_model_dir, dataset, tmp_path, **common), nproc=2, dump_grads=True)
    assert_same_step(tmp_path, reference)
    assert (tmp_path / "full_state" / "step_00000001" / "deepspeed").is_dir()
    _, out, _ = run(args_for(tiny_model_dir, dataset, tmp_path, max_steps=2, **common), nproc=2, dump_grads=True)
    assert "resumed from" in out and sorted(metrics(tmp_path)) == [1, 2]
    assert_same_training(tmp_path, reference)


ONE_SAMPLE = {"mock_data": True, "mock_data_samples": 1, "mock_data_len": 64, "effective_batch_size": 2,
              "max_steps": 1, "save_samples": 1}  # one step whose second rank gets no sample
LORA = {"lora.rank": 8, "lora.alpha": 16}


@pytest.fixture(scope="module")
def one_sample_references(tmp_path_factory, tiny_model_dir):
    refs = {}
    for name, extra in (("full", {}), ("lora", LORA)):
        refs[name] = tmp_path_factory.mktemp(f"one_sample_{name}")
        run(args_for(tiny_model_dir, {}, refs[name], **ONE_SAMPLE, **extra), dump_grads=True)
    return refs


@pytest.mark.parametrize("extra", [{}, ZERO3, LORA], ids=["FULL_SHARD", "zero3", "lora_FULL_SHARD"])
def test_a_rank_without_a_sample_matches_single_process(tmp_path, tiny_model_dir, one_sample_references, extra):
    """The untied head (and LoRA's adapters) get zero gradients on the empty rank, so every rank reduces the same
    parameters: before, gloo aborted with a collective mismatch."""
    _, out, _ = run(args_for(tiny_model_dir, {}, tmp_path, **ONE_SAMPLE, **extra), nproc=2, dump_grads=True)
    assert metrics(tmp_path)[1]["num_tokens"] == 64
    assert_same_training(tmp_path, one_sample_references["lora" if extra is LORA else "full"], steps=(1,),
                         ref_name="last_epoch")


def test_checkpoint_keeps_the_base_models_dtype(tmp_path, tokenizer, dataset):
    """A bf16 base trains in fp32 master weights and is saved in bf16, as its config.json says; LoRA's merged model
    too (merged in fp32 first); the adapter stays fp32, as peft loads adapters."""
    from transformers import AutoModelForCausalLM
    base = tmp_path / "bf16_base"
    build_tiny_model(tokenizer, base)
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    for name, extra in (("full", {}), ("lora", LORA)):
        run(args_for(str(base), dataset, tmp_path / name, learning_rate=1e-2, **extra))
        folder = tmp_path / name / "hf_format" / "last_epoch"
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
        weights = hf(tmp_path / name)
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}
        start = load_file(base / "model.safetensors")
        assert any(not torch.equal(start[k], v) for k, v in weights.items())  # trained, then cast
    assert {v.dtype for v in hf(tmp_path / "lora", file="adapter/adapter_model.safetensors").values()} == {
        torch.float32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_hybrid_shard(tmp_path, tiny_model_dir, dataset, reference):
    """2 nodes x 1 process, rendezvous on 127.0.0.1: HYBRID_SHARD shards inside a node, replicates across."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = args_for(tiny_model_dir, dataset, tmp_path, max_grad_norm=CLIP,
                    **{"fsdp_options.sharding_strategy": "HYBRID_SHARD"})
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                               "--rdzv-id=minilab-test", "--local-addr=127.0.0.1", "train.py", "--config", "",
                               *args], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) for node in (0, 1)]
    outs = communicate(procs)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-6000:]
    assert_same_step(tmp_path, reference)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, tiny_model_dir, dataset):
    """LoRA in one process for 4 steps (2 epochs), an HF folder after each step."""
    out = tmp_path_factory.mktemp("lora_ref")
    run(args_for(tiny_model_dir, dataset, out, max_steps=4, num_epochs=2, save_samples=16, learning_rate=1e-2,
                 keep_last_checkpoint_only=False, **{"lora.rank": 8, "lora.alpha": 16}))
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_lowers_loss_and_merged_model_matches_adapter(tiny_model_dir, lora_reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    rows = metrics(lora_reference)
    assert rows[4]["loss"] < rows[1]["loss"] - 0.1
    folder = lora_reference / "hf_format" / "samples_64"
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    targets = adapter_cfg["target_modules"]  # peft saves "all-linear" resolved to module names
    assert adapter_cfg["r"] == 8 and len(targets) == 2 * 7 and {t.rsplit(".", 1)[-1] for t in targets} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = torch.arange(100, 140)[None]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits(base, ids)
    adapted = PeftModel.from_pretrained(base, folder / "adapter").eval()  # wraps base in place
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert (logits(merged, ids) - base_logits).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["FULL_SHARD", "zero3"])
def test_lora_one_step_matches_single_process(tmp_path, tiny_model_dir, dataset, lora_reference, backend):
    extra = {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": backend[-1]} \
        if backend.startswith("zero") else {"fsdp_options.sharding_strategy": backend}
    run(args_for(tiny_model_dir, dataset, tmp_path, learning_rate=1e-2, **{"lora.rank": 8, "lora.alpha": 16},
                 **extra), nproc=2)
    assert_same_step(tmp_path, lora_reference)
    got = hf(tmp_path, file="adapter/adapter_model.safetensors")
    want = hf(lora_reference, "samples_16", "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:  # per tensor: Adam's first step turns a gradient element near its eps into a visible one
        assert torch.linalg.norm(got[k] - want[k]) <= 1e-3 * torch.linalg.norm(want[k]), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_nf4_lowers_loss_and_merges_against_dequantized_base(tmp_path, tiny_model_dir, dataset, dtype):
    """bf16: the 4-bit layers compute in bf16 while training; the merge check still compares in fp32 and passes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    _, out, _ = run(args_for(tiny_model_dir, dataset, tmp_path, max_steps=4, num_epochs=2, learning_rate=1e-2,
                             dtype=dtype, **{"lora.rank": 8, "lora.alpha": 16, "lora.quantize_data_type": "nf4"}))
    rows = metrics(tmp_path)
    assert rows[4]["loss"] < rows[1]["loss"] - 0.1
    difference = float(out.split("merged model matches the adapter model: max logit difference ")[1].split()[0])
    assert difference < 1e-5  # fp32 rounding only; the check allows 1e-4 of the largest logit
    folder = tmp_path / "hf_format" / "last_epoch"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    adapted = PeftModel.from_pretrained(quantized, folder / "adapter").train()  # train(): bnb's training layout
    ids = torch.arange(100, 140)[None]
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-6, rtol=1e-6)  # measured: 4e-7


REFUSED = [
    (2, {"lora": {"rank": 8, "quantize_data_type": "nf4"}}, "cannot shard bitsandbytes 4-bit weights"),
    (2, {"lora": {"rank": 8, "quantize_data_type": "nf4"}, "distributed_backend": "deepspeed"},
     "deepspeed cannot shard bitsandbytes"),
    (2, {"fsdp_options": {"cpu_offload_params": True}}, "on the CPU already: set fsdp_options.cpu_offload_params"),
    (3, {"fsdp_options": {"sharding_strategy": "HYBRID_SHARD"}}, "not a multiple of LOCAL_WORLD_SIZE 2"),
    (2, {"distributed_backend": "deepspeed", "deepspeed_options": {"cpu_offload_optimizer": True}},
     "cpu_offload_optimizer moves optimizer state"),
    (2, {"distributed_backend": "deepspeed", "deepspeed_options": {"cpu_offload_optimizer_ratio": 0.5}},
     "needs ZeRO stage 3"),
    (2, {"distributed_backend": "deepspeed", "deepspeed_options": {"cpu_offload_optimizer_ratio": 1.5}},
     "must be in (0, 1]"),
    (2, {"distributed_backend": "none"}, "distributed_backend=none runs one process"),
    (2, {"effective_batch_size": 1}, "effective_batch_size 1 is smaller than the 2 processes"),
    (1, {"dtype": "float16"}, "dtype=float16 needs loss scaling"),
]


@pytest.mark.parametrize("world_size,settings,message", REFUSED)
def test_refused_combination_says_why(monkeypatch, world_size, settings, message):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="cannot work") as e:
        sharding.check_combination(load_config(None, settings), world_size, torch.device("cpu"))
    assert message in str(e.value)


def test_all_problems_listed_at_once():
    cfg = load_config(None, {"lora": {"rank": 8, "quantize_data_type": "nf4"},
                             "fsdp_options": {"cpu_offload_params": True}})
    with pytest.raises(ConfigError) as e:
        sharding.check_combination(cfg, 2, torch.device("cpu"))
    assert "bitsandbytes" in str(e.value) and "cpu_offload_params" in str(e.value)


def test_refusal_at_start_of_a_real_run(tmp_path, tiny_model_dir, dataset):
    code, out, err = run(args_for(tiny_model_dir, dataset, tmp_path, **{"lora.rank": 8,
                                                                        "lora.quantize_data_type": "nf4"}),
                         nproc=2, check=False)
    assert code != 0 and "error: this combination of settings cannot work" in err
    assert "cannot shard bitsandbytes 4-bit weights" in err and "[rank0]: Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran


def test_qlora_without_lora_rank_refused_when_config_loads():
    with pytest.raises(ConfigError, match=r"quantize_data_type \(QLoRA\) needs lora.rank > 0"):
        load_config(None, {"lora": {"quantize_data_type": "nf4"}})


def test_cpu_gradient_norm_is_exact_to_fp32s_rounding(tiny_model_dir, tokenizer):
    """Single-process steps' norm (fp32 row norms summed in fp64) against fp64 sums of the same gradients: within
    what rounding the result to fp32 costs (6e-8), where torch's fp32 norm summed the 3.1M-element output head
    9e-5 low. exact=True, which the gradient noise scale asks for, is fp64's."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([tokenizer(" ".join(TOPICS * 8))["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads.items():
        exact = g.double().square().sum().item()
        assert sharding.squared_norm(g, exact=False).item() == pytest.approx(exact, rel=6e-8), name
        assert sharding.squared_norm(g, exact=True).item() == pytest.approx(exact, rel=1e-13), name
    exact = torch.cat([g.double().flatten() for g in grads.values()]).norm().item()
    norm = sharding.optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.0), max_grad_norm=0)
    assert norm == pytest.approx(exact, rel=6e-8)
