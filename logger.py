"""Rank-0 training log: a progress bar, metrics.jsonl (one line per optimizer step), optional TensorBoard.

    python logger.py plot RUN_DIR     # RUN_DIR/metrics.jsonl -> RUN_DIR/metrics.png (loss, lr, throughput)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out_dir: str, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 tensorboard: bool = False):
        self.enabled = enabled
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(out_dir) / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def log(self, metrics: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        if self.tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, metrics["step"])

    def message(self, text: str):
        if self.enabled:
            tqdm.write(text)

    def close(self):
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.tb:
                self.tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} not found: pass the ckpt_output_dir of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: str, out: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "lr", "tokens_per_s"), ("loss", "learning rate", "tokens/s")):
        ax.plot(steps, [r[key] for r in rows], marker="." if len(rows) < 50 else None, label=key)
        validated = [r for r in rows if "val_loss" in r]
        if key == "loss" and validated:  # held-out loss (validation_split) on the same axis
            ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], marker="o", label="val_loss")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out or Path(run_dir) / "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "plot":
        sys.exit("usage: python logger.py plot RUN_DIR")
    print(plot(sys.argv[2]))
