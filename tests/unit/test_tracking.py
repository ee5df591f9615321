from __future__ import annotations

import json

import pandas as pd
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


@pytest.mark.slow
def test_phases_share_one_parent_and_train_starts_a_new_one(cfg, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "transfer_learning__cats_vs_dogs")
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    paths.manifest.parent.mkdir(parents=True)
    rows = {"path": ["a.jpg", "b.jpg"], "split": ["train"] * 2, "label": ["cats", "dogs"]}
    pd.DataFrame(rows).to_parquet(paths.manifest)

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
    # the manifest is the run's (and the parent's) dataset: digest = its md5, its columns
    for run_id, context in [(finetune.run_id, "training"), (train.parent_run_id, "pipeline")]:
        (entry,) = client.get_run(run_id).inputs.dataset_inputs
        assert entry.dataset.digest == file_md5(paths.manifest)
        assert entry.dataset.name == "cats_vs_dogs-manifest"
        assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == context
        assert {c["name"] for c in json.loads(entry.dataset.schema)["mlflow_colspec"]} == set(rows)
    experiment_tags = client.get_experiment(train.experiment_id).tags
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    assert child.data.tags["airflow.dag_id"] == "transfer_learning__cats_vs_dogs"
    assert json.loads(child.data.tags["overrides"]) == ["train.epochs=3"]
    assert child.data.params["train.epochs"] == "3"
    experiment = client.get_experiment(train.experiment_id)
    assert experiment.name == "cats_vs_dogs"
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").resolve().as_uri()

    with phase_run(cfg, paths, "train", new_parent=True):
        pass
    assert read_record(paths, "train").parent_run_id != train.parent_run_id


@pytest.mark.slow
def test_a_scheduled_parent_gets_the_manifest_once_validate_wrote_it(cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import start_pipeline_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = DatasetPaths.of("cats_vs_dogs", tmp_path)
    parent = start_pipeline_run(cfg, paths)  # the DAG's prepare: no manifest yet
    client = MlflowClient()
    assert client.get_run(parent).inputs.dataset_inputs == []
    monkeypatch.setenv("TASKS_PARENT_RUN_ID", parent)
    paths.manifest.parent.mkdir(parents=True)
    pd.DataFrame({"path": ["a.jpg"], "split": ["train"], "label": ["cats"]}).to_parquet(
        paths.manifest
    )
    for phase in ("train", "finetune"):
        with phase_run(cfg, paths, phase):
            pass
    (entry,) = client.get_run(parent).inputs.dataset_inputs  # once, not once per phase
    assert entry.dataset.digest == file_md5(paths.manifest)
    assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "pipeline"


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


@pytest.mark.slow
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


# A tiny Keras fit with the epoch callback, in its own process so that its standard
# output can be a terminal (a pty) or a pipe, as under a shell or an Airflow worker.
_FIT = """
import logging, mlflow, numpy as np, keras
from tasks.tracking import epoch_logger
logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the stage commands do
mlflow.set_tracking_uri("sqlite:///" + __import__("sys").argv[1])
x = np.random.default_rng(0).normal(size=(24, 3)).astype("float32")
y = (x[:, 0] > 0).astype("float32")
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
with mlflow.start_run():
    model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=4, verbose=0,
              callbacks=[epoch_logger("train", 0, images=24)])
"""


def _fit_output(tmp_path, terminal: bool) -> str:
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    args = [sys.executable, "-c", _FIT, str(tmp_path / "mlflow.db")]
    if not terminal:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr
    main, child = pty.openpty()
    proc = subprocess.Popen(args, env=env, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=300) == 0, b"".join(chunks)[-2000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_each_epoch_prints_one_line_and_a_progress_bar_only_on_a_terminal(tmp_path):
    piped = _fit_output(tmp_path, terminal=False)
    lines = [line for line in piped.splitlines() if " epoch " in line]
    assert len(lines) == 2, piped[-2000:]
    for n, line in enumerate(lines, 1):
        assert f"train epoch {n}/2: loss " in line
        assert "accuracy" in line and "val_loss" in line and "val_accuracy" in line
        assert "images/s" in line and "s left)" in line
    assert "6/6" not in piped  # no progress bar in a log

    shown = _fit_output(tmp_path, terminal=True)
    # Keras' bar: the batch count of the 6 batches, the running loss, then our epoch line.
    assert "6/6" in shown and "━" in shown, shown[-2000:]
    assert shown.index("6/6") < shown.index("train epoch 1/2: loss ")
    assert "train epoch 2/2: loss " in shown


def refused(code: str, endpoint: str = "/api/2.0/mlflow/runs/search"):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    status = 401 if code == "UNAUTHENTICATED" else 403
    body = "You are not authenticated." if status == 401 else "Permission denied"
    return MlflowException(
        f"API request to endpoint {endpoint} failed with error code {status} != 200. "
        f"Response body: '{body}'",
        error_code=ErrorCode.Value(code),
    )


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ({}, "requires a login and MLFLOW_TRACKING_USERNAME is not set"),
        ({"MLFLOW_TRACKING_USERNAME": "pipeline"}, "MLFLOW_TRACKING_PASSWORD is not set"),
        (
            {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-value"},
            "refused the login of MLFLOW_TRACKING_USERNAME=pipeline; "
            "check MLFLOW_TRACKING_PASSWORD",
        ),
    ],
)
def test_a_refused_login_names_the_variable_to_fix(monkeypatch, login, expected):
    from tasks.tracking import access_error

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in login.items():
        monkeypatch.setenv(name, value)
    wrapped = RuntimeError("ending the run failed")
    wrapped.__cause__ = refused("UNAUTHENTICATED")
    for error in (refused("UNAUTHENTICATED"), wrapped):
        message = access_error(error, "http://mlflow:5000")
        assert message.startswith("MLflow tracking server http://mlflow:5000 ")
        assert expected in message and "\n" not in message
        assert "s3cr3t" not in message


def test_a_denied_request_names_the_account_and_the_request(monkeypatch):
    from tasks.tracking import access_error

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
    message = access_error(refused("PERMISSION_DENIED", "/api/2.0/mlflow/registered-models/alias"))
    assert "denied MLFLOW_TRACKING_USERNAME=viewer the request" in message
    assert "/api/2.0/mlflow/registered-models/alias" in message
    assert "pipeline account" in message
    # anything else is not a login problem
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    missing = MlflowException("no such run", error_code=ErrorCode.Value("RESOURCE_DOES_NOT_EXIST"))
    assert missing.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert access_error(missing) is None
    assert access_error(ValueError("x")) is None


def test_an_older_experiment_gets_the_comparison_view_and_keeps_its_edited_note(
    cfg, tmp_path, monkeypatch
):
    import mlflow

    from tasks.tracking import (
        COMPARISON_COLUMNS,
        EXPERIMENT_KIND_TAG,
        NOTE_TAG,
        comparison_url,
        experiment_tags,
        open_experiment,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    made = mlflow.create_experiment(
        "cats_vs_dogs",
        tags={EXPERIMENT_KIND_TAG: "custom_model_development", NOTE_TAG: "our own words"},
    )
    tags = experiment_tags(cfg, "cats_vs_dogs")
    assert open_experiment(cfg, tmp_path, "cats_vs_dogs", tags) == made
    held = mlflow.get_experiment(made).tags
    assert held[NOTE_TAG] == "our own words"  # what a person wrote in the UI stays
    view = json.loads(held["mlflow.sharedViewState.comparison"])
    assert view == {"selectedColumns": list(COMPARISON_COLUMNS)}
    assert "metrics.`test.accuracy`" in view["selectedColumns"]
    assert comparison_url("http://mlflow:5000/", made) == (
        f"http://mlflow:5000/#/experiments/{made}/runs"
        "?viewStateShareKey=comparison&workflowType=machine_learning"
    )
