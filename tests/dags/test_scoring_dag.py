"""The scoring DAGs: one per dataset, their tasks, schedule and drift asset, and the
training DAG scheduled on that asset with ``schedule.retrain_on_drift``.

Real Airflow DAG objects (the DagBag of ``dags/``, and the serialized form the scheduler
reads); what the tasks do is in tests/orchestration/test_scoring.py and
tests/e2e/test_scoring_dag.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import yaml

from tasks.config import load_config
from tasks.orchestration.project import DAG_PREFIX, SCORING_DAG_PREFIX, Project
from tests.conftest import REPO

CFG = load_config(REPO / "params.yaml")
DATASETS = list(CFG.datasets)


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def _project(tmp_path, **schedule) -> Project:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["schedule"].update(schedule)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return Project(root=REPO, params=params, state=tmp_path / "state")


def _serialized(dag):
    """The DAG as the scheduler reads it back from the database."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag))


def test_one_scoring_dag_per_dataset(dagbag):
    assert dagbag.import_errors == {}
    scoring = {d for d in dagbag.dag_ids if d.startswith(SCORING_DAG_PREFIX)}
    assert scoring == {f"scoring__{ds}" for ds in DATASETS}


@pytest.mark.parametrize("dataset", DATASETS)
def test_scoring_dag_schedule_params_and_policy(dagbag, dataset):
    dag = dagbag.dags[f"scoring__{dataset}"]
    assert dag.schedule == CFG.scoring.cron == "@hourly"
    assert "0 * * * *" in repr(dag.timetable)
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert {"transfer-learning", "scoring", dataset} <= set(dag.tags)
    assert dag.params["rescore"] is False  # the conf {"rescore": true} lists every drop
    assert f"### Scoring: `{dataset}`" in dag.doc_md
    assert f"drift/{dataset}" in dag.doc_md and "rescore" in dag.doc_md
    for task in dag.tasks:
        assert task.owner == CFG.schedule.owner
    score = dag.get_task("score")
    assert score.retries == CFG.schedule.retries
    assert score.retry_exponential_backoff == 2.0
    assert score.max_retry_delay == timedelta(minutes=30)


@pytest.mark.parametrize("dataset", DATASETS)
def test_find_drops_then_one_mapped_score_per_drop_then_the_drift_event(dagbag, dataset):
    from airflow.sdk import Asset

    dag = dagbag.dags[f"scoring__{dataset}"]
    tasks = {task.task_id: task for task in dag.tasks}
    assert set(tasks) == {"find_drops", "score", "drift_event", "all_scored"}
    assert [t.task_id for t in dag.topological_sort()] == [
        "find_drops",
        "score",
        "drift_event",
        "all_scored",
    ]
    # score is mapped over find_drops' list: one task instance (one partition) per drop
    score = tasks["score"]
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(score, MappedOperator)
    assert score.upstream_task_ids == {"find_drops"}
    assert score.map_index_template == "{{ drop_name }}"  # the drop names each instance
    assert tasks["find_drops"].upstream_task_ids == set()
    # the drift event runs whatever the drops did: a failed drop hides no other's drift
    event = tasks["drift_event"]
    assert event.upstream_task_ids == {"score"}
    assert event.trigger_rule == "all_done"
    assert event.outlets == [Asset(name=f"drift/{dataset}", group="drift")]
    # ... and the last task fails the run when a drop failed (the run's state is its leaf's)
    last = tasks["all_scored"]
    assert last.upstream_task_ids == {"score", "drift_event"}
    assert last.trigger_rule == "all_done"
    assert last.downstream_task_ids == set()
    assert [t for t, task in tasks.items() if not task.downstream_task_ids] == ["all_scored"]
    assert all(not task.outlets for t, task in tasks.items() if t != "drift_event")


def test_the_scheduler_reads_the_mapped_task_and_the_outlet_back(dagbag):
    dag = _serialized(dagbag.dags[f"scoring__{DATASETS[0]}"])
    assert type(dag.get_task("score")).__name__ == "SerializedMappedOperator"
    (asset,) = dag.get_task("drift_event").outlets
    assert (asset.name, asset.uri, asset.group) == (f"drift/{DATASETS[0]}",) * 2 + ("drift",)


@pytest.mark.parametrize("dataset", DATASETS)
def test_training_runs_on_its_cron_only_by_default(dagbag, dataset):
    assert CFG.schedule.retrain_on_drift is False
    dag = dagbag.dags[f"{DAG_PREFIX}{dataset}"]
    assert dag.schedule == "@weekly"
    assert type(dag.timetable).__name__ == "CronTriggerTimetable"


def test_retrain_on_drift_schedules_training_on_its_cron_or_the_drift_asset(tmp_path):
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from dags.datasets import build_dataset_dag
    from dags.scoring import build_scoring_dag

    project = _project(tmp_path, retrain_on_drift=True)
    cfg = project.load_config()
    for dataset in DATASETS:
        dag = build_dataset_dag(project, cfg, dataset)
        assert dag.max_active_runs == 1  # a drift-triggered run waits for a running one
        timetable = dag.timetable
        assert isinstance(timetable, AssetOrTimeSchedule)
        assert timetable.timetable == CronTriggerTimetable("0 0 * * 0", timezone="UTC")
        produced = build_scoring_dag(project, cfg, dataset).get_task("drift_event").outlets
        assert [timetable.asset_condition] == produced
        # as the scheduler reads it back: due on the cron, and on the asset's events
        read = _serialized(dag).timetable
        assert type(read).__name__ == "AssetOrTimeSchedule"
        assert read.timetable.summary == "0 0 * * 0" and read.can_be_scheduled
        assert read.asset_condition.name == f"drift/{dataset}"


def test_retrain_on_drift_without_a_cron_runs_on_the_drift_asset_alone(tmp_path):
    from dags.datasets import build_dataset_dag

    project = _project(tmp_path, retrain_on_drift=True, cron=None)
    dag = build_dataset_dag(project, project.load_config(), "cats_vs_dogs")
    timetable = _serialized(dag).timetable
    assert type(timetable).__name__ == "AssetTriggeredTimetable"
    assert [key.name for key, _ in timetable.asset_condition.iter_assets()] == [
        "drift/cats_vs_dogs"
    ]
    from airflow.timetables.base import TimeRestriction

    no_time_runs = TimeRestriction(earliest=None, latest=None, catchup=False)
    assert (
        timetable.next_dagrun_info(last_automated_data_interval=None, restriction=no_time_runs)
        is None
    )


def test_no_cron_for_scoring_is_a_dag_run_only_when_triggered(tmp_path):
    from dags.scoring import build_scoring_dag

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.setdefault("scoring", {})["cron"] = None
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    project = Project(root=REPO, params=params, state=tmp_path)
    dag = build_scoring_dag(project, project.load_config(), "ants_vs_bees")
    assert dag.schedule is None


# Parsing dags/scoring.py alone, in a fresh interpreter: what it loads and does.
PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
watched = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.fork", "socket.connect",
           "socket.getaddrinfo"}
seen = []
sys.addaudithook(lambda event, args: seen.append(event) if event in watched else None)
bag = DagBag(sys.argv[1])
heavy = {"tensorflow", "keras", "mlflow", "great_expectations", "pandas", "sklearn", "boto3",
         "botocore", "dvc"}
print(json.dumps({"dags": sorted(bag.dag_ids), "errors": list(bag.import_errors),
                  "heavy": sorted({m.split(".")[0] for m in sys.modules} & heavy),
                  "side_effects": seen}))
"""


def test_parsing_the_scoring_dags_imports_nothing_heavy_and_starts_nothing(tmp_path):
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags" / "scoring.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["dags"] == sorted(f"scoring__{ds}" for ds in DATASETS)
    assert result["heavy"] == []
    assert result["side_effects"] == []
