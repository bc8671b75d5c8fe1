"""Load a Hugging Face causal LM, pack samples padding-free, and compute the loss.

Packing: a micro-batch is one flat row; position_ids restart at every sample. Position_ids alone do not stop sdpa
or eager attention from crossing samples, so each attention path isolates them its own way: flash-attn varlen (CUDA)
reads the boundaries from position_ids; `sdpa_varlen` (the default elsewhere) runs torch's sdpa causally on each
sample; plain `sdpa` and `eager` get a block-diagonal causal mask over the whole row.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import EMBEDDED_MODEL, ConfigError, cache_dir, embedded_gguf_path

IGNORE = -100
# Layers that carry state along the sequence mix packed samples; the block mask cannot stop that.
SEQUENCE_MIXING_TYPES = {"mamba", "mamba2", "rwkv", "jamba", "bamba", "falcon_h1", "zamba", "zamba2", "lfm2",
                         "granitemoehybrid", "qwen3_next", "recurrent_gemma", "xlstm", "minimax"}


def resolve_model_path(model_path: str) -> str:
    """The embedded default becomes a cached HF folder; a local folder or a hub id passes through."""
    if model_path in (EMBEDDED_MODEL, "embedded"):
        return embedded_model_dir()
    if os.path.isdir(model_path) or (model_path.count("/") == 1 and not model_path.startswith((".", "/"))):
        return model_path
    raise ConfigError(f"model_path '{model_path}' not found: give an HF model folder, a hub id, or "
                      f"'{EMBEDDED_MODEL}' for the embedded default")


def embedded_model_dir() -> str:
    """SmolLM2-135M-Instruct from the packaged GGUF as an HF safetensors folder, made once and cached.

    Written to a temp folder and renamed, so a killed export never leaves a folder that looks complete."""
    final = cache_dir() / "SmolLM2-135M-Instruct"
    if final.is_dir():
        return str(final)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    gguf = embedded_gguf_path()
    kwargs = {"gguf_file": os.path.basename(gguf)}
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kwargs)
    dequantized = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32, **kwargs)
    config = dequantized.config
    del config.quantization_config  # the weights below are plain fp32; a GGUF-loaded model cannot be saved as is
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(dequantized.state_dict())
    fresh.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{model_path}': {e}") from None


def attention_backend(device: torch.device, disable_flash_attn: bool = False) -> str:
    if device.type == "cuda" and not disable_flash_attn and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa_varlen"


@torch.compiler.disable  # the loop depends on the batch's boundaries; compiling it would recompile every step
def sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sample_bounds=None,
                sliding_window=None, **kwargs):
    """Attention of a packed row, one sample at a time with torch's causal sdpa: what flash-attn varlen does in one
    kernel. It costs sum(length^2) instead of the row's length^2 and needs no row-sized mask (1.4x faster fwd+bwd
    than the block mask on CPU, bench/train_throughput.py --ladder). Returns (batch, tokens, heads, head_dim).
    Without sample_bounds (generation, merge checks) it is HF's own sdpa over the unpadded sequence."""
    if sample_bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outs = []
    for a, b in zip(sample_bounds[:-1], sample_bounds[1:]):
        band = None
        if sliding_window and b - a > sliding_window:  # a token sees the window's last tokens of its own sample
            band = torch.ones(b - a, b - a, dtype=torch.bool, device=query.device).tril_().triu_(1 - sliding_window)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=band, is_causal=band is None,
            dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2), None


def no_row_mask(*args, attention_mask=None, **kwargs):
    """sdpa_varlen isolates samples itself, so no row-sized mask is built; padded batches are not its job."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attn_implementation 'sdpa_varlen' takes packed rows without padding; load the model "
                         "with attn_implementation='sdpa' for padded batches")
    return None


def _register_sdpa_varlen():
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register("sdpa_varlen", sdpa_varlen)
    AttentionMaskInterface.register("sdpa_varlen", no_row_mask)


_register_sdpa_varlen()


def load_model(model_path: str, dtype: torch.dtype, attn_implementation: str = "sdpa", trust_remote_code=False,
               quantization_config=None):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code,
                                                     quantization_config=quantization_config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{model_path}': {e}") from None
    check_packing_support(model.config)
    return model


def check_packing_support(config):
    layer_types = set(getattr(config, "layer_types", None) or [])
    odd_layers = layer_types - {"full_attention", "sliding_attention"}
    if config.model_type in SEQUENCE_MIXING_TYPES or odd_layers:
        raise ConfigError(f"model type '{config.model_type}' has layers that carry state along the sequence "
                          f"({', '.join(sorted(odd_layers)) or 'recurrent/SSM'}); padding-free packing would mix "
                          "samples. Use an attention-only model (Llama, Mistral, Qwen2, Granite, SmolLM ...)")


def pack(samples: list[tuple[np.ndarray, np.ndarray]], device: torch.device, attn_implementation: str) -> dict:
    """(input_ids, labels) per sample -> one flat row. Targets are shifted inside each sample, so no sample
    predicts the next one's first token."""
    ids = np.concatenate([s[0] for s in samples]).astype(np.int64)
    targets = np.concatenate([np.append(s[1][1:], IGNORE) for s in samples]).astype(np.int64)
    lengths = [len(s[0]) for s in samples]
    positions = np.concatenate([np.arange(n) for n in lengths])
    batch = {"input_ids": torch.from_numpy(ids)[None].to(device),
             "position_ids": torch.from_numpy(positions)[None].to(device),
             "targets": torch.from_numpy(targets).to(device)}
    if attn_implementation == "sdpa_varlen":
        batch["sample_bounds"] = np.cumsum([0, *lengths]).tolist()
    # eager needs an additive float mask; CPU sdpa runs either at the same speed (bench/train_throughput.py --ladder)
    batch["attention_mask"] = None if attn_implementation in ("flash_attention_2", "sdpa_varlen") else \
        block_causal_mask(lengths, device, additive=attn_implementation == "eager" or device.type == "cpu")
    return batch


def block_causal_mask(lengths: list[int], device: torch.device, additive: bool = False) -> torch.Tensor:
    """(1, 1, T, T) mask: each token sees earlier tokens of its own sample only."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    allowed = (doc[:, None] == doc[None, :]).tril_()[None, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def loss_fn(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, loss_scale: float,
            logits_scaling: float = 1.0) -> torch.Tensor:
    """Summed token cross-entropy times loss_scale (1 / the optimizer step's global loss-token count).

    Only hidden states of trained tokens reach the vocabulary projection, and on GPU with enough of them the
    chunked linear_cross_entropy never materializes their logits either. Edit here to try another loss."""
    keep = targets != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep] / logits_scaling
    if h.shape[0] == 0:
        return hidden.sum() * 0.0  # still part of the graph: every rank runs the same backward collectives
    # chunking saves GPU memory; on CPU it measured 3-10x slower than the reference path (bench --ladder)
    chunked = torch.nn.LinearCrossEntropyOptions() if h.is_cuda and h.shape[0] >= h.shape[1] else None
    loss = F.linear_cross_entropy(h, lm_head.weight.to(h.dtype), targets[keep], linear_bias=lm_head.bias,
                                  reduction="sum", options=chunked)
    return loss.float() * loss_scale


class CausalLMWithLoss(nn.Module):
    """Runs decoder and loss in one forward, so FSDP and DeepSpeed gather the output head for the loss."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, targets, loss_scale: float, sample_bounds=None):
        varlen = {"sample_bounds": sample_bounds} if sample_bounds is not None else {}  # reaches sdpa_varlen
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       attention_mask=attention_mask, use_cache=False, **varlen).last_hidden_state
        return loss_fn(hidden, self.lm.get_output_embeddings(), targets, loss_scale,
                       getattr(self.lm.config, "logits_scaling", 1.0))
