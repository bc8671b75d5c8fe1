"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built with it."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process (this one and every subprocess: train.py alone, eval, lm-eval): beside another busy job a
# second OpenMP thread waits for a core at every op, which made a held-out eval 12x slower on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


SAMPLE_TAXONOMY = ROOT / "sdg" / "sample_taxonomy"


def sample_leaves(dest, *leaves):
    """A taxonomy of some of the sample taxonomy's leaves (paths under it), copied to dest: the tests that ask the
    real 135M teacher keep one leaf of each kind they check, as each leaf costs teacher requests."""
    import shutil
    for leaf in leaves:
        shutil.copytree(SAMPLE_TAXONOMY / leaf, Path(dest) / leaf)
    return Path(dest)


@pytest.fixture(scope="session")
def embedded_dir():
    from model import resolve_model_path
    return resolve_model_path("embedded")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from model import load_tokenizer
    return load_tokenizer(embedded_dir)


SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False)
MOE = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02)
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
# family: (transformers config class, what sets it apart from the shared tiny shape). Features that random weights
# would leave too small to matter (caps, scales) are set so that dropping them changes the loss.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "moe_intermediate_size": 32}),
    "mixtral": ("MixtralConfig", MOE),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "gemma2": ("Gemma2Config", {**SLIDING, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.5,
                                "final_logit_softcapping": 0.5, "initializer_range": 0.1}),  # scores the cap bends
    "gemma3": ("Gemma3TextConfig", {**SLIDING, "query_pre_attn_scalar": 16, "final_logit_softcapping": 0.5}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 12.0, "residual_multiplier": 0.2,
                                  "attention_multiplier": 0.1, "logits_scaling": 0.25}),
    "granitemoe": ("GraniteMoeConfig", {**MOE, "logits_scaling": 0.25, "embedding_multiplier": 12.0}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "cohere": ("CohereConfig", {"logit_scale": 4.0}),
    "gpt_oss": ("GptOssConfig", {**MOE, **SLIDING}),
    "hyperclovax": ("HyperCLOVAXConfig", {"logits_scaling": 4.0}),  # Granite's key, but it multiplies
}


def build_tiny_family(tokenizer, out_dir, family="llama", seed=0, **overrides):
    """A 2-layer random model of one architecture family (FAMILIES) with the real tokenizer, untied output head
    unless overridden, fp32, saved as an HF folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**SHAPE, **extra, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_tiny_model(tokenizer, out_dir, seed=0, **overrides):
    """A 2-layer random Llama with an untied output head (as Llama-3's) and the real tokenizer, saved."""
    return build_tiny_family(tokenizer, out_dir, "llama", seed, **overrides)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    return build_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tokenizer, tmp_path_factory):
    """The same Llama with its output head tied to the embeddings (SmolLM2, small Qwen and Gemma models)."""
    return build_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny_tied_llama"), tie_word_embeddings=True)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


TOPICS = ["the sea", "a red bicycle", "prime numbers", "bread", "the moon", "winter", "trains", "a library",
          "coffee", "rivers", "music", "chess", "gardens", "clouds", "mountains", "robots"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, tiny_model_dir):
    """32 short conversations of varied length, tokenized once for every training run of the session."""
    from tokenize_data import tokenize_dataset
    d = tmp_path_factory.mktemp("chat_data")
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {t}." + " Please." * (k % 4)},
                          {"role": "assistant", "content": f"Here is a fact about {t}. " * (1 + k % 5)}]}
            for k, t in enumerate(TOPICS * 2)]
    src = write_jsonl(d / "train.jsonl", rows)
    tokenize_dataset(src, tiny_model_dir, str(d / "tok"), 256)
    return {"data_path": src, "data_output_dir": str(d / "tok")}


def pytest_collection_modifyitems(items):
    """Files with slow tests first (in their own order otherwise): with one worker per core, each taking whole
    files (pytest.ini), the long files start at once instead of last, so the workers finish together."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
