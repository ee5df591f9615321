"""The summary DAG's report, without MLflow: latest gate decisions and the table layout."""

from __future__ import annotations

import json

import yaml

from tasks.contract import WORKSPACE_RECORD
from tasks.orchestration.project import Project
from tasks.orchestration.summary import render_markdown, write_summary
from tests.datagen import tiny_params


def _project(tmp_path) -> Project:
    sources = {ds: f"http://127.0.0.1:9/{ds}.zip" for ds in ("cats_vs_dogs", "ants_vs_bees")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(sources)))
    return Project(root=tmp_path, params=params, state=tmp_path / "state")


def test_summary_before_any_champion_lists_the_latest_gate(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = _project(tmp_path)
    ws = project.workspace("cats_vs_dogs")
    reports = ws / "reports" / "cats_vs_dogs"
    reports.mkdir(parents=True)
    (reports / "gate.json").write_text(
        json.dumps(
            {
                "version": "3",
                "alias": "challenger",
                "status": "rejected",
                "verdict": "below_floor",
                "promoted": 0,
                "candidate_score": 0.61,
                "reason": "accuracy 0.6100 is below the floor 0.8000",
            }
        )
    )
    (reports / "metrics.json").write_text(json.dumps({"accuracy": 0.61, "per_class": {}}))
    (ws / WORKSPACE_RECORD).write_text(json.dumps({"run_id": "manual__1", "overrides": ["a=1"]}))

    summary = write_summary(project)

    assert summary.markdown == project.reports / "summary.md"
    assert summary.champions == {"cats_vs_dogs": None, "ants_vs_bees": None}
    payload = json.loads(summary.json.read_text())
    cats = payload["datasets"]["cats_vs_dogs"]
    assert cats["champion"] is None
    assert cats["latest_run"]["metrics"] == {"accuracy": 0.61}
    assert cats["latest_run"]["gate"]["alias"] == "challenger"
    assert cats["latest_run"]["gate"]["verdict"] == "below_floor"
    assert cats["latest_run"]["airflow_run_id"] == "manual__1"
    text = summary.markdown.read_text()
    assert (
        "| cats_vs_dogs | none yet | – | – | – | v3 → @challenger (not promoted: below_floor) |"
        in text
    )
    assert "| ants_vs_bees | none yet | – | – | – | no gate decision yet |" in text
    assert "accuracy 0.6100 is below the floor" in text
    # The MLflow store was not created just to read it.
    assert not (project.mlflow_dir / "mlflow.db").exists()


def test_markdown_puts_the_gate_metric_first_for_each_champion():
    payload = {
        "generated_at": "2026-01-05T07:00:00+00:00",
        "gate_metric": "f1_macro",
        "mlflow_ui": "mlflow ui",
        "datasets": {
            "ants_vs_bees": {
                "champion": {
                    "model": "ants_vs_bees-classifier",
                    "version": "4",
                    "uri": "models:/ants_vs_bees-classifier@champion",
                    "backbone": "vgg16",
                    "experiment": "ants_vs_bees-scheduled__2026-01-05T00-00-00-00-00",
                    "metrics": {"f1_macro": 0.91, "accuracy": 0.92, "roc_auc": 0.97},
                },
                "latest_run": {"metrics": {}, "gate": {}, "overrides": []},
                "reports": "/x/reports/ants_vs_bees",
            }
        },
    }
    text = render_markdown(payload)
    assert "| dataset | champion | backbone | f1_macro | other metrics | latest run |" in text
    assert (
        "| ants_vs_bees | `models:/ants_vs_bees-classifier@champion` (v4) | vgg16 | 0.9100 "
        "| accuracy 0.9200, roc_auc 0.9700 | no gate decision yet |"
    ) in text
    # From the champion to the DVC experiment that restores it.
    assert (
        "champion v4 is DVC experiment `ants_vs_bees-scheduled__2026-01-05T00-00-00-00-00`"
    ) in text
