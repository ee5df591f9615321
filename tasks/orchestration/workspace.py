"""One DVC workspace per dataset: where a scheduled run executes its stages.

:func:`prepare_workspace` (a DAG's first task) validates the run's conf, syncs
the pipeline code into ``<state>/.workspaces/<ds>/`` and writes that
workspace's ``params.yaml`` = the project's params file with the run's
overrides applied. The stage tasks then run DVC there (``tasks.orchestration.dvc``).

Why a workspace per dataset: ``dvc repro`` holds one lock per repository, so
two dataset DAGs running in the project itself would fight over it (and over
``params.yaml`` when their overrides differ). Each workspace is a small DVC
repository of its own (``core.no_scm``; lineage still reads the project's git
commit, since the workspace lies inside the checkout) that shares the
project's DVC cache and remote through its ``.dvc/config.local`` and the
project's MLflow store through a ``mlflow`` symlink. The checked-in
``params.yaml`` is never modified.

Imported when Airflow parses the DAG files: keep its top level to the standard
library, ``yaml`` and the base modules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tasks.config import SET_ENV, Config
from tasks.errors import StageError
from tasks.io import atomic_path, file_lock, write_json, write_text
from tasks.orchestration.project import Project
from tasks.orchestration.runconf import params_mapping, resolve_run_config
from tasks.orchestration.stage_graph import StageGraph

RUN_RECORD = ".tasks-run.json"
"""The workspace's record of the current run: dataset, overrides, Airflow run id, stages."""
CODE_DIRS = ("tasks",)
PROJECT_FILES = ("dvc.yaml", ".dvcignore")
# Variables that would point a stage command away from its workspace.
_LOCATION_ENV = ("TASKS_PARAMS", "TASKS_ROOT", SET_ENV)


@dataclass(frozen=True)
class Prepared:
    dataset: str
    workspace: str
    overrides: tuple[str, ...]
    backbone: str

    def xcom(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": list(self.overrides)}

    def __str__(self) -> str:
        extra = f" with {', '.join(self.overrides)}" if self.overrides else ""
        return f"workspace {self.workspace} ready for {self.dataset}{extra}"


def prepare_workspace(
    project: Project,
    dataset: str,
    conf: Mapping[str, Any] | None = None,
    *,
    run_id: str | None = None,
) -> Prepared:
    """Validate ``conf`` and bring the dataset's workspace up to date for one run.

    Raises :class:`ConfigError` (one line) on a bad params file or conf; the
    workspace is then left as it was.
    """
    cfg = resolve_run_config(project, dataset, conf)
    overrides = tuple(cfg.overrides)
    ws = project.workspace(dataset)
    ws.mkdir(parents=True, exist_ok=True)
    graph = project.stage_graph(dataset)
    for name in PROJECT_FILES:
        if (project.root / name).exists():
            write_text(ws / name, (project.root / name).read_text(encoding="utf-8"))
    for name in sorted(set(CODE_DIRS) | _source_deps(project.root, graph)):
        source = project.root / name
        if source.is_dir():
            with atomic_path(ws / name) as tmp:
                shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ws / name) as tmp:
                shutil.copy2(source, tmp)
    write_text(ws / "params.yaml", yaml.safe_dump(params_mapping(cfg), sort_keys=False))
    _write_dvc_config(project, ws)
    _link_mlflow(project, ws)
    _init_tracking_store(cfg, ws, project)
    write_json(
        ws / RUN_RECORD,
        {
            "dataset": dataset,
            "overrides": list(overrides),
            "run_id": run_id,
            "params_source": str(project.params),
            "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "stages": {},
        },
    )
    return Prepared(dataset, str(ws), overrides, cfg.train.backbone)


def _source_deps(root: Path, graph: StageGraph) -> set[str]:
    """Deps that no stage produces: code and config the workspace needs a copy of."""
    outputs = {out for stage in graph.stages for out in stage.outputs}
    deps = {dep for stage in graph.stages for dep in stage.deps if dep not in outputs}
    top = set()
    for dep in deps:
        first = Path(dep).parts[0]
        if first in CODE_DIRS or (root / dep).exists():
            top.add(first if first in CODE_DIRS else dep)
    return top


def _dvc_configs(root: Path) -> Any:
    from configobj import ConfigObj

    merged = ConfigObj()
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.exists():
            merged.merge(ConfigObj(str(path)))
    return merged


def _local_url(url: str, base: Path) -> str:
    if "://" in url or Path(url).is_absolute():
        return url
    return str((base / url).resolve())


def _write_dvc_config(project: Project, ws: Path) -> None:
    """The project's DVC config, with the shared cache and absolute remote paths."""
    from configobj import ConfigObj

    (ws / ".dvc").mkdir(exist_ok=True)
    source = project.root / ".dvc" / "config"
    write_text(ws / ".dvc" / "config", source.read_text() if source.exists() else "")
    merged = _dvc_configs(project.root)
    dvc_dir = project.root / ".dvc"
    local = ConfigObj()
    for section, values in merged.items():
        if section.startswith("remote "):
            local[section] = dict(values)
            if "url" in values:
                local[section]["url"] = _local_url(values["url"], dvc_dir)
    cache = merged.get("cache", {})
    local["core"] = {"no_scm": "true"}
    local["cache"] = {
        **dict(cache),
        "dir": _local_url(cache.get("dir", "cache"), dvc_dir),
    }
    if project.remote:
        local["core"]["remote"] = "tasks"
        local['remote "tasks"'] = {"url": _local_url(project.remote, project.root)}
    lines = local.write()
    write_text(ws / ".dvc" / "config.local", "\n".join(lines) + "\n")


def _link_mlflow(project: Project, ws: Path) -> None:
    """``<ws>/mlflow`` -> the shared store, so every workspace logs to one place."""
    project.mlflow_dir.mkdir(parents=True, exist_ok=True)
    link = ws / "mlflow"
    target = project.mlflow_dir.resolve()
    if link.is_symlink() and link.resolve() == target:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        raise StageError(
            f"{link} is a folder, not a link to the shared MLflow store {target}; "
            "move its contents there (or remove it) and rerun"
        )
    link.symlink_to(target, target_is_directory=True)


def _init_tracking_store(cfg: Config, ws: Path, project: Project) -> None:
    """Create a missing embedded SQLite store once, before two DAGs' stages race to."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri(cfg, ws)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists() and db.stat().st_size:
        return
    with file_lock(project.mlflow_dir / ".init.lock"):
        if db.exists() and db.stat().st_size:
            return
        code = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
        proc = subprocess.run(
            [sys.executable, "-c", code, uri], capture_output=True, text=True, env=stage_env(())
        )
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StageError(f"cannot create the MLflow store {db}: {tail}")


def read_run_record(ws: Path) -> dict[str, Any]:
    path = ws / RUN_RECORD
    if not path.exists():
        raise StageError(
            f"{ws} has not been prepared for a run; run the DAG's prepare task first "
            "(or trigger the whole DAG)"
        )
    return json.loads(path.read_text())


def stage_env(overrides: Sequence[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LOCATION_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if overrides:
        env[SET_ENV] = json.dumps(list(overrides))
    return env
