"""What the DAG files share: retry policy, GPU placement, the error mapping, stage tasks.

``dags/`` wires; this module holds the few rules every DAG family applies the same
way, so each DAG file is a list of ``@task`` functions:

- :func:`retry_args`: deterministic stages never retry; network, tracking and
  training stages back off exponentially (``schedule.retries``);
- :func:`placement`: a GPU stage takes a slot of the GPU pool (and the Celery GPU
  queue on the local backend), which is what spreads them over GPU workers; a
  multi-worker stage takes one slot per worker pod;
- :func:`fails_fast`: our errors become Airflow's decision: a user-fixable error
  fails the task at once with its one line, a failure a retry could help is raised
  for Airflow to retry;
- :func:`stage_operator`: a GPU stage as a pod or container on the kubernetes and
  docker backends, or as an Indexed Job of ``train.workers`` pods
  (``train.distribute: multi_worker`` on kubernetes: :mod:`.k8s_job`).

Airflow is imported inside the functions: the CLI imports orchestration without it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tasks.config import Config
from tasks.errors import ConfigError, StageFailed
from tasks.orchestration.backends import Backend, SweepLane, docker_stage, kubernetes_stage
from tasks.orchestration.dvc import should_retry
from tasks.orchestration.k8s_job import indexed_workers, kubernetes_job_stage
from tasks.orchestration.project import Project

TAG = "transfer-learning"
START = datetime(2025, 1, 1, tzinfo=UTC)
RETRY_DELAY_ENV = "TASKS_RETRY_DELAY_SECONDS"

F = TypeVar("F", bound=Callable[..., Any])


def model_asset(project: Project, dataset: str) -> Any:
    """The dataset's model output: updated by the ``record`` task of its DAG."""
    from airflow.sdk import Asset

    return Asset(name=project.asset_name(dataset), uri=project.asset_uri(dataset), group="model")


def drift_asset(dataset: str) -> Any:
    """``drift/<dataset>``: updated by the scoring DAG's ``drift_event`` when a drop drifted;
    its event's ``extra`` says which drops, the model version and the tests that flagged."""
    from airflow.sdk import Asset

    return Asset(name=Project.drift_asset_name(dataset), group="drift")


def training_schedule(cfg: Config, dataset: str) -> Any:
    """The dataset DAG's schedule: ``schedule.cron``; with ``schedule.retrain_on_drift``,
    that cron or the dataset's drift asset, whichever comes first (only the asset without
    a cron). ``max_active_runs=1`` holds a drift-triggered run back while one is running."""
    if not cfg.schedule.retrain_on_drift:
        return cfg.schedule.cron
    if cfg.schedule.cron is None:
        return drift_asset(dataset)
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    cron = CronTriggerTimetable(cfg.schedule.cron, timezone="UTC")
    return AssetOrTimeSchedule(timetable=cron, assets=drift_asset(dataset))


def retry_args(cfg: Config, stage: str) -> dict[str, Any]:
    """A task's retries, with exponential back-off: for what the infrastructure loses (a
    task the executor could not send while the broker was down, a worker lost mid-task).

    Every task has them, ``NO_RETRY_STAGES`` too: a failure of the stage itself decides
    retry-or-fail in :func:`fails_fast` (a failed validation fails at once, whatever the
    retries), but a task that never reached a worker must be tried again.
    """
    delay = float(os.environ.get(RETRY_DELAY_ENV, "60"))
    return {
        "retries": cfg.schedule.retries,
        "retry_delay": timedelta(seconds=delay),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }


def placement(backend: Backend, stage: str, pods: int = 1) -> dict[str, Any]:
    """A GPU stage's pool slots, one per pod (and the Celery queue on the local backend);
    nothing otherwise."""
    if stage not in backend.gpu_stages:
        return {}
    args: dict[str, Any] = {"pool": backend.pool, "pool_slots": pods}
    if backend.queue and backend.kind == "local":
        args["queue"] = backend.queue
    return args


def task_args(cfg: Config, backend: Backend, stage: str) -> dict[str, Any]:
    """Retries and placement of the task running ``stage``."""
    return retry_args(cfg, stage) | placement(backend, stage, indexed_workers(cfg, backend, stage))


def fails_fast(stage: str | None = None, *, also: tuple[type[Exception], ...] = ()) -> Callable:
    """Map our errors to Airflow's retry-or-fail, for a task running ``stage``.

    A :class:`ConfigError` (and any type in ``also``) fails the task at once with its
    one line, no traceback. A :class:`StageFailed` is raised again for Airflow to retry
    when :func:`should_retry` says a retry could help ``stage`` (never when ``stage`` is
    None), else it fails at once. Anything else propagates: the task's retries decide.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except (ConfigError, StageFailed, *also) as error:
                if isinstance(error, StageFailed) and stage and should_retry(stage, error):
                    raise
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(str(error)) from None

        return run  # type: ignore[return-value]

    return decorate


def stage_operator(
    project: Project,
    cfg: Config,
    dataset: str,
    stage: str,
    backend: Backend,
    *,
    lane: bool = False,
    **args: Any,
) -> Any | None:
    """The pod, Indexed Job or container running ``stage`` on the kubernetes or docker
    backend; None when the stage runs on the worker. ``lane``: a sweep lane's stage, whose
    dataset and workspace are rendered from the ``plan`` task's combination (``dataset``
    names the pods)."""
    if stage not in backend.gpu_stages or backend.kind == "local":
        return None
    sweep_lane = SweepLane(plan_task="plan") if lane else None
    workers = indexed_workers(cfg, backend, stage)
    if workers > 1:
        return kubernetes_job_stage(project, dataset, stage, backend, workers, sweep_lane, **args)
    make = kubernetes_stage if backend.kind == "kubernetes" else docker_stage
    return make(project, dataset, stage, backend, lane=sweep_lane, **args)
