"""Mix messages datasets into one training JSONL by sample counts or ratios.

recipe.yaml (paths relative to the recipe's folder):

    output: mixed.jsonl
    seed: 42
    datasets:
      - path: out/train.jsonl
        samples: 500        # exactly this many (repeats the dataset when it holds fewer)
      - path: other.jsonl
        ratio: 0.5          # this fraction of the dataset (above 1 upsamples)
    exclude: [out/test.jsonl]   # optional: samples whose content matches these (the held-out split) are dropped
"""
from __future__ import annotations

import difflib
import json
import os
import random
from pathlib import Path

import yaml

from config import ConfigError

ROLES = ("system", "user", "assistant", "pretraining")  # what tokenize_data.py accepts
RECIPE_KEYS = ("output", "seed", "datasets", "exclude")
DATASET_KEYS = ("path", "samples", "ratio")


def message_problem(record) -> str | None:
    """Why a JSONL record is not a usable chat sample, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return "expected an object with a non-empty 'messages' list"
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] needs a 'role' of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}] needs a string 'content'"
    if not any(m["role"] in ("assistant", "pretraining") and m["content"].strip() for m in record["messages"]):
        return "no non-empty assistant (or pretraining) message to train on"
    return None


def read_messages(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"dataset '{path}' not found (paths in a recipe are relative to the recipe's folder)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
            if problem := message_problem(record):
                raise ConfigError(f"{path}:{lineno}: {problem}")
            records.append(record)
    return records


def write_jsonl_atomic(path: Path, records: list[dict]):
    """Readers never see a half-written file: write a temp file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unknown(keys, allowed, where: str):
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key '{key}'; {hint}")


def load_recipe(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' not found")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("datasets"), list) or not recipe["datasets"]:
        raise ConfigError(f"{path}: needs a 'datasets' list, e.g. datasets: [{{path: out/train.jsonl, ratio: 1.0}}]")
    _unknown(recipe, RECIPE_KEYS, str(path))
    exclude = recipe.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise ConfigError(f"{path}: exclude must be a list of JSONL paths, e.g. exclude: [generated/test.jsonl]")
    if not isinstance(recipe.get("seed", 0), int):
        raise ConfigError(f"{path}: seed must be an integer")
    for i, entry in enumerate(recipe["datasets"]):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ConfigError(f"{where}: needs a 'path' to a messages JSONL file")
        _unknown(entry, DATASET_KEYS, where)
        if ("samples" in entry) == ("ratio" in entry):
            raise ConfigError(f"{where}: give exactly one of 'samples' (a count) or 'ratio' (a fraction, e.g. 0.5)")
        samples, ratio = entry.get("samples", 0), entry.get("ratio", 0.0)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ConfigError(f"{where}: samples must be a whole number >= 0, got {samples!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
            raise ConfigError(f"{where}: ratio must be a number >= 0, got {ratio!r}")
    return recipe


def draw(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    """`count` records: whole copies of the dataset, then a random part of it."""
    if not records:
        return []
    copies, rest = divmod(count, len(records))
    return records * copies + rng.sample(records, rest)


def mix(recipe_path: str | Path, output: str | Path | None = None) -> tuple[Path, list[tuple[str, int, int]]]:
    """Write the mixed JSONL; returns its path and (dataset, available, taken) per dataset, the excluded
    samples last as ("excluded (held out)", held-out samples, samples removed)."""
    from sdg.heldout import record_hash
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    base = recipe_path.parent
    out = Path(output) if output else base / recipe.get("output", "mixed.jsonl")
    rng = random.Random(recipe.get("seed", 42))
    mixed, report = [], []
    held = {record_hash(r) for path in recipe.get("exclude", []) for r in read_messages(base / path)}
    removed = 0
    for entry in recipe["datasets"]:
        records = read_messages(base / entry["path"])
        if held:  # held-out evaluation samples never reach training, whatever a dataset holds
            kept = [r for r in records if record_hash(r) not in held]
            removed, records = removed + len(records) - len(kept), kept
        count = entry["samples"] if "samples" in entry else round(entry["ratio"] * len(records))
        if count and not records:
            raise ConfigError(f"{base / entry['path']}: empty dataset, cannot draw {count} samples from it")
        mixed += draw(records, count, rng)
        report.append((entry["path"], len(records), count))
    if not mixed:
        raise ConfigError(f"{recipe_path}: the recipe selects no samples; raise 'samples' or 'ratio'")
    rng.shuffle(mixed)
    write_jsonl_atomic(out, mixed)
    if recipe.get("exclude"):
        report.append(("excluded (held out)", len(held), removed))
    return out, report
