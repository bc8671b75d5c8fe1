"""Training throughput: train.py against a Hugging Face `Trainer` with padded batches and against the raw
forward+backward of the same packed rows (the compute limit).

    python bench/train_throughput.py [--samples 48] [--median-words 50] [--steps 4] [--warmup 2] [--ladder]

Same model (the embedded SmolLM2-135M-Instruct, fp32), same tokenized lognormal-length conversations,
same optimizer steps (the sampler's plan: `effective_batch_size` samples each, fed to the Trainer in that order,
padded to the longest sample of each batch), same optimizer (fused AdamW), same thread count. Every figure counts
real tokens only; the first `--warmup` steps of each method are not timed. The bench also times train.py from
outside (when each line of its metrics.jsonl appears) and checks that the logged tokens_per_s agrees with that.

    --ladder    also times the raw forward+backward with each optimization of model.py switched off in turn, and
                the optimizer step with torch's default (foreach) AdamW against the fused one train.py uses
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repo root instead of bench/, whose sampler.py / tokenize.py would shadow the trainer's and the stdlib's
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import environment, run_train_py, save_result, write_jsonl  # noqa: E402
from bench.tokenize import vocab_conversations  # noqa: E402

import sampler  # noqa: E402
import train  # noqa: E402
from config import EMBEDDED_MODEL, exit_on_error, load_config  # noqa: E402
from model import (CausalLMWithLoss, attention_backend, load_model, load_tokenizer, pack,  # noqa: E402
                   resolve_model_path)
from tokenize_data import tokenize_dataset  # noqa: E402


def hf_trainer_steps(model_path: str, data: dict, plan: list[dict], lr: float, out_dir: Path) -> list[tuple]:
    """(seconds, real tokens) per optimizer step of transformers.Trainer: one padded batch per step."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    tok = load_tokenizer(model_path)
    order = [int(i) for step in plan for micro in step["micro_batches"] for rank in micro for i in rank]
    rows = []
    for i in order:
        ids, labels = train.sample(data, i)
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": [1] * len(ids)})
    pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    real_tokens: list[int] = []

    def collate(features):
        batch = pad(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    batch_size = plan[0]["num_samples"]
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=batch_size, max_steps=len(plan),
                             learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=0.9,
                             adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused", logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             train_sampling_strategy="sequential", remove_unused_columns=False, disable_tqdm=True)
    lm = load_model(model_path, torch.float32, "sdpa")
    Trainer(model=lm, args=args, train_dataset=rows, data_collator=collate, callbacks=[StepTimer()]).train()
    return list(zip(times, real_tokens))


LADDER = {  # name: (attention, boolean mask, chunked cross-entropy, loss over every position's logits, bf16)
    "block mask (bool), chunked CE (first version)": ("sdpa", True, True, False, False),
    "block mask (float), chunked CE": ("sdpa", False, True, False, False),
    "block mask (float), logits of all tokens": ("sdpa", False, False, True, False),
    "block mask (float), CE on trained tokens only": ("sdpa", False, False, False, False),
    "per-sample sdpa, CE on trained tokens only (fp32)": ("sdpa_varlen", False, False, False, False),
    "the same in bf16 autocast (dtype=auto on a CPU with native bf16)": ("sdpa_varlen", False, False, False, True),
}


def fwd_bwd(model, batch: dict, loss_scale: float, bool_mask=False, chunked_ce=False, all_logits=False):
    """model.CausalLMWithLoss's forward+backward, or the same with one optimization of model.py undone."""
    if not (bool_mask or chunked_ce or all_logits):
        return model(**batch, loss_scale=loss_scale).backward()
    lm, targets = model.lm, batch["targets"]
    mask = batch["attention_mask"] == 0 if bool_mask else batch["attention_mask"]
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                              use_cache=False).last_hidden_state[0]
    if all_logits:
        loss = F.cross_entropy(lm.get_output_embeddings()(hidden), targets, reduction="sum")
    else:
        keep = targets != -100
        chunked = chunked_ce and int(keep.sum()) >= hidden.shape[1]  # when the old loss_fn chunked
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None
        loss = F.linear_cross_entropy(hidden[keep], lm.get_output_embeddings().weight, targets[keep],
                                      reduction="sum", options=options)
    (loss * loss_scale).backward()


def raw_steps(model, data: dict, plan: list[dict], attn: str, bf16=False, **variant) -> list[tuple]:
    """(seconds, tokens) of forward+backward of each step's packed rows: no optimizer, no logging, no sampler."""
    model.lm.set_attn_implementation(attn)
    out = []
    for step in plan:
        seconds = tokens = 0
        for micro in step["micro_batches"]:
            samples = [train.sample(data, i) for i in micro[0]]
            start = time.perf_counter()
            batch = pack(samples, torch.device("cpu"), attn)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fwd_bwd(model, batch, 1.0 / step["num_loss_tokens"], **variant)
            seconds += time.perf_counter() - start
            tokens += sum(len(s[0]) for s in samples)
        model.zero_grad(set_to_none=True)
        out.append((seconds, tokens))
    return out


def optimizer_step_seconds(model, fused: bool, repeats: int = 3) -> float:
    """One AdamW step over every parameter, as train.py takes it (fused) or with torch's default (foreach)."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e-4)
    opt = torch.optim.AdamW(params, lr=1e-9, fused=fused, foreach=None if fused else True)
    opt.step()  # creates the state
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / repeats


def rate(steps: list[tuple]) -> float:
    return sum(t for _, t in steps) / sum(s for s, _ in steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48, help="conversations in the data set")
    p.add_argument("--median-words", type=int, default=50)
    p.add_argument("--effective-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed for the train.py run")
    p.add_argument("--model-path", default=EMBEDDED_MODEL, help="an HF folder (the tests use a tiny model)")
    p.add_argument("--ladder", action="store_true", help="also time each model.py optimization switched off")
    p.add_argument("--json", help="where to write the result (default runs/bench/train_throughput.json)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops train.py and cleans up
    model_path = resolve_model_path(args.model_path)
    total_steps = args.warmup + args.steps
    n = max(args.samples, total_steps * args.effective_batch_size)
    work = Path(tempfile.mkdtemp(prefix="minilab-bench-train-"))
    result = {"env": environment(), "args": vars(args)}
    try:
        src = write_jsonl(work / "train.jsonl", vocab_conversations(load_tokenizer(model_path), n,
                                                                    args.median_words, args.seed))
        tokenize_dataset(str(src), model_path, str(work / "data"), 512)
        overrides = {"model_path": args.model_path, "data_path": src, "data_output_dir": work / "data",
                     "ckpt_output_dir": work / "run", "max_seq_len": 512, "max_batch_len": 4096,
                     "effective_batch_size": args.effective_batch_size, "max_steps": total_steps, "num_epochs": 1,
                     "learning_rate": 2e-5, "lr_scheduler": "constant", "warmup_steps": 0, "lora.rank": 0,
                     "dtype": "float32", "checkpoint_at_epoch": False, "keep_last_checkpoint_only": True,
                     "random_seed": args.seed, "num_proc": 1, "resume": "false", "distributed_backend": "none"}
        overrides = [f"{k}={v}" for k, v in overrides.items()]
        cfg = load_config(None, overrides)
        data = train.prepare_data(cfg, model_path, 0)
        plan = sampler.plan_epoch(data["lengths"], data["loss_counts"], cfg.effective_batch_size,
                                  cfg.max_batch_len, 1, cfg.random_seed, 0)[:total_steps]
        step_tokens = [sum(int(data["lengths"][i]) for m in s["micro_batches"] for r in m for i in r) for s in plan]

        # the compute limit first, while this process is as fresh as train.py's: a warm allocator is worth ~5%
        attn = attention_backend(torch.device("cpu"))
        model = CausalLMWithLoss(load_model(model_path, torch.float32, attn)).train()
        raw = raw_steps(model, data, plan, attn)
        print(f"raw_fwd_bwd_packed: {rate(raw[args.warmup:]):.1f} tokens/s", flush=True)
        ran = run_train_py(overrides, work / "run" / "metrics.jsonl", args.timeout)
        rows, arrivals = ran["rows"], ran["arrivals"]
        assert [r["num_tokens"] for r in rows] == step_tokens, "train.py trained other tokens than the plan"
        timed = rows[args.warmup:]
        outside = [b - a for a, b in zip(arrivals[args.warmup - 1:], arrivals[args.warmup:])] if args.warmup else []
        trainer_py = [(r["step_time_s"], r["num_tokens"]) for r in timed]
        print(f"train.py: {rate(trainer_py):.1f} tokens/s", flush=True)
        hf = hf_trainer_steps(model_path, data, plan, cfg.learning_rate, work / "hf")
        assert [t for _, t in hf] == step_tokens, "the Trainer baseline saw other samples than the plan"
        print(f"hf_trainer_padded: {rate(hf[args.warmup:]):.1f} tokens/s", flush=True)
        if args.ladder:
            result["ladder_raw_tokens_per_s"] = {}
            for name, (attention, b, c, a, bf16) in LADDER.items():
                steps = raw_steps(model, data, plan, attention, bf16, bool_mask=b, chunked_ce=c,
                                  all_logits=a)[args.warmup:]
                result["ladder_raw_tokens_per_s"][name] = rate(steps)
                print(f"ladder {name}: {rate(steps):.1f} tokens/s", flush=True)
            result["ladder_optimizer_step_s"] = {"foreach AdamW (torch default)": optimizer_step_seconds(model, False),
                                                 "fused AdamW (now)": optimizer_step_seconds(model, True)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rates = {"train.py": rate(trainer_py), "hf_trainer_padded": rate(hf[args.warmup:]),
             "raw_fwd_bwd_packed": rate(raw[args.warmup:])}
    result.update(step_tokens=step_tokens, tokens_per_s=rates, train_py_metrics=timed,
                  hf_steps=hf, raw_steps=raw,
                  ratio_vs_hf_trainer=rates["train.py"] / rates["hf_trainer_padded"],
                  ratio_vs_raw_fwd_bwd=rates["train.py"] / rates["raw_fwd_bwd_packed"])
    padded = sum(len(s["micro_batches"][0][0]) * max(int(data["lengths"][i]) for i in s["micro_batches"][0][0])
                 for s in plan[args.warmup:])
    result["hf_padding_fraction"] = 1 - sum(step_tokens[args.warmup:]) / padded
    if outside:
        logged, measured = sum(r["step_time_s"] for r in timed), sum(outside)
        result["logged_vs_outside_step_time"] = logged / measured
        errors = ran["arrival_errors"]  # each end of the timed span is known to within its look's gap
        result["outside_clock_error_bound"] = (errors[args.warmup - 1] + errors[-1]) / measured
    print(json.dumps(result["env"]))
    print(f"{len(plan)} steps of {args.effective_batch_size} samples, {np.mean(step_tokens):.0f} real tokens each; "
          f"the Trainer's padded batches are {result['hf_padding_fraction']:.0%} padding")
    print(f"{'method':22} {'tokens/s':>9} {'train.py is':>12}")
    for name, r in rates.items():
        print(f"{name:22} {r:9.1f} {rates['train.py'] / r:11.2f}x")
    if outside:
        print(f"train.py's logged step_time_s / the bench's own clock: {result['logged_vs_outside_step_time']:.3f}")
    ladder = result.get("ladder_raw_tokens_per_s", {})
    for name, r in ladder.items():  # raw forward+backward against raw forward+backward: no optimizer in either
        print(f"ladder (raw fwd+bwd) {name:45} {r:9.1f} tokens/s {r / next(iter(ladder.values())):6.2f}x the first")
    step_s = np.mean([s for s, _ in raw[args.warmup:]])
    for name, seconds in result.get("ladder_optimizer_step_s", {}).items():
        print(f"ladder optimizer step: {name:30} {seconds:7.3f} s ({seconds / step_s:.0%} of a step's fwd+bwd)")
    print(f"saved {save_result('train_throughput', result, args.json)}")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
