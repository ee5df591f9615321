"""What every test must leave as it found it, checked after each one (tests/conftest.py).

- no MLflow run left ``RUNNING`` in any store under the session's temp root (SQLite
  backends and file stores, found by walking it, each re-read only when it changed). A
  pipeline execution whose stages all finished is ended instead of reported: a test that
  runs stages alone leaves it open by design (register or the DAG's finish would end it);
  a RUNNING stage run, or an execution with a failed or killed stage, is reported;
- no new entry in the project folder (a stray ``mlruns/`` made by a default tracking URI);
- no connection beyond loopback (tests/netguard).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path

# Folders that hold data, caches and code, never an MLflow backend: not walked.
_NOT_STORES = {
    ".git", ".dvc", "data", "artifacts", "mlartifacts", ".checkpoints", "reports",
    "models", "__pycache__", "arrays", "tasks", "dags", "node_modules", "images",
}  # fmt: skip
_RUNNING = 1  # mlflow.entities.RunStatus.RUNNING, as a file store writes it


def find_stores(root: Path) -> list[Path]:
    """SQLite files and ``mlruns`` folders under ``root`` (the folders above pruned)."""
    found, stack = [], [str(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:  # removed meanwhile
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name == "mlruns":
                        found.append(Path(entry.path))
                    elif entry.name not in _NOT_STORES:
                        stack.append(entry.path)
                elif entry.name.endswith(".db"):
                    found.append(Path(entry.path))
    return found


# RUNNING runs, each with whether it is an open pipeline execution: a parent run whose
# stages all FINISHED, which a test that runs stages alone leaves open by design (the last
# stage, register, or the DAG's finish task would end it).
_RUNNING_SQL = """
SELECT r.run_uuid, r.name,
       EXISTS (SELECT 1 FROM tags p WHERE p.run_uuid = r.run_uuid
               AND p.key = 'pipeline.parent' AND p.value = 'true')
       AND NOT EXISTS (SELECT 1 FROM tags c JOIN runs cr ON cr.run_uuid = c.run_uuid
                       WHERE c.key = 'mlflow.parentRunId' AND c.value = r.run_uuid
                       AND cr.status != 'FINISHED')
FROM runs r WHERE r.status = 'RUNNING'
"""


def _sqlite_running(path: Path) -> list[str]:
    """The RUNNING runs of a SQLite store that are not open executions; those are ended
    (KILLED, as a new execution would end them) so that none stays RUNNING."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
                return []
            rows = db.execute(_RUNNING_SQL).fetchall()
    except sqlite3.DatabaseError:  # not SQLite, or removed meanwhile
        return []
    open_executions = [uuid for uuid, _, is_open in rows if is_open]
    if open_executions:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{path}")
        for uuid in open_executions:
            client.set_terminated(uuid, "KILLED")
    return [f"{name or '-'} ({uuid})" for uuid, name, is_open in rows if not is_open]


def _file_store_running(path: Path) -> list[str]:
    running = []
    for meta in path.glob("*/*/meta.yaml"):
        try:
            lines = meta.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        fields = dict(line.split(": ", 1) for line in lines if ": " in line)
        if fields.get("status", "").strip() == str(_RUNNING):
            running.append(f"{fields.get('run_name', '-').strip()} ({meta.parent.name})")
    return running


class RunningRuns:
    """Finds MLflow runs left RUNNING under ``root``; each store re-read only when changed."""

    def __init__(self, root: Path):
        self.root = root
        self._seen: dict[Path, tuple[int, list[str]]] = {}

    def _stamp(self, store: Path) -> int:
        if store.is_file():
            return store.stat().st_mtime_ns
        # a file store: its runs' meta.yaml change, the folder's mtime does not
        return max((m.stat().st_mtime_ns for m in store.glob("*/*/meta.yaml")), default=0)

    def check(self) -> list[str]:
        found = []
        for store in find_stores(self.root):
            try:
                stamp = self._stamp(store)
            except OSError:
                continue
            cached = self._seen.get(store)
            if cached is None or cached[0] != stamp:
                runs = (_sqlite_running if store.is_file() else _file_store_running)(store)
                cached = self._seen[store] = (stamp, runs)
            found += [f"{store}: {run}" for run in cached[1]]
        return found


def active_run() -> str | None:
    """The run this process's MLflow client still has open, if mlflow was imported."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run is not None else None


def end_open_executions(uri: str) -> list[str]:
    """End (KILLED) every pipeline execution still RUNNING in the store at ``uri``: what a
    test leaves open on purpose when it runs ``train`` alone (``register``, the last stage,
    would end it). Returns their run ids."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = "tags.`pipeline.parent` = 'true' and attributes.status = 'RUNNING'"
    runs = client.search_runs(experiments, query) if experiments else []
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in runs]
