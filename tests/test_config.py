"""The config schema: typed overrides, every problem listed with a suggestion, profiles."""
import subprocess
import sys

import pytest
from conftest import ROOT

from config import ConfigError, load_config


def test_overrides_are_typed_from_the_schema():
    cfg = load_config(None, ["lora.rank=8", "max_steps=3", "learning_rate=1e-4", "adam_betas=[0.8, 0.9]",
                             "activation_checkpointing=selective", "lora.target_modules=q_proj,v_proj", "resume=false"])
    assert cfg.lora.rank == 8 and cfg.max_steps == 3 and cfg.learning_rate == 1e-4
    assert cfg.adam_betas == [0.8, 0.9] and cfg.activation_checkpointing == "selective"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.resume == "false"


def test_every_problem_is_listed_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1.0\nlora: {rnk: 4}\nnum_epochs: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad), ["fsdp_options.sharding_strategy=FOO", "effective_batch_size=0"])
    msg = str(e.value)
    for part in ("unknown config key 'lerning_rate'; did you mean 'learning_rate'",
                 "did you mean 'lora.rank'", "'num_epochs' must be an integer",
                 "must be one of ['FULL_SHARD'", "effective_batch_size must be at least 1"):
        assert part in msg
    assert msg.count("\n  - ") == 5


def test_speed_settings_are_checked_and_the_old_checkpointing_key_is_pointed_to_its_new_name():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["num_threads=-1", "fsdp_options.prefetch_layers=-2", "random_init=true", "lora.rank=8",
                           "activation_checkpointing=some", "gradient_checkpointing=true"])
    msg = str(e.value)
    for part in ("num_threads must be 0 (automatic) or a positive count, got -1",
                 "fsdp_options.prefetch_layers must be 0 or more, got -2",
                 "random_init with lora.rank > 0 would train adapters on a random base",
                 "'activation_checkpointing' must be one of ['none', 'full', 'selective']",
                 "unknown config key 'gradient_checkpointing'; did you mean 'activation_checkpointing'?"):
        assert part in msg


def test_profiles_set_defaults_that_config_and_command_line_override(tmp_path):
    cfg = load_config(None, profile="cpu")
    assert cfg.profile == "cpu" and cfg.lora.rank == 32
    own = tmp_path / "run.yaml"
    own.write_text("profile: multi-gpu\nlearning_rate: 3.0e-5\n")
    cfg = load_config(str(own), ["num_epochs=2"])
    assert cfg.profile == "multi-gpu" and cfg.distributed_backend == "fsdp" and cfg.lora.rank == 0
    assert cfg.learning_rate == 3e-5 and cfg.num_epochs == 2
    assert load_config(str(own), profile="cpu").lora.rank == 32
    assert load_config(None, profile="auto").profile == "cpu"  # no GPU here
    with pytest.raises(ConfigError, match="profile 'gpu9' not found.*cpu, multi-gpu, single-gpu"):
        load_config(None, profile="gpu9")


def test_cli_reports_config_errors_without_traceback():
    r = subprocess.run([sys.executable, "train.py", "--config", "run.yaml", "lerning_rate=1", "lora.rank=x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean 'learning_rate'" in r.stderr and "lora.rank" in r.stderr
    assert "Traceback" not in r.stderr


def test_readme_config_reference_is_generated_from_the_schema():
    from config import reference_markdown
    assert reference_markdown() in (ROOT / "README.md").read_text()
