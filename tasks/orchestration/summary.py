"""The Monday-morning report: the champion model of every dataset, with its metrics.

``write_summary(project)`` reads the MLflow registry (``<ds>-classifier@champion``
and the metrics its ``register`` run logged) and each dataset workspace's
latest gate decision (``reports/<ds>/gate.json``) and headline metrics, and
writes ``<state>/reports/summary.md`` and ``summary.json`` atomically. The
Airflow summary DAG runs it whenever a dataset DAG updates its model asset.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.config import Config
from tasks.contract import WORKSPACE_RECORD
from tasks.io import write_json, write_text
from tasks.orchestration.project import Project

log = logging.getLogger(__name__)

CANDIDATE_PREFIX = "candidate."


@dataclass(frozen=True)
class Summary:
    markdown: Path
    json: Path
    champions: dict[str, str | None]

    def xcom(self) -> dict[str, Any]:
        return {"markdown": str(self.markdown), "json": str(self.json), "champions": self.champions}

    def __str__(self) -> str:
        lines = [f"summary: {self.markdown}"]
        for ds, version in self.champions.items():
            lines.append(f"  {ds}: {'v' + version if version else 'no champion yet'}")
        return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _headline(metrics: dict[str, Any], first: str) -> dict[str, float]:
    """Top-level numeric metrics, the gate metric first."""
    numbers = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and "." not in k
    }
    ordered = dict(sorted(numbers.items()))
    if first in ordered:
        ordered = {first: ordered.pop(first), **ordered}
    return ordered


def champion_of(cfg: Config, project: Project, dataset: str) -> dict[str, Any] | None:
    """The registry's ``@champion`` of ``dataset`` with its logged metrics, or None."""
    from tasks.tracking.registry import CHAMPION, registered_model_name
    from tasks.tracking.store import store_exists, tracking_uri

    uri = tracking_uri(cfg, project.state)
    if not store_exists(uri):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    name = registered_model_name(cfg, dataset)
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    metrics: dict[str, Any] = {}
    tags: dict[str, str] = {}
    if version.run_id:
        try:
            run = client.get_run(version.run_id)
        except MlflowException:
            run = None
        if run is not None:
            metrics = {
                k.removeprefix(CANDIDATE_PREFIX): v
                for k, v in run.data.metrics.items()
                if k.startswith(CANDIDATE_PREFIX)
            }
            tags = run.data.tags
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
    return {
        "model": name,
        "version": str(version.version),
        "uri": f"models:/{name}@{CHAMPION}",
        "run_id": version.run_id,
        "registered_at": created.isoformat(timespec="seconds"),
        "backbone": tags.get("backbone"),
        "airflow_run_id": tags.get("airflow.run_id"),
        "experiment": tags.get("dvc.exp_name"),
        "metrics": _headline(metrics, cfg.register_.metric),
    }


def dataset_summary(cfg: Config, project: Project, dataset: str) -> dict[str, Any]:
    paths = project.dataset_paths(dataset)
    gate = _read_json(paths.gate)
    run = _read_json(paths.root / WORKSPACE_RECORD)
    latest = {
        "metrics": _headline(_read_json(paths.metrics), cfg.register_.metric),
        "gate": {
            k: gate.get(k)
            for k in (
                "version",
                "alias",
                "status",
                "verdict",
                "promoted",
                "candidate_score",
                "reason",
                "experiment",
            )
            if k in gate
        },
        "airflow_run_id": run.get("run_id"),
        "overrides": run.get("overrides", []),
    }
    return {
        "champion": champion_of(cfg, project, dataset),
        "latest_run": latest,
        "reports": str(paths.reports),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.4f}"
    return "–" if value is None else str(value)


def render_markdown(payload: dict[str, Any]) -> str:
    metric = payload["gate_metric"]
    lines = [
        "# Transfer learning: champion per dataset",
        "",
        f"Generated {payload['generated_at']}. Gate metric: `{metric}`.",
        "",
        f"| dataset | champion | backbone | {metric} | other metrics | latest run |",
        "|---|---|---|---|---|---|",
    ]
    for ds, entry in payload["datasets"].items():
        champ = entry["champion"]
        gate = entry["latest_run"]["gate"]
        if gate:
            verdict = "promoted" if gate.get("promoted") else "not promoted"
            if gate.get("status") == "awaiting_approval":
                verdict = "awaiting approval"
            if gate.get("verdict"):
                verdict += f": {gate['verdict']}"
            latest = f"v{gate.get('version')} → @{gate.get('alias')} ({verdict})"
        else:
            latest = "no gate decision yet"
        if champ:
            metrics = dict(champ["metrics"])
            score = metrics.pop(metric, None)
            others = ", ".join(f"{k} {_fmt(v)}" for k, v in list(metrics.items())[:4]) or "–"
            lines.append(
                f"| {ds} | `{champ['uri']}` (v{champ['version']}) | {_fmt(champ['backbone'])} "
                f"| {_fmt(score)} | {others} | {latest} |"
            )
        else:
            lines.append(f"| {ds} | none yet | – | – | – | {latest} |")
    lines.append("")
    for ds, entry in payload["datasets"].items():
        gate = entry["latest_run"]["gate"]
        lines.append(f"- **{ds}**: reports in `{entry['reports']}`")
        if gate.get("reason"):
            lines.append(f"  - latest gate: {gate['reason']}")
        champ = entry["champion"] or {}
        if champ.get("experiment"):
            lines.append(
                f"  - champion v{champ['version']} is DVC experiment `{champ['experiment']}` "
                f"(`dvc exp apply {champ['experiment']}` + `dvc pull` restores it)"
            )
        if entry["latest_run"]["overrides"]:
            lines.append(f"  - overrides: `{', '.join(entry['latest_run']['overrides'])}`")
    lines += ["", f"MLflow: `{payload['mlflow_ui']}`", ""]
    return "\n".join(lines)


def write_summary(project: Project) -> Summary:
    """Write ``summary.md`` and ``summary.json`` under ``project.reports``."""
    cfg = project.load_config()
    datasets = {ds: dataset_summary(cfg, project, ds) for ds in cfg.datasets}
    store = project.mlflow_dir
    payload = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gate_metric": cfg.register_.metric,
        "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{store / 'mlflow.db'} --port 5000",
        "datasets": datasets,
    }
    md = write_text(project.reports / "summary.md", render_markdown(payload))
    js = write_json(project.reports / "summary.json", payload)
    champions = {
        ds: (entry["champion"] or {}).get("version") if entry["champion"] else None
        for ds, entry in datasets.items()
    }
    result = Summary(md, js, champions)
    log.info("%s", result)
    return result
