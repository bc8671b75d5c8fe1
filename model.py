"""Load a Hugging Face causal LM, pack samples padding-free, and compute the loss.

Packing: a micro-batch is one flat row; position_ids restart at every sample. Position_ids alone do not stop sdpa
or eager attention from crossing samples, so each attention path isolates them its own way: flash-attn varlen (CUDA)
reads the boundaries from position_ids; `sdpa_varlen` (the default elsewhere) runs torch's sdpa causally on each
sample; `eager_varlen` (models whose attention sdpa cannot express: Gemma-2's logit softcapping, GPT-OSS's sinks)
runs the model's own eager attention on each sample; plain `sdpa` and `eager` get a block-diagonal causal mask over
the whole row.

Architectures: the loss applies the model's own output-head transform (HEAD_TRANSFORMS), adds the router
load-balancing loss of MoE models whose config asks for it (router_aux_loss), and refuses what it cannot reproduce.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import EMBEDDED_MODEL, ConfigError, embedded_export_dir, embedded_gguf_path
from tokenize_data import load_tokenizer  # noqa: F401  (defined there so tokenizing never imports this module)

IGNORE = -100
# Layers that carry state along the sequence mix packed samples; the block mask cannot stop that.
SEQUENCE_MIXING_TYPES = {"mamba", "mamba2", "rwkv", "jamba", "bamba", "falcon_h1", "zamba", "zamba2", "lfm2",
                         "granitemoehybrid", "qwen3_next", "recurrent_gemma", "xlstm", "minimax"}
# What each model type's ForCausalLM.forward does to lm_head's logits (read in transformers' modeling_*.py): scale
# them by a config value (multiply or divide), or tanh-cap them at one.
HEAD_TRANSFORMS = {
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                     "granitemoehybrid"), ("divide", "logits_scaling")),
    "hyperclovax": ("multiply", "logits_scaling"),  # Granite's key, applied the other way round
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("multiply", "logit_scale")),
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat"),
                    ("softcap", "final_logit_softcapping")),
}
# Config keys that some architecture applies to its logits or to the hidden states before lm_head; set on a model
# type not listed above with that key, they are refused rather than silently dropped.
HEAD_KEYS = ("logits_scaling", "logit_scale", "final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap",
             "lm_head_multiplier", "logits_mup_width_multiplier", "unpadded_vocab_size")
# Attention inputs that change its result and that no packed backend here applies (transformers' attention calls)
UNHANDLED_ATTENTION_KWARGS = ("position_bias", "sinks", "indices", "block_indices")
# What torch's sdpa has no argument for: such calls run the model's own eager attention on each sample
SDPA_CANNOT = ("softcap", "s_aux")
VARLEN = ("sdpa_varlen", "eager_varlen")


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
    final = embedded_export_dir()
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


def model_config(model_path: str, trust_remote_code=False):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{model_path}': {e}") from None


def causal_lm_class(config):
    """The class AutoModelForCausalLM builds for this config, or None when it builds none."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def attention_backend(device: torch.device, disable_flash_attn: bool = False, config=None) -> str:
    """The packed attention for this model. flash-attn varlen on CUDA when installed and the model runs on it (it
    applies softcapping, not attention sinks); else sdpa_varlen, or eager_varlen for models that transformers says
    sdpa cannot run (Gemma-2, GPT-OSS). Without a config: what a plain Llama-like model gets."""
    cls = causal_lm_class(config) if config is not None else None
    flash_ok = cls is None or (cls._supports_flash_attn and "flash_attention_2" in (
        getattr(cls, "_compatible_flash_implementations", None) or ["flash_attention_2"]))
    if device.type == "cuda" and not disable_flash_attn and flash_ok and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa_varlen" if cls is None or cls._supports_sdpa else "eager_varlen"


def _refuse_unhandled_attention(module, kwargs):
    model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
    unhandled = [k for k in UNHANDLED_ATTENTION_KWARGS if kwargs.get(k) is not None]
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        unhandled.append("non-causal attention")
    if unhandled:
        raise ConfigError(f"model type '{model_type}' passes {', '.join(unhandled)} to its attention, which packed "
                          "training does not apply, so it would train a different function; use another model")


def _allowed(q_len: int, k_len: int, window, device) -> torch.Tensor:
    """(q_len, k_len) bool: causal, the queries being the last q_len positions, within the sliding window if any."""
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    allowed = k <= q
    return allowed & (k > q - window) if window else allowed


@torch.compiler.disable  # the loop depends on the batch's boundaries; compiling it would recompile every step
def sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sample_bounds=None,
                sliding_window=None, **kwargs):
    """Attention of a packed row, one sample at a time with torch's causal sdpa: what flash-attn varlen does in one
    kernel. It costs sum(length^2) instead of the row's length^2 and needs no row-sized mask (1.4x faster fwd+bwd
    than the block mask on CPU, bench/train_throughput.py --ladder). Returns (batch, tokens, heads, head_dim).
    Calls carrying what sdpa cannot compute (softcap, sinks), and every call under eager_varlen, run the model's
    own eager attention per sample instead, with that sample's causal (and sliding-window) mask.
    Without sample_bounds (generation, merge checks) it is HF's own sdpa over the unpadded sequence."""
    _refuse_unhandled_attention(module, kwargs)
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation == "eager_varlen" or any(kwargs.get(k) is not None for k in SDPA_CANNOT):
        return _eager_per_sample(module, query, key, value, dropout, scaling, sample_bounds, sliding_window,
                                 **kwargs)
    if sample_bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    outs = []
    for a, b in zip(sample_bounds[:-1], sample_bounds[1:]):
        band = None
        if sliding_window and b - a > sliding_window:  # a token sees the window's last tokens of its own sample
            band = _allowed(b - a, b - a, sliding_window, query.device)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=band, is_causal=band is None,
            dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2), None


def _eager_per_sample(module, query, key, value, dropout, scaling, sample_bounds, sliding_window, **kwargs):
    """The attention module's own eager function (its modeling file's eager_attention_forward, which applies
    softcapping and sinks) on each sample with that sample's mask; no bounds: the whole sequence, causal."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ConfigError(f"{type(module).__name__} has no eager_attention_forward for packed eager attention; "
                          "load the model with attn_implementation='sdpa_varlen' or 'flash_attention_2'")
    if sample_bounds is None:
        segments = [(slice(None), slice(None), query.shape[2], key.shape[2])]
    else:
        segments = [(slice(a, b), slice(a, b), b - a, b - a) for a, b in zip(sample_bounds[:-1], sample_bounds[1:])]
    outs = []
    for qs, ks, q_len, k_len in segments:
        allowed = _allowed(q_len, k_len, sliding_window, query.device)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)[None, None]
        out, _ = eager(module, query[:, :, qs], key[:, :, ks], value[:, :, ks], mask, dropout=dropout,
                       scaling=scaling, sliding_window=sliding_window, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def no_row_mask(*args, attention_mask=None, **kwargs):
    """The varlen backends isolate samples themselves, so no row-sized mask is built; padded batches are not their
    job."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attn_implementation 'sdpa_varlen' takes packed rows without padding; load the model "
                         "with attn_implementation='sdpa' for padded batches")
    return None


def _register_varlen():
    from transformers import AttentionInterface, AttentionMaskInterface
    for name in VARLEN:  # one function: eager_varlen's name has no "sdpa", which transformers checks support for
        AttentionInterface.register(name, sdpa_varlen)
        AttentionMaskInterface.register(name, no_row_mask)


_register_varlen()


def load_model(model_path: str, dtype: torch.dtype, attn_implementation: str = "sdpa", trust_remote_code=False,
               quantization_config=None):
    from transformers import AutoModelForCausalLM
    config = model_config(model_path, trust_remote_code)
    check_packing_support(config)
    attn_implementation = supported_attention(config, attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code,
                                                     quantization_config=quantization_config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{model_path}': {e}") from None
    return model


def supported_attention(config, attn_implementation: str) -> str:
    """sdpa_varlen becomes eager_varlen for models transformers runs without sdpa (both pack alike); plain sdpa
    there is refused naming what works, instead of transformers' message."""
    cls = causal_lm_class(config)
    if cls is None or cls._supports_sdpa or "sdpa" not in attn_implementation:
        return attn_implementation
    if attn_implementation == "sdpa_varlen":
        return "eager_varlen"
    raise ConfigError(f"model type '{config.model_type}' has no sdpa attention in transformers (it computes what "
                      "sdpa cannot, such as attention logit softcapping or sinks): load it with "
                      "attn_implementation='eager_varlen' (packed, what train.py picks) or 'eager'")


def check_packing_support(config):
    """Refuse, before training, an architecture whose packed loss would not be the model's own: layers carrying
    state along the sequence, bidirectional attention, or an output-head transform the loss does not apply."""
    layer_types = set(getattr(config, "layer_types", None) or [])
    odd_layers = layer_types - {"full_attention", "sliding_attention"}
    if config.model_type in SEQUENCE_MIXING_TYPES or odd_layers:
        raise ConfigError(f"model type '{config.model_type}' has layers that carry state along the sequence "
                          f"({', '.join(sorted(odd_layers)) or 'recurrent/SSM'}); padding-free packing would mix "
                          "samples. Use an attention-only model (Llama, Mistral, Qwen2, Granite, SmolLM ...)")
    if getattr(config.get_text_config(), "use_bidirectional_attention", False):
        raise ConfigError(f"model type '{config.model_type}' sets use_bidirectional_attention: packed causal "
                          "training would train a different function; use a causal model")
    head_transform(config)
    cls = causal_lm_class(config)
    if router_aux_settings(config) and cls and not hasattr(sys.modules[cls.__module__], "load_balancing_loss_func"):
        raise ConfigError(f"model type '{config.model_type}' asks for a router load-balancing loss "
                          "(output_router_logits) that minilab cannot compute for it: set output_router_logits "
                          "to false in its config.json, or use another model")


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
    if attn_implementation in VARLEN:
        batch["sample_bounds"] = np.cumsum([0, *lengths]).tolist()
    # eager needs an additive float mask; CPU sdpa runs either at the same speed (bench/train_throughput.py --ladder)
    batch["attention_mask"] = None if attn_implementation in ("flash_attention_2", *VARLEN) else \
        block_causal_mask(lengths, device, additive=attn_implementation == "eager" or device.type == "cpu")
    return batch


def block_causal_mask(lengths: list[int], device: torch.device, additive: bool = False) -> torch.Tensor:
    """(1, 1, T, T) mask: each token sees earlier tokens of its own sample only."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    allowed = (doc[:, None] == doc[None, :]).tril_()[None, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def has_linear_cross_entropy() -> bool:
    """F.linear_cross_entropy with its chunking options came in torch 2.13; requirements admit torch 2.9."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def head_transform(config) -> tuple[float, float | None]:
    """(scale, cap) of the model's own output head: its logits are scale * lm_head(h), then cap * tanh(logits / cap)
    when cap is set (HEAD_TRANSFORMS). A head key this does not know for the model type is refused."""
    text = config.get_text_config()
    kind, key = HEAD_TRANSFORMS.get(config.model_type, (None, None))
    for k in HEAD_KEYS:
        v = getattr(text, k, None)
        neutral = v is None or (v == 1 and "cap" not in k) or (k == "unpadded_vocab_size" and v == text.vocab_size)
        if k != key and not neutral:
            raise ConfigError(f"model type '{config.model_type}' sets {k}={v}, which its output head applies, but "
                              "minilab's loss applies only the head transforms in model.HEAD_TRANSFORMS and would "
                              "train a different function: use a supported model or add its transform there")
    value = getattr(text, key, None) if key else None
    if value is None:
        return 1.0, None
    return {"divide": (1.0 / value, None), "multiply": (float(value), None), "softcap": (1.0, float(value))}[kind]


def loss_fn(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, loss_scale: float,
            scale: float = 1.0, softcap: float | None = None, token_losses: bool = False):
    """Summed token cross-entropy times loss_scale (1 / the optimizer step's global loss-token count), of the
    logits the model's own head computes (head_transform: scale, then softcap). token_losses=True also returns
    the trained tokens' own losses (unscaled, detached), in order, for per-sample statistics (sample_stats.py).

    Only hidden states of trained tokens reach the vocabulary projection, and on GPU with enough of them the
    chunked linear_cross_entropy never materializes their logits either. A scale is linear, so it scales the
    hidden states (and bias) instead of the logits; a softcap is not, so its kept tokens' logits are computed,
    capped, then fed to cross_entropy. Edit here to try another loss."""
    keep = targets != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    if torch.is_autocast_enabled(h.device.type):  # the final norm returns fp32: project in the compute dtype
        h = h.to(torch.get_autocast_dtype(h.device.type))
    if h.shape[0] == 0:
        zero = hidden.sum() * 0.0  # still part of the graph: every rank runs the same backward collectives
        return (zero, h.new_zeros(0)) if token_losses else zero
    bias = lm_head.bias
    if scale != 1.0:
        h = h * scale
        bias = None if bias is None else bias * scale
    reduction = "none" if token_losses else "sum"
    if softcap is not None or not has_linear_cross_entropy():  # torch before 2.13 has no linear_cross_entropy
        logits = F.linear(h, lm_head.weight.to(h.dtype), bias)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = F.cross_entropy(logits.float(), targets[keep], reduction=reduction)
    else:
        # chunking saves GPU memory; on CPU it measured 3-10x slower than the reference path (bench --ladder)
        chunked = torch.nn.LinearCrossEntropyOptions() if h.is_cuda and h.shape[0] >= h.shape[1] else None
        loss = F.linear_cross_entropy(h, lm_head.weight.to(h.dtype), targets[keep], linear_bias=bias,
                                      reduction=reduction, options=chunked).float()
    if token_losses:
        return loss.sum() * loss_scale, loss.detach()
    return loss * loss_scale


def router_aux_settings(config) -> float:
    """The router load-balancing loss's weight when the config asks the model's forward to add it
    (output_router_logits with a nonzero router_aux_loss_coef, as Mixtral's, Qwen3-MoE's, GraniteMoE's and
    GPT-OSS's forward do), else 0."""
    text = config.get_text_config()
    coef = getattr(text, "router_aux_loss_coef", 0.0) or 0.0
    return float(coef) if getattr(text, "output_router_logits", False) else 0.0


def router_aux_loss(lm, router_logits: tuple, bounds: list[int], targets: torch.Tensor) -> torch.Tensor:
    """coef x sum over samples of (its trained tokens) x (its load-balancing loss alone): the model's own
    load_balancing_loss_func on each sample's router logits, as its forward(labels=...) on that sample alone adds
    coef x aux to a mean over the same trained tokens. Per sample and weighted by trained tokens, the term is a
    sum over samples like the cross-entropy, so train.py's loss_scale makes 1 rank, N ranks and accumulation give
    the same update, and the packed loss equals sum(n_s x forward(sample s, labels).loss) / N exactly."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft
    aux_fn = sys.modules[type(base).__module__].load_balancing_loss_func
    trained = torch.cat([targets.new_zeros(1), (targets != IGNORE).cumsum(0)])
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(bounds[:-1], bounds[1:]):
        aux = aux_fn(tuple(layer[a:b] for layer in router_logits), base.num_experts, base.num_experts_per_tok)
        total = total + (trained[b] - trained[a]) * aux
    return total * router_aux_settings(lm.config)


class CausalLMWithLoss(nn.Module):
    """Runs decoder and loss in one forward, so FSDP and DeepSpeed gather the output head for the loss. The loss
    is the model's own: its head transform, plus its router load-balancing loss when its config asks for it."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        check_packing_support(lm.config)
        self.lm = lm
        self.head = head_transform(lm.config)
        self.router_aux = router_aux_settings(lm.config) != 0.0

    def forward(self, input_ids, position_ids, attention_mask, targets, loss_scale: float, sample_bounds=None,
                token_losses: bool = False):
        """The loss; token_losses=True: (loss, the trained tokens' cross-entropies), as loss_fn returns them."""
        varlen = {"sample_bounds": sample_bounds} if sample_bounds is not None else {}  # reaches sdpa_varlen
        if self.router_aux:
            varlen["output_router_logits"] = True
        out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=False, **varlen)
        loss = loss_fn(out.last_hidden_state, self.lm.get_output_embeddings(), targets, loss_scale, *self.head,
                       token_losses=token_losses)
        loss, per_token = loss if token_losses else (loss, None)
        if self.router_aux:
            bounds = sample_bounds or [*(position_ids[0] == 0).nonzero()[:, 0].tolist(), position_ids.shape[1]]
            loss = loss + router_aux_loss(self.lm, out.router_logits, bounds, targets) * loss_scale
        return (loss, per_token) if token_losses else loss
