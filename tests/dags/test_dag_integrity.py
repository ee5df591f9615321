"""DAG integrity: the DagBag loads, every DAG is configured, and the task graph is dvc.yaml's."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import timedelta

import pytest
import yaml

from tasks.config import load_config
from tasks.orchestration.project import (
    DAG_PREFIX,
    SCORING_DAG_PREFIX,
    SUMMARY_DAG_ID,
    SWEEP_DAG_ID,
)
from tasks.orchestration.runconf import CONF_KEYS
from tests.conftest import REPO

DAGS = REPO / "dags"
CFG = load_config(REPO / "params.yaml")
DATASET_DAGS = [f"{DAG_PREFIX}{ds}" for ds in CFG.datasets]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS))


def test_dagbag_has_no_import_errors_and_one_dag_per_dataset(dagbag):
    assert dagbag.import_errors == {}
    scoring = {f"{SCORING_DAG_PREFIX}{ds}" for ds in CFG.datasets}
    assert set(dagbag.dag_ids) == {*DATASET_DAGS, *scoring, SUMMARY_DAG_ID, SWEEP_DAG_ID}


@pytest.mark.parametrize("dag_id", [*DATASET_DAGS, SUMMARY_DAG_ID, SWEEP_DAG_ID])
def test_every_dag_has_owner_tags_docs_and_no_catchup(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "transfer-learning" in dag.tags
    assert dag.doc_md and dag.doc_md.startswith("### Transfer learning")
    for task in dag.tasks:
        assert task.owner == CFG.schedule.owner


@pytest.mark.parametrize("dataset", list(CFG.datasets))
def test_dataset_dag_schedule_tags_and_retry_policy(dagbag, dataset):
    dag = dagbag.dags[f"{DAG_PREFIX}{dataset}"]
    assert dataset in dag.tags
    assert dag.schedule == CFG.schedule.cron == "@weekly"
    assert "0 0 * * 0" in repr(dag.timetable)
    tasks = {task.task_id: task for task in dag.tasks}
    # Every step backs off exponentially: for what the infrastructure loses (a task the
    # executor could not send, a lost worker). A deterministic failure (a failed validation,
    # a bad conf) fails at once by its exception (tests/dags/test_task_callables.py).
    for task_id in ("prepare", "download", "validate", "train", "finetune", "evaluate",
                    "register", "record", "finish"):  # fmt: skip
        task = tasks[task_id]
        assert task.retries == CFG.schedule.retries, task_id
        assert task.retry_exponential_backoff == 2.0, task_id
        assert task.max_retry_delay == timedelta(minutes=30), task_id
    for task_id in ("train", "finetune"):
        assert tasks[task_id].pool == "gpu"
    assert tasks["download"].pool != "gpu"
    for key in CONF_KEYS:
        assert f"`{key}`" in dag.doc_md


def _dvc_edges(dataset: str) -> set[tuple[str, str]]:
    """Edges of one dataset's stages, as DVC itself draws them."""
    dot = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    edges = set()
    for up, down in re.findall(r'"([\w@]+)" -> "([\w@]+)"', dot):
        if up.endswith(f"@{dataset}") and down.endswith(f"@{dataset}"):
            edges.add((up.split("@")[0], down.split("@")[0]))
    return edges


@pytest.mark.slow
def test_task_graph_equals_dvc_stage_graph(dagbag):
    dataset = next(iter(CFG.datasets))
    dag = dagbag.dags[f"{DAG_PREFIX}{dataset}"]
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    tasks = {task.task_id: task for task in dag.tasks}
    approval = {"needs_approval", "approve", "promote"}
    assert set(tasks) == {"prepare", *stages, "record", "finish", *approval}

    dag_edges = {
        (up, task_id)
        for task_id, task in tasks.items()
        for up in task.upstream_task_ids
        if up in stages and task_id in stages
    }
    dvc_edges = _dvc_edges(dataset)
    assert dvc_edges, "dvc dag drew no edges"
    assert dag_edges == dvc_edges

    # prepare is the only root; record follows every last stage; finish, the only leaf,
    # runs whatever happened before it (it ends the MLflow parent run with the outcome).
    assert [t for t, task in tasks.items() if not task.upstream_task_ids] == ["prepare"]
    leaves = {t for t, task in tasks.items() if not task.downstream_task_ids}
    assert leaves == {"finish", "promote"}  # promote: only after a person decided
    assert tasks["finish"].upstream_task_ids == {"record"}
    assert tasks["finish"].trigger_rule == "all_done"
    order = [task.task_id for task in dag.topological_sort()]
    assert [t for t in order if t in stages] == stages


def test_record_emits_the_model_asset_the_summary_dag_waits_for(dagbag):
    summary = dagbag.dags[SUMMARY_DAG_ID]
    uris = set()
    for dag_id in DATASET_DAGS:
        record = dagbag.dags[dag_id].get_task("record")
        (asset,) = record.outlets
        assert asset.uri.startswith("file://") and asset.uri.endswith("/candidate.json")
        uris.add(asset.uri)
    condition = summary.timetable.asset_condition
    assert {a.uri for a in condition.objects} == uris
    assert type(condition).__name__ == "AssetAny"


def test_a_new_dataset_is_a_new_dag_with_no_code(tmp_path):
    """Adding a dataset to params.yaml (nothing else) adds its DAG."""
    from dags.datasets import build_dataset_dags
    from dags.summary import build_summary_dag
    from tasks.orchestration.project import Project

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["flowers"] = {
        **raw["datasets"]["ants_vs_bees"],
        "classes": ["daisy", "rose"],
        "counts": {"train": {"daisy": 5, "rose": 5}, "validation": {"daisy": 2, "rose": 2}},
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    project = Project(root=REPO, params=params, state=tmp_path)
    dags = build_dataset_dags(project)
    dags[SUMMARY_DAG_ID] = build_summary_dag(project, project.load_config())
    assert f"{DAG_PREFIX}flowers" in dags
    assert dags[f"{DAG_PREFIX}flowers"].get_task("register").upstream_task_ids >= {"evaluate"}
    summary_uris = {a.uri for a in dags[SUMMARY_DAG_ID].timetable.asset_condition.objects}
    assert project.asset_uri("flowers") in summary_uris


def test_dag_files_read_no_airflow_variables():
    for path in DAGS.rglob("*.py"):
        text = path.read_text()
        assert "Variable.get" not in text and "Variable(" not in text, path


def test_bad_backend_is_a_one_line_parse_error():
    from tasks.errors import ConfigError
    from tasks.orchestration.backends import Backend

    with pytest.raises(ConfigError, match=r"TASKS_GPU_BACKEND='slurm' is not allowed; use one of"):
        Backend.from_env({"TASKS_GPU_BACKEND": "slurm"})


def test_the_approval_step_follows_register_and_holds_up_nothing_else(dagbag):
    """register >> needs_approval >> approve (HITL) >> promote; record and finish do not wait."""
    from airflow.providers.standard.operators.hitl import HITLOperator

    dag = dagbag.dags[f"{DAG_PREFIX}ants_vs_bees"]
    tasks = {task.task_id: task for task in dag.tasks}
    assert tasks["needs_approval"].upstream_task_ids == {"register"}
    assert tasks["approve"].upstream_task_ids == {"needs_approval"}
    assert tasks["promote"].upstream_task_ids == {"approve"}
    assert tasks["promote"].downstream_task_ids == set()
    approve = tasks["approve"]
    assert isinstance(approve, HITLOperator)
    assert approve.options == ["Approve", "Reject"] and approve.multiple is False
    assert "reason" in approve.params
    assert "Promote" in approve.subject and "McNemar exact p" in approve.body
    assert tasks["record"].upstream_task_ids == {"register"}
    assert tasks["finish"].upstream_task_ids == {"record"}


def test_the_sweep_maps_one_pipeline_per_combination_then_compares_and_gates(dagbag):
    dag = dagbag.dags[SWEEP_DAG_ID]
    assert dag.schedule is None  # triggered with a conf naming what to compare
    stages = [s for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]]
    lane = [s for s in stages if s != "register"]
    tasks = {task.task_id: task for task in dag.tasks}
    group = {f"pipeline.{t}" for t in ["prepare", *lane, "record", "finish"]}
    assert set(tasks) == {"plan", *group, "compare", "gate"}
    # the lane's tasks form one task group mapped over the plan's combinations
    mapped = [tasks[t].get_closest_mapped_task_group() for t in sorted(group)]
    lanes = mapped[0]
    assert lanes is not None and lanes.group_id == "pipeline"
    assert all(other is lanes for other in mapped)
    assert lanes.upstream_task_ids == {"plan"}
    for t in ("plan", "compare", "gate"):
        assert tasks[t].get_closest_mapped_task_group() is None
    order = [t.task_id for t in dag.topological_sort()]
    assert order[0] == "plan" and order[-2:] == ["compare", "gate"]
    chain = ["prepare", *lane, "record", "finish"]
    for up, down in zip(chain, chain[1:], strict=False):
        assert tasks[f"pipeline.{down}"].upstream_task_ids >= {f"pipeline.{up}"}
    assert tasks["pipeline.finish"].trigger_rule == "all_done"
    assert tasks["compare"].trigger_rule == "all_done"
    assert tasks["compare"].upstream_task_ids == {"pipeline.finish"}
    # the GPU stages (TASKS_GPU_STAGES, train and finetune by default) take a GPU pool slot
    for stage in ("train", "finetune"):
        assert tasks[f"pipeline.{stage}"].pool == "gpu"
    for task_id in ("pipeline.download", "pipeline.evaluate", "gate"):
        assert tasks[task_id].pool == "default_pool"
