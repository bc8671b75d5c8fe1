"""Every CUDA path of this project, proven on one GPU in a few minutes: one command on a fresh GPU machine.

    python bench/gpu_check.py [--only NAME ...] [--json PATH] [--dry-run]

Prints a table (pass / fail / skipped, with the reason) and writes JSON (default runs/bench/gpu_check.json); exits 1
when any check fails. A check whose package is absent (flash-attn, deepspeed, bitsandbytes, vllm) is skipped and
says so, never passed. Without CUDA it says so and exits 0. --dry-run checks the arguments and prints the plan
without running anything (CI runs it).

The training checks are real train.py runs (torchrun with 1 process for the distributed backends) on a small
random Llama with the embedded tokenizer, mock data, fp32 unless said otherwise, 2 optimizer steps, gradients
written by the MINILAB_DUMP_GRADS hook: loss, gradient norm and every parameter's gradient must equal the plain
single-GPU run's. The MFU row reuses bench/mfu.py on the Llama-1B shape at 16k tokens per step.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/ (its names shadow ours)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from bench.common import ROOT, environment, save_result  # noqa: E402

FP32_RTOL = 1e-5  # fp32 on GPU: reduction order differs between kernels and backends
BF16_RTOL = 2e-2  # bf16 keeps 8 mantissa bits (rounding 2^-8 = 3.9e-3 per value); kernels round differently
MFU_TARGET, TRAINER_RATIO_TARGET = 0.45, 1.3
STEPS = 2
TRAIN = {"mock_data": True, "mock_data_len": 128, "mock_data_samples": 16, "effective_batch_size": 8,
         "max_seq_len": 128, "max_batch_len": 512, "max_steps": STEPS, "learning_rate": 1e-3,
         "lr_scheduler": "constant", "max_grad_norm": 0.5, "dtype": "float32", "checkpoint_at_epoch": False,
         "keep_last_checkpoint_only": True, "resume": "false", "num_proc": 1}
BACKENDS = {  # torchrun, 1 process: the same FSDP2 / DeepSpeed code as on eight GPUs
    "fsdp FULL_SHARD": {"fsdp_options.sharding_strategy": "FULL_SHARD"},
    "fsdp SHARD_GRAD_OP": {"fsdp_options.sharding_strategy": "SHARD_GRAD_OP"},
    "fsdp NO_SHARD": {"fsdp_options.sharding_strategy": "NO_SHARD"},
    "fsdp FULL_SHARD cpu_offload_params": {"fsdp_options.cpu_offload_params": True},
    "deepspeed ZeRO-2": {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 2},
    "deepspeed ZeRO-3": {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 3},
    "deepspeed ZeRO-2 optimizer offload": {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 2,
                                           "deepspeed_options.cpu_offload_optimizer": True},
    "deepspeed ZeRO-3 optimizer offload": {"distributed_backend": "deepspeed", "deepspeed_options.zero_stage": 3,
                                           "deepspeed_options.cpu_offload_optimizer": True},
}
# name: (train.py overrides, launcher processes: 0 = plain python, modules it needs)
RUNS = {"reference": ({}, 0, ()), "torch_compile": ({"torch_compile": True}, 0, ()),
        **{f"torchrun {k}": ({"distributed_backend": "fsdp", **v}, 1,
                             ("deepspeed",) if "deepspeed" in k else ()) for k, v in BACKENDS.items()},
        "lora": ({"lora.rank": 8, "lora.alpha": 16, "dtype": "auto"}, 0, ()),
        "qlora": ({"lora.rank": 8, "lora.alpha": 16, "lora.quantize_data_type": "nf4", "dtype": "auto"}, 0,
                  ("bitsandbytes",))}
CHECKS = {  # name: (what it proves, modules it needs)
    "flash_varlen": ("flash-attn varlen = sdpa_varlen on a packed batch (logits, gradients, first tokens)",
                     ("flash_attn",)),
    **{f"torchrun {k}": (f"torchrun 1 process, {k}: loss, grad norm, gradients = plain run", RUNS[f"torchrun {k}"][2])
       for k in BACKENDS},
    "torch_compile": ("torch_compile=true: loss, grad norm, gradients = eager", ()),
    "lora": ("LoRA trains and saves; merged logits = adapter logits", ()),
    "qlora": ("QLoRA (bitsandbytes CUDA) trains, merge check passes, merged logits = adapter logits",
              ("bitsandbytes",)),
    "bf16_vs_fp32": ("bf16 autocast loss = fp32 loss on the same packed batch, within bf16 rounding", ()),
    "chunked_loss_memory": ("chunked linear_cross_entropy peak memory < plain logits at 16k tokens", ()),
    "vllm_serving": ("python -m serve on vLLM answers chat and completions for a trained checkpoint", ("vllm",)),
    "mfu": (f"train.py MFU >= {MFU_TARGET:.0%} and >= {TRAINER_RATIO_TARGET}x the padding-free HF Trainer on "
            "Llama-1B, 16k tokens/step", ()),
}


class Skip(Exception):
    pass


def need(*modules: str):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"{', '.join(missing)} not installed")


def rel_err(a, b) -> float:
    import torch
    return (torch.linalg.norm((a.float() - b.float()).flatten()) / torch.linalg.norm(b.float().flatten()).clamp_min(
        1e-30)).item()


def build_model_dir(path: Path) -> Path:
    """A small random untied Llama with the embedded tokenizer, saved with its weights: every run starts equal."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import load_tokenizer, resolve_model_path
    tok = load_tokenizer(resolve_model_path("embedded"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                                 tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_command(name: str, model_dir: Path, work: Path) -> tuple[list[str], dict, Path]:
    overrides, nproc, _ = RUNS[name]
    out = work / name.replace(" ", "_")
    settings = {**TRAIN, "model_path": model_dir, "ckpt_output_dir": out, **overrides}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MINILAB_DUMP_GRADS": str(out / "grads")}
    return [*launcher, "train.py", "--config", "", *[f"{k}={v}" for k, v in settings.items()]], env, out


def run_train(name: str, model_dir: Path, work: Path, timeout_s: float) -> dict:
    if RUNS[name][2]:
        try:
            need(*RUNS[name][2])
        except Skip as e:
            return {"skip": str(e)}
    cmd, env, out = train_command(name, model_dir, work)
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout_s:.0f}s"}
    result = {"returncode": r.returncode, "output": (r.stdout + r.stderr)[-4000:], "out": out,
              "seconds": time.perf_counter() - start}
    if r.returncode == 0:
        result["rows"] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return result


def same_training(run: dict, ref: dict, rtol: float = FP32_RTOL) -> dict:
    """Loss, grad norm and each parameter's gradient of every step against the reference run."""
    from safetensors.torch import load_file
    if "rows" not in ref:
        raise AssertionError(f"the plain reference run failed: {ref.get('error') or ref.get('output', '')[-1500:]}")
    if "rows" not in run:
        raise AssertionError(f"train.py failed: {run.get('error') or run['output'][-1500:]}")
    worst = {"loss": 0.0, "grad_norm": 0.0, "grad": 0.0}
    for got, want in zip(run["rows"], ref["rows"], strict=True):
        worst["loss"] = max(worst["loss"], abs(got["loss"] - want["loss"]) / abs(want["loss"]))
        worst["grad_norm"] = max(worst["grad_norm"], abs(got["grad_norm"] - want["grad_norm"]) / want["grad_norm"])
        g = load_file(run["out"] / "grads" / f"grads_step_{got['step']}.safetensors")
        w = load_file(ref["out"] / "grads" / f"grads_step_{want['step']}.safetensors")
        if g.keys() != w.keys():
            raise AssertionError(f"step {got['step']}: gradients of {sorted(g.keys() ^ w.keys())[:3]} differ in "
                                 "presence")
        key = "grad" if got["step"] == 1 else "later_grad"
        worst[key] = max(worst.get(key, 0.0), max(rel_err(g[k], w[k]) for k in w))
    # after step 1 the weights differ a little: Adam's first update g / (|g| + eps) turns the ~1e-7 differences of
    # gradient elements near eps into ~1e-2 x lr, so later gradients get 10x the tolerance (CPU measured 9e-6)
    limits = {k: 10 * rtol if k == "later_grad" else rtol for k in worst}
    detail = ", ".join(f"{k} {v:.1e} (<= {limits[k]:g})" for k, v in worst.items())
    if any(v > limits[k] for k, v in worst.items()):
        raise AssertionError(f"relative differences too large: {detail}")
    return {"detail": f"relative differences {detail}", **worst}


def logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def merged_matches_adapter(run: dict, model_dir: Path, quantized: bool) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if "rows" not in run:
        raise AssertionError(f"train.py failed: {run.get('error') or run['output'][-1500:]}")
    folder = run["out"] / "hf_format" / "last_epoch"
    if quantized and "merged model matches the adapter model" not in run["output"]:
        raise AssertionError("train.py did not report its merge check")
    extra = {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)} if quantized else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cuda", **extra)
    adapted = PeftModel.from_pretrained(base, folder / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cuda").eval()
    ids = torch.arange(100, 164, device="cuda")[None]
    err = rel_err(logits(merged, ids), logits(adapted, ids))
    if err > 1e-4:
        raise AssertionError(f"merged logits differ from the adapter model's by {err:.2e} relative")
    return {"detail": f"loss {run['rows'][0]['loss']:.4f} -> {run['rows'][-1]['loss']:.4f}; merged vs adapter "
                      f"logits {err:.1e} relative (fp32)"}


def packed_batch(lengths: list[int], attn: str, seed: int = 0):
    import numpy as np
    import torch

    from model import pack
    rng = np.random.default_rng(seed)
    samples = [(ids, ids) for ids in (rng.integers(0, 1000, n) for n in lengths)]
    return samples, pack(samples, torch.device("cuda"), attn)


def check_flash_varlen(model_dir: Path) -> dict:
    need("flash_attn")
    import torch

    from model import CausalLMWithLoss, load_model
    lengths = [1, 5, 130, 257, 64, 2]  # a one-token sample, boundaries everywhere
    out = {}
    for attn in ("flash_attention_2", "sdpa_varlen"):
        lm = load_model(str(model_dir), torch.bfloat16, attn).cuda()
        samples, batch = packed_batch(lengths, attn)
        varlen = {"sample_bounds": batch["sample_bounds"]} if "sample_bounds" in batch else {}
        with torch.no_grad():
            row = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **varlen).logits[0].float()
            alone = torch.cat([logits(lm, torch.from_numpy(s[0])[None].cuda())[0] for s in samples])
        wrapped = CausalLMWithLoss(lm)
        wrapped(**batch, loss_scale=1.0 / sum(n - 1 for n in lengths)).backward()
        out[attn] = {"row": row, "alone": alone, "grads": {k: p.grad for k, p in lm.named_parameters()}}
    flash, sdpa = out["flash_attention_2"], out["sdpa_varlen"]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()])
    errs = {"logits": rel_err(flash["row"], sdpa["row"]),
            "first_tokens": rel_err(flash["row"][starts], sdpa["alone"][starts]),
            "vs_each_sample_alone": rel_err(flash["row"], flash["alone"]),
            "grads": max(rel_err(flash["grads"][k], sdpa["grads"][k]) for k in sdpa["grads"])}
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    if max(errs.values()) > BF16_RTOL:
        raise AssertionError(f"{detail} (bf16 tolerance {BF16_RTOL})")
    return {"detail": f"relative differences {detail} (<= {BF16_RTOL})", **errs}


def check_bf16_vs_fp32(model_dir: Path) -> dict:
    import torch

    from model import CausalLMWithLoss, load_model
    lm = CausalLMWithLoss(load_model(str(model_dir), torch.float32, "sdpa_varlen").cuda())
    lengths = [100, 300, 37, 511]
    _, batch = packed_batch(lengths, "sdpa_varlen")
    scale = 1.0 / sum(n - 1 for n in lengths)
    with torch.no_grad():
        fp32 = lm(**batch, loss_scale=scale).item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = lm(**batch, loss_scale=scale).item()
    err = abs(bf16 - fp32) / fp32
    if err > BF16_RTOL:
        raise AssertionError(f"bf16 loss {bf16:.5f} vs fp32 {fp32:.5f}: {err:.1e} relative")
    return {"detail": f"loss fp32 {fp32:.5f}, bf16 {bf16:.5f}: {err:.1e} relative (<= {BF16_RTOL})", "rel": err}


def check_chunked_loss_memory(_model_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from model import has_linear_cross_entropy, loss_fn
    if not has_linear_cross_entropy():
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy options; the loss uses plain logits")
    tokens, hidden, vocab = 16384, 2048, 128256  # Llama-1B's head at 16k trained tokens
    head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    h = (torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16) / hidden ** 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")

    def peak(fn) -> tuple[float, float]:
        h.grad, head.weight.grad = None, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30, loss.item()
    chunked_gb, chunked = peak(lambda: loss_fn(h, head, targets, 1.0 / tokens))
    plain_gb, plain = peak(lambda: F.cross_entropy(F.linear(h[0], head.weight).float(), targets))
    err = abs(chunked - plain) / plain
    detail = f"peak {chunked_gb:.2f} GiB chunked vs {plain_gb:.2f} GiB plain logits; loss {err:.1e} relative"
    if not chunked_gb < plain_gb or err > BF16_RTOL:
        raise AssertionError(detail)
    return {"detail": detail, "chunked_gb": chunked_gb, "plain_gb": plain_gb}


def check_vllm(trained: Path) -> dict:
    need("vllm", "openai")
    import openai

    from serve.background import running_server
    with running_server(str(trained), startup_timeout_s=300) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8)
        text = client.completions.create(model=model, prompt="The sea is", max_tokens=8)
    if not chat.choices[0].message.content and not text.choices[0].text:
        raise AssertionError("vLLM answered with empty texts")
    return {"detail": f"chat {chat.usage.completion_tokens} and completion {text.usage.completion_tokens} tokens"}


def check_mfu(work: Path) -> dict:
    from bench.mfu import SHAPES, hf_trainer_run, train_py_run, write_model_folder
    args = SimpleNamespace(shape="1b", tokens_per_gpu=16384, seq_len=2048, steps=4, warmup=2, nproc=1, set=[],
                           timeout=300)
    model_dir = write_model_folder(SHAPES["1b"], work / "llama-1b")
    ours = train_py_run("default", {}, args, model_dir, work)
    trainer = hf_trainer_run(args, model_dir, work)
    if ours["mfu"] is None:
        raise AssertionError(f"no peak FLOP/s known for {environment()['gpu']}: add it to hardware.PEAK_BF16_FLOPS")
    ratio = ours["tokens_per_s"] / trainer["tokens_per_s"]
    detail = (f"MFU {ours['mfu']:.1%} (logged {ours['logged_mfu'] or 0:.1%}), {ours['tokens_per_s']:.0f} tokens/s, "
              f"{ratio:.2f}x the Trainer ({trainer['tokens_per_s']:.0f} tokens/s, MFU {trainer['mfu'] or 0:.1%})")
    result = {"detail": detail, "mfu": ours["mfu"], "tokens_per_s": ours["tokens_per_s"], "vs_trainer": ratio,
              "trainer_tokens_per_s": trainer["tokens_per_s"]}
    if ours["mfu"] < MFU_TARGET or ratio < TRAINER_RATIO_TARGET:
        raise AssertionError(f"below the target ({MFU_TARGET:.0%} MFU, {TRAINER_RATIO_TARGET}x): {detail}")
    return result


def attempt(fn, *args) -> dict:
    start = time.perf_counter()
    try:
        result = {"status": "pass", **fn(*args)}
    except Skip as e:
        result = {"status": "skipped", "detail": str(e)}
    except (Exception, SystemExit) as e:  # bench/mfu.py reports its failures as SystemExit
        result = {"status": "fail", "detail": f"{type(e).__name__}: {e}"[-2000:]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def plan(only: list[str]) -> list[str]:
    unknown = [n for n in only if n not in CHECKS]
    if unknown:
        raise SystemExit(f"error: unknown check(s) {unknown}; choose from: {', '.join(CHECKS)}")
    return [n for n in CHECKS if not only or n in only]


def dry_run(names: list[str]) -> int:
    work = Path(tempfile.gettempdir()) / "minilab-gpu-check"
    for name in names:
        what, modules = CHECKS[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        print(f"{name:44} {what}" + (f"  [would skip: {', '.join(missing)} not installed]" if missing else ""))
        if name in RUNS:
            cmd, _, _ = train_command(name, work / "model", work)
            print(f"{'':44} $ {' '.join(cmd[1:])}")
    print(f"dry run: {len(names)} checks planned, nothing run")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=[], help="run only these checks (names as in the table)")
    p.add_argument("--json", help="where to write the result (default runs/bench/gpu_check.json)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per train.py run")
    p.add_argument("--parallel", type=int, default=4, help="train.py runs at once (small models share the GPU)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    args = p.parse_args()
    names = plan(args.only)
    if args.parallel < 1 or args.timeout <= 0:
        raise SystemExit("error: --parallel must be at least 1 and --timeout positive")
    if args.dry_run:
        return dry_run(names)
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU checks need one (nothing run); --dry-run checks the plan")
        return 0
    env = environment(("peft",))
    print(json.dumps(env), flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="minilab-gpu-check-") as tmp:
        work = Path(tmp)
        model_dir = build_model_dir(work / "model")
        wanted = [n for n in RUNS if n in names or (n == "reference" and any(x in RUNS for x in names))
                  or (n == "lora" and "vllm_serving" in names)]
        with ThreadPoolExecutor(args.parallel) as pool:  # train.py runs in the background, in-process checks here
            runs = {n: pool.submit(run_train, n, model_dir, work, args.timeout) for n in wanted}
            for name, fn in (("flash_varlen", check_flash_varlen), ("bf16_vs_fp32", check_bf16_vs_fp32),
                             ("chunked_loss_memory", check_chunked_loss_memory)):
                if name in names:
                    results[name] = attempt(fn, model_dir)
                    torch.cuda.empty_cache()
            runs = {n: f.result() for n, f in runs.items()}
        ref = runs.get("reference", {})
        for name in names:
            if name in RUNS:
                run = runs[name]
                if "skip" in run:
                    results[name] = {"status": "skipped", "detail": run["skip"]}
                elif name in ("lora", "qlora"):
                    results[name] = attempt(merged_matches_adapter, run, model_dir, name == "qlora")
                else:
                    results[name] = attempt(same_training, run, ref)
                    if name.startswith("torchrun") and results[name]["status"] == "pass":
                        backend = RUNS[name][0].get("distributed_backend", "fsdp")
                        if f"backend {backend}" not in run["output"]:  # it really ran the backend, not none
                            results[name] = {"status": "fail", "detail": f"train.py did not run {backend}"}
                results[name]["train_py_seconds"] = round(run.get("seconds", 0), 1)
        if "vllm_serving" in names:
            lora = runs.get("lora", {})
            results["vllm_serving"] = attempt(check_vllm, lora["out"] / "hf_format" / "last_epoch") \
                if "rows" in lora else {"status": "fail", "detail": "no trained checkpoint (the lora run failed)"}
        if "mfu" in names:  # last and alone on the GPU: it times
            results["mfu"] = attempt(check_mfu, work)
    print(f"\n{'check':44} {'result':8} detail")
    for name in names:
        r = results[name]
        print(f"{name:44} {r['status']:8} {r.get('detail', '')[:300]}")
    failed = [n for n in names if results[n]["status"] == "fail"]
    print(f"saved {save_result('gpu_check', {'env': env, 'results': results}, args.json)}")
    print(f"{len(names) - len(failed)} of {len(names)} checks did not fail" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
