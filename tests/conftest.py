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


@pytest.fixture(scope="session")
def embedded_dir():
    from model import resolve_model_path
    return resolve_model_path("embedded")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from model import load_tokenizer
    return load_tokenizer(embedded_dir)


def build_tiny_model(tokenizer, out_dir, seed=0, **overrides):
    """A 2-layer random Llama with the real tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory):
    return build_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny_llama"))


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
