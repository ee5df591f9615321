"""The scoring DAG end to end: real Airflow (``airflow dags test``, one scheduler loop at a
time), the real ``python -m tasks score`` against a registered tiny model, and Airflow's
own records (its SQLite database) for what happened.

One module-scoped setup: the project's DAGs with ``schedule.retrain_on_drift: true``, an
Airflow home with every DAG serialized and unpaused, a ``@champion`` (with its drift
reference) in the state dir's MLflow store, and the inbox holding three drops (an empty
one, which the command refuses; one inverted; one like the training images) and one being
copied in. Then, in order:

1. the scoring run scores the two good drops (one mapped task each, named after its drop)
   and raises one ``drift/<ds>`` asset event naming the inverted drop, which queues the
   training DAG, although the empty drop's task failed; the run then fails, naming it;
2. once the empty drop is removed, a second run scores nothing (no drop pending), and a
   ``rescore`` run asks the command again, which does nothing for drops this version
   scored: no new event either way;
3. the training DAG's queued drift run waits while a run of it is active, and is created
   by the first scheduler loop after that run ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import ImageOps

from tasks.dev.airflow_local import LocalAirflow
from tasks.errors import StageError
from tasks.orchestration.project import DAG_PREFIX, SCORING_DAG_PREFIX, Project
from tests.conftest import REPO
from tests.datagen import make_image, tiny_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATASET = "cats_vs_dogs"
SCORING = f"{SCORING_DAG_PREFIX}{DATASET}"
TRAINING = f"{DAG_PREFIX}{DATASET}"
EMPTY, DRIFTED, CALM = "0000-empty", "0001-inverted", "0002-same"
IMAGES = 40  # per drop: above scoring.drift.min_images, so each drop is tested


def _drop(folder: Path, seed: int, inverted: bool) -> None:
    """Generated images like the training set's (48 px JPEGs), or their negatives."""
    folder.mkdir(parents=True)
    for n in range(IMAGES):
        image = make_image(n % 2, 48, seed=seed + n)
        (ImageOps.invert(image) if inverted else image).save(folder / f"{n}.jpg", quality=90)


@contextlib.contextmanager
def _clean_env() -> Iterator[None]:
    """None of the caller's MLflow, TASKS or AIRFLOW settings reach Airflow's processes."""
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith(("MLFLOW_", "TASKS_", "AIRFLOW__")):
                env.delenv(name)
        yield


def _register_champion(project: Project, base: Path) -> None:
    """``@champion`` v1 of the tiny model, with its drift reference, in the state's store."""
    from tests.tinymodel import register_champion, tiny_models

    models = tiny_models(base / "tiny")
    (project.mlflow_dir).mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.mlflow_dir / 'mlflow.db'}")
        env.delenv("TASKS_PARENT_RUN_ID", raising=False)
        env.chdir(base)  # whatever MLflow writes relative to the current folder stays here
        register_champion(base / "registry", models["good"], validation=10, train=60)
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> Iterator[LocalAirflow]:
    base = tmp_path_factory.mktemp("scoring-e2e")
    sources = {ds: f"http://127.0.0.1:1/{ds}.zip" for ds in ("cats_vs_dogs", "ants_vs_bees")}
    params = tiny_params(
        sources,
        # No crons: only the runs the tests start.
        schedule={"cron": None, "owner": "ci", "retries": 0, "gpus": 1, "retrain_on_drift": True},
        scoring={"cron": None},
    )
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    project = Project(root=REPO, params=base / "params.yaml", state=base / "state")
    instance = LocalAirflow(
        project,
        base / "airflow-home",
        extra_env={"TASKS_RETRY_DELAY_SECONDS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    _register_champion(project, base)
    inbox = project.state / "inbox" / DATASET
    _drop(inbox / DRIFTED, 900_000, inverted=True)
    _drop(inbox / CALM, 100_000, inverted=False)
    _drop(inbox / "_copying", 300_000, inverted=True)  # not complete yet: never listed
    (inbox / EMPTY).mkdir()  # the command's user-fixable error: a drop with no files
    with _clean_env():
        instance.extra_env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
        instance.prepare()
        # Every DAG in Airflow's database, unpaused (a drift event queues only an unpaused
        # consumer), as the DAG processor would leave them.
        instance.airflow("dags", "reserialize", capture_output=True)
        yield instance


def _db(airflow: LocalAirflow) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(airflow.home / "airflow.db"))


def _rows(airflow: LocalAirflow, sql: str, *args) -> list[tuple]:
    with _db(airflow) as db:
        return db.execute(sql, args).fetchall()


def _drift_events(airflow: LocalAirflow) -> list[tuple]:
    return _rows(
        airflow,
        "select e.id, e.extra, e.source_dag_id, e.source_task_id from asset_event e "
        "join asset a on a.id = e.asset_id where a.name = ? order by e.id",
        f"drift/{DATASET}",
    )


def _latest_run_tasks(airflow: LocalAirflow, dag_id: str) -> dict[tuple[str, int], tuple]:
    (run_id,) = _rows(
        airflow,
        "select run_id from dag_run where dag_id = ? order by id desc limit 1",
        dag_id,
    )[0]
    rows = _rows(
        airflow,
        "select task_id, map_index, state, rendered_map_index from task_instance "
        "where dag_id = ? and run_id = ?",
        dag_id,
        run_id,
    )
    return {(task, index): (state, name) for task, index, state, name in rows}


@pytest.fixture(scope="module")
def first_run(airflow) -> str:
    """The first scoring run: it fails (the empty drop); its output."""
    with pytest.raises(StageError, match=f"DAG {SCORING} failed"):
        airflow.dags_test(SCORING)
    return (airflow.home / "logs" / "dags-test" / f"{SCORING}.log").read_text()


def test_a_drifting_drop_raises_the_drift_event_with_its_summary(airflow, first_run):
    tasks = _latest_run_tasks(airflow, SCORING)
    assert tasks[("find_drops", -1)][0] == "success"
    # one mapped score task per complete drop, each named after its drop
    assert tasks[("score", 0)] == ("failed", EMPTY)
    assert tasks[("score", 1)] == ("success", DRIFTED)
    assert tasks[("score", 2)] == ("success", CALM)
    assert ("score", 3) not in tasks  # _copying is not listed
    # the failed drop hides no drift: the event is raised, then the run fails naming it
    assert tasks[("drift_event", -1)][0] == "success"
    assert tasks[("all_scored", -1)][0] == "failed"
    assert f"1 of 3 drop(s) failed to score: {EMPTY} (" in first_run
    assert f"score@{DATASET} {EMPTY}: drop " in first_run  # its task's own one line
    assert "holds no files" in first_run

    reports = airflow.project.reports / DATASET / "scoring"
    assert json.loads((reports / DRIFTED / "scored.json").read_text())["drift"] is True
    assert json.loads((reports / CALM / "scored.json").read_text())["drift"] is False
    assert not (reports / "_copying").exists() and not (reports / EMPTY).exists()

    ((_, extra, source_dag, source_task),) = _drift_events(airflow)
    assert (source_dag, source_task) == (SCORING, "drift_event")
    summary = json.loads(extra)
    assert summary["dataset"] == DATASET and summary["version"] == "1"
    assert summary["model"] == f"{DATASET}-classifier"
    assert summary["drops"] == [DRIFTED]  # the calm drop is scored, not in the event
    (detail,) = summary["details"]
    assert detail["images"] == IMAGES and detail["tests"]
    for test in detail["tests"].values():
        assert test["p_value"] <= test["threshold"]
    assert set(summary["flagged"]) == set(detail["tests"])
    # retrain_on_drift: the training DAG is queued for a run by the event
    queued = _rows(airflow, "select target_dag_id from asset_dag_run_queue")
    assert queued == [(TRAINING,)]


def test_a_second_run_scores_nothing_and_a_rescore_changes_nothing(airflow, first_run):
    (airflow.project.state / "inbox" / DATASET / EMPTY).rmdir()  # a person removes it
    marks = airflow.project.reports / DATASET / "scoring"
    before = {drop: (marks / drop / "scored.json").stat().st_mtime_ns for drop in (DRIFTED, CALM)}

    airflow.dags_test(SCORING)
    tasks = _latest_run_tasks(airflow, SCORING)
    assert tasks[("score", -1)][0] == "skipped"  # no drop pending: mapped to no task
    assert tasks[("drift_event", -1)][0] == "skipped"
    assert tasks[("all_scored", -1)][0] == "success"

    airflow.dags_test(SCORING, {"rescore": True})
    tasks = _latest_run_tasks(airflow, SCORING)
    assert [tasks[("score", i)][0] for i in (0, 1)] == ["success", "success"]
    assert tasks[("drift_event", -1)][0] == "skipped"  # same version: nothing scored again

    assert len(_drift_events(airflow)) == 1
    after = {drop: (marks / drop / "scored.json").stat().st_mtime_ns for drop in (DRIFTED, CALM)}
    assert after == before


def test_the_drift_run_of_training_waits_for_the_active_run_then_starts(airflow, first_run):
    """One scheduler loop at a time, with no pool slot free: runs are created (the
    scheduler's decision under test) and no task starts."""
    airflow.airflow("pools", "set", "default_pool", "0", "no task starts", capture_output=True)
    airflow.airflow("dags", "trigger", TRAINING, capture_output=True)  # a person's run

    airflow.airflow("scheduler", "--num-runs", "1", capture_output=True)
    runs = _rows(airflow, "select run_type, state from dag_run where dag_id = ?", TRAINING)
    assert runs == [("manual", "running")]  # max_active_runs=1: the drift run waits
    assert _rows(airflow, "select target_dag_id from asset_dag_run_queue") == [(TRAINING,)]

    with _db(airflow) as db:  # the person's run ends (the REST API would need the API server)
        db.execute("update dag_run set state = 'success' where dag_id = ?", (TRAINING,))
        db.commit()
    airflow.airflow("scheduler", "--num-runs", "1", capture_output=True)
    runs = _rows(airflow, "select id, run_type from dag_run where dag_id = ? order by id", TRAINING)
    assert [kind for _, kind in runs] == ["manual", "asset_triggered"]
    ((event_id, *_),) = _drift_events(airflow)
    consumed = _rows(
        airflow, "select event_id from dagrun_asset_event where dag_run_id = ?", runs[-1][0]
    )
    assert consumed == [(event_id,)]
    assert _rows(airflow, "select * from asset_dag_run_queue") == []
