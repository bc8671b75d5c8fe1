"""The config schema: typed overrides, every problem listed with a suggestion, profiles."""
import subprocess
import sys

import pytest
from conftest import ROOT

from config import STAGE_DEFAULTS, ConfigError, load_config


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


def test_stages_run_alone_get_the_defaults_pipeline_sh_gives_them():
    """The generate/evaluate defaults live in one place (config.STAGE_DEFAULTS under the profile): `python -m sdg
    generate`, eval.mmlu, eval.mt_bench, eval.heldout and serve.chat with --profile get exactly what pipeline.sh
    passes that stage for the same profile, and a flag given wins."""
    from eval.heldout import parse_args as heldout_args
    from eval.mmlu import parse_args as mmlu_args
    from eval.mt_bench import parse_args as mt_bench_args
    from phases import settings
    from sdg.__main__ import parse_args as sdg_args
    from serve.chat import parse_args as chat_args

    seen = set()
    for name in ("cpu", "single-gpu", "multi-gpu"):
        gen, ev = settings(name, [])["generate"], settings(name, [])["evaluate"]
        g = sdg_args(["generate", "--taxonomy", "t", "--output-dir", "o", "--profile", name])
        assert (g.num_instructions, g.concurrency, g.max_tokens, g.judge_threshold, g.endpoint, g.model) == (
            gen["num_instructions"], gen["concurrency"], gen["max_tokens"], gen["judge_threshold"], None, None)
        m = mmlu_args(["--profile", name])
        assert (m.few_shots, m.batch_size, m.limit) == (ev["few_shots"], ev["batch_size"], ev["mmlu_limit"] or None)
        t = mt_bench_args(["--model-endpoint", "u", "--judge-endpoint", "u", "--taxonomy", "t", "--profile", name])
        assert (t.limit, t.max_tokens, t.judge_max_tokens) == (ev["mt_bench_limit"] or None, ev["max_tokens"],
                                                               ev["judge_max_tokens"])
        h = heldout_args(["--heldout", "h", "--model", "m", "--profile", name])
        assert (h.max_new_tokens, h.batch_size) == (ev["heldout_max_tokens"], ev["batch_size"])
        assert chat_args(["--profile", name]).max_tokens == ev["chat_max_tokens"]
        seen.add((g.num_instructions, m.few_shots, t.max_tokens))
    assert len(seen) > 1  # the profiles differ, so fixed argparse defaults could not pass the loop above

    assert sdg_args(["generate", "--taxonomy", "t", "--output-dir", "o", "--profile", "single-gpu",
                     "--num-instructions", "3", "--endpoint", "http://h/v1"]).num_instructions == 3
    assert mt_bench_args(["--model-endpoint", "u", "--judge-endpoint", "u", "--taxonomy", "t", "--profile", "cpu",
                          "--limit", "2"]).limit == 2
    bare = sdg_args(["generate", "--taxonomy", "t", "--output-dir", "o", "--profile", "none"])
    assert bare.num_instructions == STAGE_DEFAULTS["generate"]["num_instructions"]
    with pytest.raises(ConfigError, match="profile 'laptop' not found.*available: cpu, multi-gpu, single-gpu"):
        heldout_args(["--heldout", "h", "--model", "m", "--profile", "laptop"])
