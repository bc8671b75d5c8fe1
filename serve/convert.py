"""`python -m serve.convert --model HF_DIR --output FILE.gguf [--quantize Q4_K_M|Q8_0|F16]`

Llama-family HF safetensors checkpoints (Llama, Mistral, Granite, Qwen2, SmolLM; merged LoRA included) to GGUF
with the `gguf` package, then quantization with llama.cpp's own `llama_model_quantize`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

from config import ConfigError, exit_on_error

# HF architecture -> (gguf arch name, whether Q/K need llama.cpp's interleaved-rotary permutation)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),  # llama.cpp runs Mistral dense models as llama
    "GraniteForCausalLM": ("GRANITE", True),
    "Qwen2ForCausalLM": ("QWEN2", False),  # NEOX rotary: HF layout already matches
}
QUANTIZATIONS = ("F16", "Q8_0", "Q4_K_M")
CACHED_NAME = "model-f16.gguf"


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; an HF checkpoint folder needs config.json, *.safetensors and the "
                          "tokenizer files (save them with save_pretrained)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def read_hparams(hf_dir: Path) -> tuple[dict, str, bool]:
    if (hf_dir / "adapter_config.json").exists() and not (hf_dir / "config.json").exists():
        raise ConfigError(f"{hf_dir} holds a LoRA adapter only; merge it into its base model first "
                          "(peft: model.merge_and_unload().save_pretrained(DIR)) and convert that folder")
    cfg = read_json(hf_dir / "config.json")
    arch = (cfg.get("architectures") or ["(none given)"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{hf_dir / 'config.json'}: architecture '{arch}' is not supported for GGUF conversion; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    gguf_arch, permute_qk = ARCHITECTURES[arch]
    return cfg, gguf_arch, permute_qk


def rope_settings(cfg: dict) -> dict:
    # transformers 5 keeps rope settings in rope_parameters; older checkpoints use rope_theta + rope_scaling
    return {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {}),
            **(cfg.get("rope_parameters") or {})}


def add_hparams(writer, cfg: dict, gguf_arch: str, file_type: int) -> None:
    import gguf

    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = rope_settings(cfg)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(file_type)
    scaling_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif scaling_type != "default":
        raise ConfigError(f"config.json: rope_scaling type '{scaling_type}' is not supported by this converter "
                          "(supported: none, linear)")
    if gguf_arch == "GRANITE":  # Granite's muP-style multipliers
        writer.add_embedding_scale(cfg.get("embedding_multiplier", 1.0))
        writer.add_residual_scale(cfg.get("residual_multiplier", 1.0))
        writer.add_attention_scale(cfg.get("attention_multiplier", 1.0 / head_dim ** 0.5))
        writer.add_logit_scale(cfg.get("logits_scaling", 1.0))


def pretokenizer_name(hf_tokenizer) -> str:
    """Which llama.cpp pre-tokenizer splits text like this HF one, judged on how it splits probe strings."""
    split = hf_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    digits = [piece for piece, _ in split("12345")]
    letters_after_punct = [piece for piece, _ in split("x.abc")]
    if digits == ["12345"]:
        return "gpt-2"
    if digits == ["123", "45"]:
        return "llama-bpe"
    if digits == list("12345"):
        return "qwen2" if ".abc" in letters_after_punct else "smollm"
    raise ConfigError(f"the tokenizer splits '12345' as {digits}, which matches no llama.cpp pre-tokenizer "
                      "this converter knows (gpt-2, llama-bpe, qwen2, smollm)")


def add_tokenizer(writer, hf_dir: Path, n_vocab: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    tokenizer_json = read_json(hf_dir / "tokenizer.json")
    model_json = tokenizer_json["model"]
    if model_json["type"] != "BPE":
        raise ConfigError(f"{hf_dir / 'tokenizer.json'}: tokenizer type '{model_json['type']}' is not supported "
                          "(supported: BPE, byte-level or SentencePiece-style with byte fallback)")
    if model_json.get("byte_fallback"):  # Llama-2 / Mistral SentencePiece-style BPE: gguf knows how to read it
        vocab = gguf.LlamaHfVocab(hf_dir)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(list(scores))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pretokenizer_name(tokenizer))
        by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(n_vocab):
            if i in added:
                tokens.append(added[i].content)
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
            else:  # embedding rows padded past the tokenizer's vocabulary
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    # merges, bos/eos/unk/pad ids, add_bos and the chat template (tokenizer_config.json or chat_template.jinja)
    gguf.SpecialVocab(hf_dir, load_merges=not model_json.get("byte_fallback"), n_vocab=n_vocab).add_to_gguf(
        writer, quiet=True)


def permute_for_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotates (first half, second half) of each head; llama.cpp rotates interleaved pairs."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def add_tensors(writer, hf_dir: Path, cfg: dict, gguf_arch: str, permute_qk: bool) -> None:
    import gguf
    from safetensors import safe_open

    files = sorted(glob.glob(str(hf_dir / "*.safetensors")))
    if not files:
        raise ConfigError(f"{hf_dir} has no *.safetensors files; save the model with save_pretrained "
                          "(safetensors is the only weight format accepted)")
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), cfg["num_hidden_layers"])
    n_head = cfg["num_attention_heads"]
    n_kv_head = cfg.get("num_key_value_heads") or n_head
    for path in files:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise ConfigError(f"{path}: not a readable safetensors file ({e}); re-save the checkpoint") from None
        with handle:
            for hf_name in handle.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from rope_freq_base
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ConfigError(f"{path}: tensor '{hf_name}' has no GGUF equivalent for {gguf_arch.lower()}; "
                                      "is this an unmerged adapter or an extra head? merge or drop it first")
                data = handle.get_tensor(hf_name).float().numpy()
                if permute_qk and hf_name.endswith("q_proj.weight"):
                    data = permute_for_rotary(data, n_head)
                elif permute_qk and hf_name.endswith("k_proj.weight"):
                    data = permute_for_rotary(data, n_kv_head)
                # norms and biases stay F32 (llama.cpp expects that); matrices go to F16
                writer.add_tensor(gguf_name, data.astype(np.float16 if data.ndim == 2 else np.float32))


def write_f16_gguf(hf_dir: Path, output: Path) -> None:
    import gguf

    cfg, gguf_arch, permute_qk = read_hparams(hf_dir)
    writer = gguf.GGUFWriter(str(output), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, gguf_arch)])
    writer.add_name(hf_dir.name)
    add_hparams(writer, cfg, gguf_arch, gguf.LlamaFileType.MOSTLY_F16)
    add_tokenizer(writer, hf_dir, cfg["vocab_size"])
    add_tensors(writer, hf_dir, cfg, gguf_arch, permute_qk)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(f16_path: Path, output: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    if llama_cpp.llama_model_quantize(str(f16_path).encode(), str(output).encode(), params) != 0:
        raise ConfigError(f"llama.cpp failed to quantize {f16_path} to {kind}; try --quantize Q8_0 or F16")


def convert(hf_dir: str, output: str, quantization: str = "F16") -> str:
    """Write the GGUF under a temporary name and rename it at the end, so a crash never leaves a complete-looking file."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantization} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    source, target = Path(hf_dir), Path(output)
    if not source.is_dir():
        raise ConfigError(f"'{hf_dir}' is not a folder; pass the HF checkpoint folder (with config.json)")
    target.parent.mkdir(parents=True, exist_ok=True)
    f16_tmp = target.with_name(f".{target.name}.f16.tmp")
    out_tmp = target.with_name(f".{target.name}.tmp")
    try:
        write_f16_gguf(source, f16_tmp)
        if quantization == "F16":
            os.replace(f16_tmp, target)
        else:
            quantize(f16_tmp, out_tmp, quantization)
            os.replace(out_tmp, target)
    finally:
        for leftover in (f16_tmp, out_tmp):
            leftover.unlink(missing_ok=True)
    return str(target)


def cached_gguf(hf_dir: str) -> str:
    """F16 GGUF next to the checkpoint, rebuilt only when a checkpoint file is newer than it."""
    cached = Path(hf_dir) / CACHED_NAME
    sources = glob.glob(os.path.join(hf_dir, "*.safetensors")) + glob.glob(os.path.join(hf_dir, "*.json"))
    newest_source = max((os.path.getmtime(p) for p in sources), default=0.0)
    if cached.exists() and cached.stat().st_mtime >= newest_source:
        return str(cached)
    print(f"converting {hf_dir} to GGUF once (cached as {cached}) ...", file=sys.stderr, flush=True)
    try:
        return convert(hf_dir, str(cached), "F16")
    except OSError as e:  # typically a read-only checkpoint folder or a full disk
        raise ConfigError(f"cannot write {cached}: {e.strerror}; convert elsewhere with `python -m serve.convert "
                          f"--model {hf_dir} --output FILE.gguf` and serve FILE.gguf") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.convert", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint folder (config.json, *.safetensors, tokenizer)")
    p.add_argument("--output", required=True, help="GGUF file to write")
    p.add_argument("--quantize", default="F16", choices=QUANTIZATIONS)
    args = p.parse_args(argv)
    print(f"wrote {convert(args.model, args.output, args.quantize)}")


if __name__ == "__main__":
    exit_on_error(main)
