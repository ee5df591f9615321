"""A scheduled run's state on the orchestration side: its workspace record, and the
environment each of its stage processes gets from it (``tasks.contract`` names both).

``prepare`` writes the workspace record (``.tasks-run.json``: dataset, overrides,
Airflow run id, DVC experiment name, baseline commit, parent run id, and each
stage's result as it finishes); every later task reads it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.contract import (
    EXPERIMENT_ENV,
    PARENT_ENV,
    RUN_ENV,
    RUN_OVERRIDES_ENV,
    STORE_ENV,
    WORKSPACE_RECORD,
)
from tasks.errors import StageError
from tasks.io import write_json

_FROM_RECORD = (
    (STORE_ENV, "store_root"),
    (PARENT_ENV, "parent_run_id"),
    (EXPERIMENT_ENV, "experiment"),
)
"""Environment variables of a stage process and the workspace record keys they hold."""


def read_workspace_record(ws: Path) -> dict[str, Any]:
    path = ws / WORKSPACE_RECORD
    if not path.exists():
        raise StageError(
            f"{ws} has not been prepared for a run; run the DAG's prepare task first "
            "(or trigger the whole DAG)"
        )
    return json.loads(path.read_text())


def write_workspace_record(ws: Path, record: Mapping[str, Any]) -> None:
    write_json(ws / WORKSPACE_RECORD, dict(record))


def update_workspace_record(ws: Path, **values: Any) -> dict[str, Any]:
    record = {**read_workspace_record(ws), **values}
    write_workspace_record(ws, record)
    return record


def stage_env(record: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment of a stage process: the caller's, less anything that ties it to
    another run, plus this run's overrides (to record), store, parent run and experiment."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = record or {}
    if record.get("overrides"):
        env[RUN_OVERRIDES_ENV] = json.dumps(list(record["overrides"]))
    for name, key in _FROM_RECORD:
        if record.get(key):
            env[name] = str(record[key])
    return env
