"""The DVC runner: each stage task runs ``dvc repro`` in its dataset's workspace.

:func:`run_stage` runs ``dvc repro --single-item <stage>@<ds>`` in the
workspace (``tasks.orchestration.workspace``), so DVC skips an unchanged stage
and the workspace's ``dvc.lock`` records exactly the params, code and data
each output was built from; :func:`push_outputs` runs ``dvc push`` (for the
experiment record, ``tasks.orchestration.experiments``). A failure is a
:class:`StageFailed` with the stage command's own one-line error and whether a
retry could help (:func:`should_retry`).

A run's overrides are in the workspace's params.yaml; each stage command is also
told them (``$TASKS_RUN_OVERRIDES``) so MLflow records them in the ``overrides`` tag.

Imported when Airflow parses the DAG files: standard library and base modules only.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.cluster import cluster_from_env
from tasks.errors import ConfigError, StageFailed
from tasks.orchestration.project import Project
from tasks.orchestration.records import read_workspace_record, stage_env, write_workspace_record
from tasks.orchestration.stage_graph import read_stage_graph
from tasks.orchestration.workers import chief_done, follow_stage
from tasks.orchestration.workspace import default_remote

log = logging.getLogger(__name__)

NO_RETRY_STAGES = frozenset({"validate"})
"""A failed validation is deterministic: retrying cannot help (a bad run conf fails
``prepare`` without retries too)."""
NETWORK_STAGES = frozenset({"download", "record"})
"""Network-bound stages retry even on a user-fixable (exit 2) error: a source may come back."""


def should_retry(stage: str, error: StageFailed) -> bool:
    """Whether Airflow should try ``stage`` again after ``error`` (else fail the task now)."""
    if stage in NO_RETRY_STAGES:
        return False
    return error.retryable or stage in NETWORK_STAGES


@dataclass(frozen=True)
class StageResult:
    """What one stage task hands to XCom: small values only."""

    stage: str
    dataset: str
    ran: bool
    seconds: float
    workspace: str
    restored: bool = False
    """Not run: DVC's run cache (shared by all workspaces) held outputs for these inputs."""
    outputs: list[str] = field(default_factory=list)
    run_id: str | None = None
    parent_run_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        state = "unchanged, skipped"
        if self.ran:
            state = "ran"
        elif self.restored:
            state = "restored from the run cache"
        text = f"{self.stage}@{self.dataset}: {state} in {self.seconds:.1f} s"
        if self.run_id:
            text += f"; MLflow run {self.run_id}"
        if self.metrics:
            text += "; " + ", ".join(f"{k}={v}" for k, v in self.metrics.items())
        return text


def dvc_command(
    ws: Path, args: Sequence[str], record: Mapping[str, Any] | None = None
) -> tuple[int, list[str]]:
    """Run ``dvc <args>`` in ``ws``, echoing its output to the log; returns (code, lines).

    ``record`` (the workspace record) gives the stage processes the run's overrides,
    parent run, experiment name and store.
    """
    return workspace_command(ws, ["dvc", *args], record)


def workspace_command(
    ws: Path,
    args: Sequence[str],
    record: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> tuple[int, list[str]]:
    """Run ``python -m <args>`` (``dvc ...``, ``tasks ...``) in ``ws`` with the run's
    environment (``env``, else the stage environment of ``record``), echoing its output to
    the log; returns (exit code, output lines)."""
    cmd = [sys.executable, "-m", *args]
    log.info("$ %s  (in %s)", " ".join(args), ws)
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=ws,
        env=dict(env) if env is not None else stage_env(record or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            log.info("%s", line)
        code = proc.wait()
    return code, lines


_EXIT = re.compile(r"exited with (-?\d+)")


def failure(stage: str, dataset: str, lines: list[str]) -> StageFailed:
    """The one-line reason, and whether trying again could help.

    The stage command's own ``error:`` line (exit 2) is user-fixable: no retry.
    A command that crashed otherwise (killed, out of memory) may pass on a
    retry; so may DVC failing to take its lock. Other DVC errors (missing
    params, a broken dvc.yaml) are deterministic.
    """
    text = "\n".join(lines)
    exits = _EXIT.findall(text)
    user_errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if user_errors:
        return StageFailed(f"{stage}@{dataset}: {user_errors[-1]}", retryable=False)
    dvc_errors = [line for line in lines if line.startswith("ERROR")]
    reason = dvc_errors[-1] if dvc_errors else (lines[-1] if lines else "no output")
    if exits:
        retryable = exits[-1] != "2"
    else:
        retryable = "lock" in reason.lower() or not dvc_errors
    return StageFailed(f"{stage}@{dataset} failed: {reason}", retryable=retryable)


def _small(payload: Any, limit: int = 24) -> dict[str, Any]:
    """Top-level scalars of a JSON object (what XCom may carry)."""
    if not isinstance(payload, dict):
        return {}
    small = {}
    for key, value in payload.items():
        if isinstance(value, bool | int | float) or value is None:
            small[key] = value
        elif isinstance(value, str) and len(value) <= 200:
            small[key] = value
        if len(small) >= limit:
            break
    return small


def run_stage(project: Project, dataset: str, stage: str) -> StageResult:
    """``dvc repro --single-item <stage>@<dataset>`` in the dataset's workspace.

    Raises :class:`StageFailed` with the stage command's one-line error.
    """
    ws = project.workspace(dataset)
    record = read_workspace_record(ws)
    spec = read_stage_graph(ws / "dvc.yaml", dataset).stage(stage)
    start = time.perf_counter()
    code, lines = dvc_command(ws, ["repro", "--single-item", spec.target], record)
    seconds = round(time.perf_counter() - start, 2)
    if code:
        raise failure(stage, dataset, lines)
    ran = any(f"Running stage '{spec.target}'" in line for line in lines)
    restored = any(f"Stage '{spec.target}' is cached" in line for line in lines)
    metrics: dict[str, Any] = {}
    for path in spec.metrics:
        target = ws / path
        if target.is_file():
            metrics.update(_small(json.loads(target.read_text())))
    run = _run_ids(project.dataset_paths(dataset).run_record(stage))
    result = StageResult(
        stage=stage,
        dataset=dataset,
        ran=ran,
        seconds=seconds,
        workspace=str(ws),
        restored=restored,
        outputs=list(spec.outputs),
        run_id=run.get("run_id"),
        parent_run_id=run.get("parent_run_id"),
        metrics=metrics,
    )
    _record_stage(ws, result)
    log.info("%s", result)
    return result


def _run_ids(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return _small(json.loads(path.read_text()))
    except json.JSONDecodeError:
        return {}


def _record_stage(ws: Path, result: StageResult) -> None:
    record = read_workspace_record(ws)
    record.setdefault("stages", {})[result.stage] = {"ran": result.ran, "seconds": result.seconds}
    write_workspace_record(ws, record)


def stage_command(
    stage: str, dataset: str, result_json: str | None = None, lane: str | None = None
) -> str | StageResult:
    """``python -m tasks dvc-stage``: what a GPU pod or container runs.

    ``result_json`` writes the XCom value there (KubernetesPodOperator reads
    ``/airflow/xcom/return.json``); ``-`` prints it as the last line instead.
    ``lane`` (``<sweep>/<combination>``): the stage of that sweep lane's workspace.
    Across machines (``TASKS_WORKER_HOSTS``), worker 0 runs ``dvc repro`` and the
    others the stage's command (:mod:`tasks.orchestration.workers`).
    """
    project = Project.from_env()
    if lane is not None:
        sweep, _, key = lane.partition("/")
        if not sweep or not key or "/" in key:
            raise ConfigError(
                f"--lane {lane!r}: write it as SWEEP/COMBINATION, e.g. "
                "manual__2026-01-05/cats_vs_dogs--mobilenet_v2"
            )
        project = project.for_lane(sweep, key)
    result = _stage_as_worker(project, dataset, stage)
    payload = json.dumps(result if isinstance(result, dict) else result.xcom(), sort_keys=True)
    if result_json == "-":
        return payload
    if result_json:
        Path(result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(result_json).write_text(payload)
    return payload if isinstance(result, dict) else result


def _stage_as_worker(project: Project, dataset: str, stage: str) -> StageResult | dict[str, Any]:
    """The stage as this process's worker runs it: ``dvc repro`` on one machine and on the
    chief; the stage's command on the other workers (``tasks.orchestration.workers``)."""
    cluster = cluster_from_env(None)
    if cluster.workers == 1:
        return run_stage(project, dataset, stage)
    ws = project.workspace(dataset)
    if not cluster.chief:
        return follow_stage(ws, dataset, stage, cluster)
    ran = None
    try:
        result = run_stage(project, dataset, stage)
        ran = result.ran
    finally:
        chief_done(ws, stage, cluster, ran)
    return result


@dataclass(frozen=True)
class PushResult:
    dataset: str
    workspace: str
    pushed: int
    seconds: float

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"dvc push ({self.dataset}): {self.pushed} file(s) sent in {self.seconds:.1f} s"


_PUSHED = re.compile(r"(\d+) files? pushed")


_QUERY = re.compile(r"(https?://[^\s\"'?]+)\?[^\s\"']*")


def push_failure(ws: Path, dataset: str, lines: list[str]) -> StageFailed:
    """``dvc push`` failed: one line naming the remote, DVC's reason and the fix.

    Nothing is lost: ``dvc push`` only reads the cache, so every output stays
    there for the retry (the record task retries: ``NETWORK_STAGES``).
    """
    error = failure("push", dataset, lines)
    reason = str(error).removeprefix(f"push@{dataset} failed: ").removeprefix("ERROR: ")
    reason = _QUERY.sub(r"\1", reason.removeprefix("unexpected error - "))
    remote = default_remote(ws) or "the default remote"
    return StageFailed(
        f"push@{dataset}: dvc push to remote {remote} failed: {reason}; make the remote "
        "reachable (endpoint up, bucket and credentials right) and retry; the outputs stay in "
        "the local DVC cache",
        retryable=error.retryable,
    )


def push_outputs(project: Project, dataset: str) -> PushResult:
    """``dvc push`` the workspace's outputs (to the project's remote, or ``TASKS_DVC_REMOTE``)."""
    ws = project.workspace(dataset)
    record = read_workspace_record(ws)
    start = time.perf_counter()
    code, lines = dvc_command(ws, ["push"], record)
    if code:
        raise push_failure(ws, dataset, lines)
    found = _PUSHED.findall("\n".join(lines))
    result = PushResult(
        dataset, str(ws), int(found[-1]) if found else 0, round(time.perf_counter() - start, 2)
    )
    log.info("%s", result)
    return result
