"""Every scheduled run is a DVC experiment: saved, pushed, and findable from MLflow.

A DAG run works in its dataset's workspace, a git checkout of the deployed
commit (``tasks.orchestration.workspace``). Its last stage done, the run is
recorded with DVC's own experiment machinery:

1. ``dvc exp save -n <name>``: a commit under ``refs/exps`` holding the run's
   ``params.yaml`` and ``dvc.lock`` (which data, params and code made which
   outputs), on top of the deployed commit;
2. ``dvc exp push <git remote> <name>``: the experiment's git ref to the
   project's repository (and its outputs to the DVC remote);
3. ``dvc push``: every output of the run to the DVC remote.

Then ``dvc exp show`` in the project lists the scheduled run beside local
experiments, and ``dvc exp apply <name>`` + ``dvc pull`` restores its
manifest, models and reports byte for byte. The name is readable: the dataset
and the Airflow run id (``cats_vs_dogs-scheduled__2026-11-30T00-00-00-00-00``).

Without a git remote (a project that is not a git checkout, e.g. files baked
into an image) the experiment is saved in the workspace's own repository only
("local-only"): ``dvc exp show`` there lists it, and the note says so.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tasks.errors import StageFailed
from tasks.orchestration.dvc import dvc_command, failure, push_outputs
from tasks.orchestration.project import Project
from tasks.orchestration.stage_graph import read_stage_graph
from tasks.orchestration.workspace import git, read_run_record, update_run_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentRecord:
    """What the record task hands to XCom: small values only."""

    dataset: str
    name: str
    rev: str
    baseline: str
    remote: str | None
    pushed: int
    seconds: float

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    workspace: str = ""

    def __str__(self) -> str:
        if self.remote:
            where = f"pushed to {self.remote}"
            restore = (
                f"in a clone of {self.remote}: dvc exp pull origin {self.name} && "
                f"dvc exp apply {self.name} && dvc pull"
            )
        else:
            where = "local-only (the project is no git checkout)"
            restore = f"cd {self.workspace} && dvc exp apply {self.name} && dvc checkout"
        return (
            f"experiment {self.name} ({self.rev[:10]} on {self.baseline[:10]}) {where}; "
            f"dvc push sent {self.pushed} file(s); {self.seconds:.1f} s\n  restore: {restore}"
        )


def record_experiment(
    project: Project, dataset: str, stages: Sequence[str] | None = None
) -> ExperimentRecord:
    """Save the workspace's run as a DVC experiment, push it, and push its outputs.

    ``stages``: the stages this run runs (a sweep lane stops before ``register``);
    default every stage of the dataset.
    """
    ws = project.workspace(dataset)
    record = read_run_record(ws)
    name = record["experiment"]
    start = time.perf_counter()
    graph = read_stage_graph(ws / "dvc.yaml", dataset)
    specs = [spec for spec in graph.stages if stages is None or spec.name in stages]
    # This dataset's stages only (the other datasets' outputs are not in this workspace).
    # Uncached outputs (metrics, the gate's decision, run ids, histories) are files git
    # keeps: include them; cached ones are git-ignored and travel through dvc.lock.
    include = [
        arg
        for spec in specs
        for out in spec.outputs
        if (ws / out).exists() and not _ignored(ws, out)
        for arg in ("--include-untracked", out)
    ]
    targets = [spec.target for spec in specs]
    save = ["exp", "save", "--force", "--name", name, *include, *targets]
    code, lines = dvc_command(ws, save, record)
    if code:
        raise failure("record", dataset, lines)
    rev = git(ws, "rev-parse", _exp_ref(ws, name))
    remote = record.get("git_remote")
    if remote:
        code, lines = dvc_command(ws, ["exp", "push", "--force", remote, name], record)
        if code:
            raise failure("record", dataset, lines)
    pushed = push_outputs(project, dataset).pushed
    result = ExperimentRecord(
        dataset=dataset,
        name=name,
        rev=rev,
        baseline=record["baseline"],
        remote=remote,
        pushed=pushed,
        seconds=round(time.perf_counter() - start, 2),
        workspace=str(ws),
    )
    update_run_record(ws, experiment_rev=rev)
    log.info("%s", result)
    return result


def _ignored(ws: Any, path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "--quiet", path], cwd=ws).returncode == 0


def _exp_ref(ws: Any, name: str) -> str:
    """The git ref of experiment ``name`` (DVC files it under ``refs/exps/<baseline>/``)."""
    refs = git(ws, "for-each-ref", "--format=%(refname)", "refs/exps").splitlines()
    for ref in refs:
        if ref.rsplit("/", 1)[-1] == name:
            return ref
    raise StageFailed(f"record: dvc exp save made no ref for {name}", retryable=True)


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
    from tasks.orchestration.workspace import pipeline_run

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
    record = read_run_record(project.workspace(dataset))
    if failed_task:
        failed = {**(tags or {}), "pipeline.failed_task": failed_task}
        pipeline_run(project, dataset, "end", "FAILED", **failed)
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
    pipeline_run(project, dataset, "end", "FINISHED", **finished)
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


def headline(
    dataset: str, dag_run_id: str, experiment: str, leaf_results: Sequence[Any] | None
) -> dict[str, Any]:
    """The model asset's extra: which run made it, and its last stages' metrics (a leaf
    that pushed no result dict, e.g. a container's JSON string, adds none)."""
    values: dict[str, Any] = {
        "dataset": dataset,
        "dag_run_id": dag_run_id,
        "experiment": experiment,
    }
    for value in leaf_results or []:
        if isinstance(value, dict):
            values.update(value.get("metrics") or {})
    return values
