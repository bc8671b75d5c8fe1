"""serve/: a real llama.cpp server on loopback with the embedded SmolLM2, driven through the real openai client,
plus HF -> GGUF conversion by llama.cpp's own converter, checked against transformers on a tiny trained checkpoint
and on a tiny random model of each architecture family llama.cpp runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from config import ConfigError, embedded_gguf_path
from conftest import build_tiny_family
from serve.background import running_server
from serve.convert import CACHED_NAME, convert
from serve.roundtrip import compare

REPO = str(Path(__file__).resolve().parent.parent)
API_KEY = "test-key-123"
TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a small village, there lived a "
              "baker who made bread every morning. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + "
              "fibonacci(n - 2). The capital of France is Paris. 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.")


def run_cli(*args, env_extra=None, timeout=120, stdin_text=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin_text)


@pytest.fixture(scope="module")
def real_tokenizer():
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def server():
    with running_server(api_key=API_KEY, ctx=1024, startup_timeout_s=120) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=API_KEY, timeout=60, max_retries=0)


def train_tiny(arch: str, tokenizer, out: Path, **extra) -> Path:
    """A 2-layer model with GQA and the real SmolLM2 tokenizer, trained a few steps so its argmaxes are decisive."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    model = getattr(transformers, f"{arch}ForCausalLM")(config)
    ids = torch.tensor([tokenizer(TRAIN_TEXT).input_ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, real_tokenizer):
    return train_tiny("Llama", real_tokenizer, tmp_path_factory.mktemp("tiny-llama"), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {q: convert(str(tiny_checkpoint), str(out / f"tiny-{q}.gguf"), q) for q in ("F16", "Q4_K_M")}


# --- the server, through the openai client -------------------------------------------------------------------

def test_chat_uses_the_models_own_template(client, real_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 12
    # SmolLM2's template injects its default system prompt: the token count proves that template was applied
    templated = real_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert reply.usage.prompt_tokens == len(templated["input_ids"])


def test_completions_are_deterministic_at_temperature_zero(client):
    first = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
    second = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                       temperature=0)
    assert first.choices[0].text.strip()
    assert first.choices[0].text == second.choices[0].text


def test_streaming_matches_the_whole_reply(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
    pieces = [c for c in chunks if c]
    assert len(pieces) > 1, "a streamed reply arrives in several chunks"
    assert "".join(pieces) == whole.choices[0].message.content


def test_wrong_or_missing_api_key_is_rejected(server):
    for key in ("wrong-key", "none"):
        bad = openai.OpenAI(base_url=server, api_key=key, timeout=30, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_chat_client_streams_and_keeps_history(server):
    done = run_cli("serve.chat", "--endpoint", server, "--system", "You are terse.", "--temperature", "0",
                   "--max-tokens", "8", stdin_text="Hello\nSay it again\n/quit\n", env_extra={"MINILAB_API_KEY": API_KEY})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("assistant> ") == 2
    assert all(len(line) > len("assistant> ") for line in done.stdout.splitlines() if line.startswith("assistant> "))


def test_chat_client_reports_a_bad_key(server):
    done = run_cli("serve.chat", "--endpoint", server, stdin_text="/quit\n", env_extra={"MINILAB_API_KEY": "nope"})
    assert done.returncode == 2 and "rejected the API key" in done.stderr and "Traceback" not in done.stderr


def test_serve_prints_its_url_and_stops_cleanly_on_ctrl_c():
    import select
    import signal

    from serve.background import free_port, is_healthy

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(port), "--ctx", "256"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "no ready line within 60 s"
        ready = proc.stdout.readline()  # the server prints this line once the model is loaded and the port is bound
        assert f"http://127.0.0.1:{port}/v1" in ready, ready + proc.stderr.read()
        assert is_healthy(f"http://127.0.0.1:{port}/v1", None)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "server stopped" in out and "Traceback" not in err, err


# --- bad input: clear error, exit code 2, no hang --------------------------------------------------------------

def test_port_in_use_is_a_clear_error(server):
    port = server.rsplit(":", 1)[1].split("/")[0]
    done = run_cli("serve", "--port", port, timeout=60)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("content,expected", [(None, "not found"), (b"not a model", "not a GGUF file")])
def test_missing_or_corrupt_model_is_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    done = run_cli("serve", "--model", str(path), timeout=60)
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr


def test_background_helper_raises_with_the_log_when_the_server_dies(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(embedded_gguf_path()).read_bytes()[:200_000])
    with pytest.raises(ConfigError, match="exited with code 2") as caught:
        with running_server(str(truncated), startup_timeout_s=60):
            pytest.fail("the server should not come up")
    assert "not a readable GGUF file" in str(caught.value)


def test_vllm_without_cuda_is_a_clear_error(tiny_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_cli("serve", "--model", str(tiny_checkpoint), "--backend", "vllm", timeout=60)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--backend llama-cpp" in done.stderr


# --- conversion ------------------------------------------------------------------------------------------------

def test_round_trip_f16_and_q4km_agree_with_transformers(tiny_checkpoint, converted):
    f16, q4 = compare(str(tiny_checkpoint), [converted["F16"], converted["Q4_K_M"]])
    print(f"\nargmax agreement F16 {f16['argmax_agreement']:.1%}, Q4_K_M {q4['argmax_agreement']:.1%}; "
          f"max logit error F16 {f16['max_relative_logit_error']:.4f}, Q4_K_M {q4['max_relative_logit_error']:.4f}")
    assert f16["argmax_agreement"] >= 0.98
    # F16 rounding alone stays far below this; a wrong Q/K layout or tensor mapping lands near 1 or above
    assert f16["max_relative_logit_error"] < 0.05
    assert q4["argmax_agreement"] >= 0.90


# Per family, what the tiny model needs to be a checkpoint llama.cpp runs as transformers does (build_tiny_family
# gives the rest). Gemma-3: llama.cpp takes its fixed 5 sliding : 1 full layer pattern, not config.layer_types,
# so the model follows that pattern (6 layers). Mistral: llama.cpp runs it as Llama, without a sliding window, as
# current Mistral releases ship it (sliding_window null). Phi-3: llama.cpp's converter reads a byte-level BPE
# tokenizer for Phi-3 only when tokenizer_config.json names GPT2Tokenizer, as Phi-4 ships it.
GGUF_FAMILIES = {
    "llama": {},
    "qwen3": {},
    "mistral": {"sliding_window": None},
    # as released Gemma 3 checkpoints: no final softcap (llama.cpp 0.3.16 reads none for gemma3)
    "gemma3": {"num_hidden_layers": 6, "layer_types": None, "final_logit_softcapping": None},
    "phi3": {},
    "olmo2": {},
    "granite": {},
}


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_each_family_llama_cpp_runs_converts_and_agrees_with_transformers(family, real_tokenizer, tmp_path):
    # random weights: the argmax margins of the 49k-token head are small, but F16 moves logits by under 1% of
    # their spread (max_relative_logit_error), so flips stay rare, and a wrong layout or hparam fails both checks
    checkpoint = Path(build_tiny_family(real_tokenizer, tmp_path / "hf", family, **GGUF_FAMILIES[family]))
    if family == "phi3":
        tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
        (checkpoint / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config,
                                                                      "tokenizer_class": "GPT2Tokenizer"}))
    (result,) = compare(str(checkpoint), [convert(str(checkpoint), str(tmp_path / "model.gguf"))], new_tokens=16)
    assert result["argmax_agreement"] >= 0.98 and result["max_relative_logit_error"] < 0.05, result


def test_unknown_pre_tokenizer_is_refused_with_llama_cpps_message(real_tokenizer, tmp_path):
    # transformers 5 reads a Qwen2 folder's tokenizer with Qwen2's own split rules: with SmolLM2's vocabulary that
    # is a tokenizer llama.cpp does not know, so converting it would tokenize differently from transformers
    checkpoint = build_tiny_family(real_tokenizer, tmp_path / "hf", "qwen2")
    with pytest.raises(ConfigError, match="pre-tokenizer was not recognized") as caught:
        convert(checkpoint, str(tmp_path / "model.gguf"))
    assert checkpoint in str(caught.value)
    assert not (tmp_path / "model.gguf").exists()


def test_converted_tokenizer_and_template_match_hf(tiny_checkpoint, converted, real_tokenizer):
    import llama_cpp

    llm = llama_cpp.Llama(converted["F16"], vocab_only=True, verbose=False)
    try:
        text = "<|im_start|>user\nHello wörld 12345 naïve café!\n  x.abc don't\t\ttabs<|im_end|>\n"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == real_tokenizer(text).input_ids
        assert llm.metadata["tokenizer.chat_template"] == real_tokenizer.chat_template
        assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == real_tokenizer.eos_token_id
    finally:
        llm.close()


def test_q4km_loads_and_generates(converted):
    import llama_cpp

    llm = llama_cpp.Llama(converted["Q4_K_M"], n_ctx=128, verbose=False)
    try:
        out = llm.create_completion("The quick brown fox", max_tokens=8, temperature=0)
        assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"]
    finally:
        llm.close()


def test_serving_an_hf_folder_converts_once_and_answers(tiny_checkpoint):
    with running_server(str(tiny_checkpoint), ctx=256, startup_timeout_s=120) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
        out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens > 0
    cached = tiny_checkpoint / CACHED_NAME
    assert cached.exists()
    first_mtime = cached.stat().st_mtime_ns
    with running_server(str(tiny_checkpoint), ctx=256, startup_timeout_s=120):
        pass
    assert cached.stat().st_mtime_ns == first_mtime, "the cached GGUF is reused, not rebuilt"


def test_architecture_llama_cpp_lacks_gets_its_own_message(real_tokenizer, tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=len(real_tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                    num_attention_heads=4, word_embed_proj_dim=64)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    real_tokenizer.save_pretrained(tmp_path / "opt")
    done = run_cli("serve.convert", "--model", str(tmp_path / "opt"), "--output", str(tmp_path / "out.gguf"),
                   timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{tmp_path / 'opt'}: llama.cpp's converter cannot convert" in done.stderr
    assert "Model OPTForCausalLM is not supported" in done.stderr and "--print-supported-models" in done.stderr
    assert not (tmp_path / "out.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["opt"]


def test_corrupt_weights_leave_no_output_behind(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.suffix in (".json", ".jinja"):
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:4096])
    output = tmp_path / "out" / "model.gguf"
    with pytest.raises(ConfigError, match="model.safetensors: not a readable safetensors file"):
        convert(str(broken), str(output), "Q4_K_M")
    assert not output.parent.exists(), "checked before anything is written"
