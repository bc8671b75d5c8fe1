"""MFU and tokens/s of train.py on random-initialized Llama shapes (nothing to download), against the Hugging Face
`Trainer` with padding-free batches on the same settings, plus a ladder of each optimization on and off.

    python bench/mfu.py [--shape 1b] [--tokens-per-gpu 16384] [--seq-len 2048] [--steps 6] [--warmup 2]
                        [--nproc 1] [--ladder] [--no-hf] [--set key=value ...]

Every run is a real train.py process (torchrun when --nproc > 1) on mock data: samples of --seq-len tokens,
--tokens-per-gpu per rank per optimizer step (one micro-step), full fine-tuning, dtype auto (bf16 on GPU). The run
is killed once its steps are logged, so no checkpoint is written. Timing starts after --warmup steps.

MFU = model FLOPs / (seconds x peak dense bf16 FLOP/s of the GPUs). Model FLOPs are computed here from the shape,
independently of train.py: 6 x (non-embedding parameters + output head) per token, plus causal attention
6 x layers x hidden x length^2 per sample. The bench's own clock (when each metrics line appears) is compared with
train.py's logged step_time_s, tokens_per_s and mfu. On CPU there is no peak to divide by; achieved TFLOP/s is shown.

The Trainer baseline (one process) gets the same model, samples per step, optimizer (fused AdamW), dtype and
attention (flash-attn varlen on GPU when installed), with transformers' DataCollatorWithFlattening.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/ (its names shadow ours)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import ROOT, environment, run_train_py, save_result  # noqa: E402
from config import ConfigError, exit_on_error  # noqa: E402

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B shapes; tiny for tests
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0},
}
LADDER = {  # name: train.py overrides, each against the default row
    "torch.compile": {"torch_compile": True},
    "selective activation checkpointing": {"activation_checkpointing": "selective"},
    "full activation checkpointing": {"activation_checkpointing": "full"},
}
MULTI_GPU_LADDER = {"FSDP prefetch off": {"fsdp_options.prefetch_layers": 0},
                    "FSDP prefetch 2 layers": {"fsdp_options.prefetch_layers": 2}}
FLASH_LADDER = {"flash-attn off (sdpa + block mask)": {"disable_flash_attn": True}}  # when train.py uses it


def shape_flops(shape: dict, lengths: list[int]) -> float:
    """Training FLOPs (fwd+bwd) of samples of these lengths: 6 x matmul parameters per token plus causal attention,
    6 x layers x hidden x length^2 per sample. Counted from the shape alone, apart from train.py's own count."""
    h, layers, heads, kv = (shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads"))
    kv_dim = h // heads * kv
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * shape["intermediate_size"] + 2 * h
    params = layers * per_layer + h + h * shape["vocab_size"]  # + final norm + output head
    return 6.0 * params * sum(lengths) + 6.0 * layers * h * sum(n * n for n in lengths)


def write_model_folder(shape: dict, path: Path) -> Path:
    """config.json of the shape plus the embedded tokenizer; train.py initializes the weights (random_init)."""
    from transformers import LlamaConfig

    from model import load_tokenizer, resolve_model_path
    tok = load_tokenizer(resolve_model_path("embedded"))
    LlamaConfig(max_position_embeddings=131072, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **shape).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def peak_flops(nproc: int) -> float | None:
    from hardware import peak_bf16_flops
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return peak * nproc if peak else None


def train_py_run(name: str, overrides: dict, args, model_dir: Path, work: Path) -> dict:
    out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    samples_per_step = args.nproc * args.tokens_per_gpu // args.seq_len
    steps = args.warmup + args.steps
    settings = {"model_path": model_dir, "random_init": True, "mock_data": True, "mock_data_len": args.seq_len,
                "mock_data_samples": samples_per_step * steps, "effective_batch_size": samples_per_step,
                "max_seq_len": args.seq_len, "max_batch_len": args.tokens_per_gpu, "max_steps": steps,
                "lora.rank": 0, "learning_rate": 1e-5, "lr_scheduler": "constant", "checkpoint_at_epoch": False,
                "save_samples": 0, "resume": "false", "ckpt_output_dir": out, **overrides}
    cli = [f"{k}={v}" for k, v in settings.items()] + args.set
    ran = run_train_py(cli, out / "metrics.jsonl", args.timeout, args.nproc, stop_after=steps)
    rows, arrivals = ran["rows"][args.warmup:steps], ran["arrivals"]
    outside_s = arrivals[steps - 1] - arrivals[args.warmup - 1]
    tokens = sum(r["num_tokens"] for r in rows)
    flops = shape_flops(SHAPES[args.shape], [args.seq_len] * (len(rows) * samples_per_step))
    peak = peak_flops(args.nproc)
    logged_s = sum(r["step_time_s"] for r in rows)
    result = {"name": name, "overrides": overrides, "tokens_per_s": tokens / outside_s,
              "logged_tokens_per_s": tokens / logged_s, "logged_vs_outside_step_time": logged_s / outside_s,
              "outside_clock_error_bound": (ran["arrival_errors"][args.warmup - 1]
                                            + ran["arrival_errors"][steps - 1]) / outside_s,
              "tflops_per_s": flops / outside_s / 1e12, "peak_memory_gb": max(r["peak_memory_gb"] for r in rows),
              "mfu": flops / outside_s / peak if peak else None,
              "logged_mfu": sum(r["mfu"] * r["step_time_s"] for r in rows) / logged_s if "mfu" in rows[0] else None}
    return result


def hf_trainer_worker(spec: dict) -> dict:
    """One process: transformers.Trainer with DataCollatorWithFlattening on the same shape and samples."""
    from transformers import (AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening, Trainer,
                              TrainerCallback, TrainingArguments)

    from model import attention_backend
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(spec["model_dir"])
    attn = "flash_attention_2" if attention_backend(device) == "flash_attention_2" else "sdpa"  # HF's own kernels
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(0, 1000, (spec["samples_per_step"] * spec["steps"], spec["seq_len"]),
                          generator=generator).tolist()]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    args = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=spec["samples_per_step"],
                             max_steps=spec["steps"], learning_rate=1e-5, lr_scheduler_type="constant",
                             adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused",
                             bf16=spec["bf16"], logging_strategy="no", save_strategy="no", report_to=[], use_cpu=not cuda,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
                             gradient_checkpointing=spec["activation_checkpointing"] != "none")
    Trainer(model=lm, args=args, train_dataset=rows, data_collator=DataCollatorWithFlattening(),
            callbacks=[StepTimer()]).train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step_times": times, "peak_memory_gb": peak}


def hf_trainer_run(args, model_dir: Path, work: Path) -> dict:
    samples_per_step = args.tokens_per_gpu // args.seq_len
    from types import SimpleNamespace

    from hardware import compute_dtype
    sets = dict(a.split("=", 1) for a in args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the dtype train.py computes in: bf16 autocast on GPU and on CPUs with native bf16 under dtype=auto
    bf16 = compute_dtype(SimpleNamespace(dtype=sets.get("dtype", "auto")), device) == torch.bfloat16
    spec = {"model_dir": str(model_dir), "out": str(work / "hf"), "samples_per_step": samples_per_step,
            "steps": args.warmup + args.steps, "seq_len": args.seq_len, "bf16": bf16,
            "activation_checkpointing": sets.get("activation_checkpointing", "none")}
    r = subprocess.run([sys.executable, __file__, "--hf-trainer-worker", json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise SystemExit(f"error: the Trainer baseline failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    worker = json.loads(r.stdout.strip().splitlines()[-1])
    timed = worker["step_times"][args.warmup:]
    tokens = len(timed) * samples_per_step * args.seq_len
    flops = shape_flops(SHAPES[args.shape], [args.seq_len] * (len(timed) * samples_per_step))
    peak = peak_flops(1)
    return {"name": "hf_trainer_padding_free", "bf16": bf16, "tokens_per_s": tokens / sum(timed),
            "tflops_per_s": flops / sum(timed) / 1e12, "peak_memory_gb": worker["peak_memory_gb"],
            "mfu": flops / sum(timed) / peak if peak else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="1b")
    p.add_argument("--tokens-per-gpu", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per mock sample")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for train.py")
    p.add_argument("--ladder", action="store_true", help="also each optimization on and off")
    p.add_argument("--no-hf", action="store_true", help="skip the Trainer baseline")
    p.add_argument("--set", nargs="*", default=[], help="train.py key=value for every run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--json", help="where to write the result (default runs/bench/mfu.json)")
    p.add_argument("--hf-trainer-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_trainer_worker:
        print(json.dumps(hf_trainer_worker(json.loads(args.hf_trainer_worker))))
        return 0
    if args.warmup < 1 or args.steps < 1:
        raise ConfigError("--warmup and --steps must be at least 1: the clock starts at the first logged step")
    if args.tokens_per_gpu % args.seq_len:
        raise ConfigError(f"--tokens-per-gpu {args.tokens_per_gpu} must be a multiple of --seq-len {args.seq_len}")
    env = environment(("peft",))
    print(json.dumps(env), flush=True)
    from model import attention_backend
    flash = torch.cuda.is_available() and attention_backend(torch.device("cuda")) == "flash_attention_2"
    ladder = {**(FLASH_LADDER if flash else {}), **LADDER, **(MULTI_GPU_LADDER if args.nproc > 1 else {})} \
        if args.ladder else {}
    results = []
    print(f"{'run':36} {'tokens/s':>10} {'vs default':>10} {'TFLOP/s':>8} {'MFU':>6} {'logged MFU':>10} "
          f"{'peak GiB':>9} {'logged/clock':>12}")
    with tempfile.TemporaryDirectory(prefix="minilab-mfu-") as tmp:
        work = Path(tmp)
        model_dir = write_model_folder(SHAPES[args.shape], work / f"llama-{args.shape}")
        runs = [("default", {})] + list(ladder.items())
        for name, overrides in runs:
            r = train_py_run(name, overrides, args, model_dir, work)
            results.append(r)
            show(r, results[0])
        if not args.no_hf and args.nproc == 1:
            hf = hf_trainer_run(args, model_dir, work)
            show(hf, results[0])
            results.append(hf)
    default = results[0]
    summary = {"env": env, "args": vars(args), "shape": SHAPES[args.shape], "runs": results}
    if not args.no_hf and args.nproc == 1:
        summary["train_py_vs_hf_tokens_per_s"] = default["tokens_per_s"] / results[-1]["tokens_per_s"]
        summary["train_py_vs_hf_peak_memory"] = default["peak_memory_gb"] / results[-1]["peak_memory_gb"]
        print(f"train.py vs the Trainer: {summary['train_py_vs_hf_tokens_per_s']:.2f}x tokens/s, "
              f"{summary['train_py_vs_hf_peak_memory']:.2f}x peak memory")
    print(f"saved {save_result('mfu', summary, args.json)}")
    return 0


def show(r: dict, default: dict):
    def pct(x):
        return f"{x:.1%}" if x is not None else "n/a"
    logged = r.get("logged_vs_outside_step_time")
    print(f"{r['name']:36} {r['tokens_per_s']:10.1f} {r['tokens_per_s'] / default['tokens_per_s']:9.2f}x "
          f"{r['tflops_per_s']:8.3f} {pct(r['mfu']):>6} {pct(r.get('logged_mfu')):>10} {r['peak_memory_gb']:9.2f} "
          f"{f'{logged:.3f}' if logged else '':>12}", flush=True)


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
