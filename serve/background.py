"""Run `python -m serve` in the background for sdg/ and eval/: start, wait until it answers, always stop it.

    with running_server() as base_url:          # embedded SmolLM2 on a free loopback port
        client = openai.OpenAI(base_url=base_url, api_key="unused")
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from config import ConfigError

API_KEY_ENV = "MINILAB_API_KEY"
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def base_url_for(host: str, port: int) -> str:
    """The URL a client on this machine uses; a wildcard bind is reached through loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def last_lines(log_path: str | None, n: int = 25) -> str:
    if not log_path or not os.path.exists(log_path):
        return "(no log captured)"
    with open(log_path, errors="replace") as f:
        return "".join(f.readlines()[-n:]).rstrip() or "(log is empty)"


def is_healthy(base_url: str, api_key: str | None) -> bool:
    request = urllib.request.Request(base_url.rstrip("/") + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # refused, reset, timed out, or HTTP errors while starting
        return False


def wait_until_healthy(base_url: str, api_key: str | None, proc: subprocess.Popen, timeout_s: float,
                       log_path: str | None) -> None:
    """Poll until /models answers 200; raise ConfigError with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"the server exited with code {proc.returncode} before it was ready; "
                              f"its last log lines:\n{last_lines(log_path)}")
        if is_healthy(base_url, api_key):
            return
        time.sleep(0.25)
    raise ConfigError(f"the server at {base_url} was not ready after {timeout_s:.0f}s (raise startup_timeout_s for "
                      f"big models); its last log lines:\n{last_lines(log_path)}")


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # the server's own graceful shutdown path, same as Ctrl-C
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def running_server(model: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                   ctx: int = 2048, api_key: str | None = None, startup_timeout_s: float = 180.0,
                   log_path: str | None = None) -> Iterator[str]:
    """Start `python -m serve` in a subprocess (model None = embedded GGUF; port None = a free port),
    wait until it answers, yield its base URL 'http://127.0.0.1:PORT/v1', stop it on exit (also on error).

    api_key None keeps whatever MINILAB_API_KEY the environment has (none = open server).
    """
    port = free_port(host) if port is None else port
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    cmd = [sys.executable, "-m", "serve", "--host", host, "--port", str(port), "--ctx", str(ctx)]
    if model is not None:
        cmd += ["--model", os.path.abspath(model) if os.path.exists(model) else model]
    owns_log = log_path is None
    if owns_log:
        fd, log_path = tempfile.mkstemp(prefix="minilab-serve-", suffix=".log")
        os.close(fd)
    base_url = base_url_for(host, port)
    with open(log_path, "w") as log:
        # Own session: a Ctrl-C meant for the caller does not race our orderly stop below.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        wait_until_healthy(base_url, api_key, proc, startup_timeout_s, log_path)
        yield base_url
    finally:
        stop(proc)
        if owns_log:
            os.remove(log_path)
