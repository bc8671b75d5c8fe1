"""The README's main job: run.yaml on the embedded SmolLM2 and the bundled sample data."""
import json
import subprocess
import sys

import numpy as np
import torch
from conftest import ROOT

from model import CausalLMWithLoss, pack
from tokenize_data import load_tokenized


def dataset_loss(model_dir, data):
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = [(np.asarray(data["input_ids"][a:b]), np.asarray(data["labels"][a:b]))
               for a, b in zip(data["offsets"][:-1], data["offsets"][1:])]
    batch = pack(samples, torch.device("cpu"), "sdpa")
    n = int((batch["targets"] != -100).sum())
    with torch.no_grad():
        return CausalLMWithLoss(lm)(**batch, loss_scale=1 / n).item()


def test_default_run_learns_and_the_saved_model_chats(tmp_path, embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--config", "run.yaml", f"ckpt_output_dir={out}",
                        f"data_output_dir={out}/data"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 15  # 40 samples, batches of 8, 3 epochs
    final = out / "hf_format" / "last_epoch"
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    data = load_tokenized(str(out / "data"))
    assert dataset_loss(str(final), data) < dataset_loss(embedded_dir, data) - 0.2
    tok = AutoTokenizer.from_pretrained(final)
    lm = AutoModelForCausalLM.from_pretrained(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is minilab?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    reply = lm.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    text = tok.decode(reply, skip_special_tokens=True)
    assert len(text.split()) >= 3, text
