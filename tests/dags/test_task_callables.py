"""The DAG's own decisions: retry or fail per stage and error kind, and what each task
returns or raises.

A task runs here as Airflow's task runner runs it: the operator's ``execute``
through the runner's ``_run_execute_callable``, inside ``set_current_context``,
with a real-shaped context (the execution API's ``DagRun``, real outlet-event
accessors). Only the task instance is a stand-in: its ``xcom_pull`` answers as
Airflow's does (None for a task that pushed nothing, a list for a list of ids).

What the callables call runs for real (``prepare_workspace``, ``run_stage`` on a
workspace whose stage fails, ``finish_pipeline``, ``write_summary``,
``review_command``), except where the unit is the callable's decision alone:
there ``run_stage`` / ``record_experiment`` are replaced by functions that raise
or return the real types (``StageFailed`` as ``failure()`` builds it from a
stage's output, ``StageResult``, ``ExperimentRecord``).

``AirflowFailException`` fails the task at once; any other exception is retried
while the task has retries left (``retry_args``: ``schedule.retries``).
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.config import load_config
from tasks.errors import StageFailed
from tasks.orchestration.dvc import NETWORK_STAGES, NO_RETRY_STAGES, failure, should_retry
from tasks.orchestration.project import Project
from tests.conftest import REPO

DATASET = "cats_vs_dogs"
RUN_ID = "manual__2026-01-05T00:00:00+00:00"
STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])

# --- error kinds: a stage's output as DVC prints it, and whether a retry could help -----

_FAILED = f"ERROR: failed to reproduce '{{stage}}@{DATASET}'"
KINDS: dict[str, tuple[list[str], bool]] = {
    "user error (exit 2)": (
        [
            f"error: no images of class 'cat'; fix datasets.{DATASET}.url",
            f"{_FAILED}: failed to run: python -m tasks {{stage}} {DATASET}, exited with 2",
        ],
        False,
    ),
    "crash (exit 1)": (
        [
            "Traceback (most recent call last):",
            "MemoryError: out of memory",
            f"{_FAILED}: failed to run: python -m tasks {{stage}} {DATASET}, exited with 1",
        ],
        True,
    ),
    "killed (exit -9)": (
        [f"{_FAILED}: failed to run: python -m tasks {{stage}} {DATASET}, exited with -9"],
        True,
    ),
    "dvc lock": (
        [
            "ERROR: Unable to acquire lock. Most likely another DVC process is running or "
            "was terminated abruptly."
        ],
        True,
    ),
    "missing dependency": (
        [f"{_FAILED}: dependency 'data/{DATASET}' does not exist"],
        False,
    ),
    "missing params": (
        [f"{_FAILED}: Parameters 'train.nope' are missing from 'params.yaml'."],
        False,
    ),
    "no output": ([], True),
}

ALWAYS, NEVER, IF_RETRYABLE = "always", "never", "if retryable"
POLICY = {
    "download": ALWAYS,  # a source may come back, even after a user-fixable error
    "validate": NEVER,  # the same data fails the same expectations
    "train": IF_RETRYABLE,
    "finetune": IF_RETRYABLE,
    "evaluate": IF_RETRYABLE,
    "register": IF_RETRYABLE,
    "record": ALWAYS,  # git and DVC remotes are network
}
"""Whether a failed stage is tried again. A new stage needs a line here."""


def _error(stage: str, kind: str) -> StageFailed:
    lines, _ = KINDS[kind]
    return failure(stage, DATASET, [line.format(stage=stage) for line in lines])


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_error_kind_is_classified_retryable_or_not(kind):
    error = _error("train", kind)
    assert error.retryable is KINDS[kind][1]
    assert str(error).startswith("train@cats_vs_dogs")
    assert "\n" not in str(error)


def test_the_retry_policy_names_every_stage_of_dvc_yaml_and_the_record():
    assert set(POLICY) == {*STAGES, "record"}
    assert {s for s, rule in POLICY.items() if rule == NEVER} == NO_RETRY_STAGES
    assert {s for s, rule in POLICY.items() if rule == ALWAYS} == NETWORK_STAGES


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stage", list(POLICY))
def test_should_retry_per_stage_and_error_kind(stage, kind):
    error = _error(stage, kind)
    expected = {ALWAYS: True, NEVER: False, IF_RETRYABLE: KINDS[kind][1]}[POLICY[stage]]
    assert should_retry(stage, error) is expected


def test_user_error_line_wins_over_the_exit_code():
    """The stage's own ``error:`` line is the message, and exit 2 means fix, don't retry."""
    error = _error("train", "user error (exit 2)")
    assert (
        str(error) == "train@cats_vs_dogs: no images of class 'cat'; fix datasets.cats_vs_dogs.url"
    )


# --- running a task as the task runner does -------------------------------------------


class TaskInstance:
    """The task instance's XCom side: ``xcom_pull`` answers like Airflow's, pushes are kept."""

    map_index = -1

    def __init__(self, task_id: str, xcoms: dict[str, Any] | None = None) -> None:
        self.task_id = task_id
        self.xcoms = dict(xcoms or {})
        self.pushed: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str | list[str] | None = None, key: str = "return_value", **_):
        assert key == "return_value"
        if isinstance(task_ids, str):
            return self.xcoms.get(task_ids)
        return [self.xcoms.get(task_id) for task_id in task_ids]

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _dag_run(dag_id: str, conf: Any) -> Any:
    from airflow.sdk.api.datamodels._generated import DagRun

    now = datetime(2026, 1, 5, tzinfo=UTC)
    fields = dict(
        dag_id=dag_id,
        run_id=RUN_ID,
        logical_date=now,
        data_interval_start=now,
        data_interval_end=now,
        run_after=now,
        start_date=now,
        end_date=None,
        run_type="manual",
        state="running",
        conf=conf,
        consumed_asset_events=[],
        partition_key=None,
    )
    if conf is None or isinstance(conf, dict):
        return DagRun(**fields)
    return DagRun.model_construct(**fields)  # the API refuses such a conf; the task must too


def run_task(dag, task_id: str, *, conf: Any = None, xcoms: dict[str, Any] | None = None):
    """Run one task of ``dag`` like the task runner: returns (its XCom value, context)."""
    from airflow.sdk.execution_time.context import OutletEventAccessors, set_current_context
    from airflow.sdk.execution_time.task_runner import _run_execute_callable

    task = dag.get_task(task_id)
    context: dict[str, Any] = {
        "dag": dag,
        "task": task,
        "dag_run": _dag_run(dag.dag_id, conf),
        "run_id": RUN_ID,
        "ti": TaskInstance(task_id, xcoms),
        "outlet_events": OutletEventAccessors(),
        "params": {},
    }
    with set_current_context(context):
        return _run_execute_callable(context, task.execute, task), context


def _pipeline(state: Path) -> tuple[Project, Any]:
    from dags.datasets import build_dataset_dag
    from tasks.orchestration.backends import Backend

    project = Project(root=REPO, params=REPO / "params.yaml", state=state)
    return project, build_dataset_dag(project, project.load_config(), DATASET, Backend())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Project, Any]:
    """cats_vs_dogs's DAG on the local backend; its state dir stays empty (tests check)."""
    return _pipeline(tmp_path_factory.mktemp("state"))


def _fails_at_once(raised: pytest.ExceptionInfo, message: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    assert raised.type is AirflowFailException
    assert str(raised.value) == message
    assert "\n" not in message
    error = raised.value
    # No chained traceback under it: the one line is the whole story.
    assert error.__cause__ is None and (error.__suppress_context__ or error.__context__ is None)


# --- stage tasks ----------------------------------------------------------------------


def test_every_stage_task_runs_its_own_stage_and_returns_the_result(pipeline, monkeypatch):
    from tasks.orchestration.dvc import StageResult

    project, dag = pipeline
    calls = []

    def run_stage(project_, dataset, stage):
        calls.append((project_, dataset, stage))
        return StageResult(stage, dataset, ran=True, seconds=1.5, workspace="/ws", metrics={"a": 1})

    monkeypatch.setattr("tasks.orchestration.dvc.run_stage", run_stage)
    for stage in STAGES:
        value, _ = run_task(dag, stage)
        assert value["stage"] == stage and value["ran"] is True and value["metrics"] == {"a": 1}
        assert json.loads(json.dumps(value)) == value  # XCom-serialisable
    assert calls == [(project, DATASET, stage) for stage in STAGES]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stage", STAGES)
def test_a_failed_stage_task_fails_at_once_or_is_retried(pipeline, monkeypatch, stage, kind):
    """Retry: the StageFailed itself propagates. No retry: AirflowFailException, one line."""
    _, dag = pipeline
    error = _error(stage, kind)

    def run_stage(project, dataset, stage_):
        raise error

    monkeypatch.setattr("tasks.orchestration.dvc.run_stage", run_stage)
    with pytest.raises(Exception) as raised:
        run_task(dag, stage)
    expected = {ALWAYS: True, NEVER: False, IF_RETRYABLE: KINDS[kind][1]}[POLICY[stage]]
    if expected:
        assert raised.value is error
        assert dag.get_task(stage).retries == load_config(REPO / "params.yaml").schedule.retries
    else:
        _fails_at_once(raised, str(error))


# A workspace whose stages are one tiny script: real ``dvc repro``, real failures.
FAIL_PY = """\
import os, sys
kind = os.environ.get("FAIL_KIND", "")
if kind == "user":
    print("error: no images of class 'cat'; fix datasets.cats_vs_dogs.url", file=sys.stderr)
    sys.exit(2)
if kind == "crash":
    raise MemoryError("out of memory")
"""


@pytest.fixture
def failing_workspace(tmp_path):
    project, dag = _pipeline(tmp_path / "state")
    ws = project.workspace(DATASET)
    (ws / ".dvc").mkdir(parents=True)
    (ws / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    stages = {
        stage: {"foreach": "${datasets}", "do": {"cmd": "python fail.py ${key}"}}
        for stage in STAGES
    }
    (ws / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (ws / "params.yaml").write_text(yaml.safe_dump({"datasets": {DATASET: {}}}))
    (ws / "fail.py").write_text(FAIL_PY)
    (ws / ".tasks-run.json").write_text(json.dumps({"dataset": DATASET, "overrides": []}))
    return dag


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "kind", "retried"),
    [
        ("train", "user", False),
        ("train", "crash", True),
        ("validate", "crash", False),  # never retried
        ("download", "user", True),  # a network stage: retried even so
    ],
)
def test_a_stage_failing_for_real_fails_at_once_or_is_retried(
    failing_workspace, monkeypatch, stage, kind, retried
):
    monkeypatch.setenv("FAIL_KIND", kind)
    with pytest.raises(Exception) as raised:
        run_task(failing_workspace, stage)
    if kind == "user":
        message = f"{stage}@{DATASET}: no images of class 'cat'; fix datasets.{DATASET}.url"
    else:
        message = (
            f"{stage}@{DATASET} failed: ERROR: failed to reproduce '{stage}@{DATASET}': "
            f"failed to run: python fail.py {DATASET}, exited with 1"
        )
    if retried:
        assert raised.type is StageFailed and str(raised.value) == message
    else:
        _fails_at_once(raised, message)


# --- prepare --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        (
            {"backbon": "vgg16"},
            "run conf: unknown key 'backbon'; use one of: backbone, weights, image_size, "
            "batch_size, epochs, learning_rate, finetune_epochs, finetune_learning_rate, "
            "unfreeze_from, floor, offline, url, mirrors, set "
            '(any parameter: {"set": {"train.epochs": 3}})',
        ),
        (["train.epochs=3"], 'run conf: must be a JSON object, e.g. {"backbone": "vgg16"}'),
        ("backbone=vgg16", 'run conf: must be a JSON object, e.g. {"backbone": "vgg16"}'),
        (
            {"set": 3},
            'run conf: "set" must map dotted keys to values, e.g. {"set": {"train.epochs": 3}}, '
            'or list "key=value" strings',
        ),
        (
            {"set": {"train.epochs": 0}},
            "run conf: train.epochs: Input should be greater than 0",
        ),
    ],
    ids=["unknown key", "a list", "a string", "set not a mapping", "invalid value"],
)
def test_a_bad_run_conf_fails_prepare_at_once_with_one_line(pipeline, conf, message):
    project, dag = pipeline
    with pytest.raises(Exception) as raised:
        run_task(dag, "prepare", conf=conf)
    _fails_at_once(raised, message)
    assert not project.workspaces.exists()  # refused before anything was touched


def test_a_bad_backbone_names_the_allowed_ones(pipeline):
    _, dag = pipeline
    with pytest.raises(Exception) as raised:
        run_task(dag, "prepare", conf={"backbone": "resnet"})
    _fails_at_once(raised, str(raised.value))
    assert str(raised.value).startswith(
        "run conf: train.backbone: 'resnet' is not allowed; use one of:"
    )


# --- finish ---------------------------------------------------------------------------


def test_finish_after_prepare_failed_fails_saying_no_run_was_opened(pipeline):
    _, dag = pipeline
    with pytest.raises(Exception) as raised:
        run_task(dag, "finish", xcoms={})
    _fails_at_once(
        raised,
        f"{DATASET}: the run failed before it started (prepare); no MLflow run was opened",
    )


# --- record ---------------------------------------------------------------------------


def _experiment(**overrides):
    from tasks.orchestration.experiments import ExperimentRecord

    values = dict(
        dataset=DATASET,
        name=f"{DATASET}-manual__2026-01-05T00-00-00-00-00",
        rev="a" * 40,
        baseline="b" * 40,
        remote=str(REPO),
        pushed=3,
        seconds=2.5,
        workspace="/ws",
    )
    return ExperimentRecord(**{**values, **overrides})


def test_record_returns_the_experiment_and_puts_the_headline_on_the_model_asset(
    pipeline, monkeypatch
):
    from tasks.orchestration.dag_tasks import model_asset

    project, dag = pipeline
    calls = []

    def record_experiment(project_, dataset):
        calls.append((project_, dataset))
        return _experiment()

    monkeypatch.setattr("tasks.orchestration.experiments.record_experiment", record_experiment)
    (leaf,) = project.stage_graph(DATASET).leaves
    register = {"stage": leaf, "metrics": {"accuracy": 0.9, "status": "promoted", "version": "4"}}
    value, context = run_task(dag, "record", xcoms={leaf: register})
    headline = {
        "dataset": DATASET,
        "dag_run_id": RUN_ID,
        "experiment": _experiment().name,
        "accuracy": 0.9,
        "status": "promoted",
        "version": "4",
    }
    assert value == {**_experiment().xcom(), "headline": headline}
    assert context["outlet_events"][model_asset(project, DATASET)].extra == headline
    assert calls == [(project, DATASET)]


def test_record_headline_skips_leaves_without_a_result_dict(pipeline, monkeypatch):
    """A leaf run by the docker backend pushes its result as a JSON string; one that pushed
    nothing pulls as None: neither adds metrics."""
    from tasks.orchestration.dag_tasks import model_asset

    project, dag = pipeline
    monkeypatch.setattr(
        "tasks.orchestration.experiments.record_experiment", lambda *_: _experiment()
    )
    (leaf,) = project.stage_graph(DATASET).leaves
    for pushed in (None, json.dumps({"metrics": {"accuracy": 0.9}})):
        value, context = run_task(dag, "record", xcoms={leaf: pushed})
        assert set(value["headline"]) == {"dataset", "dag_run_id", "experiment"}
        assert context["outlet_events"][model_asset(project, DATASET)].extra == value["headline"]


def test_a_failed_record_is_retried(pipeline, monkeypatch):
    """Saving and pushing the experiment is network work: whatever failed, try again."""
    _, dag = pipeline
    error = failure("record", DATASET, ["error: git push rejected; fetch first"])
    assert error.retryable is False and should_retry("record", error)

    def record_experiment(project, dataset):
        raise error

    monkeypatch.setattr("tasks.orchestration.experiments.record_experiment", record_experiment)
    with pytest.raises(StageFailed) as raised:
        run_task(dag, "record", xcoms={})
    assert raised.value is error
    assert dag.get_task("record").retries == load_config(REPO / "params.yaml").schedule.retries


# --- the approval step ----------------------------------------------------------------


def test_a_candidate_awaiting_approval_goes_on_to_the_approval_task(pipeline):
    _, dag = pipeline
    value, _ = run_task(
        dag, "needs_approval", xcoms={"register": {"metrics": {"status": "awaiting_approval"}}}
    )
    assert value is True


@pytest.mark.parametrize("register", [{"metrics": {"status": "promoted"}}, {"metrics": {}}, None])
def test_any_other_gate_outcome_skips_the_approval_task(pipeline, register):
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    _, dag = pipeline
    with pytest.raises(DownstreamTasksSkipped) as raised:
        run_task(dag, "needs_approval", xcoms={"register": register})
    assert list(raised.value.tasks) == ["approve"]  # promote follows by its trigger rule


def test_an_answer_that_is_neither_approve_nor_reject_fails_promote_at_once(pipeline):
    _, dag = pipeline
    xcoms = {
        "register": {"metrics": {"version": "4", "status": "awaiting_approval"}},
        "approve": {"chosen_options": ["Approve", "Reject"], "params_input": {}},
    }
    with pytest.raises(Exception) as raised:
        run_task(dag, "promote", xcoms=xcoms)
    _fails_at_once(
        raised,
        "the approval task returned ['Approve', 'Reject']; expected one of 'Approve' or 'Reject'",
    )


# --- the summary DAG ------------------------------------------------------------------


def test_the_summary_task_writes_the_report_and_returns_where(tmp_path, monkeypatch):
    from dags.summary import build_summary_dag

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = Project(root=REPO, params=REPO / "params.yaml", state=tmp_path / "state")
    dag = build_summary_dag(project, project.load_config())
    value, _ = run_task(dag, "write_summary")
    reports = project.state / "reports"
    datasets = list(project.load_config().datasets)
    assert value == {
        "markdown": str(reports / "summary.md"),
        "json": str(reports / "summary.json"),
        "champions": dict.fromkeys(datasets),
    }
    assert set(json.loads((reports / "summary.json").read_text())["datasets"]) == set(datasets)
    text = (reports / "summary.md").read_text()
    for dataset in datasets:
        assert f"| {dataset} | none yet | – | – | – | no gate decision yet |" in text
    assert not (project.state / "mlflow").exists()  # no store created just to read it


# --- one run for real: prepare, a stage that fails, finish --------------------------------


@pytest.mark.slow
def test_a_run_whose_train_fails_ends_its_mlflow_run_failed_naming_train(tmp_path, monkeypatch):
    """prepare clones the project into the workspace and opens the MLflow parent run; train
    before download fails for good (its input is missing: no retry); finish ends the parent
    run FAILED naming train and fails itself with that sentence."""
    for name in ("MLFLOW_TRACKING_URI", "TASKS_DVC_REMOTE", "TASKS_SET", "TASKS_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    project, dag = _pipeline(tmp_path / "state")
    prepared, _ = run_task(dag, "prepare", conf={"epochs": 3})
    ws = project.workspace(DATASET)
    assert prepared["workspace"] == str(ws) and prepared["overrides"] == ["train.epochs=3"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert prepared["baseline"] == head
    assert prepared["experiment"] == f"{DATASET}-manual__2026-01-05T00-00-00-00-00"
    assert yaml.safe_load((ws / "params.yaml").read_text())["train"]["epochs"] == 3

    with pytest.raises(Exception) as raised:
        run_task(dag, "train")
    _fails_at_once(raised, str(raised.value))
    assert str(raised.value).startswith(f"train@{DATASET} failed: ERROR: failed to reproduce")
    assert f"No such file or directory: '{ws / 'data'}" in str(raised.value)

    done = {"stage": "x", "ran": True}
    xcoms = {"prepare": prepared, "download": done, "validate": done}
    with pytest.raises(Exception) as raised:
        run_task(dag, "finish", xcoms=xcoms)
    parent = prepared["parent_run_id"]
    _fails_at_once(
        raised,
        f"{DATASET}: train failed; MLflow parent run {parent} ended FAILED "
        "(its log names the reason)",
    )
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{project.mlflow_dir / 'mlflow.db'}").get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["pipeline.failed_task"] == "train"
