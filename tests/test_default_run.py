"""The README's main job: run.yaml on the embedded SmolLM2 and the bundled sample data."""
import difflib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from model import CausalLMWithLoss, pack
from tokenize_data import load_tokenized

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def dataset_loss(lm, data):
    samples = [(np.asarray(data["input_ids"][a:b]), np.asarray(data["labels"][a:b]))
               for a, b in zip(data["offsets"][:-1], data["offsets"][1:])]
    batch = pack(samples, torch.device("cpu"), "sdpa")
    n = int((batch["targets"] != -100).sum())
    with torch.no_grad():
        return CausalLMWithLoss(lm)(**batch, loss_scale=1 / n).item()


def greedy_reply(lm, tok, messages):
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = lm.generate(**prompt, max_new_tokens=32, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    return tok.decode(reply, skip_special_tokens=True)


def likeness(text, answer):
    """Share of the trained answer's words that the reply gives in the same order."""
    a, b = text.lower().split(), answer.lower().split()
    return sum(m.size for m in difflib.SequenceMatcher(None, a, b).get_matching_blocks()) / len(b)


def test_default_run_learns_and_the_saved_model_chats(tmp_path, embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--config", "run.yaml", f"ckpt_output_dir={out}",
                        f"data_output_dir={out}/data"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 16))  # 40 samples, batches of 8, 3 epochs
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [row["loss"] for row in rows]
    final = out / "hf_format" / "last_epoch"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    data = load_tokenized(str(out / "data"))
    assert dataset_loss(trained, data) < dataset_loss(base, data) - 0.2
    # a training conversation: the saved model's greedy reply comes much closer to the trained answer
    example = json.loads((ROOT / "data" / "sample.jsonl").read_text().splitlines()[0])["messages"]
    tok = AutoTokenizer.from_pretrained(final)
    answer = example[-1]["content"]
    replies = {name: greedy_reply(lm, tok, example[:-1]) for name, lm in (("trained", trained), ("base", base))}
    assert likeness(replies["trained"], answer) > likeness(replies["base"], answer) + 0.3, replies
