"""Fine-tune a causal LM: `torchrun --nproc-per-node N train.py --config run.yaml [key=value ...]`.

Also runs as a plain `python train.py` (one process). The loop, top to bottom: set up processes, tokenize if
needed, load and shard the model, resume, then for every optimizer step run its packed micro-batches, step,
log and checkpoint. The loss of a step is the sum of token losses over the global count of trained tokens, so
1 rank, N ranks and any number of micro-steps give the same update.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import hardware
import optimizers
import recipes
import sample_stats
import sampler
import sharding
from config import Config, ConfigError, exit_on_error, load_config
from logger import MetricsLogger
from model import CausalLMWithLoss, attention_backend, load_tokenizer, model_config, pack, resolve_model_path
from tokenize_data import load_tokenized, tokenize_dataset, tokenizer_sha256
from tokenize_data import summary as tokenize_summary

class TrainingError(Exception):
    pass


def setup_distributed(num_threads: int = 0, timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Rank, world size and device; a process group whenever torchrun started us, one process included.
    CPU threads: torchrun pins every process to one, so share the cores instead (more threads than cores slows
    every process down). A single process keeps a set OMP_NUM_THREADS: torchrun sets it only for several. On CPU,
    freed tensors' pages are kept for the next step (hardware.keep_freed_memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    user_threads = os.environ.get("OMP_NUM_THREADS", "") if local_processes == 1 else ""
    torch.set_num_threads(num_threads or (int(user_threads) if user_threads.isdigit() and int(user_threads) > 0
                                          else max(1, cores // local_processes)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        hardware.keep_freed_memory()
    if (world_size > 1 or "LOCAL_RANK" in os.environ) and not dist.is_initialized():
        sharding.init_process_group(device, world_size, timeout_minutes)
    return (dist.get_rank() if dist.is_initialized() else 0), world_size, device


def prepare_data(cfg: Config, model_path: str, rank: int) -> dict:
    """Token arrays plus per-sample lengths and trained-token counts; tokenizes first when needed (rank 0)."""
    if cfg.mock_data:
        rng = np.random.default_rng(cfg.random_seed)
        ids = rng.integers(0, 1000, size=cfg.mock_data_samples * cfg.mock_data_len).astype(np.uint32)
        offsets = np.arange(cfg.mock_data_samples + 1, dtype=np.int64) * cfg.mock_data_len
        data = {"input_ids": ids, "labels": ids.astype(np.int32), "offsets": offsets, "meta": {"mock": True}}
    else:
        if not os.path.isfile(cfg.data_path):
            raise ConfigError(f"data_path '{cfg.data_path}' not found: point data_path at a messages JSONL file "
                              "(tokenized data is only reused for the file it was made from)")
        meta_file = Path(cfg.data_output_dir) / "meta.json"
        if rank == 0 and not _tokenized_matches(cfg, model_path, meta_file):
            print(f"tokenizing {cfg.data_path} -> {cfg.data_output_dir}", flush=True)
            tokenize_dataset(cfg.data_path, model_path, cfg.data_output_dir, cfg.max_seq_len, cfg.chat_tmpl_path,
                             cfg.num_proc)
        sharding.barrier()
        data = load_tokenized(cfg.data_output_dir)
    offsets = data["offsets"]
    data["lengths"] = np.diff(offsets)
    trained = np.asarray(data["labels"]) != -100
    trained[offsets[:-1]] = False  # a sample's first token is never predicted
    data["loss_counts"] = np.add.reduceat(trained, offsets[:-1]).astype(np.int64)
    return data


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tokenized_matches(cfg: Config, model_path: str, meta_file: Path) -> bool:
    if not meta_file.exists():
        return False
    meta = json.loads(meta_file.read_text())
    # the template by content: an edited template file re-tokenizes; no file means the tokenizer's own template,
    # which the tokenizer files' hash covers
    template = file_sha256(cfg.chat_tmpl_path) if cfg.chat_tmpl_path else None
    return meta["source_sha256"] == file_sha256(cfg.data_path) and meta["model"] == model_path \
        and meta.get("tokenizer_sha256") == tokenizer_sha256(model_path) and meta["max_seq_len"] == cfg.max_seq_len \
        and (meta.get("chat_template_sha256") == template if template else meta.get("chat_tmpl_path") is None)


def build_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases. `optimizer: muon` gives the decoder layers' matrices to Muon
    (optimizers.py). Edit here to try another optimizer."""
    hidden = optimizers.hidden_matrices(model) if cfg.optimizer == "muon" else []
    params = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in hidden)]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if hidden:
        return optimizers.MuonAdamW(hidden, groups, cfg.learning_rate, tuple(cfg.adam_betas), cfg.weight_decay)
    # fused: one kernel over all tensors; on CPU 3x faster than foreach (bench/train_throughput.py --ladder)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), fused=True)


def build_scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import get_scheduler
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def sample(data: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = data["offsets"][i], data["offsets"][i + 1]
    return np.asarray(data["input_ids"][a:b]), np.asarray(data["labels"][a:b])


def train_step(model, optimizer, step: dict, data: dict, rank: int, world_size: int, ctx) -> dict:
    """All micro-steps of one optimizer step. Each rank scales its summed loss by world_size / global trained
    tokens because the gradient reduction averages over ranks."""
    loss_scale = world_size / step["num_loss_tokens"]
    device, attn = ctx["device"], ctx["attn"]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one host sync per step
    tokens = 0
    sums = []  # this rank's samples' summed token losses, when the sampler reads statistics (sample_stats.py)
    micro_batches = step["micro_batches"]
    for m, per_rank in enumerate(micro_batches):
        samples = [sample(data, i) for i in per_rank[rank]]
        # a rank with nothing to do still runs forward/backward so collectives line up: one trained token scaled
        # by 0 reaches every parameter (an untied head too), so all ranks reduce the same, zero-filled set
        batch = pack(samples or [(np.zeros(2, np.int64), np.zeros(2, np.int64))], device, attn)
        tokens += sum(len(s[0]) for s in samples)
        sharding.set_grad_sync(model, m == len(micro_batches) - 1)
        with ctx["autocast"]:
            loss = model(**batch, loss_scale=loss_scale if samples else 0.0, token_losses=ctx["sample_stats"])
        if ctx["sample_stats"]:
            loss, token_losses = loss
            if samples:
                sums.append(sample_stats.loss_sums(token_losses, data["loss_counts"][per_rank[rank]]))
        sharding.backward(model, loss)
        loss_sum += loss.detach().double()
    # the stop request rides on this all-reduce, so preemption costs no collective of its own; so do the recipes'
    # per-rank gradient norms and per-sample losses (each rank's at its place, zeros elsewhere: the sum gathers)
    totals = torch.stack([loss_sum, loss_sum.new_tensor(tokens), loss_sum.new_tensor(ctx["stop_requested"]())])
    noise = [ctx["grad_noise"].take(rank, world_size, device)] if ctx["grad_noise"] else []
    per_sample = [sample_stats.place(sums, step, rank, device)] if ctx["sample_stats"] else []
    totals = torch.cat([totals, *noise, *per_sample]) if noise or per_sample else totals
    if dist.is_initialized():  # on the device: an NCCL group reduces no CPU tensor
        dist.all_reduce(totals)
    loss = totals[0].item() / world_size
    if not math.isfinite(loss):
        raise TrainingError(f"loss is {loss}: stopping before the update; the last saved checkpoint is untouched. "
                            "Try a lower learning_rate, dtype=float32 or max_grad_norm=1.0")
    # the noise scale subtracts two squared norms that agree to a few digits: it needs |G| exact
    grad_norm = sharding.optimizer_step(model, optimizer, ctx["max_grad_norm"], exact_norm=bool(noise))
    out = {"loss": loss, "grad_norm": grad_norm, "num_tokens": int(totals[1].item()), "stop": totals[2].item() > 0}
    rest = totals[3:].cpu().numpy() if noise or per_sample else None  # the recipes' parts, on the host
    if noise:
        out["local_grad_sq"], rest = rest[:world_size], rest[world_size:]
    if per_sample:
        out["sample_loss_sums"] = rest
    return out


def validate(model, data: dict, held_out: np.ndarray, max_batch_len: int, rank: int, world_size: int, ctx) -> float:
    """Loss on the held-out samples with training's accounting: token losses summed over every rank, divided by
    their trained tokens. Eval mode and no_grad: no dropout, so no RNG is drawn and resume stays exact."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx["device"])
    with torch.no_grad():
        for per_rank in sampler.pack_step(held_out, data["lengths"], max_batch_len, world_size):
            samples = [sample(data, i) for i in per_rank[rank]]
            batch = pack(samples or [(np.zeros(1, np.int64), np.full(1, -100))], ctx["device"], ctx["attn"])
            with ctx["autocast"]:
                loss_sum += model(**batch, loss_scale=1.0).double()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    return loss_sum.item() / int(data["loss_counts"][held_out].sum())


def train(cfg: Config) -> dict:
    rank, world_size, device = setup_distributed(cfg.num_threads, cfg.distributed_timeout_minutes)
    sharding.check_combination(cfg, world_size, device)
    torch.manual_seed(cfg.random_seed)
    if rank == 0:
        resolve_model_path(cfg.model_path)  # the embedded model is exported once, by one process
    sharding.barrier()
    model_path = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(cfg, model_path, rank)
    if cfg.chat_tmpl_path:  # checkpoints carry the template the data was tokenized with, for serving
        tokenizer.chat_template = Path(cfg.chat_tmpl_path).read_text()
    sampler.check_lengths(data["lengths"], cfg.max_batch_len)
    dtype = hardware.compute_dtype(cfg, device)
    attn = attention_backend(device, cfg.disable_flash_attn or dtype == torch.float32,  # flash-attn: 16-bit only
                             model_config(model_path))
    lm = sharding.load_lm(model_path, cfg, rank, world_size, dtype, attn)  # fp32 master weights
    model, optimizer = sharding.prepare(CausalLMWithLoss(lm), cfg, device, world_size, dtype,
                                        lambda m: build_optimizer(m, cfg))
    use_autocast = dtype != torch.float32 and sharding.backend_for(cfg, world_size) == "none"
    ctx = {"device": device, "attn": attn, "max_grad_norm": cfg.max_grad_norm,
           "autocast": torch.autocast(device.type, dtype=dtype) if use_autocast else nullcontext(),
           "grad_noise": recipes.watch_local_grads(model, cfg, world_size) if cfg.log_grad_noise_scale else None}

    train_idx, held_out = sampler.split_validation(len(data["lengths"]), cfg.validation_split, cfg.random_seed)
    num_train = len(data["lengths"]) if train_idx is None else len(train_idx)
    steps_per_epoch = math.ceil(num_train / cfg.effective_batch_size)
    total_steps = cfg.num_epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "samples_seen": 0, "last_hf_save": 0,
             "fingerprint": checkpoint.fingerprint(cfg, data["meta"])}
    resume_from = checkpoint.find_resume(cfg.resume, cfg.ckpt_output_dir)
    if resume_from:
        state = checkpoint.load_full_state(resume_from, model, optimizer, scheduler, state["fingerprint"])
    plan_fn = sampler.plan_epoch if cfg.sampler == "multipack" else recipes.SAMPLERS[cfg.sampler]
    ctx["sample_stats"] = sample_stats.wanted(plan_fn)  # only a sampler that reads them costs their upkeep
    if ctx["sample_stats"]:
        state.setdefault("sample_stats", sample_stats.new(len(data["lengths"])))
    log = MetricsLogger(cfg.ckpt_output_dir, total_steps, state["global_step"], rank == 0, cfg.tensorboard, cfg,
                        state.get("tracker_runs"))
    state["tracker_runs"] = log.run_ids  # W&B and MLflow run ids (rank 0's are the ones saved)
    log.message(f"{world_size} process(es) on {device.type}, {torch.get_num_threads()} CPU thread(s) each, "
                f"attention {attn}, backend {sharding.backend_for(cfg, world_size)}, {num_train} samples, "
                f"{len(held_out)} held out, {total_steps} steps")
    if "dropped" in data["meta"]:  # too long, no trained tokens, invalid: as tokenize_data.py reports them
        log.message(f"data: {tokenize_summary(data['meta'], cfg.data_output_dir)}")
    if resume_from:
        log.message(f"resumed from {resume_from} at step {state['global_step']}")
    ctx["stop_requested"] = install_stop_handlers()
    peak = hardware.peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def save(hf_name: str | None):
        if hf_name:
            checkpoint.save_hf(model, tokenizer, cfg.ckpt_output_dir, hf_name)
            state["last_hf_save"] = state["samples_seen"]
        checkpoint.save_full_state(model, optimizer, scheduler, cfg.ckpt_output_dir, state)
        state["saved_step"] = state["global_step"]

    def hf_name() -> str:
        return "last_epoch" if cfg.keep_last_checkpoint_only else f"samples_{state['samples_seen']}"

    final = None  # the last HF checkpoint, once training has finished
    try:
        while state["epoch"] < cfg.num_epochs and state["global_step"] < total_steps:
            if ctx["sample_stats"] and state["step_in_epoch"] == 0:  # what this epoch is planned from
                state["epoch_stats"] = state["sample_stats"].copy()
            plan = sample_stats.plan(plan_fn, data, train_idx, cfg, world_size, state)
            while state["step_in_epoch"] < len(plan) and state["global_step"] < total_steps:
                step = plan[state["step_in_epoch"]]
                start = time.perf_counter()
                out = train_step(model, optimizer, step, data, rank, world_size, ctx)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                elapsed = time.perf_counter() - start
                state.update(global_step=state["global_step"] + 1, step_in_epoch=state["step_in_epoch"] + 1,
                             samples_seen=state["samples_seen"] + step["num_samples"])
                if ctx["sample_stats"]:
                    sample_stats.update(state["sample_stats"], step, out["sample_loss_sums"], data["loss_counts"],
                                        state["global_step"])
                metrics = {"step": state["global_step"], "epoch": state["epoch"],
                           "samples_seen": state["samples_seen"], "loss": out["loss"], "lr": lr,
                           "grad_norm": out["grad_norm"], "num_tokens": out["num_tokens"],
                           "num_loss_tokens": step["num_loss_tokens"],
                           "tokens_per_s": out["num_tokens"] / elapsed,
                           "loss_tokens_per_s": step["num_loss_tokens"] / elapsed, "step_time_s": elapsed,
                           "peak_memory_gb": hardware.peak_memory_gb(device)}
                if ctx["grad_noise"]:
                    metrics.update(recipes.grad_noise_scale(out["local_grad_sq"], out["grad_norm"], step,
                                                            data["loss_counts"]))
                if peak:
                    lengths = [int(data["lengths"][i]) for micro in step["micro_batches"] for r in micro for i in r]
                    metrics["mfu"] = hardware.model_flops(lm, lengths) / (elapsed * peak * world_size)
                last = state["global_step"] == total_steps
                if len(held_out) and (last or cfg.validation_frequency and
                                      state["global_step"] % cfg.validation_frequency == 0):
                    metrics["val_loss"] = validate(model, data, held_out, cfg.max_batch_len, rank, world_size, ctx)
                    if cfg.save_best_val_loss and metrics["val_loss"] < state.get("best_val_loss", math.inf):
                        checkpoint.save_hf(model, tokenizer, cfg.ckpt_output_dir, "best_val_loss")
                        state["best_val_loss"] = metrics["val_loss"]
                log.log(metrics)
                if cfg.save_samples > 0 and state["samples_seen"] >= state["last_hf_save"] + cfg.save_samples:
                    save(hf_name())
                checkpoint.fault_point("after_step", state["global_step"])
                if out["stop"]:
                    save(None)
                    log.message(f"stop requested: saved full state at step {state['global_step']}; exiting")
                    return state
            if state["step_in_epoch"] >= len(plan):
                state.update(epoch=state["epoch"] + 1, step_in_epoch=0)
                if cfg.checkpoint_at_epoch and state.get("saved_step") != state["global_step"]:
                    save(hf_name())
        if state.get("saved_step") != state["global_step"]:
            save(hf_name())
        final = str(Path(cfg.ckpt_output_dir) / "hf_format" / hf_name())
    finally:
        log.close(final)
    return state


def install_stop_handlers():
    """SIGTERM / SIGUSR1 (preemption): finish the current step, save, exit 0."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
    return lambda: flag["stop"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune a causal LM (see run.yaml for every key).")
    p.add_argument("--config", default="run.yaml" if os.path.exists("run.yaml") else None)
    p.add_argument("--profile", help="cpu | single-gpu | multi-gpu | auto (profiles/NAME.yaml, train section)")
    p.add_argument("overrides", nargs="*", help="key=value, dotted for nested keys (lora.rank=8)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides, args.profile)
    try:
        state = train(cfg)
    except TrainingError as e:
        raise ConfigError(str(e)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {state['global_step']} steps, {state['samples_seen']} samples -> {cfg.ckpt_output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
