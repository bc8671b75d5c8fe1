"""What the hardware offers the loop: the compute dtype, peak FLOP/s for MFU, the training FLOPs of a model, peak
memory. Plain functions that train.py and the benchmarks share."""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource

import torch

import sharding
from config import Config, ConfigError

# dense bf16 FLOP/s per GPU by device name (whole words); the first match wins, so variants precede their family
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
                   ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12))


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (autocast over fp32 master weights), else fp32."""
    native = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" \
        else cpu_has_native_bf16()
    return choose_dtype(cfg.dtype, device.type, native)


def choose_dtype(name: str, device_type: str, native_bf16: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if native_bf16 else torch.float32
    if name == "bfloat16" and device_type == "cuda" and not native_bf16:  # before Ampere
        raise ConfigError("dtype=bfloat16: this GPU has no bf16 arithmetic; use dtype=float32 (or auto)")
    return getattr(torch, name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 fwd+bwd ran 2.1-2.8x fp32 on such a CPU (bench/train_throughput.py --ladder);
    elsewhere bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_bf16_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS if re.search(rf"\b{k}\b", device_name)), None)


def model_flops(lm, lengths: list[int]) -> float:
    """Training FLOPs for MFU. Per token and weight: 2 forward, 2 for the input's gradient, and 2 for the weight's
    own gradient only if it trains (a frozen LoRA/QLoRA base counts 4, not 6); plus causal attention per sample."""
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    # every parameter is a matmul but the embedding lookup; a tied head shares its tensor but is still a matmul
    weights = [p for p in lm.parameters() if p is not embedding] + ([head] if head is embedding else [])
    per_token = sum((6 if p.requires_grad else 4) * sharding.whole_numel(p) for p in weights)
    cfg = lm.config
    return per_token * sum(lengths) + 6 * cfg.num_hidden_layers * cfg.hidden_size * sum(x * x for x in lengths)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc reuse the pages of freed tensors. Each CPU step allocates and frees the same large activation and
    gradient buffers; by default glibc maps each afresh (a page fault and zeroing per 4 KiB) and hands freed heap
    back to the system. With no mmap'd chunks and no trimming, fwd+bwd ran 5-8% faster in fp32 and the flattening
    Trainer 19% in bf16 (bench/train_throughput.py runs that peer with and without it). The resident size stays at
    its peak, which every step reaches anyway. False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS ignore or reject these parameters)
    except (OSError, AttributeError, TypeError):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
