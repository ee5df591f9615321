"""Where the pipeline's code, parameters and run state live, and what Airflow calls things.

Locations come from the environment (read by :meth:`Project.from_env`):
``TASKS_PROJECT`` (the checkout with ``dvc.yaml``, ``tasks/`` and ``.dvc/``),
``TASKS_PARAMS`` (the params file, default ``<project>/params.yaml``),
``TASKS_STATE_DIR`` (holds ``.workspaces/``, ``mlflow/`` and
``reports/summary.*``; default the project) and ``TASKS_DVC_REMOTE`` (a remote
URL that replaces the project's default remote).

Imported when Airflow parses the DAG files: standard library, ``yaml`` and
``tasks.config`` only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.config import Config, load_config
from tasks.contract import DVC_REMOTE_ENV, PARAMS_ENV, PROJECT_ENV, STATE_ENV
from tasks.orchestration.stage_graph import StageGraph, read_stage_graph
from tasks.paths import DatasetPaths

DAG_PREFIX = "transfer_learning__"
"""Airflow DAG ids: ``<prefix><dataset>`` per dataset, ``<prefix>summary`` for the report."""
SUMMARY_DAG_ID = f"{DAG_PREFIX}summary"
SWEEP_DAG_ID = f"{DAG_PREFIX}sweep"
SCORING_DAG_PREFIX = "scoring__"
"""The scoring DAGs: ``scoring__<dataset>`` (new drops scored and tested for drift)."""
DRIFT_ASSET_PREFIX = "drift/"
"""The drift asset of a dataset, ``drift/<dataset>``: updated when a scored drop drifted."""


@dataclass(frozen=True)
class Project:
    """Where the pipeline's code, parameters and run state live."""

    root: Path
    params: Path
    state: Path
    remote: str | None = None
    lane: str | None = None
    """A sweep combination's own workspace (``.workspaces/sweeps/<sweep>/<key>``);
    None: the dataset's workspace of its DAG (``.workspaces/<dataset>``)."""

    @classmethod
    def from_env(
        cls, root: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> Project:
        env = os.environ if environ is None else environ
        base = Path(root or env.get(PROJECT_ENV) or Path.cwd()).resolve()
        params = Path(env.get(PARAMS_ENV) or "params.yaml")
        state = Path(env.get(STATE_ENV) or base)
        return cls(
            root=base,
            params=params if params.is_absolute() else base / params,
            state=state if state.is_absolute() else base / state,
            remote=env.get(DVC_REMOTE_ENV) or None,
        )

    @classmethod
    def of_dag_file(cls, dag_file: str | Path) -> Project:
        """The project a DAG file belongs to: ``TASKS_PROJECT``, else the folder above
        the DAG folder."""
        return cls.from_env(os.environ.get(PROJECT_ENV) or Path(dag_file).resolve().parents[1])

    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def workspaces(self) -> Path:
        return self.state / ".workspaces"

    def workspace(self, dataset: str) -> Path:
        if self.lane:
            return self.workspaces / "sweeps" / self.lane
        return self.workspaces / dataset

    def for_lane(self, sweep: str, key: str) -> Project:
        """The same project, with one sweep combination's workspace."""
        return replace(self, lane=f"{sweep}/{key}")

    @property
    def mlflow_dir(self) -> Path:
        """The shared embedded MLflow store (``mlflow.db`` + ``artifacts/``)."""
        return self.state / "mlflow"

    @property
    def reports(self) -> Path:
        """Cross-dataset reports (``summary.md``/``summary.json``)."""
        return self.state / "reports"

    def load_config(self) -> Config:
        return load_config(self.params)

    def stage_graph(self, dataset: str) -> StageGraph:
        return read_stage_graph(self.dvc_yaml, dataset)

    def dataset_paths(self, dataset: str) -> DatasetPaths:
        """Where the stages of ``dataset`` read and write, in its workspace."""
        return DatasetPaths.of(dataset, self.workspace(dataset))

    def model_file(self, dataset: str) -> Path:
        """The file whose update is the DAG's Airflow Asset: the candidate model record."""
        return self.dataset_paths(dataset).candidate

    def asset_uri(self, dataset: str) -> str:
        return self.model_file(dataset).as_uri()

    @staticmethod
    def asset_name(dataset: str) -> str:
        return f"{DAG_PREFIX}{dataset}.model"

    @staticmethod
    def drift_asset_name(dataset: str) -> str:
        return f"{DRIFT_ASSET_PREFIX}{dataset}"
