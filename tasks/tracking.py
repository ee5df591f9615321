"""MLflow tracking: one experiment per dataset, one parent run per pipeline
execution, one child run per phase (train, finetune, evaluate, register).

Stages run as separate processes (DVC, Airflow), so the parent's id travels in
a small JSON record per phase (``DatasetPaths.run_record``): ``train`` opens a
new parent; later phases attach to the parent named in ``runs/train.json``
(or ``$TASKS_PARENT_RUN_ID``), or open one of their own if there is none.

Every run is tagged with its lineage: git commit, the DVC hashes of the data it
read, the backbone, the Airflow dag/run ids when scheduled, and the ``--set``
overrides. Param names are the same for every backbone and dataset.

This is also the one place that knows where the store is (:func:`tracking_uri`),
what the registered model and its aliases are called, and how a logged model
is loaded back (:func:`load_logged_model`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tasks.config import Config, load_config
from tasks.errors import ConfigError, StageError
from tasks.io import file_md5, write_json
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import keras
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from tasks.ml.training import PhaseCheckpoint

_log = logging.getLogger(__name__)

PARENT_ENV = "TASKS_PARENT_RUN_ID"
"""Set by the orchestrator: the parent run a stage's child run belongs to."""
STORE_ENV = "TASKS_STORE_ROOT"
"""Set by the orchestrator: the folder holding the shared embedded store (``mlflow/``)."""
AIRFLOW_ENV_TAGS = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    "DVC_EXP_NAME": "dvc.exp_name",
    "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
    "TASKS_EXPERIMENT": "dvc.exp_name",
}
"""Environment the scheduler (or ``dvc exp run``) sets, and the run tag each becomes."""
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
WORKSPACE_TAG = "tasks.workspace"
END_REASON_TAG = "tasks.end_reason"
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")


AWAITING_APPROVAL = "awaiting_approval"
"""``gate.decision`` of a version that passed the gate and waits for a person (register,
approve and the DAG's approval step read it)."""
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
"""Registry aliases: the served model, a refused (or not yet approved) candidate, the
champion it replaced."""


def tracking_uri(cfg: Config | None, root: str | Path = ".") -> str:
    """``$MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the embedded SQLite store.

    ``cfg`` None (commands outside a stage, such as ``predict``): the params
    file ``$TASKS_PARAMS`` (default ``params.yaml``) is read if it exists.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if cfg is None:
        params = Path(os.environ.get("TASKS_PARAMS", "params.yaml"))
        try:
            cfg = load_config(params) if params.is_file() else None
        except ConfigError:
            cfg = None
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{store_root(Path(root)) / 'mlflow' / 'mlflow.db'}"


def store_exists(uri: str) -> bool:
    """False only for an embedded SQLite store whose file is not there yet."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def current_experiment() -> str | None:
    """The DVC experiment this process's run will be saved as (scheduled, or ``dvc exp run``)."""
    return os.environ.get("TASKS_EXPERIMENT") or os.environ.get("DVC_EXP_NAME") or None


def registered_model_name(cfg: Config, dataset: str) -> str:
    return f"{cfg.tracking.experiment_prefix}{dataset}-classifier"


def store_root(root: Path) -> Path:
    """The project folder that holds the embedded store.

    ``dvc exp run --temp`` and queued experiments run in a copy under
    ``<project>/.dvc/tmp/exps/``; their runs belong in the project's store, not
    in the copy that DVC deletes afterwards. A scheduled run's workspace is
    told where the shared store is (``$TASKS_STORE_ROOT``).
    """
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).resolve()
    resolved = Path(root).resolve()
    parts = resolved.parts
    for index in range(len(parts) - 3):
        if parts[index + 1 : index + 4] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[: index + 1])
    return resolved


def experiment_name(cfg: Config, dataset: str) -> str:
    return f"{cfg.tracking.experiment_prefix}{dataset}"


def use_experiment(cfg: Config, paths: DatasetPaths) -> str:
    """Point MLflow at our store and make sure the dataset's experiment exists; returns its id."""
    name = experiment_name(cfg, paths.dataset)
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


def locked_hash(root: Path, stage: str, out: str) -> str | None:
    """The hash ``dvc.lock`` holds for output ``out`` of ``stage`` (None outside DVC)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get(stage, {}).get("outs", []):
        if entry.get("path") == out:
            return entry.get("md5") or entry.get("hash")
    return None


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def lineage_tags(cfg: Config, paths: DatasetPaths) -> dict[str, str]:
    """Tags that say what produced a run: code, data, backbone, scheduler, overrides."""
    ds = paths.dataset
    tags = {
        "dataset": ds,
        "git.commit": git_commit(paths.root),
        "backbone": cfg.train.backbone,
        "weights.source": cfg.train.weights,
        "overrides": json.dumps(list(cfg.overrides)),
        WORKSPACE_TAG: str(paths.root.resolve()),
    }
    if paths.manifest.exists():
        tags["data.manifest_md5"] = file_md5(paths.manifest)
    raw = locked_hash(paths.root, f"download@{ds}", f"data/raw/{ds}")
    if raw:
        tags["data.raw_dvc_hash"] = raw
    for env, tag in AIRFLOW_ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def flat_params(cfg: Config, dataset: str) -> dict[str, Any]:
    """The parameters a run depends on, with the same names for every backbone and dataset."""
    params: dict[str, Any] = {"dataset": dataset, "recipe": cfg.recipe}
    sections = {
        "train": cfg.train,
        "finetune": cfg.finetune,
        "augmentation": cfg.augmentation,
    }
    for prefix, section in sections.items():
        for key, value in section.model_dump().items():
            if isinstance(value, dict):
                for sub, inner in value.items():
                    params[f"{prefix}.{key}.{sub}"] = inner
            else:
                params[f"{prefix}.{key}"] = value
    return params


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


def dvc_cache_path(root: Path, md5: str) -> Path | None:
    """Where DVC keeps the file of hash ``md5`` in this project's cache (None outside DVC)."""
    import configparser

    dvc = Path(root) / ".dvc"
    if not dvc.is_dir():
        return None
    cache = dvc / "cache"
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser()
        try:
            parser.read(dvc / name)
        except configparser.Error:
            continue
        if parser.has_option("cache", "dir"):
            cache = dvc / parser.get("cache", "dir")
    path = (cache / "files" / "md5" / md5[:2] / md5[2:]).resolve()
    return path if path.exists() else None


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """MLflow's dataset code warns about nothing the user can act on: it registers its local
    source twice ("interpreted in multiple ways", naming the same class twice) and hints
    that integer columns cannot hold NaN (a manifest has none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def manifest_dataset(cfg: Config, paths: DatasetPaths) -> mlflow.data.dataset.Dataset | None:
    """The validated manifest as an MLflow dataset: digest = its DVC md5, source = where
    DVC keeps it (the workspace file outside DVC), schema = its columns."""
    if not paths.manifest.exists():
        return None
    import mlflow.data
    import pandas as pd

    md5 = file_md5(paths.manifest)
    source = dvc_cache_path(paths.root, md5) or paths.manifest.resolve()
    try:
        frame = pd.read_parquet(paths.manifest)
    except (OSError, ValueError) as error:  # lineage only: the stage reports a bad manifest
        _log.warning("manifest %s not logged as a dataset: %s", paths.manifest, error)
        return None
    with _quiet_datasets():
        return mlflow.data.from_pandas(
            frame,
            source=source.as_uri(),
            targets="label",
            name=f"{paths.dataset}-manifest",
            digest=md5,
        )


def log_evaluated_model(
    cfg: Config,
    paths: DatasetPaths,
    model_path: Path,
    test_metrics: dict[str, float],
    phase: str | None,
) -> str:
    """Record the evaluated model as an MLflow logged model of the pipeline execution.

    The file itself is versioned by DVC, so the logged model is *external*: its
    tags say where DVC keeps it (path, md5); its test metrics are linked to it
    and to the manifest dataset (logged by the active evaluate run). Its source
    run is the pipeline's parent run, the row of the runs table (MLflow 3.17's
    Models column lists the models whose source run is the row), and it is an
    output of both runs, so the model page shows its lineage. Returns the model id.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput

    active = mlflow.active_run()
    client = mlflow.MlflowClient()
    parent = client.get_run(active.info.run_id).data.tags.get(PARENT_RUN_TAG)
    md5 = file_md5(model_path)
    model = mlflow.create_external_model(
        name=f"{paths.dataset}-{cfg.train.backbone_name}",
        source_run_id=parent or active.info.run_id,
        model_type="keras",
        params={key: str(value) for key, value in flat_params(cfg, paths.dataset).items()},
        tags={
            "dvc.path": model_path.relative_to(paths.root).as_posix(),
            "dvc.md5": md5,
            "dvc.cache": str(dvc_cache_path(paths.root, md5) or ""),
            "model.phase": str(phase),
            "backbone": cfg.train.backbone,
            "dataset": paths.dataset,
        },
    )
    with _quiet_datasets():
        dataset = manifest_dataset(cfg, paths)
        mlflow.log_metrics(test_metrics, model_id=model.model_id, dataset=dataset)
    for run_id in dict.fromkeys([active.info.run_id, parent or active.info.run_id]):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    return model.model_id


INPUT_CONTEXTS = {"train": "training", "finetune": "training", "evaluate": "evaluation"}
"""The phases that read the manifest, and the context MLflow shows for it."""


@dataclass(frozen=True)
class RunRecord:
    phase: str
    run_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str


def read_record(paths: DatasetPaths, phase: str) -> RunRecord | None:
    path = paths.run_record(phase)
    if not path.exists():
        return None
    return RunRecord(**json.loads(path.read_text()))


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
    _log_manifest(cfg, paths, run.info.run_id, "pipeline")
    return run.info.run_id


def _log_manifest(cfg: Config, paths: DatasetPaths, run_id: str, context: str) -> None:
    """Log the manifest as an input of ``run_id`` (what fills the UI's Dataset column)."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = manifest_dataset(cfg, paths)
    if dataset is not None:
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        with _quiet_datasets():
            entity = dataset._to_mlflow_entity()  # what mlflow.log_input sends, for any run id
        MlflowClient().log_inputs(run_id, datasets=[DatasetInput(entity, tags)])


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
        record = read_record(paths, "train")
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
        if parent is None:
            parent = start_pipeline_run(cfg, paths)
        end_stale_runs(experiment_id, paths, f"a new attempt of {phase} started", phase=phase)
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=phase,
            parent_run_id=parent,
            tags={**lineage_tags(cfg, paths), "phase": phase},
        ) as run:
            mlflow.log_params(flat_params(cfg, paths.dataset))
            if phase in INPUT_CONTEXTS:
                _log_manifest(cfg, paths, run.info.run_id, INPUT_CONTEXTS[phase])
                # a scheduled parent opens before validate writes the manifest
                if not mlflow.MlflowClient().get_run(parent).inputs.dataset_inputs:
                    _log_manifest(cfg, paths, parent, "pipeline")
            yield run
        record = RunRecord(phase, run.info.run_id, parent, experiment_id, mlflow.get_tracking_uri())
        write_json(paths.run_record(phase), record.__dict__)
        if last and not scheduled:
            end_pipeline_run(cfg, paths, parent, "FINISHED")


@contextmanager
def server_errors(uri: str, rerun: str) -> Iterator[None]:
    """Turn "the tracking server cannot be reached" into a one-line StageError.

    MLflow raises an ``MlflowException`` holding the whole failed request (or,
    ending the run on the way out, a second one); with an ``http(s)://`` store
    that could not be reached (refused, timed out, still failing after MLflow's
    retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``)
    the error names the server and the fix instead. ``rerun``: the command to run again.
    """
    try:
        yield
    except Exception as error:
        denied = access_error(error, uri)
        if denied:
            raise StageError(f"{denied}, then rerun `{rerun}`") from None
        reason = unreachable_reason(error) if uri.startswith(("http://", "https://")) else None
        if reason is None:
            raise
        raise StageError(
            f"MLflow tracking server {uri} unreachable ({reason}); start it, or point "
            f"MLFLOW_TRACKING_URI (or tracking.uri) at a running one, then rerun `{rerun}`"
        ) from None


def access_error(error: BaseException | None, uri: str | None = None) -> str | None:
    """What to fix when an authenticating server (``mlflow/serve.sh`` with ``MLFLOW_AUTH``)
    refused the request behind ``error`` (401: no or wrong login; 403: the account may not);
    ``None`` for any other error. Names the variables to set, never a password."""
    codes = {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    error = next((e for e in _causes(error) if getattr(e, "error_code", "") in codes), None)
    if error is None:
        return None
    server = f"MLflow tracking server {uri or os.environ.get('MLFLOW_TRACKING_URI', '')}".rstrip()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if error.error_code == "PERMISSION_DENIED":
        request = str(error).split(" failed", 1)[0].removeprefix("API request to endpoint ")
        return (
            f"{server} denied MLFLOW_TRACKING_USERNAME={user} the request {request}: run the "
            "pipeline as the pipeline account (read-only accounts cannot write runs or move "
            "aliases)"
        )
    if not user or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        missing = "MLFLOW_TRACKING_USERNAME" if not user else "MLFLOW_TRACKING_PASSWORD"
        return (
            f"{server} requires a login and {missing} is not set; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the pipeline account's"
        )
    return (
        f"{server} refused the login of MLFLOW_TRACKING_USERNAME={user}; check "
        "MLFLOW_TRACKING_PASSWORD (or ask the MLflow admin to reset the account)"
    )


def unreachable_reason(error: BaseException | None) -> str | None:
    """Why a server could not be reached, when ``error`` or what it was raised from says so."""
    import requests

    for cause in _causes(error):
        if isinstance(cause, requests.exceptions.Timeout):
            return "timed out"
        if isinstance(cause, requests.exceptions.ConnectionError):
            return "connection refused" if "refused" in str(cause) else "connection failed"
        if isinstance(cause, requests.exceptions.RetryError):
            return "still failing after retries"
    return None


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and what it was raised from or during, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def load_logged_model(uri: str) -> tuple[keras.Model, dict[str, Any]]:
    """Download and load the Keras model logged at ``uri`` (``models:/``, ``runs:/``, a folder).

    Returns the model and its MLmodel ``metadata`` (``classes``, ``image_size``...).
    A model that cannot be fetched or loaded is a StageError naming the store.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    import tasks.ml.model  # noqa: F401 - registers the custom layers the model may use

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        metadata = Model.load(str(local / "MLmodel")).metadata or {}
        model = mlflow.tensorflow.load_model(str(local))
    except (MlflowException, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StageError(
            f"cannot load MLflow model {uri}: {first} (tracking store: "
            f"{mlflow.get_tracking_uri()}; set MLFLOW_TRACKING_URI to the right one)"
        ) from None
    return model, dict(metadata)


def epoch_logger(
    phase: str,
    offset: int,
    images: int = 0,
    restored: list[dict[str, Any]] | None = None,
    stream: Any = None,
) -> keras.callbacks.Callback:
    """A Keras callback that logs ``loss``/``accuracy``/``val_*`` to MLflow per epoch
    (step = global epoch) and keeps them as history rows in ``.rows``; ``offset`` is
    the epochs of earlier phases.

    Each epoch also prints one line (phase, epoch n/N, the metrics, training
    images per second over ``images``, the time left at that pace); on a terminal
    (``stream`` a TTY, standard output by default) a Keras progress bar runs through
    each epoch's batches first, and logs and pipes get the lines only. ``restored``:
    the epochs a killed attempt finished (``PhaseCheckpoint.finished``), logged
    again to this attempt's run so its history is whole.

    Our own callback, not ``mlflow.tensorflow.autolog`` (which needs TensorBoard
    and logs different names per setup).
    """
    import keras
    import mlflow

    from tasks.ml.training import METRICS

    out = sys.stdout if stream is None else stream
    terminal = bool(getattr(out, "isatty", lambda: False)())

    class EpochLogger(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[dict[str, Any]] = []
            self.epoch_seconds: list[float] = []  # this attempt's epochs
            self.started = time.perf_counter()
            self.bar: keras.utils.Progbar | None = None
            for logs in restored or []:
                self._record(int(logs["epoch"]), logs)

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.started = time.perf_counter()
            if terminal:
                total = int(self.params.get("epochs") or 0)
                out.write(f"{phase}, epoch {epoch + 1}/{total}\n")
                self.bar = keras.utils.Progbar(self.params.get("steps"), unit_name="batch")
                self.batches, self.shown = 0, []

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if self.bar is not None:
                self.batches = batch + 1
                self.shown = [(k, float(v)) for k, v in (logs or {}).items() if k in METRICS]
                self.bar.update(self.batches, values=self.shown, finalize=False)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.bar is not None:  # the bar's last state (it draws at most every 50 ms)
                self.bar.update(self.batches, values=self.shown, finalize=True)
                self.bar = None
            values = self._record(epoch, logs or {})
            seconds = time.perf_counter() - self.started
            self.epoch_seconds.append(seconds)
            total = int(self.params.get("epochs") or 0)
            shown = " ".join(f"{name} {value:.4f}" for name, value in values.items())
            rate = f", {images / seconds:.0f} images/s" if images and seconds > 0 else ""
            left = max(total - epoch - 1, 0) * seconds
            _log.info(
                "%s epoch %d/%d: %s (%.1f s%s, about %.0f s left)",
                phase, epoch + 1, total, shown, seconds, rate, left,
            )  # fmt: skip

        def images_per_second(self) -> float | None:
            """Training images per second over this attempt's epochs (None: none ran)."""
            spent = sum(self.epoch_seconds)
            return images * len(self.epoch_seconds) / spent if images and spent > 0 else None

        def _record(self, epoch: int, logs: dict[str, Any]) -> dict[str, float]:
            step = offset + epoch + 1
            values = {name: float(logs[name]) for name in METRICS if name in logs}
            self.rows.append({"phase": phase, "epoch": step, **values})
            mlflow.log_metrics(values, step=step)
            return values

    return EpochLogger()


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


# --- the registry's aliases and their history ------------------------------------

HISTORY_TAG = "alias_history."
"""Registered-model tag prefix: one tag per alias move, ``alias_history.<UTC time>.v<version>``.

MLflow keeps only where an alias points now; these tags keep where it pointed
before (they live with the registered model, so they survive runs being deleted).
"""
_HISTORY_REASON = 600


def current_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None (no such alias or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        _raise_unless_missing(client, name, error)
        return None


def _raise_unless_missing(client: MlflowClient, name: str, error: Exception) -> None:
    """Re-raise ``error`` unless it says that registered model ``name`` (or its alias) does
    not exist. A server with logins answers 403 for a model that does not exist yet; a
    refused login, or a denial on a model that does, is raised."""
    if not access_error(error):
        return
    if getattr(error, "error_code", "") == "PERMISSION_DENIED":
        escaped = name.replace("'", "\\'")
        if not client.search_registered_models(filter_string=f"name = '{escaped}'"):
            return
    raise error


def promote_version(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    """``version`` becomes ``@champion``; the champion it replaces keeps ``@previous``."""
    if previous is not None and previous != version:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, CHAMPION, version)
    challenger = current_alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)


def record_alias_move(client: MlflowClient, name: str, entry: dict[str, Any]) -> str:
    """Append ``entry`` (version, alias, decision, reason, run…) to the model's history tags.

    Returns the tag key. Keys sort by time, so reading them back in key order
    replays the moves.
    """
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    key = f"{HISTORY_TAG}{now:%Y%m%dT%H%M%S.%f}Z.v{entry['version']}"
    record = {"time": now.isoformat(timespec="seconds"), **entry}
    if len(str(record.get("reason", ""))) > _HISTORY_REASON:
        record["reason"] = str(record["reason"])[: _HISTORY_REASON - 1] + "…"
    client.set_registered_model_tag(name, key, json.dumps(record, sort_keys=True))
    return key


def alias_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of registered model ``name``, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as error:
        _raise_unless_missing(client, name, error)
        return []
    moves = []
    for key in sorted(k for k in tags if k.startswith(HISTORY_TAG)):
        try:
            moves.append(json.loads(tags[key]))
        except json.JSONDecodeError:
            continue
    return moves


def champion_tenures(moves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Who held ``@champion`` from when until when (``until`` None: still holds it)."""
    tenures: list[dict[str, Any]] = []
    for move in moves:
        if move.get("alias") != CHAMPION:
            continue
        if tenures and tenures[-1]["until"] is None:
            tenures[-1]["until"] = move["time"]
        tenures.append({"version": str(move["version"]), "since": move["time"], "until": None})
    return tenures


def format_history(name: str, moves: list[dict[str, Any]]) -> str:
    """The history as a person reads it: each move, then who was ``@champion`` when."""
    if not moves:
        return f"{name}: no alias moves recorded yet (run register first)"
    lines = [f"{name}: alias moves, oldest first"]
    for move in moves:
        who = f" by {move['by']}" if move.get("by") else ""
        previous = f", previous champion v{move['previous']}" if move.get("previous") else ""
        verdict = f" [{move['verdict']}]" if move.get("verdict") else ""
        lines.append(
            f"  {move['time']}  v{move['version']} -> @{move['alias']}  "
            f"{move.get('decision', '')}{verdict}{who}{previous}"
        )
        if move.get("reason"):
            lines.append(f"      {move['reason']}")
        where = [f"run {move['run_id']}"] if move.get("run_id") else []
        if move.get("experiment"):
            where.append(f"DVC experiment {move['experiment']}")
        if where:
            lines.append(f"      {', '.join(where)}")
    tenures = champion_tenures(moves)
    lines.append(f"@{CHAMPION}, who held it when:")
    if not tenures:
        lines.append("  nobody yet")
    for tenure in tenures:
        until = tenure["until"] or "now"
        lines.append(f"  v{tenure['version']}  {tenure['since']} -> {until}")
    return "\n".join(lines)
