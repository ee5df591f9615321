"""The run contract: how a pipeline execution's state reaches each stage process.

A stage is a process (``python -m tasks <stage> <dataset>``, under ``dvc repro``).
What it knows of the run it belongs to comes three ways, each named here once:

1. **The environment** the orchestrator gives each stage process
   (``tasks.orchestration.records.stage_env``): the names below. A person
   running a stage by hand sets none of them, or only :data:`PARAMS_ENV` /
   :data:`ROOT_ENV` / :data:`SET_ENV`.
2. **Run records**, ``reports/<ds>/runs/<phase>.json`` (:class:`RunRecord`): the
   MLflow ids of a phase's run, written when the phase's run ends and read by
   later stages (finetune attaches to train's parent run; register ends it).
3. **The workspace record**, ``.tasks-run.json`` in a scheduled run's workspace
   (:data:`WORKSPACE_RECORD`): the run's dataset, overrides, DVC experiment name,
   baseline commit and parent run id, written by ``prepare`` and read by the
   orchestration layer only (it builds the environment of 1. from it).

Between Airflow tasks, XCom carries small copies of these (ids, paths, headline
metrics) and nothing else. A gate decision's status is read by the
approval step, so its words live here too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.io import write_json

# --- 1. the environment of a stage process -----------------------------------------

PARAMS_ENV = "TASKS_PARAMS"
"""The params file a stage reads (default ``params.yaml``; ``--params`` wins)."""
ROOT_ENV = "TASKS_ROOT"
"""The project root a stage's paths are relative to (default ``.``; ``--root`` wins)."""
SET_ENV = "TASKS_SET"
"""JSON list of ``key=value`` overrides applied before ``--set`` (for a person's use)."""
RUN_OVERRIDES_ENV = "TASKS_RUN_OVERRIDES"
"""JSON list of the scheduled run's overrides, already written into the workspace's
params.yaml: recorded with every stage's MLflow run, not applied a second time."""
STORE_ENV = "TASKS_STORE_ROOT"
"""Where the shared embedded MLflow store is (``<state>/mlflow``)."""
PARENT_ENV = "TASKS_PARENT_RUN_ID"
"""The MLflow parent run of the pipeline execution the stage belongs to."""
EXPERIMENT_ENV = "TASKS_EXPERIMENT"
"""The DVC experiment the run will be saved as (MLflow tag ``dvc.exp_name``)."""

RUN_ENV = (PARAMS_ENV, ROOT_ENV, SET_ENV, RUN_OVERRIDES_ENV, STORE_ENV, PARENT_ENV, EXPERIMENT_ENV)
"""What ties a stage process to a run: never inherited from the caller of a run."""

GPUS_ENV = "TASKS_GPUS"
"""The GPU ids this machine may give GPU stages (``tasks.gpus``)."""
GPUS_PER_TASK_ENV = "TASKS_GPUS_PER_TASK"
"""How many of them one GPU stage claims."""
GPU_LOCKS_ENV = "TASKS_GPU_LOCKS"
"""The folder of the per-GPU lock files that make a claim exclusive."""
GPU_WAIT_ENV = "TASKS_GPU_WAIT_SECONDS"
"""How long a GPU stage waits for a free GPU before it fails."""

# --- deployment: where the project and its run state are (read by orchestration) ----

PROJECT_ENV = "TASKS_PROJECT"
STATE_ENV = "TASKS_STATE_DIR"
DVC_REMOTE_ENV = "TASKS_DVC_REMOTE"

# --- 2. run records ------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """The MLflow ids of one phase's run: ``reports/<ds>/runs/<phase>.json``
    (``DatasetPaths.run_record``)."""

    phase: str
    run_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> RunRecord | None:
        """The record at ``path``; None when that phase has not run here."""
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


# --- 3. the workspace record ---------------------------------------------------------

WORKSPACE_RECORD = ".tasks-run.json"
"""A scheduled run's record in its workspace (git-ignored)."""

# --- the gate's decision, as register reports it --------------------------------------

PROMOTED = "promoted"
REJECTED = "rejected"
AWAITING_APPROVAL = "awaiting_approval"
"""Passed the gate; waits at ``@challenger`` for a person (``register.approval: human``)."""
