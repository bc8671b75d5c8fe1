"""`python -m serve.roundtrip --model HF_DIR --gguf FILE.gguf`: does llama.cpp predict what transformers predicts?

For each prompt, transformers extends it greedily; the whole sequence is then fed to both runtimes and the
next-token argmax is compared at every position. Prints the share of positions that agree.
"""
from __future__ import annotations

import argparse

import numpy as np

from config import ConfigError, exit_on_error

DEFAULT_PROMPTS = (
    "The quick brown fox",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The capital of France is",
    "1, 2, 3, 4,",
)


def hf_greedy_sequences(hf_dir: str, prompts, new_tokens: int):
    """Returns (token sequences, transformers' logits at every position of each)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sequences, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            sequences.append(out[0].tolist())
            logits.append(model(out).logits[0].numpy())
    return sequences, logits


def llama_cpp_logits(gguf_path: str, sequences) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(gguf_path, n_ctx=max(len(s) for s in sequences) + 8, logits_all=True, verbose=False,
                          n_gpu_layers=0)
    result = []
    try:
        for sequence in sequences:
            llm.reset()
            llm.eval(sequence)
            result.append(np.array(llm.scores[: len(sequence)]))
    finally:
        llm.close()
    return result


def compare(hf_dir: str, gguf_paths: list[str], prompts=DEFAULT_PROMPTS, new_tokens: int = 24) -> list[dict]:
    """Per GGUF: share of positions whose next-token argmax equals transformers' on the HF folder, and the
    largest logit difference relative to the logits' spread (argmax alone is blind to small layout bugs)."""
    sequences, reference = hf_greedy_sequences(hf_dir, prompts, new_tokens)
    results = []
    for path in gguf_paths:
        predicted = llama_cpp_logits(path, sequences)
        agree = sum(int((p.argmax(-1) == r.argmax(-1)).sum()) for p, r in zip(predicted, reference))
        worst = max(float(np.abs(p - r).max() / r.std()) for p, r in zip(predicted, reference))
        results.append({"gguf": path, "argmax_agreement": agree / sum(len(r) for r in reference),
                        "max_relative_logit_error": worst})
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve.roundtrip", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint folder")
    p.add_argument("--gguf", required=True, nargs="+", help="GGUF file(s) converted from it")
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    if args.new_tokens < 1:
        raise ConfigError(f"--new-tokens {args.new_tokens} must be at least 1")
    for result in compare(args.model, args.gguf, new_tokens=args.new_tokens):
        print(f"{result['gguf']}: next-token argmax agrees with transformers at {result['argmax_agreement']:.1%} "
              f"of positions; max logit error {result['max_relative_logit_error']:.3f} x the logits' std")


if __name__ == "__main__":
    exit_on_error(main)
