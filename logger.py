"""Rank-0 training log: a progress bar, metrics.jsonl (one line per optimizer step), optional TensorBoard, W&B
and MLflow (the same fields every step, the config at start, the final checkpoint at the end).

    python logger.py plot RUN_DIR     # RUN_DIR/metrics.jsonl -> RUN_DIR/metrics.png (loss, lr, throughput)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out_dir: str, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 tensorboard: bool = False, cfg=None, run_ids: dict | None = None):
        self.enabled = enabled
        # tracker run ids, kept in the full state (train.py) so that a resumed run continues the same tracker runs
        self.run_ids = dict(run_ids or {})
        self.wandb = self.mlflow = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(out_dir) / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if cfg is not None and cfg.wandb_project:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name,
                                    id=self.run_ids.get("wandb"), resume="allow", dir=out_dir,
                                    config=dataclasses.asdict(cfg))
            self.run_ids["wandb"] = self.wandb.id
        if cfg is not None and (cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name):
            import mlflow
            self.mlflow = mlflow
            # a file: store is the offline store mlflow-skinny opens (sqlite needs SQLAlchemy); MLflow 3 refuses it
            # unless opted in, and a user who names one has chosen it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if cfg.mlflow_tracking_uri:
                mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            if cfg.mlflow_experiment_name:
                mlflow.set_experiment(cfg.mlflow_experiment_name)
            resumed = "mlflow" in self.run_ids
            run = mlflow.start_run(run_id=self.run_ids.get("mlflow"), run_name=None if resumed else cfg.mlflow_run_name)
            self.run_ids["mlflow"] = run.info.run_id
            if not resumed:  # MLflow params are write-once: the resumed run keeps those of its start
                mlflow.log_params(flatten(dataclasses.asdict(cfg)))

    def log(self, metrics: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        step = metrics["step"]
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(values, step=step)

    def message(self, text: str):
        if self.enabled:
            tqdm.write(text)

    def close(self, final_checkpoint: str | None = None):
        """final_checkpoint: the last HF checkpoint of a finished run; without it (a stop or a failure) the tracker
        runs are marked unfinished, to be continued by a resume."""
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                if final_checkpoint:
                    self.wandb.summary["final_checkpoint"] = final_checkpoint
                self.wandb.finish(exit_code=0 if final_checkpoint else 1)
            if self.mlflow:
                if final_checkpoint:
                    self.mlflow.set_tag("final_checkpoint", final_checkpoint)
                self.mlflow.end_run("FINISHED" if final_checkpoint else "KILLED")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'lora': {'rank': 8}} -> {'lora.rank': 8}: the config as MLflow params, dotted as on the command line."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


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
