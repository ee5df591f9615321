"""``make run`` and ``make demo`` as a new user types them, in a fresh git copy of the project.

``make run`` with no network: the sources refuse connections (a held loopback port
stands in for the dataset URL, so the test does not depend on this machine being
offline); it must stop at the first DAG with the download's one-line cause and how
``make`` spells the fix. ``make demo`` for one dataset (the offline weights file the
session made is put where the demo would make it): it must finish, print where to look,
register a champion in its own store and leave the project's files alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.dev.airflow_local import MAKE_RUN_HINT
from tasks.dev.httpserver import closed_port
from tests.conftest import PIPELINE_FILES, git_project

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FILES = [*PIPELINE_FILES, "Makefile", "uv.lock", "params.yaml"]
VENV = Path(sys.executable).parents[1]


def _make(project: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``make`` in the copy, with this venv and none of the caller's stores or settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "AIRFLOW", "TASKS_", "DVC_", "AWS_"))
        # under `make test` these would make it a sub-make ("make[1]: Entering directory")
        and k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    }
    return subprocess.run(
        # -o: this venv is set up already (the suite runs in it); make must not sync it again
        ["make", f"VENV={VENV}", "-o", f"{VENV}/.synced", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_run_offline_stops_at_the_download_with_its_cause_and_the_make_fix(tmp_path):
    project = git_project(tmp_path / "project", FILES)
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}/cats_and_dogs_filtered.zip"
        run = _make(
            project,
            "run",
            f"SET=datasets.cats_vs_dogs.url={url} download.retries=1",
            timeout=900,
        )
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    transcripts = project / ".airflow" / "logs" / "dags-test"
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("make: *** [Makefile:")
    assert lines[-4] == (
        "error: DAG transfer_learning__cats_vs_dogs failed (exit 1); its output is in "
        f"{transcripts / 'transfer_learning__cats_vs_dogs.log'}"
    )
    cause = lines[-3]
    assert cause.startswith(
        f"download@cats_vs_dogs: cats_vs_dogs: cannot reach any source (tried {url}: "
    ), cause
    assert "connection refused" in cause
    assert "Fix: add a mirror with --set 'datasets.cats_vs_dogs.mirrors=" in cause
    assert lines[-2] == MAKE_RUN_HINT
    # The named file holds what scrolled past: each download attempt and the task's failure.
    transcript = (transcripts / "transfer_learning__cats_vs_dogs.log").read_text()
    assert transcript.count(f"StageFailed: {cause}") == 3  # the task and its 2 retries
    assert transcript in run.stdout
    # The first DAG's failure stops the run: the other dataset's DAG never starts.
    assert [p.name for p in transcripts.iterdir()] == ["transfer_learning__cats_vs_dogs.log"]
    assert "Timings" not in run.stdout


def test_make_demo_for_one_dataset_finishes_and_leaves_the_project_alone(tmp_path, offline_weights):
    project = git_project(tmp_path / "project", FILES)
    before = {name: _sha(project / name) for name in ("params.yaml", "dvc.yaml")}
    weights = project / ".demo" / "weights" / "mobilenet_v2_32.weights.h5"
    weights.parent.mkdir(parents=True)
    shutil.copy(offline_weights, weights)  # what the demo makes first, in ~80 s

    demo = _make(project, "demo", "DEMO_ARGS=--dataset ants_vs_bees", timeout=1500)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert "demo: archives served from http://127.0.0.1:" in out
    state = project / ".demo"
    summary = state / "reports" / "summary.md"
    assert f"  summary        {summary}" in out
    assert "ants_vs_bees" in summary.read_text()
    reports = state / ".workspaces" / "ants_vs_bees" / "reports" / "ants_vs_bees"
    assert f"  ants_vs_bees   {reports}/" in out
    assert (reports / "metrics.json").is_file()
    assert "Demo finished in" in out.splitlines()[-1]
    with sqlite3.connect(state / "mlflow" / "mlflow.db") as db:
        aliases = db.execute("SELECT name, alias FROM registered_model_aliases").fetchall()
    assert ("ants_vs_bees-classifier", "champion") in aliases
    # The checked-in files, the project's own store and remote: untouched.
    assert {name: _sha(project / name) for name in before} == before
    assert not (project / "mlflow").exists() and not (project / ".dvc-remote").exists()
    assert not (state / ".workspaces" / "cats_vs_dogs").exists()
