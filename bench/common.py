"""Shared by the benchmarks: the environment record (hardware, versions, commit), synthetic conversations with
lognormal lengths, and writing a result as JSON next to what it printed."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the a model data token train river cloud garden music number light stone paper window engine bright quick "
         "small large simple careful answer question because however therefore example second first green blue "
         "matrix vector learning system result value function memory process thread").split()


def environment(extra_packages: tuple[str, ...] = ()) -> dict:
    """Hardware, versions and commit; extra_packages adds the versions of those modules."""
    import importlib

    import tokenizers
    import torch
    import transformers
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    env = {"commit": commit, "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__,
           "load_avg_1m": os.getloadavg()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for name in extra_packages:
        env[name] = importlib.import_module(name).__version__
    return env


def run_train_py(overrides: list[str], metrics_file: Path, timeout_s: float, nproc: int = 1,
                 stop_after: int = 0) -> dict:
    """train.py as users run it (under torchrun when nproc > 1). Notes when each metrics line appears, as an
    outside clock for its steps; stop_after > 0 kills the run once that many steps are logged (no final save)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty run can never block on a full pipe
    proc = subprocess.Popen([*launcher, "train.py", "--config", "", *overrides], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    arrivals: list[float] = []
    arrival_errors: list[float] = []  # each line appeared between the look before and the look that saw it
    deadline = time.monotonic() + timeout_s
    last_look = time.perf_counter()
    try:
        while proc.poll() is None and not (stop_after and len(arrivals) >= stop_after):
            if time.monotonic() > deadline:
                raise SystemExit(f"error: train.py ran past {timeout_s:.0f}s; lower the sizes or raise --timeout")
            if metrics_file.exists():
                with open(metrics_file) as f:
                    lines = f.read().count("\n")  # complete lines only
                now = time.perf_counter()
                arrivals += [now] * (lines - len(arrivals))
                arrival_errors += [now - last_look] * (lines - len(arrival_errors))
            last_look = time.perf_counter()
            time.sleep(0.05)  # looks take CPU from train.py: one every 5 ms cost it up to 3% on 2 cores
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
            proc.wait()
    log.seek(0)
    output = log.read()
    log.close()
    if proc.returncode != 0 and not stop_after:
        raise SystemExit(f"error: train.py failed (exit {proc.returncode}):\n{output[-3000:]}")
    text = metrics_file.read_text() if metrics_file.exists() else ""
    rows = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
    if stop_after and len(rows) < stop_after:
        raise SystemExit(f"error: train.py stopped after {len(rows)} of {stop_after} steps:\n{output[-3000:]}")
    return {"rows": rows, "arrivals": arrivals, "arrival_errors": arrival_errors, "output": output}


def lognormal_lengths(n: int, median: float, sigma: float, low: int, high: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), low, high).astype(np.int64)


def conversations(n: int, median_words: int, seed: int = 0, sigma: float = 0.6) -> list[dict]:
    """System + user + assistant turns whose total word count is lognormal around median_words."""
    rng = np.random.default_rng(seed)
    totals = lognormal_lengths(n, median_words, sigma, 8, 20 * median_words, seed + 1)
    rows = []
    for total in totals.tolist():
        words = rng.choice(WORDS, size=total).tolist()
        user_words = max(2, total // 4)
        rows.append({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": " ".join(words[:user_words]) + "?"},
            {"role": "assistant", "content": " ".join(words[user_words:]).capitalize() + "."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def save_result(name: str, result: dict, path: str | None = None) -> Path:
    """The result as JSON at path (default runs/bench/<name>.json), written whole: temp name, then rename."""
    out = Path(path) if path else ROOT / "runs" / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return out
