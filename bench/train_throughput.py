"""Training throughput: train.py against the peers a user would pick instead and against the raw forward+backward
of the same packed rows (the compute limit), from one run.

    python bench/train_throughput.py [--samples 48] [--median-words 50] [--steps 4] [--warmup 2] [--repeats 1]
                                     [--ladder]

Same model (the embedded SmolLM2-135M-Instruct), same tokenized lognormal-length conversations, same dtype (`auto`
as users get it: bf16 autocast on a CPU with native bf16, else fp32; --dtype to fix it), same optimizer (fused
AdamW, constant lr), same thread count. Peers (--peers): the HF `Trainer` fed the sampler's steps in order, padded
to each batch's longest sample or flattened padding-free (DataCollatorWithFlattening), and TRL's SFTTrainer with
packing=True (bfd), skipped when trl is not installed. For each packing peer the bench checks whether a packed
row's attention stays inside each sample: the logits of two samples packed by its collator against each alone.
Each peer runs in a fresh interpreter, as it does for its users; the best one runs again with train.py's allocator
setting (hardware.keep_freed_memory; the raw forward+backward has it too), to show what that setting is worth.
The raw forward+backward runs in a fresh interpreter too, before and after train.py (a 2-core VM's speed drifts by
several percent over minutes), its figure the mean of both. Every figure counts real tokens only; the first
`--warmup` steps of each method are not timed. The bench also times train.py from outside (when each line of its
metrics.jsonl appears) and checks that the logged step times agree.

    --repeats N runs N rounds of every method in the order above (the best peer of the first round is the one rerun
                with the allocator setting in each); each figure is the median over the rounds and each ratio the
                median of the rounds' own ratios, since a round's methods run minutes apart and the rounds longer
    --ladder    also times the raw forward+backward with each optimization of model.py switched off in turn, and
                the optimizer step with torch's default (foreach) AdamW against the fused one train.py uses
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repo root instead of bench/, whose sampler.py / tokenize.py would shadow the trainer's and the stdlib's
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import environment, run_train_py, save_result, write_jsonl  # noqa: E402
from bench.tokenize import vocab_conversations  # noqa: E402

import hardware  # noqa: E402
import sampler  # noqa: E402
import train  # noqa: E402
from config import EMBEDDED_MODEL, ConfigError, exit_on_error, load_config  # noqa: E402
from model import (CausalLMWithLoss, attention_backend, load_model, load_tokenizer, pack,  # noqa: E402
                   resolve_model_path)
from tokenize_data import tokenize_dataset  # noqa: E402


PEERS = ("hf_trainer_padded", "hf_trainer_flattened", "trl_sft_packed")
LEAK_TOLERANCE = 1e-3  # fp32 logits of one sample, packed or alone, differ by ~1e-5 (other matmul shapes)


def plan_rows(data: dict, plan: list[dict]) -> list[dict]:
    """The plan's samples in its order, as the peers' datasets hold them (labels: -100 where no loss)."""
    order = [int(i) for step in plan for micro in step["micro_batches"] for rank in micro for i in rank]
    return [dict(zip(("input_ids", "labels"), (a.tolist() for a in train.sample(data, i)))) for i in order]


def packing_leak(model, collate, rows: list[dict]) -> float:
    """Largest |logit| difference between two samples packed into one row by `collate` and each run alone: ~1e-5
    when the packed row's attention stays inside each sample, O(1) when the second sample sees the first."""
    batch = collate(rows[:2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():  # no KV cache, as in training: with one, transformers does not look for packed samples
        packed = model(**inputs, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows[:2]])
    return float((packed[:alone.shape[0]] - alone).abs().max())


def peer_steps(peer: str, model_path: str, rows: list[dict], num_steps: int, samples_per_step: int,
               tokens_per_row: int, lr: float, bf16: bool, out_dir: Path) -> tuple[list[tuple], float | None]:
    """(seconds, real tokens) per optimizer step of a peer trainer, and its packing_leak (None: nothing packed).

    hf_trainer_padded     transformers.Trainer, each step's samples padded to its longest (DataCollatorForSeq2Seq)
    hf_trainer_flattened  the same Trainer, each step's samples flattened into one row (DataCollatorWithFlattening)
    trl_sft_packed        TRL's SFTTrainer, packing=True (bfd, padding-free): rows of about a train.py step's tokens
    """
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback,
                              TrainingArguments)
    tok = load_tokenizer(model_path)
    lm = load_model(model_path, torch.float32, "sdpa")
    common = dict(output_dir=str(out_dir), max_steps=num_steps, learning_rate=lr, lr_scheduler_type="constant",
                  weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused",
                  logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, bf16=bf16,
                  dataloader_num_workers=0, train_sampling_strategy="sequential", disable_tqdm=True)
    if peer == "trl_sft_packed":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        args = SFTConfig(**common, per_device_train_batch_size=1, packing=True, packing_strategy="bfd",
                         max_length=tokens_per_row)
        trainer = SFTTrainer(model=lm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        collate, count = trainer.data_collator, lambda batch: int(batch["input_ids"].numel())
    else:
        if peer == "hf_trainer_padded":
            collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="pt")
            rows = [dict(r, attention_mask=[1] * len(r["input_ids"])) for r in rows]
            count = lambda batch: int(batch["attention_mask"].sum())  # noqa: E731
        else:
            collate, count = DataCollatorWithFlattening(), lambda batch: int(batch["input_ids"].numel())
        args = TrainingArguments(**common, per_device_train_batch_size=samples_per_step, remove_unused_columns=False)
        trainer = Trainer(model=lm, args=args, train_dataset=rows, data_collator=collate)
    leak = None if peer == "hf_trainer_padded" else packing_leak(lm.eval(), collate, rows)
    real_tokens: list[int] = []
    times: list[float] = []

    def counted(features):
        batch = collate(features)
        real_tokens.append(count(batch))
        return batch

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer.data_collator = counted
    trainer.add_callback(StepTimer())
    lm.train()
    trainer.train()
    return list(zip(times, real_tokens)), leak


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


def raw_fwd_bwd(model_path: str, data: dict, plan: list[dict], attn: str, bf16: bool) -> list[tuple]:
    """raw_steps of a freshly loaded model, meant for a process of its own as train.py and each peer have: the
    limit is then measured in the same conditions, with no other model's memory in this process."""
    return raw_steps(CausalLMWithLoss(load_model(model_path, torch.float32, attn)).train(), data, plan, attn, bf16)


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


def in_fresh_process(fn, args: tuple, allocator=False):
    """fn(*args) in a new interpreter, as a peer trainer runs for its users: glibc's allocator at its defaults
    (this process has train.py's setting, hardware.keep_freed_memory), unless `allocator` asks for that too. An
    executor, not a Pool: its worker exits on its own instead of being killed, so semaphores its work left open are
    released then, not reported as leaked when the bench exits."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=hardware.keep_freed_memory if allocator else None) as pool:
        return pool.submit(fn, *args).result()


def rate(steps: list[tuple]) -> float:
    return sum(t for _, t in steps) / sum(s for s, _ in steps)


def run_peer(setup: dict, peer: str, allocator=False) -> tuple[list[tuple], float | None]:
    """peer_steps in a fresh interpreter, on the plan's samples in order."""
    return in_fresh_process(peer_steps, (peer, setup["model_path"], setup["rows_in_order"], len(setup["plan"]),
                                         setup["plan"][0]["num_samples"], setup["mean_tokens"], setup["lr"],
                                         setup["bf16"], setup["work"] / peer), allocator)


def measure_round(setup: dict, peers: list[str]) -> dict:
    """One round, every method in a fresh process, in this order: the raw rows, train.py, the raw rows again (the
    limit is the mean of both sides), then each peer. Tokens/s per method and the raw material behind each."""
    warmup, work = setup["warmup"], setup["work"]
    raw_args = tuple(setup[k] for k in ("model_path", "data", "plan", "attn", "bf16"))
    raw = in_fresh_process(raw_fwd_bwd, raw_args, allocator=True)
    print(f"raw_fwd_bwd_packed before train.py: {rate(raw[warmup:]):.1f} tokens/s", flush=True)
    shutil.rmtree(work / "run", ignore_errors=True)  # each round's train.py starts from nothing
    ran = run_train_py(setup["overrides"], work / "run" / "metrics.jsonl", setup["timeout"])
    raw_after = in_fresh_process(raw_fwd_bwd, raw_args, allocator=True)
    rates = {"raw_fwd_bwd_packed": rate(raw[warmup:] + raw_after[warmup:])}
    print(f"raw_fwd_bwd_packed after train.py: {rate(raw_after[warmup:]):.1f} tokens/s; both: "
          f"{rates['raw_fwd_bwd_packed']:.1f}", flush=True)
    rows, arrivals = ran["rows"], ran["arrivals"]
    assert [r["num_tokens"] for r in rows] == setup["step_tokens"], "train.py trained other tokens than the plan"
    timed = rows[warmup:]
    rates["train.py"] = rate([(r["step_time_s"], r["num_tokens"]) for r in timed])
    print(f"train.py: {rates['train.py']:.1f} tokens/s", flush=True)
    out = {"tokens_per_s": rates, "raw_steps": raw, "raw_steps_after_train_py": raw_after, "train_py_metrics": timed,
           "peer_steps": {}, "packing_leak_max_abs_logit": {}}
    outside = [b - a for a, b in zip(arrivals[warmup - 1:], arrivals[warmup:])] if warmup else []
    if outside:
        out["logged_vs_outside_step_time"] = sum(r["step_time_s"] for r in timed) / sum(outside)
        errors = ran["arrival_errors"]  # each end of the timed span is known to within its look's gap
        out["outside_clock_error_bound"] = (errors[warmup - 1] + errors[-1]) / sum(outside)
    for peer in peers:
        steps, leak = run_peer(setup, peer)
        if peer != "trl_sft_packed":  # TRL packs its own rows; the Trainer's steps hold the plan's samples
            assert [t for _, t in steps] == setup["step_tokens"], f"{peer} saw other samples than the plan"
        rates[peer], out["peer_steps"][peer] = rate(steps[warmup:]), steps
        if leak is not None:
            out["packing_leak_max_abs_logit"][peer] = leak
        print(f"{peer}: {rates[peer]:.1f} tokens/s" + ("" if leak is None else f", packing leak {leak:.2g}"),
              flush=True)
    return out


def ladder(setup: dict) -> dict:
    """Raw forward+backward with each optimization of model.py undone in turn, and the optimizer step two ways."""
    hardware.keep_freed_memory()
    model = CausalLMWithLoss(load_model(setup["model_path"], torch.float32, setup["attn"])).train()
    result = {"ladder_raw_tokens_per_s": {}}
    for name, (attention, b, c, a, ladder_bf16) in LADDER.items():
        steps = raw_steps(model, setup["data"], setup["plan"], attention, ladder_bf16, bool_mask=b, chunked_ce=c,
                          all_logits=a)[setup["warmup"]:]
        result["ladder_raw_tokens_per_s"][name] = rate(steps)
        print(f"ladder {name}: {rate(steps):.1f} tokens/s", flush=True)
    result["ladder_optimizer_step_s"] = {"foreach AdamW (torch default)": optimizer_step_seconds(model, False),
                                         "fused AdamW (now)": optimizer_step_seconds(model, True)}
    return result


def report(result: dict, rounds: list[dict], plan: list[dict], data: dict, step_tokens: list[int], bf16: bool,
           args) -> None:
    """Each figure the median over the rounds, each ratio the median of its per-round ratios (a round's methods
    run minutes apart, the rounds further apart), printed with every round's figure and saved with all of them."""
    names = list(rounds[0]["tokens_per_s"])
    rates = {n: float(np.median([r["tokens_per_s"][n] for r in rounds])) for n in names}
    train_py_is = {n: float(np.median([r["train_py_is"][n] for r in rounds])) for n in names}
    best = max((p for p in PEERS if p in rates), key=rates.get, default=None)
    leaks = {p: max(r["packing_leak_max_abs_logit"][p] for r in rounds)
             for p in rounds[0]["packing_leak_max_abs_logit"]}
    result.update(rounds=rounds, step_tokens=step_tokens, tokens_per_s=rates, train_py_is=train_py_is,
                  packing_leak_max_abs_logit=leaks, compute_dtype="bfloat16" if bf16 else "float32", best_peer=best,
                  ratio_vs_raw_fwd_bwd=train_py_is["raw_fwd_bwd_packed"])
    if best:
        result["ratio_vs_best_peer"] = train_py_is[best]
    with_allocator = next((n for n in names if n.endswith("+allocator")), None)
    if with_allocator:
        result["ratio_vs_best_peer_with_allocator"] = train_py_is[with_allocator]
    padded = sum(len(s["micro_batches"][0][0]) * max(int(data["lengths"][i]) for i in s["micro_batches"][0][0])
                 for s in plan[args.warmup:])
    result["padded_batch_padding_fraction"] = 1 - sum(step_tokens[args.warmup:]) / padded
    print(json.dumps(result["env"]))
    print(f"{len(plan)} steps of {args.effective_batch_size} samples, {np.mean(step_tokens):.0f} real tokens each, "
          f"{result['compute_dtype']}; padded batches are {result['padded_batch_padding_fraction']:.0%} padding; "
          f"medians of {len(rounds)} round(s)")
    width = max(map(len, names + list(result["skipped"])))
    print(f"{'method':{width}} {'tokens/s':>9} {'train.py is':>12}  each round: tokens/s (train.py is)")
    for name in names:
        leak = leaks.get(name)
        note = "" if leak is None else f"  packed samples {'see each other' if leak > LEAK_TOLERANCE else 'apart'}" \
            f" (max |logit| diff {leak:.1e} against each sample alone)"
        each = ", ".join(f"{r['tokens_per_s'][name]:.1f} ({r['train_py_is'][name]:.2f}x)" for r in rounds)
        print(f"{name:{width}} {rates[name]:9.1f} {train_py_is[name]:11.2f}x  {each}{note}")
    for peer, why in result["skipped"].items():
        print(f"{peer:{width}} skipped: {why}")
    if best:
        print(f"goal: >= 1.30x the best peer ({best}): {result['ratio_vs_best_peer']:.2f}x; "
              f">= 0.90x the raw fwd+bwd: {result['ratio_vs_raw_fwd_bwd']:.2f}x")
    clocks = [r["logged_vs_outside_step_time"] for r in rounds if "logged_vs_outside_step_time" in r]
    if clocks:
        print(f"train.py's logged step_time_s / the bench's own clock: {', '.join(f'{c:.3f}' for c in clocks)}")
    ladder_rates = result.get("ladder_raw_tokens_per_s", {})
    first = next(iter(ladder_rates.values()), None)
    for name, r in ladder_rates.items():  # raw forward+backward against raw forward+backward: no optimizer in either
        print(f"ladder (raw fwd+bwd) {name:45} {r:9.1f} tokens/s {r / first:6.2f}x the first")
    step_s = np.mean([s for s, _ in rounds[0]["raw_steps"][args.warmup:]])
    for name, seconds in result.get("ladder_optimizer_step_s", {}).items():
        print(f"ladder optimizer step: {name:30} {seconds:7.3f} s ({seconds / step_s:.0%} of a step's fwd+bwd)")
    print(f"saved {save_result('train_throughput', result, args.json)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48, help="conversations in the data set")
    p.add_argument("--median-words", type=int, default=50)
    p.add_argument("--effective-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="rounds of every method, one after another; medians")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed for each train.py run")
    p.add_argument("--model-path", default=EMBEDDED_MODEL, help="an HF folder (the tests use a tiny model)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="train.py's dtype, and the same for every peer and the raw fwd+bwd (auto: what users get)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    p.add_argument("--no-peer-with-allocator", dest="peer_with_allocator", action="store_false",
                   help="skip the best peer's rerun with train.py's allocator setting")
    p.add_argument("--ladder", action="store_true", help="also time each model.py optimization switched off")
    p.add_argument("--json", help="where to write the result (default runs/bench/train_throughput.json)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops train.py and cleans up
    peers = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ConfigError(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats: {args.repeats}; give 1 or more rounds")
    result = {"env": environment(), "args": vars(args), "skipped": {}}
    if "trl_sft_packed" in peers and importlib.util.find_spec("trl") is None:
        result["skipped"]["trl_sft_packed"] = "trl is not installed (pip install trl)"
        peers.remove("trl_sft_packed")
    model_path = resolve_model_path(args.model_path)
    total_steps = args.warmup + args.steps
    n = max(args.samples, total_steps * args.effective_batch_size)
    work = Path(tempfile.mkdtemp(prefix="minilab-bench-train-"))
    try:
        src = write_jsonl(work / "train.jsonl", vocab_conversations(load_tokenizer(model_path), n,
                                                                    args.median_words, args.seed))
        tokenize_dataset(str(src), model_path, str(work / "data"), 512)
        overrides = {"model_path": args.model_path, "data_path": src, "data_output_dir": work / "data",
                     "ckpt_output_dir": work / "run", "max_seq_len": 512, "max_batch_len": 4096,
                     "effective_batch_size": args.effective_batch_size, "max_steps": total_steps, "num_epochs": 1,
                     "learning_rate": 2e-5, "lr_scheduler": "constant", "warmup_steps": 0, "lora.rank": 0,
                     "dtype": args.dtype, "checkpoint_at_epoch": False, "keep_last_checkpoint_only": True,
                     "random_seed": args.seed, "num_proc": 1, "resume": "false", "distributed_backend": "none"}
        overrides = [f"{k}={v}" for k, v in overrides.items()]
        cfg = load_config(None, overrides)
        data = train.prepare_data(cfg, model_path, 0)
        plan = sampler.plan_epoch(data["lengths"], data["loss_counts"], cfg.effective_batch_size,
                                  cfg.max_batch_len, 1, cfg.random_seed, 0)[:total_steps]
        step_tokens = [sum(int(data["lengths"][i]) for m in s["micro_batches"] for r in m for i in r) for s in plan]
        bf16 = hardware.compute_dtype(cfg, torch.device("cpu")) == torch.bfloat16
        setup = {"model_path": model_path, "data": data, "plan": plan, "attn": attention_backend(torch.device("cpu")),
                 "bf16": bf16, "warmup": args.warmup, "work": work, "overrides": overrides, "timeout": args.timeout,
                 "step_tokens": step_tokens, "rows_in_order": plan_rows(data, plan),
                 "mean_tokens": int(np.mean(step_tokens)), "lr": cfg.learning_rate}
        rounds, allocator_peer = [], None
        for r in range(args.repeats):
            print(f"round {r + 1} of {args.repeats}", flush=True)
            rnd = measure_round(setup, peers)
            if args.peer_with_allocator and peers:  # how much of train.py's lead is its allocator setting
                allocator_peer = allocator_peer or max(peers, key=rnd["tokens_per_s"].get)  # the first round's best
                name = f"{allocator_peer}+allocator"
                rnd["tokens_per_s"][name] = rate(run_peer(setup, allocator_peer, allocator=True)[0][args.warmup:])
                print(f"{allocator_peer} with train.py's allocator setting: {rnd['tokens_per_s'][name]:.1f} tokens/s",
                      flush=True)
            rates = rnd["tokens_per_s"]
            rnd["train_py_is"] = {name: rates["train.py"] / v for name, v in rates.items()}
            rounds.append(rnd)
        if args.ladder:
            result.update(ladder(setup))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(result, rounds, plan, data, step_tokens, bf16, args)


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
