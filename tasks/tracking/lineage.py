"""What produced a run: its lineage tags, its parameters, its dataset.

Every run is tagged with the git commit, the DVC hashes of the data it read,
the backbone, the Airflow dag/run ids when scheduled, and the ``--set``
overrides (:func:`lineage_tags`). Param names are the same for every backbone
and dataset (:func:`flat_params`). The validated manifest is logged as the
run's MLflow dataset, pointing at where DVC keeps it (:func:`log_manifest`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tasks.config import Config
from tasks.contract import EXPERIMENT_ENV
from tasks.io import file_md5
from tasks.paths import DatasetPaths

if TYPE_CHECKING:
    import mlflow

_log = logging.getLogger(__name__)

AIRFLOW_ENV_TAGS = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "AIRFLOW_CTX_TRY_NUMBER": "airflow.try_number",
    "DVC_EXP_NAME": "dvc.exp_name",
    "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
    EXPERIMENT_ENV: "dvc.exp_name",
}
"""Environment the scheduler (or ``dvc exp run``) sets, and the run tag each becomes."""
WORKSPACE_TAG = "tasks.workspace"
FEEDBACK_TAG = "data.feedback_drops"
"""The fed-back drops (``python -m tasks feedback``) the manifest trains on, comma-separated."""


def current_experiment() -> str | None:
    """The DVC experiment this process's run will be saved as (scheduled, or ``dvc exp run``)."""
    return os.environ.get(EXPERIMENT_ENV) or os.environ.get("DVC_EXP_NAME") or None


def locked_hash(root: Path, stage: str, out: str) -> str | None:
    """The hash ``dvc.lock`` holds for output ``out`` of ``stage`` (None outside DVC)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for entry in stages.get(stage, {}).get("outs", []):
        if entry.get("path") == out:
            return entry.get("md5") or entry.get("hash")
    return None


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def lineage_tags(cfg: Config, paths: DatasetPaths) -> dict[str, str]:
    """Tags that say what produced a run: code, data, backbone, scheduler, overrides."""
    ds = paths.dataset
    tags = {
        "dataset": ds,
        "git.commit": git_commit(paths.root),
        "backbone": cfg.train.backbone,
        "weights.source": cfg.train.weights,
        "overrides": json.dumps(list(cfg.overrides)),
        WORKSPACE_TAG: str(paths.root.resolve()),
    }
    if paths.manifest.exists():
        tags["data.manifest_md5"] = file_md5(paths.manifest)
    for tag, stage, out in (
        ("data.raw_dvc_hash", "download", f"data/raw/{ds}"),
        ("data.shards_dvc_hash", "validate", f"data/shards/{ds}"),
    ):
        locked = locked_hash(paths.root, f"{stage}@{ds}", out)
        if locked:
            tags[tag] = locked
    for env, tag in AIRFLOW_ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def flat_params(cfg: Config, dataset: str) -> dict[str, Any]:
    """The parameters a run depends on, with the same names for every backbone and dataset."""
    params: dict[str, Any] = {"dataset": dataset, "recipe": cfg.recipe}
    sections = {
        "train": cfg.train,
        "finetune": cfg.finetune,
        "augmentation": cfg.augmentation,
    }
    for prefix, section in sections.items():
        for key, value in section.model_dump().items():
            if isinstance(value, dict):
                for sub, inner in value.items():
                    params[f"{prefix}.{key}.{sub}"] = inner
            else:
                params[f"{prefix}.{key}"] = value
    return params


def dvc_cache_path(root: Path, md5: str) -> Path | None:
    """Where DVC keeps the file of hash ``md5`` in this project's cache (None outside DVC)."""
    import configparser

    dvc = Path(root) / ".dvc"
    if not dvc.is_dir():
        return None
    cache = dvc / "cache"
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser()
        try:
            parser.read(dvc / name)
        except configparser.Error:
            continue
        if parser.has_option("cache", "dir"):
            cache = dvc / parser.get("cache", "dir")
    path = (cache / "files" / "md5" / md5[:2] / md5[2:]).resolve()
    return path if path.exists() else None


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """MLflow's dataset code warns about nothing the user can act on: it registers its local
    source twice ("interpreted in multiple ways", naming the same class twice) and hints
    that integer columns cannot hold NaN (a manifest has none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def manifest_dataset(cfg: Config, paths: DatasetPaths) -> mlflow.data.dataset.Dataset | None:
    """The validated manifest as an MLflow dataset: digest = its DVC md5, source = where
    DVC keeps it (the workspace file outside DVC), schema = its columns."""
    if not paths.manifest.exists():
        return None
    import mlflow.data
    import pandas as pd

    md5 = file_md5(paths.manifest)
    source = dvc_cache_path(paths.root, md5) or paths.manifest.resolve()
    try:
        frame = pd.read_parquet(paths.manifest)
    except (OSError, ValueError) as error:  # lineage only: the stage reports a bad manifest
        _log.warning("manifest %s not logged as a dataset: %s", paths.manifest, error)
        return None
    with quiet_datasets():
        return mlflow.data.from_pandas(
            frame,
            source=source.as_uri(),
            targets="label",
            name=f"{paths.dataset}-manifest",
            digest=md5,
        )


def log_manifest(cfg: Config, paths: DatasetPaths, run_id: str, context: str) -> None:
    """Log the manifest as an input of ``run_id`` (what fills the UI's Dataset column) and
    tag the run with the fed-back drops it holds (:data:`FEEDBACK_TAG`)."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = manifest_dataset(cfg, paths)
    if dataset is not None:
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        with quiet_datasets():
            entity = dataset._to_mlflow_entity()  # what mlflow.log_input sends, for any run id
        client = MlflowClient()
        client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])
        client.set_tag(run_id, FEEDBACK_TAG, feedback_drops(dataset.df))


def feedback_drops(manifest: Any) -> str:
    """The drops whose images are the manifest's usable train rows besides the archive's,
    comma-separated by name ("" for none)."""
    if "source" not in manifest:
        return ""
    used = manifest[(manifest["split"] == "train") & (manifest["status"] == "ok")]
    return ",".join(sorted(set(used["source"]) - {""}))
