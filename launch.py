"""Train from Python (scripts, notebooks), as InstructLab's `run_training`:

    from launch import run_training
    status, out_dir = run_training({"model_path": "...", "data_path": "train.jsonl", "num_epochs": 2}, nproc_per_node=2)

The config (a Config, or a dict of keys: ours, or InstructLab TrainingArgs' names) is validated here, written to
OUT_DIR/launch_config.yaml, and trained by `torchrun train.py --config FILE` in a subprocess (list argv, no shell).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import subprocess
import sys
from pathlib import Path

import yaml

from config import Config, ConfigError, load_config
from eval.report import write_atomic

TRAIN = Path(__file__).resolve().parent / "train.py"
# InstructLab TrainingArgs names that differ from ours
RENAMED = {"adamw_weight_decay": "weight_decay", "adamw_betas": "adam_betas", "data_process_num_cpu_procs": "num_proc"}
# InstructLab keys with no minilab counterpart: accepted at the values minilab behaves as anyway, refused otherwise
AS_IS = {"is_padding_free": (True, False),  # packing is always padding-free
         "process_data": (True,),  # train.py tokenizes whenever data_output_dir lacks the data
         "accelerate_full_state_at_epoch": (True, False),  # a full state is saved with every checkpoint
         "use_legacy_tmpl": (False,), "use_dolomite": (False,), "use_liger": (False,), "adamw_eps": (1e-8,),
         "pretraining_config": (None,)}
IGNORED = ("log_level", "logger_type", "tensorboard_log_dir")  # logging is ours: see the tracker keys in README


def from_instructlab(args: dict) -> dict:
    """Our keys or InstructLab TrainingArgs' (a model_dump() too) -> our keys. None means our default; enums become
    their values."""
    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if v is not None}
        return list(value) if isinstance(value, tuple) else value

    ours = [f.name for f in dataclasses.fields(Config)]
    valid = ours + list(RENAMED) + list(AS_IS) + list(IGNORED)
    out, problems = {}, []
    for key, value in args.items():
        value = plain(value)
        if key in AS_IS:
            if value not in AS_IS[key]:
                problems.append(f"'{key}={value!r}' has no minilab equivalent; it works only as {AS_IS[key]}")
        elif key in IGNORED:
            if key == "tensorboard_log_dir" and value or key == "logger_type" and "tensorboard" in str(value):
                out["tensorboard"] = True  # events go to ckpt_output_dir/tensorboard
        elif key in RENAMED or key in ours:
            if value is not None:
                out[RENAMED.get(key, key)] = value
        else:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            problems.append(f"unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    if isinstance(out.get("deepspeed_options"), dict):  # its DeepSpeed-format saves: our full state comes with each
        out["deepspeed_options"].pop("save_samples", None)
    if problems:
        raise ConfigError("invalid training arguments:\n  - " + "\n  - ".join(problems))
    return out


def run_training(config: Config | dict, nproc_per_node: int | str = 1, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str | None = None, master_port: int | None = None) -> tuple[int, str]:
    """Train in `nproc_per_node` processes per node; returns (exit status, ckpt_output_dir)."""
    if hasattr(config, "model_dump"):  # an InstructLab TrainingArgs object
        config = config.model_dump()
    keys = dataclasses.asdict(config) if isinstance(config, Config) else from_instructlab(config)
    cfg = load_config(None, keys)  # every problem now, not in each process
    for name, value, least in (("nproc_per_node", nproc_per_node, 1), ("nnodes", nnodes, 1),
                               ("node_rank", node_rank, 0), ("master_port", master_port, 1)):
        if name == "nproc_per_node" and value in ("gpu", "auto") or name == "master_port" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name} must be an integer of at least {least}, got {value!r}")
    out_dir = Path(cfg.ckpt_output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "launch_config.yaml"
    write_atomic(str(config_file), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")
    else:  # values joined to their options (--x=VALUE), so none can pass for an option of its own
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr or '127.0.0.1'}",
                f"--master-port={master_port or 29500}"]
    cmd += [str(TRAIN), f"--config={config_file.resolve()}"]
    return subprocess.run(cmd).returncode, str(out_dir)
