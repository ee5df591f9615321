"""The MLflow parent run of a scheduled run: opened by ``prepare``, ended by ``finish``.

One parent run spans a DAG run; each stage's phase run is its child
(``$TASKS_PARENT_RUN_ID``). Both ends run ``python -m tasks pipeline-run`` in the
run's workspace, a process like every stage, so MLflow's store migrations stay out
of the Airflow worker. ``finish`` ends it FINISHED with the DVC experiment's name
and rev, or FAILED naming the task that failed.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any

from tasks.errors import StageFailed
from tasks.orchestration.process import run_checked
from tasks.orchestration.project import Project
from tasks.orchestration.records import read_workspace_record, stage_env

log = logging.getLogger(__name__)


def start_parent_run(project: Project, dataset: str) -> str:
    """Open the run's parent run (the workspace record must exist); its id."""
    return _pipeline_run(project, dataset, "start").strip().splitlines()[-1]


def end_parent_run(project: Project, dataset: str, status: str, **tags: str) -> None:
    """End the run's parent run with ``status`` and ``tags``."""
    options = (f"--tag={k}={v}" for k, v in tags.items())
    _pipeline_run(project, dataset, "end", "--status", status, *options)


def _pipeline_run(project: Project, dataset: str, action: str, *options: str) -> str:
    ws = project.workspace(dataset)
    argv = [sys.executable, "-m", "tasks", "pipeline-run", action, dataset, *options]
    env = stage_env(read_workspace_record(ws))
    return run_checked(argv, f"MLflow parent run of {dataset} ({action})", cwd=ws, env=env)


@dataclass(frozen=True)
class PipelineOutcome:
    """How a DAG run ended, as the ``finish`` task records it on the MLflow parent run."""

    dataset: str
    status: str
    parent_run_id: str | None
    experiment: str | None
    failed_task: str | None
    message: str

    def xcom(self) -> dict[str, Any]:
        return asdict(self)


def finish_pipeline(
    project: Project,
    dataset: str,
    prepared: dict[str, Any] | None,
    failed_task: str | None,
    tags: dict[str, str] | None = None,
) -> PipelineOutcome:
    """End the run's MLflow parent run: FINISHED with the experiment's name and rev, or
    FAILED naming the task that failed. ``prepared`` is the prepare task's XCom (None when
    prepare itself failed: then no parent run was opened and there is nothing to end);
    ``tags`` go on the parent run either way (a sweep's id and combination)."""
    if not prepared or not prepared.get("parent_run_id"):
        return PipelineOutcome(
            dataset,
            "FAILED",
            None,
            None,
            failed_task or "prepare",
            f"{dataset}: the run failed before it started (prepare); no MLflow run was opened",
        )
    parent = prepared["parent_run_id"]
    record = read_workspace_record(project.workspace(dataset))
    if failed_task:
        failed = {**(tags or {}), "pipeline.failed_task": failed_task}
        end_parent_run(project, dataset, "FAILED", **failed)
        message = (
            f"{dataset}: {failed_task} failed; MLflow parent run {parent} ended FAILED "
            "(its log names the reason)"
        )
        return PipelineOutcome(dataset, "FAILED", parent, None, failed_task, message)
    finished = {
        **(tags or {}),
        "dvc.exp_name": record["experiment"],
        "dvc.exp_rev": record.get("experiment_rev", ""),
        "dvc.exp_baseline_rev": record["baseline"],
    }
    end_parent_run(project, dataset, "FINISHED", **finished)
    message = f"{dataset}: finished; experiment {record['experiment']}, MLflow parent run {parent}"
    log.info("%s", message)
    return PipelineOutcome(dataset, "FINISHED", parent, record["experiment"], None, message)


def finish_tasks(
    project: Project,
    dataset: str,
    results: dict[str, Any],
    tags: dict[str, str] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """The ``finish`` task: end the parent run from each task's XCom, in order (None: that
    task failed or never ran). Raises a one-line, not retryable :class:`StageFailed`
    naming the first task that failed; ``label`` prefixes it (a sweep lane's key)."""
    failed = next((name for name, value in results.items() if value is None), None)
    outcome = finish_pipeline(project, dataset, results.get("prepare"), failed, tags)
    if failed:
        message = f"{label}: {outcome.message}" if label else outcome.message
        raise StageFailed(message, retryable=False)
    return outcome.xcom()
