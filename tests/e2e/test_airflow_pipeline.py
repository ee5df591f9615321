"""The DAGs end to end with real Airflow, DVC, MLflow, GE and Keras, on tiny generated data.

One temporary git copy of the project, both datasets served from 127.0.0.1,
tiny params. Shared, in order of the fixtures:

1. ``airflow dags test`` of the cats_vs_dogs DAG with a run conf (what
   ``make run`` does): MLflow runs with lineage and the overrides tag, a
   registry alias, the DVC remote holding every cached output, and the run a
   DVC experiment that a fresh clone of the project restores byte for byte
   (the model files' md5 equal the ``model.md5`` tags MLflow recorded);
2. a bad conf fails the first task with the one-line error;
3. the sweep DAG over two backbones (``dags test``): one pipeline per backbone in
   its own workspace, the comparison table, Pareto plot and MLflow run, and only
   the best through the registry gate;
4. the real scheduler stack (api-server + scheduler + dag-processor on a free
   loopback port): both dataset DAGs triggered together through the REST API
   both succeed, the GPU pool keeps their training tasks apart, and the model
   assets trigger the summary DAG;
5. a run with ``register.approval: human`` in its conf stops at the approval task
   with the gate report; answering it through the REST API promotes the version
   and the registry's history records who approved it;
6. the sweep under the scheduler: its two lanes run side by side while the one
   GPU slot keeps their training apart (its wall time against ``dags test``'s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
import yaml

from tasks.dev.airflow_local import SQLITE_CONNECT_ARGS, LocalAirflow, stage_seconds, stop_group
from tasks.dev.httpserver import unused_port
from tasks.errors import StageError
from tasks.orchestration.project import DAG_PREFIX, SUMMARY_DAG_ID, SWEEP_DAG_ID, Project
from tasks.orchestration.sweep import sweep_id
from tests.conftest import PIPELINE_FILES, git_project
from tests.datagen import learnable_train, make_archive, tiny_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATASETS = ("cats_vs_dogs", "ants_vs_bees")
STAGES = ("download", "validate", "train", "finetune", "evaluate", "register")
# The gate's floor: each model must get both of its 2 test images right (a one-class model
# scores 0.5). Offline-made weights and 15 head epochs score 1.0 on both datasets here; see
# tests/e2e/test_dvc_pipeline.py for the measurements.
FLOOR = 0.75
CATS = f"{DAG_PREFIX}cats_vs_dogs"
ANTS = f"{DAG_PREFIX}ants_vs_bees"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, archive_server, offline_weights) -> LocalAirflow:
    base = tmp_path_factory.mktemp("airflow-e2e")
    sources = {}
    for seed, name in enumerate(DATASETS):
        archive = make_archive(
            base / "served" / f"{name}.zip", name, {"train": 8, "validation": 4}, 40, seed=seed
        )
        sources[name] = archive_server.add(f"/airflow/{name}.zip", archive.read_bytes())
    params = tiny_params(
        sources,
        {"train": 8, "validation": 4},
        train=learnable_train(offline_weights),
        finetune={"epochs": 1},
        evaluate={"gradcam_images": 1, "mistakes": 2},
        register={"floor": FLOOR, "promote_if": "not_worse"},
        # No cron: only the runs the tests trigger (an unpaused weekly DAG would also start
        # the latest scheduled run at once, and max_active_runs=1 would queue ours behind it).
        schedule={"cron": None, "owner": "ci", "retries": 1, "gpus": 1},
    )
    with _own_airflow(
        base,
        params,
        TF_CPP_MIN_LOG_LEVEL="2",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
    ) as instance:
        yield instance


@contextlib.contextmanager
def _own_airflow(base: Path, params: dict, **extra_env: str) -> Iterator[LocalAirflow]:
    """A git project with ``params`` and its own prepared Airflow installation under
    ``base``, with none of the caller's MLflow, TASKS or AIRFLOW settings."""
    repo = git_project(base / "repo", PIPELINE_FILES, params)
    instance = LocalAirflow(
        Project.from_env(repo, environ={}),
        base / "airflow-home",
        port=unused_port(),
        extra_env={"TASKS_RETRY_DELAY_SECONDS": "1", **extra_env},
    )
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith(("MLFLOW_", "TASKS_", "AIRFLOW__")):
                env.delenv(name)
        instance.prepare()
        yield instance


def _store_uri(project: Project) -> str:
    return f"sqlite:///{project.mlflow_dir / 'mlflow.db'}"


def _mlflow_client(project: Project):
    from mlflow import MlflowClient

    return MlflowClient(_store_uri(project))


@pytest.fixture(scope="module")
def dag_test(airflow):
    """``airflow dags test`` of one dataset DAG with a run conf; returns (seconds, conf)."""
    conf = {"finetune_epochs": 1, "set": {"evaluate.mistakes": 3}}
    seconds = airflow.dags_test(CATS, conf)
    return seconds, conf


def test_dag_test_runs_every_stage_and_records_the_run(airflow, dag_test):
    seconds, _ = dag_test
    project = airflow.project
    ws = project.workspace("cats_vs_dogs")
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert {f"{s}@cats_vs_dogs" for s in STAGES} == set(lock["stages"])
    # Overrides reached the workspace's params only; the checked-in file is untouched.
    run_params = yaml.safe_load((ws / "params.yaml").read_text())
    assert run_params["evaluate"]["mistakes"] == 3
    assert yaml.safe_load(project.params.read_text())["evaluate"]["mistakes"] == 2
    assert (
        lock["stages"]["evaluate@cats_vs_dogs"]["params"]["params.yaml"]["evaluate.mistakes"] == 3
    )
    stages = stage_seconds(project, "cats_vs_dogs")
    print(
        f"\nairflow dags test (cats_vs_dogs): {seconds:.1f} s, stage commands {stages:.1f} s, "
        f"Airflow overhead {seconds - stages:.1f} s"
    )
    assert 0 < stages < seconds


def test_mlflow_runs_carry_the_airflow_lineage_and_overrides(airflow, dag_test):
    client = _mlflow_client(airflow.project)
    experiment = client.get_experiment_by_name("cats_vs_dogs")
    runs = client.search_runs([experiment.experiment_id])
    children = {r.data.tags.get("phase"): r for r in runs if r.data.tags.get("phase")}
    assert {"train", "finetune", "evaluate", "register"} <= set(children)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in children.values()}
    assert len(parents) == 1
    for run in children.values():
        assert run.data.tags["airflow.dag_id"] == CATS
        assert run.data.tags["airflow.run_id"].startswith("manual__")
        assert json.loads(run.data.tags["overrides"]) == [
            "finetune.epochs=1",
            "evaluate.mistakes=3",
        ]
    evaluate = children["evaluate"].data.metrics
    assert {"test.accuracy", "validation.accuracy", "test.images"} <= set(evaluate)
    assert evaluate["test.images"] == 2  # 20% of each class's 4 validation images
    assert evaluate["test.accuracy"] >= FLOOR  # it learned: a one-class model gets 0.5


def test_registry_alias_and_dvc_remote_after_the_run(airflow, dag_test):
    client = _mlflow_client(airflow.project)
    champion = client.get_model_version_by_alias("cats_vs_dogs-classifier", "champion")
    assert str(champion.version) == "1"
    ws = airflow.project.workspace("cats_vs_dogs")
    gate = json.loads((ws / "reports" / "cats_vs_dogs" / "gate.json").read_text())
    assert gate["alias"] == "champion" and gate["version"] == "1"
    assert (gate["floor"], gate["status"], gate["verdict"]) == (FLOOR, "promoted", "first")
    record = json.loads((ws / ".tasks-run.json").read_text())
    assert gate["experiment"] == record["experiment"]  # gate.json names the run's experiment
    remote = airflow.project.root / ".dvc-remote" / "files" / "md5"
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    cached = {
        "data/raw/cats_vs_dogs",
        "data/manifests/cats_vs_dogs.parquet",
        "models/cats_vs_dogs/frozen.keras",
        "models/cats_vs_dogs/finetuned.keras",
    }
    hashes = {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] in cached
    }
    assert set(hashes) == cached
    for path, md5 in hashes.items():
        assert (remote / md5[:2] / md5[2:]).is_file(), path


def test_the_run_is_a_dvc_experiment_a_fresh_clone_restores(airflow, dag_test, tmp_path):
    """docs/reproducing.md's lineage recipe, followed literally, from a registered model version."""
    project = airflow.project
    client = _mlflow_client(project)
    # From the registered model to its experiment ...
    version = client.get_model_version_by_alias("cats_vs_dogs-classifier", "champion")
    run = client.get_run(version.run_id)
    name = run.data.tags["dvc.exp_name"]
    assert name.startswith("cats_vs_dogs-manual__")
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.exp_name"] == name
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--csv"],
        cwd=project.root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert name in shown  # listed in the project beside local experiments

    # ... and from the experiment back to the exact files, in a fresh clone.
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(project.root), str(clone))
    # The project's remote is the folder .dvc-remote/, given relative to the project: a clone
    # elsewhere names it (an S3 remote needs no such line).
    store = ["remote", "add", "--local", "store", str(project.root / ".dvc-remote")]
    pull = ["exp", "pull", "--remote", "store", "origin", name]
    for args in (store, pull, ["exp", "apply", name], ["pull", "--remote", "store"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=clone, check=True)
    experiment = client.get_experiment_by_name("cats_vs_dogs").experiment_id
    runs = client.search_runs([experiment], f"tags.`dvc.exp_name` = '{name}'")
    phases = [r for r in runs if r.data.tags.get("phase") in ("train", "finetune")]
    recorded = {r.data.tags["model.path"]: r.data.tags["model.md5"] for r in phases}
    assert set(recorded) == {
        "models/cats_vs_dogs/frozen.keras",
        "models/cats_vs_dogs/finetuned.keras",
    }
    for path, md5 in recorded.items():
        assert hashlib.md5((clone / path).read_bytes()).hexdigest() == md5, path
    params = yaml.safe_load((clone / "params.yaml").read_text())
    assert params["evaluate"]["mistakes"] == 3  # the run's conf, not the committed file's


def test_bad_conf_fails_the_first_task_with_one_line(airflow, dag_test):
    proc = airflow.airflow(
        "dags",
        "test",
        CATS,
        "--conf",
        json.dumps({"backbone": "resnet"}),
        check=False,
        capture_output=True,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "run conf: train.backbone: 'resnet' is not allowed; use one of:" in output
    assert "starting task_id=prepare" in output
    assert "starting task_id=download" not in output


# --- the sweep -----------------------------------------------------------------------

# Two backbones on cats_vs_dogs: MobileNetV2 on the offline-made weights (learns: 1.0 on
# the test images) and EfficientNetB0 with random weights (collapsed features: the head
# cannot beat chance), so the comparison has a known winner. Two fine-tuning epochs: the
# MobileNetV2 lane's train stage is the dags-test run's (DVC restores it from the run
# cache), its finetune, evaluate and register run anew.
SWEEP_CONF = {
    "backbones": ["mobilenet_v2", "efficientnet_b0"],
    "datasets": ["cats_vs_dogs"],
    "set": {"finetune.epochs": 2},
    "per_backbone": {"efficientnet_b0": {"train.weights": "none"}},
}


@pytest.fixture(scope="module")
def sweep(airflow, dag_test):
    """``airflow dags test`` of the sweep DAG (after the cats_vs_dogs run has a champion):
    its wall time, its report folder, and the dataset DAG's params before it."""
    own = airflow.project.workspace("cats_vs_dogs") / "params.yaml"
    before = own.read_bytes()
    seconds = airflow.dags_test(SWEEP_DAG_ID, SWEEP_CONF)
    (folder,) = (airflow.project.reports / "sweep").iterdir()
    return seconds, folder, before


def test_sweep_runs_one_pipeline_per_backbone_in_its_own_workspace(airflow, sweep):
    seconds, folder, before = sweep
    project = airflow.project
    report = json.loads((folder / "comparison.json").read_text())
    rows = {row["backbone"]: row for row in report["rows"]}
    assert set(rows) == {"mobilenet_v2", "efficientnet_b0"}
    workspaces = {row["workspace"] for row in rows.values()}
    assert workspaces == {
        str(project.workspaces / "sweeps" / folder.name / f"cats_vs_dogs--{b}") for b in rows
    }
    for backbone, row in rows.items():
        ws = Path(row["workspace"])
        params = yaml.safe_load((ws / "params.yaml").read_text())
        assert params["train"]["backbone"] == backbone
        metrics = json.loads((ws / "reports" / "cats_vs_dogs" / "metrics.json").read_text())
        assert row["status"] == "ok" and row["test_accuracy"] == metrics["accuracy"]
        # training seconds: the MLflow runs that trained each phase's model
        client = _mlflow_client(project)
        phases = [client.get_run(row[f"{p}_run_id"]).info for p in ("train", "finetune")]
        spent = sum((info.end_time - info.start_time) / 1000 for info in phases)
        assert row["training_seconds"] == pytest.approx(spent, abs=0.02) and spent > 0
    # the MobileNetV2 lane's train stage came from DVC's run cache: its model and its
    # seconds are those of the dags-test run's train phase
    assert rows["mobilenet_v2"]["restored"] == ["train"]
    assert rows["efficientnet_b0"]["restored"] == []
    dag_run_train = json.loads(
        (project.workspace("cats_vs_dogs") / "reports/cats_vs_dogs/runs/train.json").read_text()
    )
    assert rows["mobilenet_v2"]["train_run_id"] == dag_run_train["run_id"]
    assert rows["mobilenet_v2"]["test_accuracy"] >= FLOOR
    # the dataset DAG's own workspace was not touched by the sweep
    assert (project.workspace("cats_vs_dogs") / "params.yaml").read_bytes() == before
    print(f"\nairflow dags test (sweep, 2 backbones, one after the other): {seconds:.1f} s")


def test_sweep_comparison_table_plot_and_mlflow_runs(airflow, sweep):
    _, folder, _ = sweep
    report = json.loads((folder / "comparison.json").read_text())
    assert report["best"] == {"cats_vs_dogs": "cats_vs_dogs--mobilenet_v2"}
    rows = {row["backbone"]: row for row in report["rows"]}
    assert rows["mobilenet_v2"]["pareto"] is True and rows["mobilenet_v2"]["best"] is True
    # EfficientNetB0 is on the front only if it trained faster (it is less accurate)
    faster = rows["efficientnet_b0"]["training_seconds"] < rows["mobilenet_v2"]["training_seconds"]
    less_accurate = rows["efficientnet_b0"]["test_accuracy"] < rows["mobilenet_v2"]["test_accuracy"]
    assert less_accurate
    assert rows["efficientnet_b0"]["pareto"] is faster
    table = (folder / "comparison.md").read_text()
    assert table.index("cats_vs_dogs--mobilenet_v2") < table.index("cats_vs_dogs--efficientnet_b0")
    assert (folder / "pareto_cats_vs_dogs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = _mlflow_client(airflow.project)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["sweep.id"] == folder.name
    assert run.data.tags["best.cats_vs_dogs"] == "cats_vs_dogs--mobilenet_v2"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.md", "comparison.csv", "pareto_cats_vs_dogs.png"} <= logged
    assert "comparison_table.json" in logged
    # each combination is a pipeline execution of its own, tagged with the sweep
    experiment = client.get_experiment_by_name("cats_vs_dogs")
    parents = client.search_runs([experiment.experiment_id], f"tags.`sweep.id` = '{folder.name}'")
    by_key = {p.data.tags["sweep.combination"]: p for p in parents}
    assert set(by_key) == {row["combination"] for row in rows.values()}
    for key, parent in by_key.items():
        assert parent.info.status == "FINISHED"
        assert parent.data.params["train.backbone"] == key.split("--")[1]
        assert parent.info.run_id == rows[key.split("--")[1]]["parent_run_id"]
        assert "test.accuracy" in parent.data.metrics
        assert parent.data.tags["dvc.exp_name"].endswith(key)


def test_sweep_sends_only_the_best_combination_through_the_gate(airflow, sweep):
    _, folder, _ = sweep
    report = json.loads((folder / "comparison.json").read_text())
    rows = {row["backbone"]: row for row in report["rows"]}
    best_ws = Path(rows["mobilenet_v2"]["workspace"])
    other_ws = Path(rows["efficientnet_b0"]["workspace"])
    gate = json.loads((best_ws / "reports" / "cats_vs_dogs" / "gate.json").read_text())
    assert not (other_ws / "reports" / "cats_vs_dogs" / "gate.json").exists()
    client = _mlflow_client(airflow.project)
    version = client.get_model_version("cats_vs_dogs-classifier", gate["version"])
    register = client.get_run(version.run_id)
    assert register.data.tags["mlflow.parentRunId"] == rows["mobilenet_v2"]["parent_run_id"]
    assert gate["status"] == "promoted"  # 1.0 on the 2 test images, as the champion: not worse
    assert gate["candidate_score"] == rows["mobilenet_v2"]["test_accuracy"]


# --- the scheduler stack ------------------------------------------------------------


class Stack:
    """api-server, scheduler and dag-processor as separate processes; stopped on exit."""

    def __init__(self, airflow: LocalAirflow, logs: Path) -> None:
        self.airflow = airflow
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.base = f"http://127.0.0.1:{airflow.port}"

    def start(self) -> Stack:
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in ("api-server", "scheduler", "dag-processor"):
            with open(self.logs / f"{name}.log", "w") as out:
                self.procs[name] = subprocess.Popen(
                    [str(self.airflow.bin / "airflow"), name],
                    env=self.airflow.env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_group(proc, signal.SIGTERM, grace=30.0)

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def wait_for(self, what: str, check, timeout: float = 120, every: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode})\n{self.tail()}")
            try:
                value = check()
            except requests.RequestException:
                value = None
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")


@pytest.fixture(scope="module")
def stack(airflow, dag_test, tmp_path_factory):
    started = time.perf_counter()
    running = Stack(airflow, tmp_path_factory.mktemp("stack-logs")).start()
    try:
        running.wait_for(
            "the api-server",
            lambda: requests.get(f"{running.base}/api/v2/monitor/health", timeout=5).ok,
        )
        passwords = airflow.home / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        token = requests.post(
            f"{running.base}/auth/token",
            json={"username": "admin", "password": password},
            timeout=API_TIMEOUT,
        ).json()["access_token"]
        running.session = requests.Session()
        running.session.headers["Authorization"] = f"Bearer {token}"
        running.startup_s = time.perf_counter() - started
        yield running
    finally:
        running.stop()
        leftovers = [name for name, proc in running.procs.items() if proc.poll() is None]
        assert leftovers == []
        # Executor workers included: nothing alive is left in the groups we started.
        assert [pid for proc in running.procs.values() for pid in _live_members(proc.pid)] == []


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (read from /proc)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


# Longer than an Airflow process waits for SQLite's write lock (SQLITE_CONNECT_ARGS): a request
# that waited its turn is answered, not abandoned by the client.
API_TIMEOUT = SQLITE_CONNECT_ARGS["timeout"] + 30


def _api(stack: Stack, path: str, method: str = "GET", **kwargs) -> dict:
    response = stack.session.request(
        method, f"{stack.base}/api/v2{path}", timeout=API_TIMEOUT, **kwargs
    )
    assert response.ok, f"{method} {path}: {response.status_code} {response.text[:500]}"
    return response.json()


def _write(stack: Stack, method: str, path: str, body: dict, what: str) -> None:
    """A REST write sent as a careful client sends it: a lost answer (a timeout, or a 5xx after
    the server's SQLite lock wait) is sent again, and a 409 on a resend means the earlier
    attempt took effect. ``body`` names what it writes, so a resend never writes it twice."""
    attempts = 0

    def done() -> bool:
        nonlocal attempts
        attempts += 1
        response = stack.session.request(
            method, f"{stack.base}/api/v2{path}", json=body, timeout=API_TIMEOUT
        )
        if response.status_code == 409 and attempts > 1:
            return True
        if response.status_code < 500:
            assert response.ok, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.ok

    stack.wait_for(what, done, timeout=3 * API_TIMEOUT)


def _trigger(stack: Stack, dag_id: str, conf: dict) -> str:
    """A manual run under a run id chosen here (Airflow's own form), so a resent POST finds
    the run its first attempt created instead of starting a second one."""
    run_id = f"manual__{datetime.now(UTC).isoformat()}"
    body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
    _write(stack, "POST", f"/dags/{dag_id}/dagRuns", body, f"{dag_id}'s run {run_id} created")
    return run_id


def _state_since(stack: Stack, ti_path: str) -> float | None:
    """When (monotonic) the task instance was first seen awaiting input; None before."""
    if _api(stack, ti_path)["state"] != "awaiting_input":
        return None
    return time.monotonic()


def _run_state(stack: Stack, dag_id: str, run_id: str) -> str | None:
    state = _api(stack, f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
    return state if state in ("success", "failed") else None


def _task_log(home: Path, dag_id: str, run_id: str, task_id: str) -> list[tuple[str, str]]:
    """(logger, message) of each line of a task's first attempt, as the UI shows them."""
    path = home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    events = []
    for line in (path / "attempt=1.log").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        events.append((str(entry.get("logger", "")), str(entry.get("event", ""))))
    return events


def test_both_dataset_dags_triggered_together_succeed_and_feed_the_summary(stack):
    project = stack.airflow.project
    for dag_id in (CATS, ANTS, SUMMARY_DAG_ID):
        stack.wait_for(
            f"{dag_id} to be parsed",
            lambda d=dag_id: stack.session.get(f"{stack.base}/api/v2/dags/{d}", timeout=5).ok,
        )
    cats_before = int(
        _mlflow_client(project)
        .get_model_version_by_alias("cats_vs_dogs-classifier", "champion")
        .version
    )
    started = time.perf_counter()
    # ants_vs_bees runs from scratch; cats_vs_dogs keeps the dags-test run's evaluate setting and
    # changes only the gate, so just `register` reruns (a second registry write, at the same time).
    confs = {CATS: {"set": {"evaluate.mistakes": 3, "register.alpha": 0.1}}, ANTS: {}}
    runs = {dag_id: _trigger(stack, dag_id, conf) for dag_id, conf in confs.items()}
    states = {
        dag_id: stack.wait_for(
            f"{dag_id} to finish", lambda d=dag_id: _run_state(stack, d, runs[d]), timeout=900
        )
        for dag_id in runs
    }
    both = time.perf_counter() - started
    assert states == {CATS: "success", ANTS: "success"}, stack.tail()

    # What a person reads in the Airflow UI: the train task's log shows each epoch and ends
    # with the stage's one-line result (nothing of ours after it).
    events = _task_log(stack.airflow.home, ANTS, runs[ANTS], "train")
    assert any(re.search(r"epoch 1/\d+: loss \d", event) for _, event in events), events
    ours = [event for logger, event in events if logger.startswith("tasks.")]
    assert re.fullmatch(r"train@ants_vs_bees: ran in [\d.]+ s; MLflow run [0-9a-f]{32}", ours[-1])

    # Skip-if-unchanged across runs: cats_vs_dogs reran only the stage whose params changed.
    ran = {
        stage: _api(
            stack,
            f"/dags/{CATS}/dagRuns/{runs[CATS]}/taskInstances/{stage}/xcomEntries/return_value",
        )["value"]["ran"]
        for stage in STAGES
    }
    assert ran == {stage: stage == "register" for stage in STAGES}

    # One GPU slot: the two DAGs' train/finetune tasks never overlapped.
    spans = []
    for dag_id, run_id in runs.items():
        tis = _api(stack, f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        spans += [
            (ti["start_date"], ti["end_date"])
            for ti in tis
            if ti["task_id"] in ("train", "finetune")
        ]
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, spans

    # Each model asset update triggers the summary; the last one sees both new champions.
    def summary_with_both() -> dict | None:
        path = project.reports / "summary.json"
        report = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
        versions = {
            ds: (entry["champion"] or {}).get("version") for ds, entry in report["datasets"].items()
        }
        want = {"cats_vs_dogs": str(cats_before + 1), "ants_vs_bees": "1"}
        return report if versions == want else None

    report = stack.wait_for("the summary of both champions", summary_with_both, timeout=300)
    triggered = [
        r
        for r in _api(stack, f"/dags/{SUMMARY_DAG_ID}/dagRuns")["dag_runs"]
        if r["run_type"] == "asset_triggered"
    ]
    assert triggered and all(r["state"] in ("success", "running", "queued") for r in triggered)
    assert report["datasets"]["ants_vs_bees"]["champion"]["metrics"]
    markdown = (project.reports / "summary.md").read_text()
    assert "cats_vs_dogs-classifier@champion" in markdown
    assert "is DVC experiment `ants_vs_bees-manual__" in markdown
    print(
        f"\nscheduler stack up in {stack.startup_s:.1f} s; both DAGs together {both:.1f} s",
        file=sys.stderr,
    )


def test_human_approval_through_the_rest_api_promotes_the_candidate(stack):
    """The run waits at `approve` showing the gate; an Approve over REST moves @champion."""
    client = _mlflow_client(stack.airflow.project)
    name = "ants_vs_bees-classifier"
    before = str(client.get_model_version_by_alias(name, "champion").version)
    # only the gate's settings change: register reruns, its candidate is the same model
    conf = {"set": {"register.approval": "human", "register.promote_if": "not_worse"}}
    run_id = _trigger(stack, ANTS, conf)
    ti_path = f"/dags/{ANTS}/dagRuns/{run_id}/taskInstances/approve"

    def waiting() -> dict | None:
        response = stack.session.get(f"{stack.base}/api/v2{ti_path}/-1/hitlDetails", timeout=10)
        return response.json() if response.ok else None

    detail = stack.wait_for("the approval task to ask", waiting, timeout=600)
    # A person answers after the scheduler has seen the parked worker exit. An answer within
    # about a second of parking races that executor event in Airflow 3.3 (the scheduler then
    # finds the resumed task queued and fails it), so wait as a person would.
    parked = stack.wait_for(
        "the approval task to be parked", lambda: _state_since(stack, ti_path), timeout=120
    )
    while time.monotonic() - parked < 10:
        assert _api(stack, ti_path)["state"] == "awaiting_input"
        time.sleep(1)
    assert detail["options"] == ["Approve", "Reject"]
    assert detail["subject"] == f"Promote {name} v{int(before) + 1} to @champion?"
    assert "| verdict | **equivalent** (rule: promote if not worse) |" in detail["body"]
    assert "McNemar exact p" in detail["body"]
    # nothing moved yet: the candidate waits at @challenger
    pending = client.get_model_version_by_alias(name, "challenger")
    assert str(pending.version) == str(int(before) + 1)
    assert str(client.get_model_version_by_alias(name, "champion").version) == before

    answer = {"chosen_options": ["Approve"], "params_input": {"reason": "checked the plots"}}
    _write(stack, "PATCH", f"{ti_path}/-1/hitlDetails", answer, "the approval recorded")
    state = stack.wait_for(
        "the run to finish", lambda: _run_state(stack, ANTS, run_id), timeout=300
    )
    assert state == "success", stack.tail()
    promote = _api(stack, f"/dags/{ANTS}/dagRuns/{run_id}/taskInstances/promote")
    assert promote["state"] == "success"

    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(pending.version)
    assert str(client.get_model_version_by_alias(name, "previous").version) == before
    assert champion.tags["gate.decision"] == "approved"
    assert champion.tags["gate.reviewed_by"] == "admin"
    assert champion.tags["gate.review_reason"] == "checked the plots"
    history = subprocess.run(
        [sys.executable, "-m", "tasks", "history", "ants_vs_bees"],
        cwd=stack.airflow.project.workspace("ants_vs_bees"),
        env={**os.environ, "MLFLOW_TRACKING_URI": _store_uri(stack.airflow.project)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"v{pending.version} -> @challenger  awaiting_approval [equivalent]" in history
    assert f"v{pending.version} -> @champion  approved [equivalent] by admin" in history
    tenures = history.split("@champion, who held it when:")[1].strip().splitlines()
    assert tenures[-1].strip().startswith(f"v{pending.version}  ")
    assert tenures[-1].endswith("-> now") and tenures[-2].strip().startswith(f"v{before}  ")


# --- the sweep under the scheduler (last: the stack is up, its gate registers a version) ---


def test_sweep_under_the_scheduler_runs_its_lanes_side_by_side(stack, sweep):
    sequential, _, _ = sweep
    stack.wait_for(
        "the sweep DAG to be parsed",
        lambda: stack.session.get(f"{stack.base}/api/v2/dags/{SWEEP_DAG_ID}", timeout=5).ok,
    )
    started = time.perf_counter()
    # another seed: both lanes train anew (nothing restored from the run cache)
    run_id = _trigger(stack, SWEEP_DAG_ID, {**SWEEP_CONF, "set": {"train.seed": 8}})
    state = stack.wait_for(
        "the sweep to finish", lambda: _run_state(stack, SWEEP_DAG_ID, run_id), timeout=1500
    )
    wall = time.perf_counter() - started
    assert state == "success", stack.tail()
    tis = _api(stack, f"/dags/{SWEEP_DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")
    lanes: dict[int, dict[str, tuple[str, str]]] = {}
    for ti in tis["task_instances"]:
        if ti["task_id"].startswith("pipeline."):
            assert ti["state"] == "success", ti
            lanes.setdefault(ti["map_index"], {})[ti["task_id"]] = (
                ti["start_date"],
                ti["end_date"],
            )
    assert sorted(lanes) == [0, 1]
    assert all(len(tasks) == 8 for tasks in lanes.values())  # prepare..evaluate, record, finish
    # the two lanes ran side by side: some task of one overlapped some task of the other
    overlaps = [
        (a, b)
        for a, (a_start, a_end) in lanes[0].items()
        for b, (b_start, b_end) in lanes[1].items()
        if a_start < b_end and b_start < a_end
    ]
    assert overlaps, lanes
    # ... while the one GPU slot kept their train/finetune tasks apart
    spans = sorted(
        span
        for tasks in lanes.values()
        for task_id, span in tasks.items()
        if task_id in ("pipeline.train", "pipeline.finetune")
    )
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, spans
    folder = stack.airflow.project.reports / "sweep" / sweep_id(run_id)
    report = json.loads((folder / "comparison.json").read_text())
    assert report["best"] == {"cats_vs_dogs": "cats_vs_dogs--mobilenet_v2"}
    assert all(row["restored"] == [] for row in report["rows"])
    busy = sum(
        (_when(end) - _when(start)).total_seconds()
        for tasks in lanes.values()
        for start, end in tasks.values()
    )
    print(
        f"\nsweep, 2 backbones, both lanes training: {wall:.1f} s under the scheduler (lanes "
        f"side by side, 1 GPU slot; its lane tasks ran {busy:.1f} s in all); the dags-test "
        f"sweep (one after the other, MobileNetV2's train restored): {sequential:.1f} s",
        file=sys.stderr,
    )


def _when(stamp: str):
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# --- a sweep's GPU stages as containers ------------------------------------------------


def test_a_sweeps_gpu_stage_renders_each_lanes_container_command(tmp_path):
    """A real sweep run on the docker backend, with no Docker daemon: each mapped lane's
    container task renders its own dataset and lane from ``plan`` (read back from Airflow's
    rendered fields), then fails to reach the daemon; the workspaces it names exist."""
    import sqlite3

    params = tiny_params(
        {"cats_vs_dogs": "http://127.0.0.1:1/c.zip", "ants_vs_bees": "http://127.0.0.1:1/a.zip"},
        schedule={"cron": None, "owner": "ci", "retries": 0, "gpus": 1},
    )
    conf = {"backbones": ["mobilenet_v2"], "datasets": ["cats_vs_dogs", "ants_vs_bees"]}
    with _own_airflow(
        tmp_path,
        params,
        TASKS_GPU_BACKEND="docker",
        TASKS_GPU_STAGES="download",  # the first stage after prepare: no data needed
        TASKS_DOCKER_URL=f"tcp://127.0.0.1:{unused_port()}",
    ) as instance:
        with pytest.raises(StageError, match="failed"):
            instance.dags_test(SWEEP_DAG_ID, conf)
    project = instance.project
    with sqlite3.connect(tmp_path / "airflow-home" / "airflow.db") as db:
        rows = db.execute(
            "select map_index, rendered_fields from rendered_task_instance_fields "
            "where dag_id = ? and task_id = 'pipeline.download' order by map_index",
            (SWEEP_DAG_ID,),
        ).fetchall()
    commands = {index: json.loads(fields)["command"] for index, fields in rows}
    (sweep,) = (project.workspaces / "sweeps").iterdir()
    for index, dataset in enumerate(("cats_vs_dogs", "ants_vs_bees")):
        key = f"{dataset}--mobilenet_v2"
        assert commands[index] == [
            "python", "-m", "tasks", "dvc-stage", "download", dataset,
            "--lane", f"{sweep.name}/{key}", "--result-json", "-",
        ]  # fmt: skip
        assert (sweep / key / ".tasks-run.json").is_file()  # prepared: what the container reads
