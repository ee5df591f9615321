"""``sweep-report``: a sweep's comparison, from the rows the sweep DAG gathered.

Reads ``<folder>/rows.json`` (one row per combination: status, test and validation
accuracy, training seconds, ...; written by ``tasks.orchestration.sweep``) and
writes, in ``<folder>``:

- ``comparison.md`` and ``comparison.csv``: the table, best first per dataset;
- ``pareto_<dataset>.png``: test accuracy against training seconds, one point per
  combination, the Pareto front (nothing both faster and as accurate) in red;
- ``comparison.json``: the rows with ``pareto`` marks, the best per dataset and the
  MLflow run id — written last: its presence means the report is complete.

The same files, a ``comparison_table.json`` (``mlflow.log_table``) and one metric
per combination go on one MLflow run in the ``sweeps`` experiment.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import Config, recipe_reference
from tasks.errors import StageError
from tasks.io import write_json, write_text

log = logging.getLogger(__name__)

COLUMNS = (
    "dataset",
    "combination",
    "recipe",
    "backbone",
    "image_size",
    "learning_rate",
    "status",
    "test_accuracy",
    "validation_accuracy",
    "frozen_val_accuracy",
    "finetuned_val_accuracy",
    "reported",
    "test_f1_macro",
    "test_roc_auc",
    "train_seconds",
    "finetune_seconds",
    "training_seconds",
    "train_images_per_second",
    "finetune_images_per_second",
    "restored",
    "pareto",
    "best",
    "parent_run_id",
)


@dataclass(frozen=True)
class SweepReport:
    sweep: str
    folder: Path
    rows: int
    best: dict[str, str]
    plots: tuple[str, ...]
    mlflow_run_id: str

    def __str__(self) -> str:
        winners = ", ".join(f"{ds}: {key}" for ds, key in self.best.items()) or "none"
        return (
            f"sweep {self.sweep}: {self.rows} combinations compared in {self.folder} "
            f"(comparison.md, {', '.join(self.plots)}); best {winners}; MLflow run "
            f"{self.mlflow_run_id}"
        )


def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple:
        ok = row.get("status") == "ok"
        return (row["dataset"], not ok, -(row.get("test_accuracy") or 0.0), row["combination"])

    return sorted(rows, key=key)


def _plain(value: Any) -> Any:
    """A value as a table shows it: yes/blank for flags, lists joined, numbers as they are."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return value


def _cell(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_markdown(sweep: str, rows: list[dict[str, Any]]) -> str:
    always = {"status", "pareto", "best", "restored"}
    shown = [
        c
        for c in COLUMNS
        if c != "parent_run_id" and (c in always or any(_cell(r.get(c)) for r in rows))
    ]
    lines = [
        f"# Sweep {sweep}",
        "",
        "Best first per dataset. Seconds: the MLflow runs of each phase; `restored`: "
        "phases DVC restored from its run cache (trained earlier with the same code, params "
        "and data; the seconds are that training's). `pareto`: no other combination is both "
        "faster and as accurate; `best`: goes through the registry gate. `reported`: what the "
        "recipe's walkthrough reported on its own data and settings, for comparison.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in shown) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _plain(row.get(c)) for c in COLUMNS})
    return out.getvalue()


HEADLINE = {
    "frozen_val_accuracy": "frozen.val_accuracy",
    "finetuned_val_accuracy": "finetuned.val_accuracy",
    "train_images_per_second": "train.images_per_second",
    "finetune_images_per_second": "finetune.images_per_second",
}
"""Row column -> the metric each pipeline's parent MLflow run carries (log_headline)."""


def _from_mlflow(rows: list[dict[str, Any]]) -> None:
    """Each finished row's training seconds: the wall time of the MLflow runs of its train
    and finetune phases (for a lane DVC restored from its run cache, the runs that made
    the models), so restored and fresh lanes compare on the same footing. Also the image
    size, phase accuracies and throughputs from the lane's parent run, and what the
    recipe's walkthrough reported."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    for row in rows:
        if row.get("recipe"):
            row["reported"] = recipe_reference(row["recipe"])["reported"]
        if row.get("status") != "ok":
            continue
        try:
            parent = client.get_run(row["parent_run_id"]).data if row.get("parent_run_id") else None
        except MlflowException:
            parent = None
        if parent is not None:
            size = parent.params.get("image_size")
            row["image_size"] = int(size) if size and size.isdigit() else size
            for column, metric in HEADLINE.items():
                if metric in parent.metrics:
                    row[column] = round(parent.metrics[metric], 4)
        total = 0.0
        for phase in ("train", "finetune"):
            run_id = row.get(f"{phase}_run_id")
            try:
                info = client.get_run(run_id).info if run_id else None
            except MlflowException:
                info = None
            if info is not None and info.end_time:
                row[f"{phase}_seconds"] = round((info.end_time - info.start_time) / 1000, 2)
            total += row.get(f"{phase}_seconds") or 0.0
        row["training_seconds"] = round(total, 2)


def _label(row: dict[str, Any]) -> str:
    """A point's name on the plot: the recipe or backbone (and the rate)."""
    rate = row.get("learning_rate")
    return (row.get("recipe") or row["backbone"]) + ("" if rate is None else f" lr {rate:g}")


def run(cfg: Config, folder: Path) -> SweepReport:
    """Write the comparison in ``folder`` and log it as one MLflow run (see module doc)."""
    from tasks.tracking.runs import sweep_experiment

    source = folder / "rows.json"
    if not source.is_file():
        raise StageError(f"{source} is missing; the sweep DAG's compare task writes it")
    data = json.loads(source.read_text())
    sweep = data["sweep"]
    experiment_id = sweep_experiment(cfg, Path.cwd())
    _from_mlflow(data["rows"])
    rows, best = _rank(data["rows"])
    plots = _plot_fronts(sweep, rows, folder)
    write_text(folder / "comparison.md", table_markdown(sweep, rows))
    write_text(folder / "comparison.csv", table_csv(rows))
    run_id = _log_sweep(experiment_id, sweep, rows, best, folder, plots)
    write_json(
        folder / "comparison.json",
        {"sweep": sweep, "best": best, "mlflow_run_id": run_id, "rows": rows},
    )
    report = SweepReport(sweep, folder, len(rows), best, tuple(plots), run_id)
    log.info("%s", report)
    return report


def _rank(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows best first per dataset, each marked ``best`` (it goes through the gate) and,
    when finished, ``pareto`` (nothing else both faster and as accurate)."""
    from tasks.ml.ranking import best_by_group, pareto_front

    done = [row for row in rows if row.get("status") == "ok"]
    best = best_by_group(done, "dataset", "test_accuracy", "training_seconds", "combination")
    for row in rows:
        row["best"] = best.get(row["dataset"]) == row["combination"]
    rows = _ranked(rows)
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        done = [r for r in rows if r["dataset"] == dataset and r.get("status") == "ok"]
        front = pareto_front(
            [r["training_seconds"] for r in done], [r["test_accuracy"] for r in done]
        )
        for row, on in zip(done, front, strict=True):
            row["pareto"] = on
    return rows, best


def _plot_fronts(sweep: str, rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """``pareto_<dataset>.png`` per dataset with a finished combination: their names."""
    from tasks.ml.plots import pareto_plot

    plots = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        done = [r for r in rows if r["dataset"] == dataset and r.get("status") == "ok"]
        if done:
            out = pareto_plot(
                [_label(r) for r in done],
                [r["training_seconds"] for r in done],
                [r["test_accuracy"] for r in done],
                [bool(r["pareto"]) for r in done],
                folder / f"pareto_{dataset}.png",
                title=f"{dataset}: test accuracy against training time (sweep {sweep})",
            )
            plots.append(out.name)
    return plots


def _log_sweep(
    experiment_id: str,
    sweep: str,
    rows: list[dict[str, Any]],
    best: dict[str, str],
    folder: Path,
    plots: list[str],
) -> str:
    """The sweep's MLflow run: tags, params, one metric pair per finished combination,
    the table and the files; its id."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep-{sweep}") as run:
        mlflow.set_tags({"sweep.id": sweep, **{f"best.{ds}": key for ds, key in best.items()}})
        mlflow.log_params(
            {
                "datasets": ",".join(dict.fromkeys(r["dataset"] for r in rows)),
                "backbones": ",".join(dict.fromkeys(r["backbone"] for r in rows)),
                "recipes": ",".join(dict.fromkeys(r.get("recipe") or "-" for r in rows)),
                "combinations": len(rows),
            }
        )
        for row in rows:
            if row.get("status") == "ok":
                mlflow.log_metrics(
                    {
                        f"{row['combination']}.test_accuracy": row["test_accuracy"],
                        f"{row['combination']}.training_seconds": row["training_seconds"],
                    }
                )
        mlflow.log_table(
            {c: [_cell(r.get(c)) for r in rows] for c in COLUMNS}, "comparison_table.json"
        )
        for name in ("comparison.md", "comparison.csv", *plots):
            mlflow.log_artifact(str(folder / name))
    return run.info.run_id
