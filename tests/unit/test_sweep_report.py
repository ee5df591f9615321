"""``sweep-report``: the comparison table, the Pareto plot and the sweep's MLflow run, from
the rows the sweep DAG gathered, on a real SQLite MLflow store."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tasks.config import parse_config
from tests.conftest import REPO
from tests.datagen import tiny_params


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    return uri


def _phase_run(client: MlflowClient, experiment: str, seconds: float) -> str:
    run = client.create_run(experiment, start_time=1_000_000)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=1_000_000 + int(seconds * 1000))
    return run.info.run_id


def _row(key, backbone, accuracy, train_id, finetune_id, status="ok", restored=()):
    row = {
        "combination": key,
        "dataset": key.split("--")[0],
        "backbone": backbone,
        "learning_rate": None,
        "status": status,
        "workspace": f"/ws/{key}",
        "parent_run_id": f"parent-{backbone}",
    }
    if status == "ok":
        row |= {
            "test_accuracy": accuracy,
            "validation_accuracy": accuracy,
            "test_f1_macro": accuracy,
            "test_roc_auc": 0.9,
            "train_run_id": train_id,
            "finetune_run_id": finetune_id,
            "train_seconds": 0.5,  # the stage's: replaced by the MLflow run's
            "finetune_seconds": 0.5,
            "training_seconds": 1.0,
            "restored": list(restored),
        }
    else:
        row["failed_stage"] = "train"
    return row


def test_report_table_plot_best_and_mlflow_run(store, tmp_path):
    import mlflow

    cfg = parse_config(tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}))
    mlflow.set_tracking_uri(store)
    client = MlflowClient()
    phases = client.create_experiment("phases")
    ids = {
        name: _phase_run(client, phases, s)
        for name, s in {"mt": 10, "mf": 20, "vt": 50, "vf": 60, "et": 3, "ef": 4}.items()
    }
    rows = [
        _row("cats_vs_dogs--vgg16", "vgg16", 0.9, ids["vt"], ids["vf"]),
        _row(
            "cats_vs_dogs--mobilenet_v2", "mobilenet_v2", 0.9, ids["mt"], ids["mf"], "ok", ["train"]
        ),
        _row("cats_vs_dogs--efficientnet_b0", "efficientnet_b0", 0.5, ids["et"], ids["ef"]),
        _row("cats_vs_dogs--resnet50", "resnet50", None, None, None, status="failed"),
    ]
    folder = tmp_path / "reports" / "sweep" / "s1"
    folder.mkdir(parents=True)
    (folder / "rows.json").write_text(json.dumps({"sweep": "s1", "rows": rows}))

    from tasks.commands import sweep_report

    report = sweep_report.run(cfg, folder)

    saved = json.loads((folder / "comparison.json").read_text())
    by_key = {row["combination"]: row for row in saved["rows"]}
    # seconds are the MLflow phase runs' wall time, whatever the stage took to restore them
    assert by_key["cats_vs_dogs--mobilenet_v2"]["training_seconds"] == 30.0
    assert by_key["cats_vs_dogs--vgg16"]["training_seconds"] == 110.0
    # as accurate as VGG16 and faster: MobileNetV2 wins; VGG16 is dominated by it
    assert report.best == saved["best"] == {"cats_vs_dogs": "cats_vs_dogs--mobilenet_v2"}
    pareto = {key: row.get("pareto") for key, row in by_key.items()}
    assert pareto == {
        "cats_vs_dogs--mobilenet_v2": True,
        "cats_vs_dogs--vgg16": False,
        "cats_vs_dogs--efficientnet_b0": True,  # the fastest, though the least accurate
        "cats_vs_dogs--resnet50": None,  # failed: not compared
    }
    # the table: best first, the failed lane last
    with open(folder / "comparison.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["combination"].split("--")[1] for r in table] == [
        "mobilenet_v2",
        "vgg16",
        "efficientnet_b0",
        "resnet50",
    ]
    assert table[0]["best"] == "yes" and table[0]["restored"] == "train"
    assert table[3]["status"] == "failed"
    markdown = (folder / "comparison.md").read_text()
    assert (
        markdown.startswith("# Sweep s1")
        and "| cats_vs_dogs | cats_vs_dogs--mobilenet_v2 |" in markdown
    )
    assert (folder / "pareto_cats_vs_dogs.png").read_bytes()[:4] == b"\x89PNG"

    # one MLflow run in the `sweeps` experiment, with the table and plot
    run = client.get_run(saved["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "sweeps"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["best.cats_vs_dogs"] == "cats_vs_dogs--mobilenet_v2"
    assert run.data.metrics["cats_vs_dogs--vgg16.training_seconds"] == 110.0
    assert run.data.params["combinations"] == "4"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert logged >= {"comparison.md", "comparison.csv", "pareto_cats_vs_dogs.png"}


def test_missing_rows_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks",
            "sweep-report",
            str(tmp_path / "nowhere"),
            "--params",
            str(REPO / "params.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rows.json is missing" in last


def test_recipe_rows_show_the_parent_runs_headline_and_what_the_walkthrough_reported(
    store, tmp_path
):
    import mlflow

    from tasks.commands import sweep_report
    from tasks.config import recipe_reference

    cfg = parse_config(tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/c.zip"}))
    mlflow.set_tracking_uri(store)
    client = MlflowClient()
    phases = client.create_experiment("phases")
    parent = client.create_run(phases)
    client.log_param(parent.info.run_id, "image_size", "150")
    for key, value in {
        "frozen.val_accuracy": 0.8,
        "finetuned.val_accuracy": 0.85,
        "train.images_per_second": 123.456,
        "finetune.images_per_second": 45.6,
    }.items():
        client.log_metric(parent.info.run_id, key, value)
    client.set_terminated(parent.info.run_id)
    row = _row(
        "cats_vs_dogs--xception_guide",
        "xception",
        0.9,
        _phase_run(client, phases, 5),
        _phase_run(client, phases, 7),
    )
    row |= {"recipe": "xception_guide", "parent_run_id": parent.info.run_id}
    default = _row("cats_vs_dogs--vgg16", "vgg16", 0.5, None, None, status="failed")
    folder = tmp_path / "reports" / "sweep" / "s2"
    folder.mkdir(parents=True)
    (folder / "rows.json").write_text(json.dumps({"sweep": "s2", "rows": [row, default]}))

    sweep_report.run(cfg, folder)

    with open(folder / "comparison.csv") as handle:
        first = next(csv.DictReader(handle))
    reported = recipe_reference("xception_guide")["reported"]
    assert reported and "98.3 %" in reported
    assert first["recipe"] == "xception_guide" and first["reported"] == reported
    assert first["image_size"] == "150"
    assert (first["frozen_val_accuracy"], first["finetuned_val_accuracy"]) == ("0.8", "0.85")
    assert first["train_images_per_second"] == "123.456"
    assert first["training_seconds"] == "12.0"
    markdown = (folder / "comparison.md").read_text()
    header = markdown.splitlines()[4]
    assert "| recipe |" in header and "| reported |" in header
    assert "xception_guide" in markdown
