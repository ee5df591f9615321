from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.contract import RunRecord
from tasks.io import file_md5
from tasks.paths import DatasetPaths
from tasks.tracking.runs import phase_run
from tasks.tracking.store import tracking_uri


def _record(paths, phase: str) -> RunRecord | None:
    return RunRecord.read(paths.run_record(phase))


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
    train, finetune = (
        _record(paths, "train"),
        _record(paths, "finetune"),
    )
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
    assert _record(paths, "train").parent_run_id != train.parent_run_id


@pytest.mark.slow
def test_a_scheduled_parent_gets_the_manifest_once_validate_wrote_it(cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tasks.tracking.runs import start_pipeline_run

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


KILLED_MID_PHASE = """
import os, sys, time
from pathlib import Path
from tasks.config import parse_config
from tasks.paths import DatasetPaths
from tasks.tracking.runs import phase_run
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
    parent = client.get_run(_record(paths, "register").parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= client.get_run(_record(paths, "register").run_id).info.end_time


def test_an_older_experiment_gets_the_comparison_view_and_keeps_its_edited_note(
    cfg, tmp_path, monkeypatch
):
    import mlflow

    from tasks.tracking.runs import (
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
