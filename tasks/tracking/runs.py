"""MLflow experiments and runs: one experiment per dataset, one parent run per pipeline
execution, one child run per phase (train, finetune, evaluate, register).

Stages run as separate processes (DVC, Airflow), so the parent's id travels in
a small JSON record per phase (``DatasetPaths.run_record``): ``train`` opens a
new parent; later phases attach to the parent named in ``runs/train.json``
(or ``$TASKS_PARENT_RUN_ID``), or open one of their own if there is none.
What each run is tagged with (its lineage) is :mod:`tasks.tracking.lineage`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import Config
from tasks.contract import PARENT_ENV, RunRecord
from tasks.paths import DatasetPaths
from tasks.tracking.lineage import WORKSPACE_TAG, flat_params, lineage_tags, log_manifest
from tasks.tracking.registry import registered_model_name
from tasks.tracking.store import access_error, server_errors, store_root, tracking_uri

if TYPE_CHECKING:
    import mlflow

    from tasks.ml.training import PhaseCheckpoint

_log = logging.getLogger(__name__)

PARENT_TAG = "pipeline.parent"
PARENT_RUN_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
COMPARISON_VIEW = "comparison"
"""The runs table's shared view (``?viewStateShareKey=comparison``): the headline columns."""
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
COMPARISON_COLUMNS = (
    "attributes.`Dataset`",
    "params.`train.backbone`",
    "params.`recipe`",
    "params.`image_size`",
    "metrics.`test.accuracy`",
    "metrics.`validation.accuracy`",
    "metrics.`frozen.val_accuracy`",
    "metrics.`finetuned.val_accuracy`",
    "metrics.`test.f1_macro`",
    "metrics.`test.roc_auc`",
    "metrics.`train.seconds`",
    "metrics.`finetune.seconds`",
    "metrics.`train.images_per_second`",
    "tags.`gate.decision`",
    "attributes.`Models`",
)
"""What the comparison view shows: one parent row per pipeline execution, its headline."""
NOTE_TAG = "mlflow.note.content"
END_REASON_TAG = "tasks.end_reason"


def mlflow_experiment_name(cfg: Config, dataset: str) -> str:
    return f"{cfg.tracking.experiment_prefix}{dataset}"


def use_experiment(cfg: Config, paths: DatasetPaths) -> str:
    """Point MLflow at our store and make sure the dataset's experiment exists; returns its id."""
    name = mlflow_experiment_name(cfg, paths.dataset)
    return open_experiment(cfg, paths.root, name, experiment_tags(cfg, paths.dataset))


def open_experiment(cfg: Config, root: Path, name: str, tags: dict[str, str]) -> str:
    """Point MLflow at our store; create experiment ``name`` with ``tags`` if it is not
    there (and tag one a store made before these tags); returns its id."""
    import mlflow

    uri = tracking_uri(cfg, root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in tags.items():  # what a store made before a tag existed lacks
            if key not in experiment.tags:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        artifacts = Path(cfg.tracking.artifact_location)
        if not artifacts.is_absolute():
            artifacts = store_root(Path(root)) / artifacts
        location = artifacts.as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags=tags)


def sweep_experiment(cfg: Config, root: Path) -> str:
    """The experiment holding one comparison run per sweep; returns its id."""
    note = (
        "One run per sweep of the `transfer_learning__sweep` DAG: its comparison table "
        "(comparison.md/.csv), the test accuracy against training seconds plot with the "
        "Pareto front, and the best combination per dataset. Each combination's own "
        "pipeline run is in its dataset's experiment, tagged `sweep.id`."
    )
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: note}
    return open_experiment(cfg, root, f"{cfg.tracking.experiment_prefix}sweeps", tags)


def experiment_tags(cfg: Config, dataset: str) -> dict[str, str]:
    """What makes the MLflow UI open the experiment as model training, with a description."""
    spec = cfg.dataset(dataset)
    note = (
        f"**{dataset}**: {' vs '.join(spec.classes)} images from {spec.url}, classified by "
        "transfer learning on a frozen ImageNet backbone, then fine-tuned.\n\n"
        "One parent run per pipeline execution (download, validate, train, finetune, "
        "evaluate, register), carrying the headline parameters and metrics to compare; "
        "its child runs hold each phase's detail. Registered model: "
        f"`{registered_model_name(cfg, dataset)}`."
    )
    view = json.dumps({"selectedColumns": list(COMPARISON_COLUMNS)})
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        NOTE_TAG: note,
        VIEW_TAG_PREFIX + COMPARISON_VIEW: view,
    }


def comparison_url(server: str, experiment_id: str) -> str:
    """The runs table of experiment ``experiment_id`` on ``server`` (the MLflow UI's base
    URL) as training runs with the headline columns shown."""
    query = f"viewStateShareKey={COMPARISON_VIEW}&workflowType=machine_learning"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def log_headline(
    metrics: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Copy a phase's headline figures onto the parent run of the active child run.

    The parent is the one row per pipeline execution that the runs table compares,
    so its names are the same for every backbone and dataset. A param the parent
    already holds with another value (a parent resumed under other settings) is
    left as it was, with a warning: MLflow params cannot change.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    if active is None:
        return
    parent = client.get_run(active.info.run_id).data.tags.get(PARENT_RUN_TAG)
    if parent is None:
        return
    held = client.get_run(parent).data.params
    new_params = []
    for key, value in (params or {}).items():
        if key not in held:
            new_params.append(Param(key, str(value)))
        elif held[key] != str(value):
            _log.warning(
                "parent run %s keeps %s=%s (this phase: %s)", parent, key, held[key], value
            )
    now = int(time.time() * 1000)
    client.log_batch(
        parent,
        metrics=[Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()],
        params=new_params,
        tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()],
    )


INPUT_CONTEXTS = {"train": "training", "finetune": "training", "evaluate": "evaluation"}
"""The phases that read the manifest, and the context MLflow shows for it."""


def end_stale_runs(experiment_id: str, paths: DatasetPaths, reason: str, **tags: str) -> list[str]:
    """End the RUNNING runs of this dataset and workspace that match ``tags`` as KILLED.

    A stage killed mid-run (SIGKILL, out of memory, a preempted node) cannot end
    its own run; the next attempt does, with ``reason`` as the tag
    ``tasks.end_reason``. Returns the ids it ended.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    wanted = {"dataset": paths.dataset, WORKSPACE_TAG: str(paths.root.resolve()), **tags}
    conditions = ["attributes.status = 'RUNNING'"]
    conditions += [f"tags.`{key}` = '{value}'" for key, value in wanted.items()]
    ended = []
    for run in client.search_runs([experiment_id], " and ".join(conditions)):
        client.set_tag(run.info.run_id, END_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def start_pipeline_run(cfg: Config, paths: DatasetPaths) -> str:
    """Open the parent run of one pipeline execution; it stays RUNNING until ended.

    A parent this workspace left RUNNING (its pipeline never finished) is ended
    as KILLED first.
    """
    import mlflow
    from mlflow.entities import Param

    experiment_id = use_experiment(cfg, paths)
    end_stale_runs(experiment_id, paths, "a new pipeline execution started", **{PARENT_TAG: "true"})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = mlflow.MlflowClient().create_run(
        experiment_id,
        run_name=f"{paths.dataset}-{cfg.train.backbone_name}-{stamp}",
        tags={**lineage_tags(cfg, paths), PARENT_TAG: "true"},
    )
    params = [Param(key, str(value)) for key, value in flat_params(cfg, paths.dataset).items()]
    mlflow.MlflowClient().log_batch(run.info.run_id, params=params)
    log_manifest(cfg, paths, run.info.run_id, "pipeline")
    return run.info.run_id


def end_pipeline_run(
    cfg: Config, paths: DatasetPaths, run_id: str, status: str, tags: dict[str, str] | None = None
) -> None:
    """End the parent run with ``status`` (FINISHED, FAILED or KILLED) and its final tags.

    Child runs still RUNNING under it (a stage that died) end as KILLED.
    """
    from mlflow.tracking import MlflowClient

    use_experiment(cfg, paths)
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for child in children:
        client.set_tag(child.info.run_id, END_REASON_TAG, f"pipeline ended {status}")
        client.set_terminated(child.info.run_id, "KILLED")
    client.set_terminated(run_id, status)


def _existing_parent(paths: DatasetPaths, experiment_id: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    candidate = os.environ.get(PARENT_ENV)
    if not candidate:
        record = RunRecord.read(paths.run_record("train"))
        candidate = record.parent_run_id if record else None
    if not candidate:
        return None
    try:
        run = MlflowClient().get_run(candidate)
    except MlflowException as error:
        if access_error(error):  # a refused login is not "no such run"
            raise
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return None
    return candidate


@contextmanager
def phase_run(
    cfg: Config,
    paths: DatasetPaths,
    phase: str,
    *,
    new_parent: bool = False,
    last: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open the child run of ``phase`` under the pipeline's parent run.

    The parent is the orchestrator's (``$TASKS_PARENT_RUN_ID``, opened when the
    DAG run started); without one, ``new_parent=True`` (the ``train`` stage)
    opens a new pipeline execution and later phases attach to it, and
    ``last=True`` (the ``register`` stage) ends it. A child run of the same
    phase that a killed attempt left RUNNING is ended first. On success the
    ids are written to ``paths.run_record(phase)``.
    """
    import mlflow

    with server_errors(tracking_uri(cfg, paths.root), f"python -m tasks {phase} {paths.dataset}"):
        experiment_id = use_experiment(cfg, paths)
        scheduled = bool(os.environ.get(PARENT_ENV))
        parent = None if new_parent and not scheduled else _existing_parent(paths, experiment_id)
        opened = parent is None
        if opened:
            parent = start_pipeline_run(cfg, paths)
        end_stale_runs(experiment_id, paths, f"a new attempt of {phase} started", phase=phase)
        try:
            with mlflow.start_run(
                experiment_id=experiment_id,
                run_name=phase,
                parent_run_id=parent,
                tags={**lineage_tags(cfg, paths), "phase": phase},
            ) as run:
                mlflow.log_params(flat_params(cfg, paths.dataset))
                if phase in INPUT_CONTEXTS:
                    log_manifest(cfg, paths, run.info.run_id, INPUT_CONTEXTS[phase])
                    # a scheduled parent opens before validate writes the manifest
                    if not mlflow.MlflowClient().get_run(parent).inputs.dataset_inputs:
                        log_manifest(cfg, paths, parent, "pipeline")
                yield run
        except BaseException:
            # the execution this phase opened ends with it (a retry opens a new one), never
            # left RUNNING; one opened by the scheduler or an earlier stage is its opener's
            if opened:
                with contextlib.suppress(Exception):  # the phase's own error is the one to tell
                    end_pipeline_run(cfg, paths, parent, "FAILED")
            raise
        record = RunRecord(phase, run.info.run_id, parent, experiment_id, mlflow.get_tracking_uri())
        record.write(paths.run_record(phase))
        if last and not scheduled:
            end_pipeline_run(cfg, paths, parent, "FINISHED")


def log_resume(checkpoint: PhaseCheckpoint, phase: str, epochs: int) -> None:
    """Say (log line, ``resumed_after_epoch`` tag) where a phase resumes after a killed attempt."""
    import mlflow

    done = checkpoint.resumed_epochs
    if done:
        _log.info(
            "%s resumes after epoch %d of %d (checkpoint in %s)",
            phase, done, epochs, checkpoint.directory,
        )  # fmt: skip
    mlflow.set_tag("resumed_after_epoch", str(done))
