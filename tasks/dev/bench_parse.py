"""How long Airflow takes to parse the DAG folder, per GPU backend.

``python -m tasks.dev.bench_parse [--repeat 3] [--backend local ...]`` (from the
project root: the DAGs read params.yaml and dvc.yaml). The DAG processor
re-parses the folder every 30 s, so this is a cost paid all day. Each run is a
fresh interpreter with a throw-away ``AIRFLOW_HOME`` that times, the way
``tests/dags/test_parse_cost.py`` parses the folder:

- ``airflow import``: ``from airflow.dag_processing.dagbag import DagBag``;
- ``parse``: ``DagBag(<project>/dags)``: importing the DAG files and building
  every DAG (what each re-parse costs);

and prints the median of ``--repeat`` runs, with the DAG and task counts. The
test asserts what keeps the parse cheap (no heavy import, no process, no
connection); the seconds are measured here, where a loaded machine cannot fail
a build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BACKENDS = ("local", "kubernetes", "docker")
ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys, time
start = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
imported = time.perf_counter()
bag = DagBag(sys.argv[1])
parsed = time.perf_counter()
print(json.dumps({
    "errors": {k: v[-300:] for k, v in bag.import_errors.items()},
    "dags": len(bag.dag_ids),
    "tasks": sum(len(d.tasks) for d in bag.dags.values()),
    "airflow_import_s": imported - start,
    "parse_s": parsed - imported,
}))
"""


def probe(dags: Path, backend: str, home: Path) -> dict:
    """One fresh interpreter parsing ``dags`` under ``backend``; its timings and counts."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TASKS_GPU_BACKEND": backend,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(dags)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode:
        raise SystemExit(f"parsing {dags} ({backend}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise SystemExit(f"import errors in {dags} ({backend}): {result['errors']}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh interpreters per backend")
    parser.add_argument(
        "--backend", action="append", choices=BACKENDS, help="default: all three (repeatable)"
    )
    parser.add_argument("--dags", type=Path, default=ROOT / "dags", help="the DAG folder")
    args = parser.parse_args(argv)

    print(f"DagBag parse of {args.dags}, median of {args.repeat} fresh interpreters")
    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp:
        for backend in args.backend or BACKENDS:
            runs = [
                probe(args.dags, backend, Path(tmp) / f"{backend}-{n}") for n in range(args.repeat)
            ]
            imported = statistics.median(r["airflow_import_s"] for r in runs)
            parsed = statistics.median(r["parse_s"] for r in runs)
            print(
                f"  {backend:<11} airflow import {imported:6.2f} s   parse {parsed:6.2f} s   "
                f"({runs[0]['dags']} DAGs, {runs[0]['tasks']} tasks)"
            )


if __name__ == "__main__":
    main()
