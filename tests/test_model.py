"""Padding-free packing and the loss, on a tiny random Llama with the real tokenizer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import ConfigError
from model import CausalLMWithLoss, check_packing_support, load_model, pack


def random_samples(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(5, 40, size=n):
        ids = rng.integers(0, vocab, size=length)
        labels = np.where(rng.random(length) < 0.6, ids, -100)
        out.append((ids, labels))
    return out


@pytest.mark.parametrize("attn", ["sdpa_varlen", "sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_model_dir, attn):
    lm = load_model(tiny_model_dir, torch.float32, attn).eval()
    samples = random_samples(5, lm.config.vocab_size)
    batch = pack(samples, torch.device("cpu"), attn)
    varlen = {"sample_bounds": batch["sample_bounds"]} if attn == "sdpa_varlen" else {}
    with torch.no_grad():
        packed = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    attention_mask=batch["attention_mask"], **varlen).logits[0]
        singles = [lm(input_ids=torch.as_tensor(ids)[None], sample_bounds=[0, len(ids)] if varlen else None).logits[0]
                   for ids, _ in samples]
    torch.testing.assert_close(packed, torch.cat(singles), atol=1e-5, rtol=1e-5)
    if not varlen:  # without the block mask, position_ids alone let attention cross samples
        with torch.no_grad():
            leaky = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        assert not torch.allclose(leaky, torch.cat(singles), atol=1e-3)


def test_loss_is_summed_token_ce_over_global_count(tiny_model_dir):
    lm = load_model(tiny_model_dir, torch.float32, "sdpa")
    samples = random_samples(4, lm.config.vocab_size, seed=1)
    batch = pack(samples, torch.device("cpu"), "sdpa")
    targets = batch["targets"]
    # targets are shifted inside each sample: a sample's last position predicts nothing
    ends = np.cumsum([len(s[0]) for s in samples]) - 1
    assert (targets[ends] == -100).all()
    model = CausalLMWithLoss(lm)
    loss = model(**batch, loss_scale=1 / 1000)
    logits = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"]).logits[0]
    reference = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / 1000
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert lm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_models_that_mix_the_sequence_are_refused():
    from transformers import MambaConfig
    with pytest.raises(ConfigError, match="packing would mix samples"):
        check_packing_support(MambaConfig())
    cfg = type("C", (), {"model_type": "hybrid", "layer_types": ["full_attention", "linear_attention"]})()
    with pytest.raises(ConfigError, match="linear_attention"):
        check_packing_support(cfg)


def test_activation_checkpointing_keeps_gradients_and_recomputes_what_its_mode_says(tiny_model_dir):
    """Ops run during backward: `full` re-runs every layer's matmuls and attention, `selective` re-runs only the
    cheap ops (activations, norms) and keeps matmul and attention outputs; gradients are identical either way."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    import sharding

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    runs = {}
    for mode in ("none", "full", "selective"):
        model = CausalLMWithLoss(load_model(tiny_model_dir, torch.float32, "sdpa")).train()
        if mode != "none":
            sharding.enable_activation_checkpointing(model.lm, mode)
        batch = pack(random_samples(3, model.lm.config.vocab_size), torch.device("cpu"), "sdpa")
        loss = model(**batch, loss_scale=1e-2)
        with CountOps() as counted:
            loss.backward()
        runs[mode] = ({k: p.grad for k, p in model.named_parameters()}, counted.ops)
    grads, ops = runs["none"]
    layers = 2
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert ops["silu"] == 0 and ops[attention] == 0  # without checkpointing nothing of the forward re-runs
    assert runs["full"][1]["mm"] == ops["mm"] + 6 * layers  # q k v o gate up; down_proj's output is not needed
    assert runs["full"][1][attention] == layers and runs["full"][1]["silu"] == layers
    assert runs["selective"][1]["mm"] == ops["mm"] and runs["selective"][1][attention] == 0
    assert runs["selective"][1]["silu"] == layers and runs["selective"][1]["rsqrt"] == 2 * layers
    for mode in ("full", "selective"):
        for k, g in runs[mode][0].items():
            torch.testing.assert_close(g, grads[k], atol=0, rtol=0, msg=f"{mode}: {k}")


def test_sdpa_varlen_keeps_a_sliding_window_inside_each_sample(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    MistralForCausalLM(config).save_pretrained(tmp_path)
    varlen = load_model(str(tmp_path), torch.float32, "sdpa_varlen").eval()
    reference = load_model(str(tmp_path), torch.float32, "eager").eval()  # HF's own sliding-window mask
    samples = random_samples(3, config.vocab_size, seed=2)  # 5 to 40 tokens: longer than the window
    batch = pack(samples, torch.device("cpu"), "sdpa_varlen")
    with torch.no_grad():
        packed = varlen(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        sample_bounds=batch["sample_bounds"]).logits[0]
        singles = torch.cat([reference(input_ids=torch.as_tensor(ids)[None]).logits[0] for ids, _ in samples])
        reference.config.sliding_window = None
        unwindowed = torch.cat([reference(input_ids=torch.as_tensor(ids)[None]).logits[0] for ids, _ in samples])
    torch.testing.assert_close(packed, singles, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unwindowed, singles, atol=1e-3)  # the window mattered for these lengths


def test_sdpa_varlen_model_still_runs_plain_forwards_and_refuses_padding(tiny_model_dir):
    varlen = load_model(tiny_model_dir, torch.float32, "sdpa_varlen").eval()
    reference = load_model(tiny_model_dir, torch.float32, "sdpa").eval()
    ids = torch.as_tensor(random_samples(1, varlen.config.vocab_size)[0][0])[None]
    with torch.no_grad():  # no sample_bounds: HF's own sdpa, as in generation or the LoRA merge check
        torch.testing.assert_close(varlen(input_ids=ids).logits, reference(input_ids=ids).logits)
        padded = torch.ones_like(ids)
        padded[0, 0] = 0
        with pytest.raises(ValueError, match="packed rows without padding"):
            varlen(input_ids=ids, attention_mask=padded)
