"""`python -m serve`: one command from a checkpoint to an OpenAI-compatible endpoint.

A GGUF file is served in-process by llama-cpp-python's server. An HF folder goes to vLLM when CUDA and vllm are
present; otherwise it is converted to GGUF once (cached next to the checkpoint) and served by llama.cpp.
No --model = the embedded SmolLM2 GGUF. If MINILAB_API_KEY is set, every request must carry it as a bearer token.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys

from config import EMBEDDED_MODEL, ConfigError, embedded_gguf_path, exit_on_error
from serve.background import API_KEY_ENV, base_url_for, wait_until_healthy

BACKENDS = ("auto", "llama-cpp", "vllm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or HF checkpoint folder (default: embedded SmolLM2 GGUF)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ctx", type=int, default=2048, help="context length in tokens")
    args = p.parse_args(argv)
    if args.ctx < 16:
        raise ConfigError(f"--ctx {args.ctx} is too small; use at least 16 (for example --ctx 2048)")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a valid TCP port; use 1-65535 (for example --port 8000)")
    return args


def resolve_model(model: str | None) -> str:
    if model is None or model == EMBEDDED_MODEL:
        return embedded_gguf_path()
    if not os.path.exists(model):
        raise ConfigError(f"model '{model}' not found; pass a .gguf file or an HF checkpoint folder with config.json")
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise ConfigError(f"'{model}' is a folder without config.json; pass an HF checkpoint folder or a .gguf file")
        return model
    with open(model, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"'{model}' is not a GGUF file (bad magic bytes: corrupt, truncated or another format); "
                              "convert an HF folder with: python -m serve.convert --model DIR --output FILE.gguf")
    return model


def cuda_with_vllm() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def pick_backend(model_path: str, backend: str) -> str:
    is_hf = os.path.isdir(model_path)
    if backend == "vllm":
        if not is_hf:
            raise ConfigError(f"the vllm backend serves HF checkpoint folders, not '{model_path}'; "
                              "use --backend llama-cpp for GGUF files")
        if not cuda_with_vllm():
            raise ConfigError("--backend vllm needs a CUDA GPU and the 'vllm' package (pip install vllm); "
                              "on this machine use --backend llama-cpp (the checkpoint is converted to GGUF)")
        return "vllm"
    if backend == "auto" and is_hf and cuda_with_vllm():
        return "vllm"
    return "llama-cpp"


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails in a second, and uvicorn serves on this very socket."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # allows restart over TIME_WAIT, not over a listener
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; "
                          f"stop the other server or pick another port with --port {port + 1}") from None
    sock.listen(128)
    return sock


def gguf_chat_format(gguf_path: str) -> str | None:
    """Force the model's own template: llama-cpp-python would otherwise swap in a built-in one it guesses."""
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise ConfigError(f"'{gguf_path}' is not a readable GGUF file ({e}); re-download or re-convert it") from None
    return "chat_template.default" if "tokenizer.chat_template" in reader.fields else None


def with_props(app):
    """Answer `GET /props` as llama.cpp's own server does: `total_slots` (llama-cpp-python computes one request at
    a time) tells clients how many to send at once. It also counts the completion requests received, those open now
    and the most ever open at once, and those cut off (the reply's last byte never sent: the client left and a
    stream stopped), so what a client's queueing, retries and exits cost the server can be read from outside."""
    props = {"total_slots": 1, "completion_requests": 0, "open_requests": 0, "max_open_requests": 0,
             "cut_requests": 0}

    async def app_with_props(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/props":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(props).encode()})
            return
        if scope["type"] != "http" or not scope["path"].endswith("/completions"):
            return await app(scope, receive, send)
        props["completion_requests"] += 1
        props["open_requests"] += 1
        props["max_open_requests"] = max(props["max_open_requests"], props["open_requests"])
        answered = False

        async def send_and_count(message):  # closed once its last byte is sent: the client may ask again then
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body") and not answered:
                answered = True
                props["open_requests"] -= 1
            await send(message)
        try:
            await app(scope, receive, send_and_count)
        finally:
            if not answered:
                props["open_requests"] -= 1
                props["cut_requests"] += 1
    return app_with_props


def serve_llama_cpp(gguf_path: str, host: str, port: int, ctx: int, api_key: str | None) -> None:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    sock = bind_listening_socket(host, port)
    chat_format = gguf_chat_format(gguf_path)
    # Explicit values everywhere: pydantic-settings would otherwise read stray HOST/PORT/API_KEY env vars.
    server_settings = ServerSettings(host=host, port=port, api_key=api_key, interrupt_requests=False)
    model_settings = ModelSettings(model=gguf_path, model_alias=os.path.basename(gguf_path), n_ctx=ctx,
                                   chat_format=chat_format, n_gpu_layers=0, verbose=False)
    try:
        app = create_app(server_settings=server_settings, model_settings=[model_settings])
    except ValueError as e:
        sock.close()
        raise ConfigError(f"llama.cpp could not load '{gguf_path}' ({e}); the file may be corrupt or use an "
                          "architecture this llama.cpp build does not know; re-convert it with serve.convert") from None
    # lifespan off: the app has no startup hooks, and on Ctrl-C starlette would log a spurious CancelledError.
    server = uvicorn.Server(uvicorn.Config(with_props(app), host=host, port=port, log_level="warning",
                                           lifespan="off"))
    print(f"serving {gguf_path} with llama.cpp at {base_url_for(host, port)} (Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])  # uvicorn finishes in-flight requests, then re-raises the Ctrl-C
    except KeyboardInterrupt:
        pass
    print("server stopped", flush=True)


def serve_vllm(hf_dir: str, host: str, port: int, ctx: int, api_key: str | None) -> None:
    bind_listening_socket(host, port).close()  # fail fast on a busy port instead of after minutes of loading
    env = dict(os.environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # via the environment so the key never shows in `ps`
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir, "--host", host,
           "--port", str(port), "--max-model-len", str(ctx)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        wait_until_healthy(base_url_for(host, port), api_key, proc, timeout_s=1800.0, log_path=None)
        print(f"serving {hf_dir} with vLLM at {base_url_for(host, port)} (Ctrl-C stops)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print("server stopped", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    model_path = resolve_model(args.model)
    backend = pick_backend(model_path, args.backend)
    api_key = os.environ.get(API_KEY_ENV) or None
    if backend == "vllm":
        serve_vllm(model_path, args.host, args.port, args.ctx, api_key)
        return
    if os.path.isdir(model_path):
        from serve.convert import cached_gguf

        model_path = cached_gguf(model_path)
    serve_llama_cpp(model_path, args.host, args.port, args.ctx, api_key)


if __name__ == "__main__":
    try:
        exit_on_error(main)
    except KeyboardInterrupt:  # Ctrl-C while loading or converting: stop quietly, nothing half-written is kept
        sys.exit(130)
