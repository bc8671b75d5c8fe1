"""Every model family users fine-tune, on tiny random models of each (conftest.FAMILIES, the real tokenizer, fp32):
the packed loss and its gradients equal the model's own forward(labels=...) per sample, LoRA finds each family's
projections and merges exactly, what cannot be reproduced is refused at start, and FSDP2 on 2 processes equals 1."""
import copy

import numpy as np
import pytest
import torch
from conftest import FAMILIES, build_tiny_family
from test_train import assert_same_weights, base_args, metrics, run_train, weights

import sharding
from config import ConfigError, load_config
from model import (CausalLMWithLoss, attention_backend, check_packing_support, load_model, model_config, pack,
                   sdpa_varlen)

CPU = torch.device("cpu")
MOE = ("qwen3_moe", "mixtral", "granitemoe", "gpt_oss")
# what sets each family apart, switched off one at a time (same seed, so the same weights): each must move the
# model's own loss far beyond the tolerance below, or the equality test could not see it dropped
FEATURES = {
    "mistral": {"sliding window": {"sliding_window": 4096}},
    "gemma2": {"attention softcapping": {"attn_logit_softcapping": None},
               "final logit softcapping": {"final_logit_softcapping": None},
               "sliding window": {"sliding_window": 4096}},
    "gemma3": {"final logit softcapping": {"final_logit_softcapping": None}, "sliding window": {"sliding_window": 4096}},
    "granite": {"logits scaling": {"logits_scaling": 1.0}},
    "granitemoe": {"logits scaling": {"logits_scaling": 1.0}, "router aux loss": {"output_router_logits": False}},
    "cohere": {"logit scale": {"logit_scale": 1.0}},
    "hyperclovax": {"logits scaling": {"logits_scaling": 1.0}},
    "qwen3_moe": {"router aux loss": {"output_router_logits": False}},
    "mixtral": {"router aux loss": {"output_router_logits": False}},
    "gpt_oss": {"router aux loss": {"output_router_logits": False}, "attention sinks": None},
}


@pytest.fixture(scope="session")
def family_dir(tokenizer, tmp_path_factory):
    made = {}

    def get(family, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = build_tiny_family(tokenizer, tmp_path_factory.mktemp(family), family, **overrides)
        return made[key]
    return get


def samples(vocab: int, lengths=(23, 9, 37, 14), seed=0):
    """Longer than the tiny sliding window (4); every sample trains its last token, so none has zero targets."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, vocab, n)
        labels = np.where(rng.random(n) < 0.6, ids, -100)
        labels[-1] = ids[-1]
        out.append((ids, labels))
    return out


def trained(labels) -> int:
    return int((labels[1:] != -100).sum())  # the first token is never predicted


def own_loss(lm, batch_samples):
    """sum over samples of (its trained tokens) x forward(sample alone, labels=...).loss: HF returns the mean over
    the sample's trained tokens (plus coef x its router aux loss for MoE models whose config asks for it)."""
    return sum(lm(input_ids=torch.as_tensor(ids)[None], labels=torch.as_tensor(labels)[None],
                  use_cache=False).loss * trained(labels) for ids, labels in batch_samples)


def packed_loss(model, batch_samples, attn, total):
    return model(**pack(batch_samples, CPU, attn), loss_scale=1 / total)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_gradients_equal_the_models_own_forward(family_dir, family):
    """Tolerance: fp32 sums of a few hundred terms in a different order (packed row vs one sample, sdpa vs eager):
    measured 2e-7 relative on the loss and 1.3e-6 of each gradient tensor's largest entry."""
    path = family_dir(family)
    attn = attention_backend(CPU, False, model_config(path))  # what train.py picks on CPU
    assert attn == ("eager_varlen" if family in ("gemma2", "gpt_oss") else "sdpa_varlen")
    lm = load_model(path, torch.float32, attn).train()
    reference = load_model(path, torch.float32, "eager").train()  # the model's own attention, one sample at a time
    assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight  # untied
    batch_samples = samples(lm.config.vocab_size)
    total = sum(trained(labels) for _, labels in batch_samples)
    loss = packed_loss(CausalLMWithLoss(lm), batch_samples, attn, total)
    loss.backward()
    want = own_loss(reference, batch_samples) / total
    want.backward()
    torch.testing.assert_close(loss, want.float(), rtol=1e-6, atol=0)
    grads = {k: p.grad for k, p in lm.named_parameters()}
    for k, p in reference.named_parameters():
        assert p.grad is not None and grads[k] is not None, k
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-5 * float(p.grad.abs().max()), msg=k)
    if family in MOE:  # the router loss is per sample, so any split into micro-batches or ranks sums the same
        with torch.no_grad():
            split = sum(packed_loss(CausalLMWithLoss(lm), part, attn, total)
                        for part in (batch_samples[:1], batch_samples[1:3], batch_samples[3:]))
        torch.testing.assert_close(split, loss.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family,feature", [(f, n) for f, features in FEATURES.items() for n in features])
def test_what_sets_a_family_apart_changes_its_own_loss(family_dir, family, feature):
    overrides = FEATURES[family][feature]
    base = load_model(family_dir(family), torch.float32, "eager")
    if overrides is None:  # attention sinks: no config key turns them off; a very negative sink takes no weight
        without = copy.deepcopy(base)
        for module in without.modules():
            if hasattr(module, "sinks"):
                module.sinks.data.fill_(-1e4)
    else:
        without = load_model(family_dir(family, **overrides), torch.float32, "eager")
        assert_same_weights(base.state_dict(), without.state_dict(), atol=0)
    batch_samples = samples(base.config.vocab_size)
    with torch.no_grad():
        a, b = own_loss(base, batch_samples).item(), own_loss(without, batch_samples).item()
    assert abs(a - b) / a > 2e-5, f"{family} without {feature}: {a} vs {b}"


def test_head_transforms_and_attention_features_not_applied_are_refused_at_start(tmp_path, tokenizer, dataset):
    from transformers import AutoConfig
    # Beam softcaps its logits (final_logit_softcapping), but its forward is not one model.HEAD_TRANSFORMS lists.
    # The folder holds no weights: the refusal comes before any is read.
    model_dir = tmp_path / "beam"
    AutoConfig.for_model("beam", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = {"data_path": dataset["data_path"], "data_output_dir": str(tmp_path / "tok")}
    r = run_train(base_args(str(model_dir), data, tmp_path / "run", max_steps=1), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "model type 'beam' sets final_logit_softcapping=30.0, which its output head applies" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    from transformers import Gemma3TextConfig
    with pytest.raises(ConfigError, match="'gemma3_text' sets use_bidirectional_attention"):
        check_packing_support(Gemma3TextConfig(use_bidirectional_attention=True))


def test_models_without_sdpa_load_packed_with_their_own_eager_attention(family_dir):
    path = family_dir("gemma2")
    with pytest.raises(ConfigError, match="'gemma2' has no sdpa attention.*attn_implementation='eager_varlen'"):
        load_model(path, torch.float32, "sdpa")
    assert load_model(path, torch.float32, "sdpa_varlen").config._attn_implementation == "eager_varlen"


def test_attention_inputs_no_packed_backend_applies_are_refused(family_dir):
    lm = load_model(family_dir("llama"), torch.float32, "sdpa_varlen")
    attention = lm.model.layers[0].self_attn
    q = torch.zeros(1, 4, 6, 16)
    with pytest.raises(ConfigError, match="'llama' passes position_bias to its attention"):
        sdpa_varlen(attention, q, q[:, :2], q[:, :2], None, sample_bounds=[0, 6], position_bias=torch.zeros(1))
    attention.is_causal = False
    with pytest.raises(ConfigError, match="non-causal attention"):
        sdpa_varlen(attention, q, q[:, :2], q[:, :2], None, sample_bounds=[0, 6])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "hyperclovax"])  # its layers are Llama's
def test_lora_finds_each_familys_projections_trains_and_merges_exactly(family_dir, family):
    path = family_dir(family)
    attn = attention_backend(CPU, False, model_config(path))
    base = load_model(path, torch.float32, attn)
    linears = {name for name, m in base.get_decoder().layers.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = load_config(None, ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.0"])
    lm = sharding.apply_lora(base, cfg)  # lora.target_modules unset: peft's all-linear
    adapted = {name.split("layers.", 1)[1] for name, m in lm.named_modules() if hasattr(m, "lora_A")}
    # every linear layer, and for Mixtral and Qwen3-MoE peft also wraps the router and the fused expert weights
    assert linears <= adapted and all(sum(a.startswith(f"{i}.") for a in adapted) >= 4 for i in range(2))
    assert not hasattr(lm.get_output_embeddings(), "lora_A")  # the head stays as trained
    model = CausalLMWithLoss(lm).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch_samples = samples(lm.config.vocab_size)
    packed_loss(model, batch_samples, attn, sum(trained(labels) for _, labels in batch_samples)).backward()
    assert all((p.grad is not None) == ("lora_" in k) for k, p in model.named_parameters()), "only LoRA trains"
    optimizer.step()
    lm.eval()
    ids = torch.as_tensor(batch_samples[2][0])[None]
    with torch.no_grad():
        adapter = lm(input_ids=ids).logits
        with lm.disable_adapter():
            before = lm(input_ids=ids).logits
        merged = copy.deepcopy(lm).merge_and_unload(safe_merge=True)(input_ids=ids).logits
    assert not torch.allclose(adapter, before, rtol=1e-4, atol=0)  # the step changed the function
    torch.testing.assert_close(merged, adapter, rtol=1e-5, atol=1e-5 * float(adapter.abs().max()))


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma2"])
def test_fsdp2_two_processes_equal_one(tmp_path, family_dir, dataset, family):
    """Untied head, MoE with its router loss, softcapped eager attention: one FSDP2 step on 2 processes (several
    micro-batches each) gives the loss and weights of one process."""
    path = family_dir(family)
    data = {"data_path": dataset["data_path"], "data_output_dir": str(tmp_path / "tok")}
    run_train(base_args(path, data, tmp_path / "one", max_steps=1))
    run_train(base_args(path, data, tmp_path / "two", max_steps=1, max_batch_len=300), nproc=2)
    one, two = metrics(tmp_path / "one")[1], metrics(tmp_path / "two")[1]
    assert two["num_tokens"] == one["num_tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)  # measured 5e-9: the gradients' scale
    # Adam's first step is lr x g / (|g| + eps): an entry whose gradient is near eps moves by up to lr (1e-3) on
    # fp32 summation order alone (measured 1.5e-6 on one entry of 2048, as with accumulation in one process)
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"), atol=5e-6)
