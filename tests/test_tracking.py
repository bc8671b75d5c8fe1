"""W&B (offline) and MLflow (file store) get the same steps as metrics.jsonl, a resume continues the same tracker
run; launch.run_training trains from Python with our keys or InstructLab's."""
import glob
import importlib.util
import json
import struct

import pytest
from test_train import base_args, metrics, run_train

import launch
from config import ConfigError, load_config


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside the test
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def wandb_records(run_file):
    """The records of an offline run file (.wandb): a 7-byte header, then LevelDB-log chunks of protobuf Records
    in 32 KiB blocks; the wandb package has no reader of its own for them."""
    from wandb.proto import wandb_internal_pb2
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, chunk = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def values(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_every_step_config_and_final_checkpoint(tmp_path, tiny_model_dir, dataset, offline):
    out = tmp_path / "run"
    run_train(base_args(tiny_model_dir, dataset, out, max_steps=3, num_epochs=2, wandb_project="minilab-test",
                        wandb_run_name="tiny"))
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = list(wandb_records(run_file))
    history = {r.history.step.num: values(r.history.item) for r in records if r.WhichOneof("record_type") == "history"}
    m = metrics(out)
    assert sorted(history) == sorted(m) == [1, 2, 3]
    assert [history[s]["loss"] for s in m] == [m[s]["loss"] for s in m]
    assert [history[s]["grad_norm"] for s in m] == [m[s]["grad_norm"] for s in m]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "tiny" and run.project == "minilab-test"
    assert values(run.config.update)["max_steps"] == 3
    summary = values(i for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update)
    assert summary["final_checkpoint"] == str(out / "hf_format" / "last_epoch")
    saved = json.loads(max(out.glob("full_state/step_*/trainer_state.json")).read_text())
    assert saved["tracker_runs"]["wandb"] in run_file  # the id a resume continues


def test_mlflow_file_store_continues_one_run_across_kill_and_resume(tmp_path, tiny_model_dir, dataset, monkeypatch):
    from mlflow.tracking import MlflowClient
    for var in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    uri = f"file:{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, dataset, out, max_steps=6, num_epochs=3, save_samples=16,
                     mlflow_tracking_uri=uri, mlflow_experiment_name="minilab-test", mlflow_run_name="tiny")
    monkeypatch.setenv("MINILAB_TEST_HOOK", "after_step=3:kill")  # SIGKILL once step 3 is saved
    assert run_train(args, check=False).returncode != 0
    assert sorted(metrics(out)) == [1, 2, 3]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in, for this process (train.py's own)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("minilab-test").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(h.step, h.value) for h in history] == [(s, r["loss"]) for s, r in sorted(metrics(out).items())]
    assert len(history) == 3 and run.info.run_name == "tiny" and run.data.params["max_steps"] == "6"
    monkeypatch.delenv("MINILAB_TEST_HOOK")
    assert "at step 3" in run_train(args).stdout
    (resumed,) = client.search_runs([run.info.experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    m = metrics(out)
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda h: h.step)
    assert [(h.step, h.value) for h in history] == [(s, m[s]["loss"]) for s in range(1, 7)]
    assert resumed.data.tags["final_checkpoint"] == str(out / "hf_format" / "last_epoch")


def keys(tiny_model_dir, dataset, out, **extra):
    return dict(a.split("=", 1) for a in base_args(tiny_model_dir, dataset, out, **extra))


@pytest.mark.slow
def test_run_training_launches_two_processes(tmp_path, tiny_model_dir, dataset, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    status, out_dir = launch.run_training(keys(tiny_model_dir, dataset, out, max_steps=2), nproc_per_node=2)
    assert (status, out_dir) == (0, str(out))
    assert sorted(metrics(out)) == [1, 2] and (out / "hf_format" / "last_epoch" / "model.safetensors").exists()
    assert "max_steps: 2" in (out / "launch_config.yaml").read_text()


def test_run_training_takes_instructlab_training_args(tmp_path, tiny_model_dir, dataset, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    # as InstructLab's TrainingArgs(...).model_dump() gives them, defaults included
    args = {"model_path": tiny_model_dir, "chat_tmpl_path": None, "use_legacy_tmpl": False, **dataset,
            "ckpt_output_dir": str(out), "max_seq_len": 256, "max_batch_len": 4096, "num_epochs": 1,
            "effective_batch_size": 16, "save_samples": 0, "learning_rate": 1e-3, "adamw_weight_decay": 0.01,
            "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8, "warmup_steps": 0, "random_seed": 5, "use_dolomite": False,
            "is_padding_free": True, "checkpoint_at_epoch": True, "accelerate_full_state_at_epoch": True,
            "mock_data": False, "mock_data_len": 0, "deepspeed_options": {
                "cpu_offload_optimizer": False, "cpu_offload_optimizer_ratio": 1, "cpu_offload_optimizer_pin_memory":
                False, "save_samples": None},
            "fsdp_options": {"cpu_offload_params": False, "sharding_strategy": "FULL_SHARD"},
            "distributed_backend": "fsdp", "disable_flash_attn": False, "lora": None, "process_data": True,
            "keep_last_checkpoint_only": True, "pretraining_config": None, "data_process_num_cpu_procs": 1,
            "use_liger": False, "log_level": "INFO", "logger_type": "async", "wandb_run_name": None,
            "mlflow_run_name": None, "mlflow_tracking_uri": None, "mlflow_experiment_name": None,
            "wandb_project": None, "wandb_entity": None, "tensorboard_log_dir": None}
    assert launch.run_training(args) == (0, str(out))
    assert sorted(metrics(out)) == [1, 2]
    saved = (out / "launch_config.yaml").read_text()
    assert "weight_decay: 0.01" in saved and "num_proc: 1" in saved


def test_run_training_names_each_unknown_key_and_its_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        launch.run_training({"learnig_rate": 1e-4, "adamw_weight_decy": 0.1, "use_liger": True,
                             "ckpt_output_dir": str(tmp_path)})
    message = str(e.value)
    assert "unknown key 'learnig_rate'; did you mean 'learning_rate'?" in message
    assert "unknown key 'adamw_weight_decy'; did you mean 'adamw_weight_decay'?" in message
    assert "'use_liger=True' has no minilab equivalent" in message
    with pytest.raises(ConfigError, match="nproc_per_node must be an integer of at least 1, got '--nnodes=2'"):
        launch.run_training({"ckpt_output_dir": str(tmp_path)}, nproc_per_node="--nnodes=2")
    assert not (tmp_path / "launch_config.yaml").exists()  # nothing is written or run before the checks pass


def test_an_mlflow_store_that_cannot_open_is_refused_before_training(monkeypatch):
    if importlib.util.find_spec("sqlalchemy"):
        pytest.skip("the full mlflow package is installed: its sqlite store opens")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"pip install mlflow, or set mlflow_tracking_uri=file:PATH"):
        load_config(None, {"mlflow_experiment_name": "minilab"})  # MLflow 3's default store is sqlite
