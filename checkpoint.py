"""Checkpoints: HF folders for using the model, full training state for resuming. Both atomic.

    ckpt_output_dir/hf_format/samples_N/    safetensors, config, tokenizer, chat template (+ adapter/ for LoRA)
    ckpt_output_dir/full_state/step_N/      model + optimizer (torch distributed checkpoint, sharded per rank),
                                            per-rank RNG, trainer_state.json (its arrays, such as
                                            per-sample statistics, as NAME.npy); COMPLETE is written last
Everything is written under a temp name and renamed, so a save killed half-way never looks complete.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import sharding
from config import ConfigError

# Keys whose change makes a saved state meaningless for this run.
FINGERPRINT_KEYS = ("model_path", "max_seq_len", "effective_batch_size", "random_seed", "mock_data", "lora",
                    "distributed_backend", "validation_split", "sampler", "optimizer")
KEEP_FULL_STATES = 2
MARKER = "COMPLETE"
HOOK_POINTS = ("after_step", "inside_save", "after_request", "in_flight")


def fault_point(point: str, n: int):
    """Deterministic fault injection for tests (README, "Test hooks"): MINILAB_TEST_HOOK="POINT=N:ACTION[@RANK],...".
    POINT is after_step (step N is logged and its save_samples save done; before epoch-end and stop saves) or
    inside_save (rank 0, the full state of step N complete under its temp name, before the rename) or
    after_request (sdg: the run's Nth teacher reply is in the cache) or in_flight (sdg: the first token of the run's
    Nth teacher request has arrived, the rest not). ACTION is
    kill (SIGKILL), a signal name sent to this process (sigterm, sigusr1), or pause."""
    for spec in filter(None, os.environ.get("MINILAB_TEST_HOOK", "").split(",")):
        where, _, action = spec.partition(":")
        action, _, only_rank = action.partition("@")
        if where.partition("=")[0] not in HOOK_POINTS or not (action in ("kill", "pause") or
                                                               hasattr(signal, action.upper())):
            raise ValueError(f"MINILAB_TEST_HOOK: cannot read {spec!r}: points {HOOK_POINTS}, actions kill, "
                             "pause or a signal name")
        if where != f"{point}={n}" or (only_rank and int(only_rank) != int(os.environ.get("RANK", 0))):
            continue
        if action == "pause":
            _pause()
        else:
            os.kill(os.getpid(), signal.SIGKILL if action == "kill" else getattr(signal, action.upper()))


def _pause():
    """Write MINILAB_TEST_HOOK_DIR/paused_rankR (holding the pid), then wait until MINILAB_TEST_HOOK_DIR/release
    exists or SIGTERM, SIGUSR1 or SIGINT arrives (its own handler runs too)."""
    folder, rank = Path(os.environ["MINILAB_TEST_HOOK_DIR"]), os.environ.get("RANK", "0")
    tmp = folder / f".paused_rank{rank}.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, folder / f"paused_rank{rank}")  # whole, so the test reads the pid at once
    woken = []
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def wake(signum, frame):
        woken.append(signum)
        if callable(old[signum]):
            old[signum](signum, frame)
    for s in old:
        signal.signal(s, wake)
    try:
        while not woken and not (folder / "release").exists():
            time.sleep(0.01)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if woken and not callable(old[woken[0]]):  # no handler of its own: the signal's default action now
        signal.raise_signal(woken[0])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _replace_dir(tmp: Path, final: Path):
    """Swap a finished temp folder into place; an older folder of that name goes only once the new one is in."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def check_free_space(path: Path, needed_bytes: int):
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed_bytes * 1.1:
        raise ConfigError(f"not enough disk space in {path} for a checkpoint: {free / 2**30:.1f} GiB free, about "
                          f"{needed_bytes / 2**30:.1f} GiB needed; free space or point ckpt_output_dir elsewhere")


def needed_bytes(model, hf_dtype: torch.dtype | None = None) -> int:
    """About what a save writes in all, the same on every rank and backend: the whole model in hf_dtype (an HF
    folder), or the parameters plus AdamW's two fp32 moments (and an fp32 master copy of 16-bit ones)."""
    if hf_dtype:
        return sum(sharding.whole_numel(p) * hf_dtype.itemsize for p in model.parameters())
    return sum(sharding.whole_numel(p) * (p.element_size() + p.requires_grad * (8 + 4 * (p.element_size() < 4)))
               for p in model.parameters())


def save_dtype(config) -> torch.dtype:
    """The dtype in the base model's config.json: a bf16 base gives a bf16 checkpoint; fp32 when it names none."""
    from transformers import PretrainedConfig
    try:
        raw, _ = PretrainedConfig.get_config_dict(config._name_or_path)
    except OSError:  # a config made in memory
        raw = {}
    dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype")), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def save_hf(model, tokenizer, out_dir: str, name: str):
    """A complete HF folder loadable by AutoModelForCausalLM; LoRA runs also get adapter/ and a merged model."""
    final = Path(out_dir) / "hf_format" / name
    lm = model.lm if hasattr(model, "lm") else model.module.lm
    dtype = save_dtype((lm.get_base_model() if hasattr(lm, "peft_config") else lm).config)
    if _rank() == 0:
        check_free_space(final.parent, needed_bytes(model, dtype))
    quantized = getattr(lm, "is_loaded_in_4bit", False)
    state = sharding.dequantized_state(lm) if quantized else sharding.full_model_state(model)
    if _rank() == 0:
        state = {k.removeprefix("lm."): v for k, v in state.items()}
        tmp = final.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain = _cpu_copy(lm, state)
        if hasattr(plain, "peft_config"):
            plain.save_pretrained(tmp / "adapter")
            # safe_merge adds into a copy: the base tensors may be the live model's (one process, ZeRO-2)
            plain = plain.merge_and_unload(safe_merge=True)
            if quantized:  # QLoRA: merged into the dequantized base; must still match the adapter model
                sharding.check_merge(lm, plain, plain.config.vocab_size)
        plain.to(dtype).save_pretrained(tmp)  # trained in fp32 master weights, saved as the base was
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, final)
    _barrier()
    return final


def _cpu_copy(lm, state: dict):
    """A CPU model (peft-wrapped for LoRA) of the same architecture holding the given full state dict."""
    from transformers import AutoModelForCausalLM
    is_peft = hasattr(lm, "peft_config")
    base_config = copy.deepcopy((lm.get_base_model() if is_peft else lm).config)
    if hasattr(base_config, "quantization_config"):  # QLoRA: the saved weights are dequantized
        del base_config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base_config, dtype=next(iter(state.values())).dtype)
    if is_peft:
        from peft import get_peft_model
        plain = get_peft_model(plain, copy.deepcopy(lm.peft_config["default"]))
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    missing = [k for k, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"checkpoint state is missing {missing[:3]}")
    plain.generation_config = copy.deepcopy(lm.generation_config)
    return plain


def fingerprint(cfg, data_meta: dict) -> dict:
    keys = {k: (vars(getattr(cfg, k)) if hasattr(getattr(cfg, k), "__dict__") else getattr(cfg, k))
            for k in FINGERPRINT_KEYS}
    keys["data_sha256"] = data_meta.get("source_sha256")
    keys["chat_template_sha256"] = data_meta.get("chat_template_sha256")  # the template's content, not its path
    return json.loads(json.dumps(keys))


def save_full_state(model, optimizer, scheduler, out_dir: str, trainer_state: dict):
    root = Path(out_dir) / "full_state"
    name = f"step_{trainer_state['global_step']:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    if _rank() == 0:
        check_free_space(root, needed_bytes(model))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if sharding.is_deepspeed(model):  # the engine's own format: ZeRO partitions of model and optimizer per rank
        model.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        arrays = {k: v for k, v in trainer_state.items() if isinstance(v, np.ndarray)}  # per-sample statistics
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        plain = {k: v for k, v in trainer_state.items() if k not in arrays}
        (tmp / "trainer_state.json").write_text(json.dumps({**plain, "scheduler": scheduler.state_dict()}))
        (tmp / MARKER).write_text("ok")
        fault_point("inside_save", trainer_state["global_step"])
        _replace_dir(tmp, final)
        for old in sorted(root.glob("step_*"))[:-KEEP_FULL_STATES]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find_resume(resume, out_dir: str) -> Path | None:
    """The full state to resume from: `auto` = newest complete one, a path, or none."""
    if resume in (False, None, "false", "no", ""):
        return None
    if resume not in (True, "auto"):
        path = Path(resume)
        if not (path / MARKER).exists():
            raise ConfigError(f"resume: '{resume}' is not a complete full-state checkpoint (no {MARKER} file); "
                              f"use resume=auto or a folder under {out_dir}/full_state")
        return path
    root = Path(out_dir) / "full_state"
    if _rank() == 0 and root.exists():
        for stale in root.glob(".*.tmp"):  # a save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    done = sorted(p for p in root.glob("step_*") if (p / MARKER).exists()) if root.exists() else []
    return done[-1] if done else None


def load_full_state(path: Path, model, optimizer, scheduler, expected_fingerprint: dict) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    saved = {"optimizer": "adamw", "sampler": "multipack", **state.get("fingerprint", {})}  # saved before the keys
    differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in expected_fingerprint.items() if saved.get(k) != v]
    if differ:
        raise ConfigError(f"cannot resume from {path}: " + "; ".join(differ) +
                          ". Use the original settings, a new ckpt_output_dir, or resume=false to start fresh")
    if sharding.is_deepspeed(model):
        model.load_checkpoint(str(path), tag="deepspeed", load_lr_scheduler_states=False)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    scheduler.load_state_dict(state.pop("scheduler"))
    state.update({f.stem: np.load(f) for f in path.glob("*.npy")})
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
