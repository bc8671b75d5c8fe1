"""Result files shared by the evaluations: atomic JSON, markdown tables, PNG charts, 95% intervals."""
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
    _save(fig, path)


def _save(fig, path: str) -> None:
    """Written under a temp name and renamed: a killed run never leaves half a PNG."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def proportion(correct: int, n: int) -> dict:
    """An accuracy with its 95% Wilson score interval (scipy), which stays inside [0, 1] for small n."""
    from scipy.stats import binomtest

    if n == 0:
        return {"value": None, "n": 0, "low": None, "high": None}
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": correct / n, "n": n, "correct": correct, "low": float(ci.low), "high": float(ci.high)}


def ratio_bootstrap(sums: list[float], counts: list[int], seed: int = 0) -> dict:
    """sum(sums) / sum(counts) (e.g. NLL per token over samples) with a 95% percentile bootstrap over samples."""
    import numpy as np
    from scipy.stats import bootstrap

    if not counts:
        return {"value": None, "n": 0, "low": None, "high": None}
    value = float(sum(sums) / sum(counts))
    if len(counts) < 2:
        return {"value": value, "n": len(counts), "low": None, "high": None}
    ci = bootstrap((np.asarray(sums, float), np.asarray(counts, float)), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis),
                   paired=True, vectorized=True, n_resamples=2000, method="percentile", confidence_level=0.95,
                   random_state=np.random.default_rng(seed)).confidence_interval
    return {"value": value, "n": len(counts), "low": float(ci.low), "high": float(ci.high)}


def verdict(base: dict, trained: dict, higher_is_better: bool = True) -> str:
    """improved / worse only when the 95% intervals do not overlap; otherwise the data cannot tell."""
    if None in (base.get("low"), base.get("high"), trained.get("low"), trained.get("high")):
        return "not measurable"
    better, worse = (trained["low"] > base["high"], trained["high"] < base["low"])
    if not higher_is_better:
        better, worse = worse, better
    return "improved" if better else "worse" if worse else "no clear change"


def plot_intervals(path: str, rows: dict[str, tuple[dict, dict]], ylabel: str) -> None:
    """Base vs trained per metric: bars with 95% interval whiskers, on one axis (accuracies 0-1, NLL in nats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 2), 4.5))
    for i, label in enumerate(("base", "trained")):
        values, errors = [], [[], []]
        for name in names:
            score = rows[name][i]
            value = score.get("value") or 0.0
            values.append(value)
            errors[0].append(value - score["low"] if score.get("low") is not None else 0.0)
            errors[1].append(score["high"] - value if score.get("high") is not None else 0.0)
        ax.bar([x + i * 0.4 for x in range(len(names))], values, 0.4, yerr=errors, capsize=4, label=label)
    ax.set_xticks([x + 0.2 for x in range(len(names))], [n.replace(": ", "\n") for n in names], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title("base vs trained, 95% intervals")
    ax.legend()
    _save(fig, path)
