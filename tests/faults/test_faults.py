"""Fault injection: each fault ends in one clear line (or a retry that succeeds) and loses nothing.

Real processes and components, no mocks: the stage commands run as ``python -m tasks``
processes, a full disk is a real small tmpfs (test_full_disk.py; a file-size limit,
``RLIMIT_FSIZE``, only where mounting is refused), the tracking server is a real
``mlflow server`` (started by ``mlflow/serve.sh``) that is stopped and started again, and
the DVC remote is an S3 endpoint on a closed loopback port that a ``moto_server`` later
opens.

What each test asserts is in the first line of its docstring: the fault, what the user
sees, what is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.dev.httpserver import closed_port
from tests.conftest import REPO
from tests.datagen import LAYOUTS, tiny_params
from tests.deploy.stack import Process, base_env, http_ok, wait_until

DS = "cats_vs_dogs"
LAYOUT_ROOT = LAYOUTS[DS]["root"]
COUNTS = {"train": 2, "validation": 1}


# ----------------------------------------------------------------------------- helpers


def stage(
    command: str,
    params: Path,
    root: Path,
    *args: str,
    fsize: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m tasks <command> cats_vs_dogs`` in its own process; ``fsize``: the largest
    file it may write, in bytes (``ulimit -f``)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    argv = [sys.executable, "-m", "tasks", command, DS, "--params", str(params)]
    return subprocess.run(
        [*argv, "--root", str(root), *args],
        cwd=REPO,
        env=env or stage_env(),
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=limit if fsize else None,
    )


def stage_env(**extra: str) -> dict[str, str]:
    """The test's environment without any other store or run, plus ``extra``."""
    return base_env(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", **extra)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The failed command's message: exit 2, no traceback, one ``error:`` line last."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last.removeprefix("error: ")


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``roots`` (files or folders)."""
    files = []
    for root in roots:
        files += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {
        str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files
    }


# Full disks (download, extraction, manifest, model save, artifact upload): test_full_disk.py


# ----------------------------------------------------------------------------- 3. MLflow


def mlflow_server(store: Path, port: int = 0) -> tuple[Process, str]:
    """``mlflow/serve.sh`` in embedded mode: SQLite and artifacts under ``store``; on the
    port it picks (0) or, for a restart at the same URL, on ``port``. Returns its URL."""
    env = base_env(MLFLOW_EMBEDDED_DIR=str(store), MLFLOW_PORT=str(port))
    log = store.parent / f"mlflow-{len(list(store.parent.glob('mlflow-*.log')))}.log"
    server = Process.start("mlflow server", ["bash", str(REPO / "mlflow/serve.sh")], env, log)
    url = f"http://127.0.0.1:{server.announced_port(150)}"
    wait_until(lambda: server.check_alive() and http_ok(f"{url}/health"), 150, "mlflow", log)
    return server, url


def registry(url: str) -> tuple[dict[str, str], list[str]]:
    """The model's aliases and its versions, as the tracking server at ``url`` has them."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    model = client.get_registered_model(f"{DS}-classifier")
    versions = sorted(v.version for v in client.search_model_versions(f"name='{DS}-classifier'"))
    return {k: str(v) for k, v in model.aliases.items()}, [str(v) for v in versions]


@pytest.mark.slow
def test_tracking_server_down_fails_in_one_line_and_the_retry_registers(
    tmp_path, write_params, monkeypatch
):
    """MLflow tracking server down during register → `error: MLflow tracking server <url>
    unreachable (connection refused); start it, or point MLFLOW_TRACKING_URI (or tracking.uri)
    at a running one, then rerun ...` → gate.json, the run record and @champion kept; after
    a restart on the same store the retry registers the candidate."""
    from tasks.config import parse_config
    from tasks.steps import register
    from tests.tinymodel import make_workspace, tiny_models, use_candidate

    models = tiny_models(tmp_path / "tiny")
    paths = make_workspace(tmp_path / "ws", counts={"train": 2, "validation": 30})
    raw = tiny_params({DS: "http://127.0.0.1:1/x.zip"})
    params = write_params(raw)
    store = tmp_path / "mlflow"
    server, url = mlflow_server(store)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
        use_candidate(paths, models["good"])
        assert register.run(parse_config(raw), paths).promoted  # the earlier good run: v1
        assert registry(url) == ({"champion": "1"}, ["1"])
        use_candidate(paths, models["retrain"])
        outputs = [paths.gate, paths.run_record("register"), paths.models]
        kept = snapshot(*outputs)

        server.stop()
        env = stage_env(
            MLFLOW_TRACKING_URI=url,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
            MLFLOW_HTTP_REQUEST_TIMEOUT="5",
        )
        failed = stage("register", params, paths.root, env=env)
        assert one_line_error(failed) == (
            f"MLflow tracking server {url} unreachable (connection refused); start it, or "
            "point MLFLOW_TRACKING_URI (or tracking.uri) at a running one, then rerun "
            f"`python -m tasks register {DS}`"
        )
        assert snapshot(*outputs) == kept

        server, _ = mlflow_server(store, port=int(url.rsplit(":", 1)[1]))  # back, same store
        assert registry(url) == ({"champion": "1"}, ["1"])
        retried = stage("register", params, paths.root, env=env)
        assert retried.returncode == 0, retried.stderr[-3000:]
        gate = json.loads(paths.gate.read_text())
        assert gate["version"] == "2"
        champion = "2" if gate["promoted"] else "1"
        assert registry(url)[0]["champion"] == champion
        assert registry(url)[1] == ["1", "2"]
    finally:
        server.stop()


def store_metrics(store: Path) -> int:
    """How many metric values the server's SQLite store holds (0 before it has one)."""
    import sqlite3

    dbs = list(store.rglob("*.db"))
    if not dbs:
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True)) as db:
        try:
            return db.execute("SELECT count(*) FROM metrics").fetchone()[0]
        except sqlite3.OperationalError:  # tables not made yet
            return 0


@pytest.mark.slow
def test_tracking_server_killed_during_a_fit_fails_in_one_line_and_the_retry_trains(
    tmp_path, offline_weights, write_params
):
    """The MLflow server SIGKILLed while train logs its epochs → `error: MLflow tracking
    server <url> unreachable (connection refused); start it, ... then rerun `python -m tasks
    train <ds>`` → no model, no temporary written → after a restart on the same store the
    retry trains, and the run the kill left RUNNING ends KILLED (none stays RUNNING)."""
    from tests.invariants import end_open_executions
    from tests.model.conftest import make_workspace

    paths = make_workspace(tmp_path / "ws", {"train": 4, "validation": 4}, size=32)
    raw = tiny_params({DS: "http://127.0.0.1:1/x.zip"}, train={"weights": str(offline_weights)})
    raw["train"] |= {"epochs": 40, "batch_size": 8, "early_stopping_patience": 100}
    params = write_params(raw)
    store = tmp_path / "mlflow"
    server, url = mlflow_server(store)
    env = stage_env(
        MLFLOW_TRACKING_URI=url,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    argv = [sys.executable, "-m", "tasks", "train", DS, "--params", str(params)]
    fit = subprocess.Popen(
        [*argv, "--root", str(paths.root)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: store_metrics(store) > 0 or fit.poll() is not None, 300, "an epoch")
        assert fit.poll() is None, fit.stderr.read()[-3000:]
        os.killpg(server.popen.pid, signal.SIGKILL)  # mid-fit: epochs are being logged
        server.popen.wait(10)
        _, err = fit.communicate(timeout=600)
        failed = subprocess.CompletedProcess(fit.args, fit.returncode, "", err)
        assert one_line_error(failed) == (
            f"MLflow tracking server {url} unreachable (connection refused); start it, or "
            "point MLFLOW_TRACKING_URI (or tracking.uri) at a running one, then rerun "
            f"`python -m tasks train {DS}`"
        )
        assert not paths.models.exists() or list(paths.models.iterdir()) == []

        server, _ = mlflow_server(store, port=int(url.rsplit(":", 1)[1]))  # back, same store
        raw["train"]["epochs"] = 1
        retried = stage("train", write_params(raw), paths.root, env=env)
        assert retried.returncode == 0, retried.stderr[-3000:]
        assert paths.frozen_model.is_file()
        from mlflow import MlflowClient

        client = MlflowClient(url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        statuses = sorted((r.data.tags.get("phase", "execution"), r.info.status) for r in runs)
        assert statuses == [
            ("execution", "KILLED"),  # the killed attempt's, ended by the retry
            ("execution", "RUNNING"),  # the retry's: register would end it
            ("train", "FINISHED"),
            ("train", "KILLED"),  # the killed attempt's, ended by the retry
        ], statuses
        assert len(end_open_executions(url)) == 1
    finally:
        if fit.poll() is None:
            fit.kill()
            fit.wait()
        server.stop()


# ----------------------------------------------------------------------------- 4. DVC push

S3 = {
    "AWS_ACCESS_KEY_ID": "faults-key",
    "AWS_SECRET_ACCESS_KEY": "faults-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.mark.slow
def test_dvc_remote_unreachable_at_push_keeps_the_cache_and_the_retry_pushes(tmp_path, monkeypatch):
    """DVC remote unreachable at push → `push@<ds> failed: ...` → outputs and the DVC cache
    byte for byte; once the remote answers, the retry pushes every cached output."""
    import boto3
    import yaml

    from tasks.errors import StageFailed
    from tasks.orchestration.dvc import push_outputs, run_stage
    from tasks.orchestration.project import Project
    from tasks.orchestration.workspace import prepare_workspace
    from tests.orchestration.test_workspace import DVC_YAML, STEP

    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("[core]\n    autostage = true\n")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "step.py").write_text(STEP)
    sources = {DS: "http://127.0.0.1:9/x.zip"}
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(sources), sort_keys=False))
    # the port refuses connections (held, not listening) until moto_server takes it
    with closed_port() as port:
        endpoint = f"http://127.0.0.1:{port}"
        for name, value in {**S3, "AWS_ENDPOINT_URL_S3": endpoint, "DVC_NO_ANALYTICS": "1"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        for name in ("TASKS_PARAMS", "TASKS_ROOT", "TASKS_SET", "TASKS_PARENT_RUN_ID"):
            monkeypatch.delenv(name, raising=False)
        project = Project.from_env(root, environ={"TASKS_DVC_REMOTE": "s3://dvc/store"})
        prepare_workspace(project, DS)
        for name in ("first", "second"):
            assert run_stage(project, DS, name).ran
        ws = project.workspace(DS)
        kept = snapshot(ws / "out", root / ".dvc" / "cache")

        with pytest.raises(StageFailed) as error:
            push_outputs(project, DS)
        assert str(error.value) == (
            f"push@{DS}: dvc push to remote 'tasks' (s3://dvc/store, endpoint {endpoint}) failed: "
            f'Could not connect to the endpoint URL: "{endpoint}/dvc"; make the remote reachable '
            "(endpoint up, bucket and credentials right) and retry; the outputs stay in the local "
            "DVC cache"
        )
        assert snapshot(ws / "out", root / ".dvc" / "cache") == kept

    moto = Process.start(
        "moto_server",
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        base_env(),
        tmp_path / "moto.log",
    )
    try:
        wait_until(lambda: moto.check_alive() and http_ok(f"{endpoint}/moto-api/"), 60, "moto")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name=S3["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket="dvc")
        assert push_outputs(project, DS).pushed == 2  # first.txt and model.bin
        stored = s3.list_objects_v2(Bucket="dvc", Prefix="store/")["Contents"]
        assert {o["Key"].removeprefix("store/") for o in stored} == cached_outputs(root)
    finally:
        moto.stop()
    assert snapshot(ws / "out", root / ".dvc" / "cache") == kept


def cached_outputs(root: Path) -> set[str]:
    """The project's cached output files, as paths under the cache (not its run cache)."""
    cache = root / ".dvc" / "cache"
    return {p.relative_to(cache).as_posix() for p in (cache / "files").rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- 5. SIGKILL


@pytest.mark.slow
def test_sigkill_of_evaluate_keeps_the_earlier_reports_and_the_rerun_succeeds(
    tmp_path, write_params, monkeypatch
):
    """SIGKILL of evaluate while it draws the plots → the process dies (-9), no message →
    metrics.json, predictions.csv, plots/ and the run record byte for byte; the rerun succeeds."""
    import signal
    import time

    from tasks.config import parse_config
    from tasks.steps import evaluate
    from tests.tinymodel import make_workspace, tiny_models, use_candidate

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("TASKS_PARENT_RUN_ID", raising=False)
    paths = make_workspace(tmp_path / "ws", counts={"train": 2, "validation": 20})
    use_candidate(paths, tiny_models(tmp_path / "tiny")["good"])
    raw = tiny_params({DS: "http://127.0.0.1:1/x.zip"})
    params = write_params(raw)
    evaluate.run(parse_config(raw), paths)  # the earlier good run
    outputs = [paths.metrics, paths.predictions, paths.plots, paths.run_record("evaluate")]
    kept = snapshot(*outputs)
    first_run = json.loads(paths.run_record("evaluate").read_text())["run_id"]

    argv = [sys.executable, "-m", "tasks", "evaluate", DS, "--params", str(params)]
    victim = subprocess.Popen(
        [*argv, "--root", str(paths.root)],
        cwd=REPO,
        env=stage_env(MLFLOW_TRACKING_URI=store),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        staging = [d for d in paths.reports.glob(".plots.*") if d.is_dir() and any(d.iterdir())]
        if staging:  # some figures drawn, not all: kill it mid-way
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    _, stderr = victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL, stderr[-3000:]
    assert staging, "evaluate ended before it drew a figure"
    assert snapshot(*outputs) == kept
    assert evaluate_runs(store) == ["FINISHED"]  # killed before it opened its run

    rerun = stage("evaluate", params, paths.root, env=stage_env(MLFLOW_TRACKING_URI=store))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert evaluate_runs(store) == ["FINISHED", "FINISHED"]
    assert json.loads(paths.run_record("evaluate").read_text())["run_id"] != first_run
    assert {p.name for p in paths.plots.iterdir()} == {Path(f).name for f in kept if "/plots/" in f}


def evaluate_runs(store: str) -> list[str]:
    """The statuses of the evaluate runs in ``store``, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(DS).experiment_id
    runs = client.search_runs(
        [experiment], "tags.phase = 'evaluate'", order_by=["attributes.start_time ASC"]
    )
    return [run.info.status for run in runs]
