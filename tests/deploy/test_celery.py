"""The team topology for real: CeleryExecutor on Redis, a default and two GPU workers.

A real dataset DAG runs through the scheduler, the broker and the workers
(``tests/deploy/celery.py``); Airflow's own task-instance records then say which
worker ran what.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PIPELINE_FILES, git_project
from tests.datagen import learnable_train, make_archive, tiny_params
from tests.deploy.celery import GPU_WORKERS, start_topology

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATASET = "cats_vs_dogs"
DAG_ID = f"transfer_learning__{DATASET}"
# What a DAG run needs of the project (the e2e copies), less pyproject.toml: not needed here
PROJECT_FILES = [item for item in PIPELINE_FILES if item != "pyproject.toml"]
GPU_STAGES = {"train", "finetune"}


@pytest.fixture(scope="module")
def topology(tmp_path_factory, archive_server, offline_weights):
    base = tmp_path_factory.mktemp("celery")
    archive = make_archive(base / "served.zip", DATASET, {"train": 8, "validation": 4}, 40)
    url = archive_server.add("/celery/cats_vs_dogs.zip", archive.read_bytes())
    params = tiny_params(
        {DATASET: url},
        {"train": 8, "validation": 4},
        train=learnable_train(offline_weights),
        finetune={"epochs": 6, "feature_cache": "off", "early_stopping_patience": 6},
        evaluate={"gradcam_images": 1, "mistakes": 2},
        register={"floor": 0.0, "promote_if": "not_worse"},
        schedule={"cron": None, "owner": "ci", "retries": 2, "gpus": 2},
    )
    project = git_project(base / "project", PROJECT_FILES, params)
    stack = start_topology(base, project, {})
    try:
        yield stack
    finally:
        stack.stop_all()


def _trigger(stack, dag_id: str, run_id: str, timeout: float = 900) -> str:
    stack.wait_dag(dag_id, 180)
    stack.airflow("dags", "unpause", dag_id)
    stack.airflow("dags", "trigger", dag_id, "--run-id", run_id)
    deadline = time.monotonic() + timeout
    while (state := stack.run_state(dag_id, run_id)) not in ("success", "failed"):
        stack.check_alive()
        assert time.monotonic() < deadline, f"{dag_id} {run_id} still {state} after {timeout} s"
        time.sleep(2)
    return state


def test_gpu_stages_run_on_the_gpu_workers_and_the_rest_on_the_default_worker(topology):
    state = _trigger(topology, DAG_ID, "celery-1")
    tasks = topology.tasks(DAG_ID, "celery-1")
    table = sorted(
        (t["start"], k[0], t["queue"], t["hostname"], t["state"])
        for k, t in tasks.items()
        if t["start"]
    )
    for row in table:
        print(row)
    assert state == "success"
    for (task_id, _), ti in tasks.items():
        if ti["state"] == "skipped":
            continue
        if task_id in GPU_STAGES:
            assert ti["queue"] == "gpu" and ti["hostname"].split("-host")[0] in GPU_WORKERS, ti
        else:
            assert ti["queue"] == "default" and ti["hostname"] == "cpu-host", ti


# --------------------------------------------------------------------- faults


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _finished_epochs(state: Path) -> int:
    try:
        return len(json.loads(state.read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return 0


def _free(lock: Path) -> bool:
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@dataclass
class Timeline:
    """What happened when, in the faulted run (seconds since its trigger)."""

    start: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)

    def note(self, what: str, when: float | None = None) -> None:
        self.events.append(((when or time.time()) - self.start, what))

    def __str__(self) -> str:
        return "\n".join(f"  {t:7.1f} s  {what}" for t, what in sorted(self.events))


def _faulted_run(stack, run_id: str, ws: Path, timeline: Timeline) -> str:
    """Trigger a run that fine-tunes anew, and on the way: stop Redis for a while, kill the
    GPU worker in the middle of a fine-tuning epoch, restart the scheduler."""
    conf = json.dumps({"finetune_epochs": EPOCHS})
    stack.airflow("dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", conf)
    timeline.start = time.time()
    state_file = ws / ".checkpoints" / DATASET / "finetune" / "state.json"
    steps = ["redis", "kill", "scheduler"]
    deadline = time.monotonic() + 1200
    while (state := stack.run_state(DAG_ID, run_id)) not in ("success", "failed"):
        assert time.monotonic() < deadline, f"{run_id} still {state}"
        step = steps[0] if steps else None
        if step == "kill" and _finished_epochs(state_file) < 2:
            time.sleep(0.1)  # epochs are short here: watch the checkpoint closely
            continue
        tasks = {k[0]: t for k, t in stack.tasks(DAG_ID, run_id).items()}
        if step == "redis" and tasks.get("prepare", {}).get("state") == "success":
            stack.kill("redis")
            timeline.note("Redis stopped (prepare done, download not yet sent)")
            time.sleep(REDIS_DOWN_SECONDS)
            stack.start("redis")
            timeline.note("Redis started again")
            steps.pop(0)
        elif step == "kill" and _finished_epochs(state_file) >= 2:
            ti = tasks["finetune"]
            worker = ti["hostname"].removesuffix("-host")
            epochs = _finished_epochs(state_file)
            killed = stack.kill(worker)
            timeline.note(f"SIGKILL {worker}, try {ti['try_number']}, after epoch {epochs}", killed)
            steps.pop(0)
        elif step == "scheduler" and tasks.get("evaluate", {}).get("state") in (
            "queued",
            "running",
        ):
            stack.procs["scheduler"].stop(timeout=30)
            timeline.note("scheduler stopped (evaluate queued or running)")
            stack.start("scheduler")
            timeline.note("scheduler started again")
            steps.pop(0)
        time.sleep(0.5)
    assert not steps, f"the run ended ({state}) before the faults {steps} were injected"
    return state


REDIS_DOWN_SECONDS = 15
EPOCHS = 12
"""The faulted run's fine-tuning epochs (the first run's were 6: DVC runs it anew)."""


def test_a_lost_gpu_worker_a_restarted_scheduler_and_a_broker_outage_lose_nothing(
    topology, tmp_path
):
    stack = topology
    project = Path(stack.env["TASKS_PROJECT"])
    ws = project / ".workspaces" / DATASET
    kept = {name: _md5(ws / name) for name in (
        f"models/{DATASET}/frozen.keras", f"data/manifests/{DATASET}.parquet")}  # fmt: skip
    timeline = Timeline()
    try:
        state = _faulted_run(stack, "celery-faults", ws, timeline)
    finally:  # the lost machine comes back, for the tests after this one
        for name in GPU_WORKERS:
            if not stack.procs[name].alive():
                stack.restart_worker(name)

    tries = stack.tries(DAG_ID, "celery-faults", "finetune")
    final = stack.tasks(DAG_ID, "celery-faults")[("finetune", -1)]
    first, last = tries[0], final
    timeline.note(
        f"try {first['try_number']} marked {first['state']} (heartbeat timeout)",
        first["end"].timestamp(),
    )
    timeline.note(
        f"try {last['try_number']} started on {last['hostname']}", last["start"].timestamp()
    )
    timeline.note(f"try {last['try_number']} {last['state']}", last["end"].timestamp())
    outage = [line for line in (stack.base / "scheduler.log").read_text().splitlines()
              if "Error sending Celery workload" in line]  # fmt: skip
    print("\nwhile Redis was down, the scheduler said:\n  " + "\n  ".join(outage[:3]))
    assert outage and f"127.0.0.1:{stack.redis_port}" in outage[0]
    log = _task_log(stack, "celery-faults", "finetune", last["try_number"])
    resumed = re.findall(rf"phase 2 resumes after epoch (\d+) of {EPOCHS}", log)
    print(f"\nthe faulted run ({state}):\n{timeline}\n  resumed after epoch {resumed}")
    assert state == "success"
    assert first["state"] == "failed" and last["state"] == "success" and last["try_number"] == 2
    assert first["hostname"] != last["hostname"], "the retry ran on the surviving gpu worker"
    assert {first["hostname"], last["hostname"]} == {f"{w}-host" for w in GPU_WORKERS}
    assert resumed and int(resumed[0]) >= 2  # from the phase checkpoint, not from epoch 0
    history = pd.read_csv(ws / "reports" / DATASET / "history.csv")
    finetune_epochs = history.loc[history["phase"] == "finetune", "epoch"].tolist()
    assert finetune_epochs == sorted(set(finetune_epochs)) and len(finetune_epochs) == EPOCHS

    # nothing lost: earlier outputs untouched, no run left RUNNING, no GPU held
    assert {name: _md5(ws / name) for name in kept} == kept
    (store,) = project.glob("mlflow/mlflow.db")
    with sqlite3.connect(store) as db:
        running = db.execute("SELECT run_uuid, name FROM runs WHERE status = 'RUNNING'").fetchall()
    assert running == []
    locks = [p for w in GPU_WORKERS for p in stack.locks(w).glob("gpu-*.lock")]
    assert locks and all(_free(lock) for lock in locks)
    # the run is a DVC experiment a fresh clone restores, the fine-tuned model included
    name = json.loads((ws / ".tasks-run.json").read_text())["experiment"]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    for args in (["remote", "add", "--local", "store", str(project / ".dvc-remote")],
                 ["exp", "pull", "--remote", "store", "origin", name], ["exp", "apply", name],
                 ["pull", "--remote", "store"]):  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=clone, check=True, capture_output=True
        )
    finetuned = f"models/{DATASET}/finetuned.keras"
    assert _md5(clone / finetuned) == _md5(ws / finetuned)


def _task_log(stack, run_id: str, task_id: str, try_number: int) -> str:
    logs = Path(stack.env["AIRFLOW_HOME"]) / "logs"
    found = list(
        logs.glob(f"dag_id={DAG_ID}/run_id={run_id}/task_id={task_id}/attempt={try_number}.log")
    )
    return found[0].read_text(errors="replace") if found else ""


# --------------------------------------------------------------------- a sweep

SWEEP_DAG_ID = "transfer_learning__sweep"


def test_a_sweeps_two_lanes_train_at_once_on_the_two_gpu_workers(topology):
    stack = topology
    stack.wait_dag(SWEEP_DAG_ID, 180)
    stack.airflow("dags", "unpause", SWEEP_DAG_ID)
    conf = {"backbones": ["mobilenet_v2"], "learning_rates": [0.003, 0.001],
            "datasets": [DATASET], "set": {"finetune.epochs": EPOCHS, "train.seed": 8}}  # fmt: skip
    stack.airflow(
        "dags", "trigger", SWEEP_DAG_ID, "--run-id", "celery-sweep", "--conf", json.dumps(conf)
    )
    deadline = time.monotonic() + 1200
    while (state := stack.run_state(SWEEP_DAG_ID, "celery-sweep")) not in ("success", "failed"):
        stack.check_alive()
        assert time.monotonic() < deadline, f"the sweep is still {state}"
        time.sleep(2)
    tasks = stack.tasks(SWEEP_DAG_ID, "celery-sweep")
    gpu = {key: ti for key, ti in tasks.items() if key[0].split(".")[-1] in GPU_STAGES}
    print("\nthe sweep's GPU tasks:")
    for (task_id, lane), ti in sorted(gpu.items(), key=lambda item: item[1]["start"]):
        print(f"  lane {lane} {task_id:<20} {ti['hostname']:<12} {ti['start']:%H:%M:%S.%f}"
              f" -> {ti['end']:%H:%M:%S.%f}")  # fmt: skip
    assert state == "success"
    assert {lane for _, lane in gpu} == {0, 1} and all(t["queue"] == "gpu" for t in gpu.values())
    # from Airflow's records, not the wall clock: a GPU task of each lane ran at once, on
    # the two GPU workers
    together = [
        (a, b)
        for a, ta in gpu.items()
        for b, tb in gpu.items()
        if a[1] == 0 and b[1] == 1 and ta["start"] < tb["end"] and tb["start"] < ta["end"]
    ]
    assert together, gpu
    assert all(gpu[a]["hostname"] != gpu[b]["hostname"] for a, b in together)
