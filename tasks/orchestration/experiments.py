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
from tasks.orchestration.records import read_workspace_record, update_workspace_record
from tasks.orchestration.stage_graph import read_stage_graph
from tasks.orchestration.workspace import git

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
    record = read_workspace_record(ws)
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
            reason = str(failure("record", dataset, lines)).split(" failed: ", 1)[-1]
            raise StageFailed(
                f"record@{dataset}: the git remote {remote} refused experiment {name} "
                f"({reason.removeprefix('ERROR: ')}); it stays saved in {ws}: let the pipeline "
                "account push refs/exps there, then retry the task",
                retryable=True,
            )
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
    update_workspace_record(ws, experiment_rev=rev)
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
