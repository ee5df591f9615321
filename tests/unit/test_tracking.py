from __future__ import annotations

import json

import pytest

from tasks.config import parse_config
from tasks.io import file_md5
from tasks.paths import DatasetPaths
from tasks.tracking import flat_params, phase_run, read_record, tracking_uri
from tests.datagen import tiny_params


@pytest.fixture
def cfg():
    return parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}), ["train.epochs=3"]
    )


def test_default_store_is_sqlite_under_the_workspace(cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg, tmp_path) == "http://127.0.0.1:5000"


def test_param_names_do_not_depend_on_backbone(cfg):
    other = parse_config(
        tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}), ["train.backbone=vgg16"]
    )
    assert flat_params(cfg, "x").keys() == flat_params(other, "x").keys()
    assert flat_params(cfg, "x")["train.epochs"] == 3
    assert flat_params(cfg, "x")["train.head.dropout"] is None


def test_phases_share_one_parent_and_train_starts_a_new_one(cfg, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "transfer_learning__cats_vs_dogs")
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    paths.manifest.parent.mkdir(parents=True)
    paths.manifest.write_bytes(b"manifest")

    with phase_run(cfg, paths, "train", new_parent=True):
        mlflow.log_metric("loss", 1.0)
    with phase_run(cfg, paths, "finetune"):
        pass
    train, finetune = read_record(paths, "train"), read_record(paths, "finetune")
    assert train.parent_run_id == finetune.parent_run_id
    assert train.run_id != finetune.run_id

    client = MlflowClient()
    child = client.get_run(finetune.run_id)
    assert child.data.tags["mlflow.parentRunId"] == train.parent_run_id
    assert child.data.tags["phase"] == "finetune"
    assert child.data.tags["data.manifest_md5"] == file_md5(paths.manifest)
    assert child.data.tags["airflow.dag_id"] == "transfer_learning__cats_vs_dogs"
    assert json.loads(child.data.tags["overrides"]) == ["train.epochs=3"]
    assert child.data.params["train.epochs"] == "3"
    experiment = client.get_experiment(train.experiment_id)
    assert experiment.name == "cats_vs_dogs"
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").resolve().as_uri()

    with phase_run(cfg, paths, "train", new_parent=True):
        pass
    assert read_record(paths, "train").parent_run_id != train.parent_run_id


def test_dvc_temp_experiments_log_to_the_project_store(cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12"
    temp_workspace.mkdir(parents=True)
    expected = f"sqlite:///{(tmp_path / 'project').resolve()}/mlflow/mlflow.db"
    assert tracking_uri(cfg, temp_workspace) == expected


KILLED_MID_PHASE = """
import os, sys, time
from pathlib import Path
from tasks.config import parse_config
from tasks.paths import DatasetPaths
from tasks.tracking import phase_run
from tests.datagen import tiny_params

cfg = parse_config(tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}))
paths = DatasetPaths.of("cats_vs_dogs", Path(sys.argv[1]))
with phase_run(cfg, paths, "train", new_parent=True) as run:
    Path(sys.argv[2]).write_text(run.info.run_id)
    time.sleep(600)
"""


def test_a_killed_phase_leaves_no_run_running(cfg, tmp_path, monkeypatch):
    """SIGKILL mid-phase: the next attempt ends the orphan KILLED, with the reason; the
    parent the pipeline opened ends with the pipeline (local dvc repro: at register)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from tests.conftest import REPO

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    started = tmp_path / "run-id"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_PHASE, str(tmp_path), str(started)], cwd=REPO
    )
    deadline = time.monotonic() + 180
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    orphan = started.read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    client = MlflowClient(tracking_uri(cfg, tmp_path))
    assert client.get_run(orphan).info.status == "RUNNING"
    with phase_run(cfg, paths, "train", new_parent=True):
        pass
    with phase_run(cfg, paths, "finetune"):
        pass
    with phase_run(cfg, paths, "register", last=True):
        pass
    ended = client.get_run(orphan)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["tasks.end_reason"] == "a new attempt of train started"
    experiment = ended.info.experiment_id
    assert client.search_runs([experiment], "attributes.status = 'RUNNING'") == []
    parent = client.get_run(read_record(paths, "register").parent_run_id)
    assert parent.info.status == "FINISHED"
    assert (
        parent.info.end_time >= client.get_run(read_record(paths, "register").run_id).info.end_time
    )
