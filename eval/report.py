"""Result files shared by eval.mmlu and eval.mt_bench: atomic JSON, markdown tables, an optional PNG chart."""
from __future__ import annotations

import json
import os
from pathlib import Path

from config import ConfigError


def write_atomic(path: str, text: str | bytes) -> None:
    """Write to a temp name in the same folder, then rename: a crash never leaves a complete-looking file."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise ConfigError(f"cannot write '{path}': folder '{target.parent}' does not exist (create it first)")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str, result: dict) -> None:
    write_atomic(path, json.dumps(result, indent=2) + "\n")


def scores_table(scores: dict[str, float], overall: float | None, header: str, digits: int = 4) -> str:
    lines = [f"| {header} | score |", "|---|---:|"]
    lines += [f"| {name} | {value:.{digits}f} |" for name, value in scores.items()]
    lines.append(f"| **overall** | **{'n/a' if overall is None else f'{overall:.{digits}f}'}** |")
    return "\n".join(lines)


def comparison(base: dict[str, float], candidate: dict[str, float]) -> dict:
    """Per-name deltas for names both runs scored; improvements and regressions sorted by size."""
    deltas = {name: candidate[name] - base[name] for name in candidate if name in base}
    return {
        "delta": deltas,
        "improvements": sorted((n for n, d in deltas.items() if d > 0), key=lambda n: -deltas[n]),
        "regressions": sorted((n for n, d in deltas.items() if d < 0), key=lambda n: deltas[n]),
    }


def comparison_table(base: dict[str, float], candidate: dict[str, float], header: str, digits: int = 4) -> str:
    lines = [f"| {header} | base | candidate | delta | |", "|---|---:|---:|---:|---|"]
    for name in candidate:
        if name in base:
            delta = candidate[name] - base[name]
            mark = "improved" if delta > 0 else "regressed" if delta < 0 else ""
            lines.append(f"| {name} | {base[name]:.{digits}f} | {candidate[name]:.{digits}f} | {delta:+.{digits}f} | {mark} |")
    return "\n".join(lines)


def plot_scores(path: str, series: dict[str, dict[str, float]], ylabel: str) -> None:
    """Grouped bar chart: one bar group per name, one bar per series (e.g. base and candidate)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    names = list(next(iter(series.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4))
    for i, (label, scores) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], [scores.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
