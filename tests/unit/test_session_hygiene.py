"""The suite's own check: a session that leaves a process or a temp folder behind fails.

A pytest session is run on one test that starts a server-like process and makes a temp
folder, then forgets both: the session must fail naming them, and neither may outlive it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from tests.conftest import REPO

FORGETFUL = """
import pathlib, subprocess, tempfile

def test_forgets_its_server_and_folder():
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    pathlib.Path("server.pid").write_text(str(server.pid))
    pathlib.Path("temp.txt").write_text(tempfile.mkdtemp(prefix="stack-postgres-"))
"""


def _running(pid: str) -> bool:
    """Whether the process runs (a killed one waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _session(folder: Path, test: str) -> subprocess.CompletedProcess:
    """A pytest session of its own on ``test`` (a module's source), run in ``folder`` with the
    suite's conftest as a plugin (its hooks and autouse checks)."""
    (folder / "test_inner.py").write_text(textwrap.dedent(test))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
        + [str(folder)],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO), "TESTS_LEFTOVER_GRACE_S": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_session_that_leaves_a_process_and_a_folder_fails_naming_them(tmp_path):
    run = _session(tmp_path, FORGETFUL)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 passed, 1 error" in run.stdout
    assert "the tests left behind" in run.stdout
    pid = (tmp_path / "server.pid").read_text()
    assert f"process {pid}: sleep 300" in run.stdout
    made = Path((tmp_path / "temp.txt").read_text())
    assert f"temp folder {made}" in run.stdout
    assert made.parent.parent == Path(tempfile.gettempdir())  # in the session's own folder
    assert not _running(pid)  # killed at the session's end
    assert not made.parent.exists()  # the session's temp folder went with it


def test_a_session_that_cleans_up_passes(tmp_path):
    run = _session(
        tmp_path,
        """
        import shutil, subprocess, tempfile

        def test_stops_its_server_and_removes_its_folder():
            proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
            shutil.rmtree(tempfile.mkdtemp(prefix="stack-postgres-"))
            proc.kill()
            proc.wait()
        """,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 passed" in run.stdout and "left behind" not in run.stdout


def test_a_test_that_leaves_a_run_running_or_reaches_beyond_loopback_fails_naming_it(tmp_path):
    run = _session(
        tmp_path,
        """
        import socket, subprocess, sys
        import mlflow

        def test_leaves_a_run_running(tmp_path):
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
            client = mlflow.MlflowClient()
            client.create_run(client.create_experiment("e"), run_name="forgotten")

        def test_swallows_a_refused_connection_in_a_child_process():
            code = (
                "import socket\\ntry:\\n socket.create_connection(('192.0.2.1', 9), 1)\\n"
                "except OSError as e:\\n print(e)"
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            assert "beyond loopback refused" in out.stdout

        def test_connects_to_loopback_only():
            with socket.socket() as server:
                server.bind(("127.0.0.1", 0))
                server.listen()
                socket.create_connection(server.getsockname(), 1).close()
        """,
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "3 passed" in run.stdout and "2 errors" in run.stdout, run.stdout[-2000:]
    assert "MLflow run left RUNNING: " in run.stdout and "forgotten (" in run.stdout
    assert "connection beyond loopback: pid " in run.stdout
    assert "socket.connect ('192.0.2.1', 9)" in run.stdout


def test_an_open_pipeline_execution_is_ended_but_a_running_stage_run_is_reported(tmp_path):
    """A parent run whose stages all finished is what a test running stages alone leaves by
    design: the check ends it (KILLED). A stage run still RUNNING is a zombie: the check
    reports it and its execution, and ends neither."""
    run = _session(
        tmp_path,
        """
        import pathlib

        import mlflow

        def _store(tmp_path, name):
            client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
            experiment = client.create_experiment(name)
            parent = client.create_run(experiment, tags={"pipeline.parent": "true"})
            child = client.create_run(
                experiment, tags={"mlflow.parentRunId": parent.info.run_id}, run_name="stage"
            )
            pathlib.Path(f"{name}.ids").write_text(  # in the outer test's folder (the cwd)
                f"{tmp_path / 'mlflow.db'} {parent.info.run_id} {child.info.run_id}"
            )
            return client, child.info.run_id

        def test_open_execution(tmp_path):
            client, child = _store(tmp_path, "open")
            client.set_terminated(child)

        def test_zombie_stage(tmp_path):
            _store(tmp_path, "zombie")
        """,
    )
    import sqlite3

    assert "2 passed" in run.stdout and "1 error" in run.stdout, run.stdout[-2000:]
    statuses = {}
    for name in ("open", "zombie"):
        found = (tmp_path / f"{name}.ids").read_text().split()
        with sqlite3.connect(found[0]) as db:
            rows = dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())
        statuses[name] = (rows[found[1]], rows[found[2]])
    assert statuses == {"open": ("KILLED", "FINISHED"), "zombie": ("RUNNING", "RUNNING")}
    assert f"mlflow.db: stage ({found[2]})" in run.stdout  # the zombie's stage
    assert f"({found[1]})" in run.stdout  # and its execution, both reported
    reported = {line.strip() for line in run.stdout.splitlines() if "left RUNNING: " in line}
    assert len(reported) == 2, reported  # the open execution is not
