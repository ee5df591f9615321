"""Parsing the DAG folder is cheap: no heavy import, measured in a fresh interpreter.

The DAG processor re-parses the folder every 30 s; TensorFlow alone takes
seconds to import, so the DAG files and what they import must not pull it in
(nor Great Expectations or MLflow), on any GPU backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

HEAVY = ("tensorflow", "keras", "great_expectations", "mlflow", "torch")

PROBE = """
import json, sys, time
start = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
imported = time.perf_counter()
bag = DagBag(sys.argv[1])
parsed = time.perf_counter()
import dags.transfer_learning  # the module the tests and the factory share
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))
print(json.dumps({
    "errors": {k: v[-300:] for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dag_ids),
    "heavy": heavy,
    "airflow_import_s": imported - start,
    "parse_s": parsed - imported,
    "tasks": sum(len(d.tasks) for d in bag.dags.values()),
}))
"""


def _probe(tmp_path, **env: str) -> dict:
    environ = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags"), ",".join(HEAVY)],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["local", "kubernetes", "docker"])
def test_parsing_the_dag_folder_imports_nothing_heavy(tmp_path, backend):
    result = _probe(tmp_path, TASKS_GPU_BACKEND=backend)
    assert result["errors"] == {}
    assert len(result["dags"]) == 3
    assert result["heavy"] == []
    # Generous bound for a loaded 2-core machine; typically well under a second.
    assert result["parse_s"] < 10
    print(
        f"\n{backend}: airflow import {result['airflow_import_s']:.2f} s, "
        f"DagBag parse {result['parse_s']:.2f} s ({result['tasks']} tasks)"
    )
