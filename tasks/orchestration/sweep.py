"""A sweep: one full pipeline per dataset × backbone (× learning rate), then a comparison.

The ``transfer_learning__sweep`` DAG's conf::

    {"backbones": ["mobilenet_v2", "efficientnet_b0"],     # backbones, recipes or both
     "recipes": ["xception_guide", "inception_mixed7"],    # presets (tasks/recipes)
     "datasets": ["cats_vs_dogs"],                          # default: every dataset
     "learning_rates": [0.001, 0.0001],                     # optional: train.learning_rate
     "set": {"train.epochs": 5},                            # optional: every combination
     "per_backbone": {"efficientnet_b0": {"train.image_size": 224}},   # optional
     "per_recipe": {"xception_guide": {"train.batch_size": 16}}}       # optional

A backbone lane runs the params file's recipe with that backbone; a recipe lane runs
that preset (``recipe=<name>``: its backbone, size, head, optimizers, augmentation),
under whatever the params file itself writes, as any run would.

Each combination is a lane: its own workspace (``.workspaces/sweeps/<sweep>/<key>``,
:meth:`Project.for_lane`), prepared, run stage by stage, recorded as a DVC
experiment and ended in MLflow exactly like a run of the dataset's DAG (its parent
run tagged ``sweep.id``/``sweep.combination``). Then :func:`compare_sweep` gathers
one row per lane from its workspace and runs ``python -m tasks sweep-report``, which
writes ``reports/sweep/<sweep>/`` (a table and a test accuracy × training seconds
plot, the Pareto front marked, also on an MLflow run) and picks the best lane per
dataset; :func:`gate_best` sends each through the normal ``register`` gate.

A lane whose stages DVC restored from its run cache (same code, params and data
as an earlier run) trains nothing; its training seconds are those of the MLflow
runs that made the restored models, so the comparison stays about training.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.config import BACKBONES, recipe_names
from tasks.contract import PARAMS_ENV, STORE_ENV
from tasks.errors import ConfigError, StageError, StageFailed
from tasks.io import write_json
from tasks.orchestration.dvc import StageResult, run_stage
from tasks.orchestration.process import run_checked
from tasks.orchestration.project import Project
from tasks.orchestration.records import read_workspace_record, stage_env
from tasks.orchestration.runconf import resolve_run_config, set_entries
from tasks.orchestration.workspace import Prepared, prepare_workspace

log = logging.getLogger(__name__)

SWEEP_KEYS = (
    "backbones",
    "recipes",
    "datasets",
    "learning_rates",
    "set",
    "per_backbone",
    "per_recipe",
)
SWEEP_TAG, COMBINATION_TAG = "sweep.id", "sweep.combination"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
TRAINING_STAGES = ("train", "finetune")
"""The stages whose seconds are a combination's training time."""


@dataclass(frozen=True)
class Combination:
    """One lane of a sweep: the dataset DAG's conf for one dataset × backbone (× rate)."""

    sweep: str
    key: str
    dataset: str
    backbone: str
    learning_rate: float | None
    conf: dict[str, Any]
    recipe: str | None = None
    """The preset this lane runs (a ``recipes`` lane); None: a ``backbones`` lane."""

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_xcom(cls, value: Mapping[str, Any]) -> Combination:
        return cls(**value)

    def project(self, project: Project) -> Project:
        return project.for_lane(self.sweep, self.key)

    @property
    def tags(self) -> dict[str, str]:
        return {SWEEP_TAG: self.sweep, COMBINATION_TAG: self.key}


def sweep_id(run_id: str | None) -> str:
    """A folder- and ref-safe name for the sweep (from the DAG run id)."""
    return _UNSAFE.sub("-", run_id or "manual").strip("-.") or "manual"


def _names(conf: Mapping[str, Any], key: str, allowed: Sequence[str]) -> list[str]:
    value = conf[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f'sweep conf: "{key}" must be a non-empty list of names, e.g. {allowed[:2]}'
        )
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ConfigError(f'sweep conf: "{key}" has unknown {unknown}; use some of {list(allowed)}')
    if len(set(value)) != len(value):
        raise ConfigError(f'sweep conf: "{key}" lists a name twice: {value}')
    return value


def _rates(conf: Mapping[str, Any]) -> list[float | None]:
    value = conf.get("learning_rates")
    if value is None:
        return [None]
    ok = isinstance(value, list) and value
    if not ok or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ConfigError(
            'sweep conf: "learning_rates" must be a non-empty list of numbers, e.g. [0.001, 0.0001]'
        )
    return [float(v) for v in value]


def _per(conf: Mapping[str, Any], key: str, names: list[str], listed: str) -> Mapping:
    value = conf.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f'sweep conf: "{key}" maps a name to overrides, e.g. '
            f'{{"{key}": {{"vgg16": {{"train.batch_size": 16}}}}}}'
        )
    stray = [name for name in value if name not in names]
    if stray:
        raise ConfigError(f'sweep conf: "{key}" names {stray}, which "{listed}" does not list')
    return value


def plan_sweep(
    project: Project, conf: Mapping[str, Any] | None, run_id: str | None
) -> list[Combination]:
    """Validate the sweep conf and list its combinations; each one's config is checked
    like a run of its dataset DAG (one-line :class:`ConfigError` naming the combination)."""
    if not isinstance(conf, Mapping) or not ({"backbones", "recipes"} & set(conf)):
        raise ConfigError(
            'sweep conf: name the backbones or recipes to compare, e.g. {"backbones": '
            '["mobilenet_v2", "efficientnet_b0"], "recipes": ["xception_guide"], '
            '"datasets": ["cats_vs_dogs"]}'
        )
    unknown = [key for key in conf if key not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"sweep conf: unknown key {unknown[0]!r}; use some of {list(SWEEP_KEYS)}")
    cfg = project.load_config()
    backbones = _names(conf, "backbones", BACKBONES) if "backbones" in conf else []
    recipes = _names(conf, "recipes", recipe_names()) if "recipes" in conf else []
    datasets = (
        _names(conf, "datasets", list(cfg.datasets)) if "datasets" in conf else list(cfg.datasets)
    )
    per_backbone = _per(conf, "per_backbone", backbones, "backbones")
    per_recipe = _per(conf, "per_recipe", recipes, "recipes")
    lanes = [
        (b, None, [f"train.backbone={b}", *set_entries(per_backbone.get(b) or [])])
        for b in backbones
    ]
    lanes += [(r, r, [f"recipe={r}", *set_entries(per_recipe.get(r) or [])]) for r in recipes]
    common = set_entries(conf.get("set") or [])
    sweep = sweep_id(run_id)
    combinations = []
    for dataset in datasets:
        for name, recipe, own in lanes:
            for rate in _rates(conf):
                key = f"{dataset}--{name}" + ("" if rate is None else f"--lr{rate:g}")
                overrides = [*common, *own]
                if rate is not None:
                    overrides.append(f"train.learning_rate={rate}")
                try:
                    resolved = resolve_run_config(project, dataset, {"set": overrides})
                except ConfigError as error:
                    raise ConfigError(f"sweep combination {key}: {error}") from None
                combinations.append(
                    Combination(
                        sweep,
                        key,
                        dataset,
                        resolved.train.backbone_name,
                        rate,
                        {"set": overrides},
                        recipe,
                    )
                )
    return combinations


def prepare_lane(project: Project, combo: Combination, run_id: str | None) -> Prepared:
    """Prepare the combination's own workspace, as a dataset DAG's ``prepare`` does; a bad
    conf is a :class:`ConfigError` naming the combination."""
    try:
        return prepare_workspace(
            combo.project(project),
            combo.dataset,
            combo.conf,
            run_id=f"{run_id or 'manual'}--{combo.key}",
        )
    except ConfigError as error:
        raise ConfigError(f"{combo.key}: {error}") from None


def run_lane_stage(project: Project, combo: Combination, stage: str) -> StageResult:
    return run_stage(combo.project(project), combo.dataset, stage)


# --- the comparison -------------------------------------------------------------------


def sweep_folder(project: Project, sweep: str) -> Path:
    return project.reports / "sweep" / sweep


def lane_row(project: Project, combo: Combination) -> dict[str, Any]:
    """One row of the comparison: what the combination's workspace reports."""
    paths = combo.project(project).dataset_paths(combo.dataset)
    ws = paths.root
    row: dict[str, Any] = {
        "combination": combo.key,
        "dataset": combo.dataset,
        "recipe": combo.recipe,
        "backbone": combo.backbone,
        "learning_rate": combo.learning_rate,
        "status": "failed",
        "workspace": str(ws),
    }
    try:
        record = read_workspace_record(ws)
    except StageError:
        return row
    stages = record.get("stages", {})
    row["parent_run_id"] = record.get("parent_run_id")
    row["experiment"] = record.get("experiment")
    metrics_file = paths.metrics
    done = metrics_file.is_file() and "evaluate" in stages and record.get("experiment_rev")
    if not done:  # a lane counts once it is evaluated and recorded as a DVC experiment
        lane = ("download", "validate", *TRAINING_STAGES, "evaluate")
        row["failed_stage"] = next((s for s in lane if s not in stages), "record")
        return row
    metrics = json.loads(metrics_file.read_text())
    for stage in TRAINING_STAGES:  # the MLflow run of each phase (the original, if restored)
        run = paths.run_record(stage)
        row[f"{stage}_run_id"] = (
            json.loads(run.read_text()).get("run_id") if run.is_file() else None
        )
    row["restored"] = [s for s in TRAINING_STAGES if not stages.get(s, {}).get("ran", True)]
    row.update(
        status="ok",
        test_accuracy=metrics.get("accuracy"),
        test_f1_macro=metrics.get("f1_macro"),
        test_roc_auc=metrics.get("roc_auc"),
        validation_accuracy=(metrics.get("validation") or {}).get("accuracy"),
        test_images=metrics.get("images"),
        model=metrics.get("model"),
        training_seconds=round(
            sum(stages.get(s, {}).get("seconds", 0.0) for s in TRAINING_STAGES), 2
        ),
        **{f"{s}_seconds": stages.get(s, {}).get("seconds") for s in TRAINING_STAGES},
    )
    return row


@dataclass(frozen=True)
class SweepComparison:
    sweep: str
    folder: str
    rows: list[dict[str, Any]]
    best: dict[str, str]
    mlflow_run_id: str | None

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        ok = sum(row["status"] == "ok" for row in self.rows)
        winners = ", ".join(f"{ds}: {key}" for ds, key in self.best.items()) or "none"
        return (
            f"sweep {self.sweep}: {ok}/{len(self.rows)} combinations finished; best {winners}; "
            f"table and plot in {self.folder}"
        )


def compare_sweep(project: Project, combos: Sequence[Combination]) -> SweepComparison:
    """Write ``reports/sweep/<sweep>/`` and its MLflow run (``python -m tasks sweep-report``,
    a process, like every stage); raises :class:`StageError` when no combination finished."""
    if not combos:
        raise StageError("sweep: no combinations to compare")
    sweep = combos[0].sweep
    folder = sweep_folder(project, sweep)
    rows = [lane_row(project, combo) for combo in combos]
    write_json(folder / "rows.json", {"sweep": sweep, "rows": rows})
    env = stage_env()
    env[STORE_ENV] = str(project.state)
    env[PARAMS_ENV] = str(project.params)
    argv = [sys.executable, "-m", "tasks", "sweep-report", str(folder)]
    run_checked(argv, f"sweep {sweep}: the comparison failed", cwd=project.root, env=env)
    report = json.loads((folder / "comparison.json").read_text())
    best = report["best"]
    result = SweepComparison(sweep, str(folder), report["rows"], best, report["mlflow_run_id"])
    if not best:
        raise StageError(f"{result}; no combination finished, so none goes through the gate")
    log.info("%s", result)
    return result


def gate_best(
    project: Project, combos: Sequence[Combination], best: Mapping[str, str]
) -> dict[str, Any]:
    """Run ``register`` (the normal gate) in the workspace of each dataset's best combination."""
    by_key = {combo.key: combo for combo in combos}
    results = {}
    for dataset, key in best.items():
        results[dataset] = {
            "combination": key,
            **run_lane_stage(project, by_key[key], "register").xcom(),
        }
    return results


def gate_sweep(
    project: Project, combos: Sequence[Combination], comparison: Mapping[str, Any]
) -> dict[str, Any]:
    """The sweep's ``gate`` task: :func:`gate_best`, then a not retryable
    :class:`StageFailed` when any combination failed (the sweep run fails after the
    others were compared and the best gated)."""
    gated = gate_best(project, combos, comparison["best"])
    failed = [row["combination"] for row in comparison["rows"] if row["status"] != "ok"]
    if failed:
        raise StageFailed(
            f"sweep: {len(failed)} of {len(combos)} combinations failed ({', '.join(failed)}); "
            f"the others were compared in {comparison['folder']} and the best gated",
            retryable=False,
        )
    return gated
