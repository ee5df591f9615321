"""Parsing the DAG folder is cheap: no heavy import, no process, no connection.

The DAG processor re-parses the folder every 30 s; TensorFlow alone takes
seconds to import, so the DAG files and what they import must not pull it in
(nor Great Expectations or MLflow), on any GPU backend; nor may building the
DAGs run a command (git, dvc) or reach a server. Checked in a fresh
interpreter; how long a parse takes is measured by ``python -m tasks.dev.bench_parse``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# each test parses the DAG folder in a fresh interpreter: seconds each
pytestmark = pytest.mark.slow

HEAVY = ("tensorflow", "keras", "great_expectations", "mlflow", "torch")

# Audit events of work that has no place in a parse: starting a process, opening a connection.
SIDE_EFFECTS = (
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.fork",
    "socket.connect",
    "socket.getaddrinfo",
)

PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
watched = set(sys.argv[3].split(","))
seen = []

def watch(event, args):
    if event in watched:
        seen.append(f"{event} {args!r:.200}")

sys.addaudithook(watch)
bag = DagBag(sys.argv[1])
import dags.datasets, dags.scoring, dags.summary, dags.sweep  # as the tests import them
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print(json.dumps({
    "errors": {k: v[-300:] for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dag_ids),
    "heavy": heavy,
    "side_effects": seen,
}))
"""


def _probe(tmp_path, folder=REPO / "dags", **env: str) -> dict:
    """Parse ``folder`` with a DagBag in a fresh interpreter; what it loaded and did."""
    environ = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), ",".join(HEAVY), ",".join(SIDE_EFFECTS)],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["local", "kubernetes", "docker"])
def test_parsing_the_dag_folder_imports_nothing_heavy_and_starts_nothing(tmp_path, backend):
    result = _probe(tmp_path, TASKS_GPU_BACKEND=backend)
    assert result["errors"] == {}
    assert len(result["dags"]) == 6  # one per dataset, one scoring per dataset, summary, sweep
    assert result["heavy"] == []
    assert result["side_effects"] == []


def test_the_probe_sees_a_process_started_at_parse_time(tmp_path):
    """The side-effect check has teeth: a DAG file that runs a command at parse is caught."""
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "runs_a_command.py").write_text(
        "import subprocess, sys\n"
        "from airflow.sdk import DAG\n"
        "subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
        "dag = DAG('runs_a_command', schedule=None)\n"
    )
    result = _probe(tmp_path, folder)
    assert result["dags"] == ["runs_a_command"]
    assert [event.split()[0] for event in result["side_effects"]] == ["subprocess.Popen"]
