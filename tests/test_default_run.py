"""The README's main job: run.yaml on the embedded SmolLM2 and the bundled sample data."""
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


def mean_loss(lm, data, indices):
    """Mean token loss over the trained tokens of these tokenized samples (teacher-forced)."""
    offsets = data["offsets"]
    samples = [(np.asarray(data["input_ids"][offsets[i]:offsets[i + 1]]),
                np.asarray(data["labels"][offsets[i]:offsets[i + 1]])) for i in indices]
    batch = pack(samples, torch.device("cpu"), "sdpa")
    n = int((batch["targets"] != -100).sum())
    with torch.no_grad():
        return CausalLMWithLoss(lm)(**batch, loss_scale=1 / n).item()


def greedy_reply(lm, tok, messages):
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = lm.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    return tok.decode(reply, skip_special_tokens=True)


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
    assert data["meta"]["num_samples"] == 40  # nothing dropped: sample i is line i of data/sample.jsonl
    every = range(40)
    assert mean_loss(trained, data, every) < mean_loss(base, data, every) - 0.2
    # the first training conversation: its answer is much more likely under the saved model than under the base
    assert mean_loss(trained, data, [0]) < mean_loss(base, data, [0]) - 0.5
    example = json.loads((ROOT / "data" / "sample.jsonl").read_text().splitlines()[0])["messages"]
    tok = AutoTokenizer.from_pretrained(final)
    replies = [greedy_reply(lm, tok, example[:-1]) for lm in (trained, base)]
    assert replies[0].strip() and replies[0] != replies[1], replies  # the saved model chats, and not as the base
