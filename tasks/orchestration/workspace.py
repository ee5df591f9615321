"""One workspace per dataset: a git checkout of the deployed commit, where a scheduled run works.

:func:`prepare_workspace` (a DAG's first task) validates the run's conf and
brings ``<state>/.workspaces/<ds>/`` to the deployed commit:

- the project a git checkout (the usual case): the workspace is a
  ``git clone --shared`` of it, checked out (detached) at the project's
  ``HEAD``; the run is later pushed back to it as a DVC experiment
  (``tasks.orchestration.experiments``). Uncommitted edits in the project are
  not part of the run (a warning says so): what runs is what git can restore.
- the project not a git checkout (files baked into an image): the workspace
  is a git repository of its own whose commits are snapshots of the project's
  pipeline files; experiments stay there ("local-only").

Then it writes the workspace's ``params.yaml`` = the project's params file with
the run's overrides applied, for this dataset only (DVC sees the real values,
and the experiment records them), points DVC at the project's shared cache and remote
(``.dvc/config.local``), writes the workspace record (``.tasks-run.json``,
``tasks.orchestration.records``) and opens the run's MLflow parent run
(``tasks.orchestration.parent_run``, which ``finish`` ends).

Why a workspace per dataset: ``dvc repro`` holds one lock per repository, so
two dataset DAGs running in the project itself would fight over it (and over
``params.yaml`` when their overrides differ). A DAG runs one run at a time
(``max_active_runs=1``), so its workspace is reused: outputs stay between
runs, and DVC's shared run cache restores any stage whose inputs are unchanged.
The checked-in ``params.yaml`` is never modified.

Imported when Airflow parses the DAG files: keep its top level to the standard
library, ``yaml`` and the base modules.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tasks.config import Config
from tasks.errors import StageError
from tasks.io import atomic_path, file_lock, write_text
from tasks.orchestration.parent_run import start_parent_run
from tasks.orchestration.process import run_checked
from tasks.orchestration.project import Project
from tasks.orchestration.records import (
    stage_env,
    update_workspace_record,
    write_workspace_record,
)
from tasks.orchestration.runconf import params_mapping, resolve_run_config
from tasks.orchestration.stage_graph import StageGraph

log = logging.getLogger(__name__)

CODE_DIRS = ("tasks",)
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore")
SNAPSHOT_AUTHOR = ("tasks pipeline", "pipeline@localhost")
_REF_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Prepared:
    dataset: str
    workspace: str
    overrides: tuple[str, ...]
    backbone: str
    experiment: str
    baseline: str
    parent_run_id: str | None

    def xcom(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": list(self.overrides)}

    def __str__(self) -> str:
        extra = f" with {', '.join(self.overrides)}" if self.overrides else ""
        return (
            f"workspace {self.workspace} at {self.baseline[:10]} ready for {self.dataset}{extra}; "
            f"experiment {self.experiment}"
        )


def prepare_workspace(
    project: Project,
    dataset: str,
    conf: Mapping[str, Any] | None = None,
    *,
    run_id: str | None = None,
) -> Prepared:
    """Validate ``conf`` and bring the dataset's workspace to the deployed commit for one run.

    Raises :class:`ConfigError` (one line) on a bad params file or conf; the
    workspace is then left as it was.
    """
    cfg = resolve_run_config(project, dataset, conf)
    overrides = tuple(cfg.overrides)
    ws = project.workspace(dataset)
    remote, baseline = checkout_deployed(project, ws)
    write_text(ws / "params.yaml", yaml.safe_dump(run_params(cfg, dataset), sort_keys=False))
    _write_dvc_config(project, ws)
    _checkout_feedback(ws, dataset)
    _init_tracking_store(project)
    name = dvc_experiment_name(dataset, run_id)
    record = {
        "dataset": dataset,
        "overrides": list(overrides),
        "run_id": run_id,
        "params_source": str(project.params),
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "experiment": name,
        "baseline": baseline,
        "git_remote": remote,
        "parent_run_id": None,
        "store_root": str(project.state),
        "stages": {},
    }
    write_workspace_record(ws, record)
    parent = start_parent_run(project, dataset)
    update_workspace_record(ws, parent_run_id=parent)
    return Prepared(dataset, str(ws), overrides, cfg.train.backbone_name, name, baseline, parent)


def run_params(cfg: Config, dataset: str) -> dict[str, Any]:
    """The workspace's params.yaml: every parameter of the run, and only its own dataset.

    With one dataset, ``foreach: ${datasets}`` makes only this DAG's stages, so
    ``dvc status`` and ``dvc exp show`` in the workspace speak of this run alone.
    """
    params = params_mapping(cfg)
    params["datasets"] = {dataset: params["datasets"][dataset]}
    return params


# --- git ----------------------------------------------------------------------


def dvc_experiment_name(dataset: str, run_id: str | None) -> str:
    """``<dataset>-<run id>`` with what git refuses in a ref name made ``-``."""
    text = f"{dataset}-{run_id or 'manual'}"
    return _REF_UNSAFE.sub("-", text).strip("-.").replace("..", "-")


def git(repo: Path, *args: str) -> str:
    """``git <args>`` in ``repo``; its stdout, stripped. A failure is a one-line StageError."""
    doing = f"git {' '.join(args)} failed in {repo}"
    return run_checked(["git", *args], doing, cwd=repo, env=_git_env()).strip()


def _git_env() -> dict[str, str]:
    name, email = SNAPSHOT_AUTHOR
    env = dict(os.environ)
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", name)
        env.setdefault(f"GIT_{role}_EMAIL", email)
    return env


def is_git_checkout(path: Path) -> bool:
    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True
    )
    return proc.returncode == 0 and Path(proc.stdout.strip()).resolve() == path.resolve()


def checkout_deployed(project: Project, ws: Path) -> tuple[str | None, str]:
    """Bring ``ws`` to the deployed commit; returns (git remote to push to or None, commit)."""
    if is_git_checkout(project.root):
        return str(project.root), _clone_at_head(project, ws)
    log.warning(
        "%s is not a git checkout: experiments stay in the workspace's own repository "
        "(local-only); deploy a git checkout to share them",
        project.root,
    )
    return None, _snapshot(project, ws)


def _clone_at_head(project: Project, ws: Path) -> str:
    head = git(project.root, "rev-parse", "HEAD")
    if git(project.root, "status", "--porcelain", "--untracked-files=no"):
        log.warning(
            "%s has uncommitted changes; this run uses commit %s (commit them to run them)",
            project.root,
            head[:10],
        )
    if not (ws / ".git").exists():
        if ws.exists() and any(ws.iterdir()):
            raise StageError(
                f"{ws} exists but is not a git checkout (a workspace from before runs were "
                "experiments?); remove it and rerun"
            )
        ws.parent.mkdir(parents=True, exist_ok=True)
        git(ws.parent, "clone", "--quiet", "--shared", "--no-checkout", str(project.root), ws.name)
    else:
        git(ws, "fetch", "--quiet", "origin")
    git(ws, "checkout", "--quiet", "--force", "--detach", head)
    git(ws, "reset", "--quiet", "--hard", head)
    return head


def _snapshot(project: Project, ws: Path) -> str:
    """Commit the project's pipeline files into the workspace's own repository."""
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".git").exists():
        git(ws, "init", "--quiet")
    graph = project.stage_graph(ws.name)
    for name in PROJECT_FILES:
        if (project.root / name).exists():
            write_text(ws / name, (project.root / name).read_text(encoding="utf-8"))
    copied = sorted(set(CODE_DIRS) | _source_deps(project.root, graph) | {"params.yaml"})
    for name in copied:
        source = project.root / name
        if source.is_dir():
            with atomic_path(ws / name) as tmp:
                shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            (ws / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ws / name) as tmp:
                shutil.copy2(source, tmp)
    config = project.root / ".dvc" / "config"
    (ws / ".dvc").mkdir(exist_ok=True)
    write_text(ws / ".dvc" / "config", config.read_text() if config.exists() else "")
    tracked = [*PROJECT_FILES, *copied, ".dvc/config"]
    git(ws, "add", "--all", "--", *[name for name in tracked if (ws / name).exists()])
    if git(ws, "status", "--porcelain", "--untracked-files=no") or not _has_commits(ws):
        git(ws, "commit", "--quiet", "--allow-empty", "-m", f"snapshot of {project.root}")
    return git(ws, "rev-parse", "HEAD")


def _has_commits(ws: Path) -> bool:
    return (
        subprocess.run(
            ["git", "rev-parse", "--verify", "HEAD"], cwd=ws, capture_output=True
        ).returncode
        == 0
    )


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


# --- DVC and MLflow -----------------------------------------------------------


def _dvc_configs(root: Path) -> Any:
    from configobj import ConfigObj

    merged = ConfigObj()
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.exists():
            merged.merge(ConfigObj(str(path)))
    return merged


def default_remote(root: Path) -> str | None:
    """The DVC remote ``dvc push`` in ``root`` sends to, as "name (url, endpoint ...)"."""
    merged = _dvc_configs(root)
    name = merged.get("core", {}).get("remote")
    if not name:
        return None
    section = merged.get(f'remote "{name}"', {})
    where = ", ".join(
        part
        for part in (
            section.get("url"),
            section.get("endpointurl") and f"endpoint {section['endpointurl']}",
        )
        if part
    )
    return f"'{name}' ({where})" if where else f"'{name}'"


def _local_url(url: str, base: Path) -> str:
    if "://" in url or Path(url).is_absolute():
        return url
    return str((base / url).resolve())


def _write_dvc_config(project: Project, ws: Path) -> None:
    """``.dvc/config.local``: the project's shared cache, its remotes with absolute paths."""
    from configobj import ConfigObj

    merged = _dvc_configs(project.root)
    dvc_dir = project.root / ".dvc"
    local = ConfigObj()
    for section, values in merged.items():
        if section.startswith("remote "):
            local[section] = dict(values)
            if "url" in values:
                local[section]["url"] = _local_url(values["url"], dvc_dir)
    cache = merged.get("cache", {})
    local["cache"] = {
        **dict(cache),
        "dir": _local_url(cache.get("dir", "cache"), dvc_dir),
    }
    core = dict(merged.get("core", {}))
    local["core"] = {"remote": core["remote"]} if core.get("remote") else {}
    if project.remote:
        local["core"]["remote"] = "tasks"
        local['remote "tasks"'] = {"url": _local_url(project.remote, project.root)}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
        if project.remote.startswith("s3://") and endpoint:
            local['remote "tasks"']["endpointurl"] = endpoint
    (ws / ".dvc").mkdir(exist_ok=True)
    write_text(ws / ".dvc" / "config.local", "\n".join(local.write()) + "\n")


def _checkout_feedback(ws: Path, dataset: str) -> None:
    """The dataset's fed-back drops (``python -m tasks feedback``): the clone has their
    ``.dvc`` files, the shared cache (else the remote) their images; validate reads them."""
    folder = Path("data") / "feedback" / dataset
    if not any((ws / folder).glob("*.dvc")):
        return
    dvc = [sys.executable, "-m", "dvc"]
    try:
        run_checked([*dvc, "checkout", "-R", str(folder)], "dvc checkout", cwd=ws, env=stage_env())
    except StageError:
        run_checked(
            [*dvc, "pull", "-R", str(folder)],
            f"cannot restore the fed-back drops of {dataset} (dvc pull -R {folder})",
            cwd=ws,
            env=stage_env(),
        )


def _init_tracking_store(project: Project) -> None:
    """Create a missing embedded SQLite store once, before two DAGs' stages race to."""
    from tasks.tracking.store import tracking_uri

    uri = tracking_uri(project.load_config(), project.state)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists() and db.stat().st_size:
        return
    with file_lock(project.mlflow_dir / ".init.lock"):
        if db.exists() and db.stat().st_size:
            return
        code = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
        argv = [sys.executable, "-c", code, uri]
        run_checked(argv, f"cannot create the MLflow store {db}", cwd=Path.cwd(), env=stage_env())
