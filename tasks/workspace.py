"""One DVC workspace per dataset: where a scheduled run executes its stages.

The Airflow DAGs (``dags/``) only wire; every task calls one function here:

- :func:`prepare_workspace` (the first task) validates the run's conf, syncs the
  pipeline code into ``<state>/.workspaces/<ds>/`` and writes that workspace's
  ``params.yaml`` = the project's params file with the run's overrides applied;
- :func:`run_stage` runs ``dvc repro --single-item <stage>@<ds>`` there, so DVC
  skips an unchanged stage and the workspace's ``dvc.lock`` records exactly the
  params, code and data each output was built from;
- :func:`push_outputs` (the last task) runs ``dvc push`` to the project's remote.

Why a workspace per dataset: ``dvc repro`` holds one lock per repository, so
two dataset DAGs running in the project itself would fight over it (and over
``params.yaml`` when their overrides differ). Each workspace is a small DVC
repository of its own (``core.no_scm``; lineage still reads the project's git
commit, since the workspace lies inside the checkout) that shares the
project's DVC cache and remote through its ``.dvc/config.local`` and the
project's MLflow store through a ``mlflow`` symlink. The checked-in
``params.yaml`` is never modified.

Per-run overrides: a DAG run's conf, e.g. ``{"backbone": "vgg16",
"finetune_epochs": 5}`` (friendly keys, see :data:`CONF_KEYS`) or
``{"set": {"train.epochs": 3}}``, becomes ``--set``-style ``key=value``
assignments. They are validated like ``params.yaml`` (one-line
:class:`ConfigError`), written into the workspace's ``params.yaml`` (so DVC
sees the real values: a changed backbone reruns ``train``, the next plain run
reruns it back) and passed to each stage command through ``$TASKS_SET`` so
MLflow records them in the ``overrides`` tag.

Locations come from the environment (read by :meth:`Project.from_env`):
``TASKS_PROJECT`` (the checkout with ``dvc.yaml``, ``tasks/`` and ``.dvc/``),
``TASKS_PARAMS`` (the params file, default ``<project>/params.yaml``),
``TASKS_STATE_DIR`` (holds ``.workspaces/``, ``mlflow/`` and
``reports/summary.*``; default the project) and ``TASKS_DVC_REMOTE`` (a remote
URL that replaces the project's default remote).

This module is imported when Airflow parses the DAG files: keep its top level
to the standard library, ``yaml`` and ``tasks.config``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tasks.config import Config, ConfigError, load_config, parse_config
from tasks.errors import StageError
from tasks.stage_graph import StageGraph, read_stage_graph

log = logging.getLogger(__name__)

DAG_PREFIX = "transfer_learning__"
"""Airflow DAG ids: ``<prefix><dataset>`` per dataset, ``<prefix>summary`` for the report."""
SUMMARY_DAG_ID = f"{DAG_PREFIX}summary"
SET_ENV = "TASKS_SET"
"""JSON list of ``key=value`` overrides the stage CLI applies (and records) before ``--set``."""

RUN_RECORD = ".tasks-run.json"
CODE_DIRS = ("tasks",)
PROJECT_FILES = ("dvc.yaml", ".dvcignore")
# Variables that would point a stage command away from its workspace.
_LOCATION_ENV = ("TASKS_PARAMS", "TASKS_ROOT", SET_ENV)

CONF_KEYS: dict[str, str] = {
    "backbone": "train.backbone",
    "weights": "train.weights",
    "image_size": "train.image_size",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "learning_rate": "train.learning_rate",
    "finetune_epochs": "finetune.epochs",
    "finetune_learning_rate": "finetune.learning_rate",
    "unfreeze_from": "finetune.unfreeze_from",
    "floor": "register.floor",
    "offline": "download.offline",
    "url": "datasets.{dataset}.url",
    "mirrors": "datasets.{dataset}.mirrors",
}
"""Friendly DAG-run conf keys and the dotted params key each one sets.

Any other key goes through ``{"set": {"dotted.key": value}}`` (or a list of
``"dotted.key=value"`` strings); ``url``/``mirrors`` apply to the DAG's dataset.
"""


@dataclass(frozen=True)
class Project:
    """Where the pipeline's code, parameters and run state live."""

    root: Path
    params: Path
    state: Path
    remote: str | None = None

    @classmethod
    def from_env(
        cls, root: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> Project:
        env = os.environ if environ is None else environ
        base = Path(root or env.get("TASKS_PROJECT") or Path.cwd()).resolve()
        params = Path(env.get("TASKS_PARAMS") or "params.yaml")
        state = Path(env.get("TASKS_STATE_DIR") or base)
        return cls(
            root=base,
            params=params if params.is_absolute() else base / params,
            state=state if state.is_absolute() else base / state,
            remote=env.get("TASKS_DVC_REMOTE") or None,
        )

    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def workspaces(self) -> Path:
        return self.state / ".workspaces"

    def workspace(self, dataset: str) -> Path:
        return self.workspaces / dataset

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

    def model_file(self, dataset: str) -> Path:
        """The file whose update is the DAG's Airflow Asset: the candidate model record."""
        return self.workspace(dataset) / "models" / dataset / "candidate.json"

    def asset_uri(self, dataset: str) -> str:
        return self.model_file(dataset).as_uri()

    @staticmethod
    def asset_name(dataset: str) -> str:
        return f"{DAG_PREFIX}{dataset}.model"


# --- run conf -----------------------------------------------------------------


def _as_text(value: Any) -> str:
    """``value`` written so that the CLI's YAML parse gives it back unchanged."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


def conf_overrides(conf: Mapping[str, Any] | None, dataset: str) -> tuple[str, ...]:
    """Turn a DAG run's conf into ``dotted.key=value`` overrides (see :data:`CONF_KEYS`)."""
    if not conf:
        return ()
    if not isinstance(conf, Mapping):
        raise ConfigError('run conf: must be a JSON object, e.g. {"backbone": "vgg16"}')
    overrides = []
    for key, value in conf.items():
        if key == "set":
            overrides.extend(_set_entries(value))
        elif key in CONF_KEYS:
            overrides.append(f"{CONF_KEYS[key].format(dataset=dataset)}={_as_text(value)}")
        else:
            allowed = ", ".join([*CONF_KEYS, "set"])
            raise ConfigError(
                f"run conf: unknown key {key!r}; use one of: {allowed} "
                '(any parameter: {"set": {"train.epochs": 3}})'
            )
    return tuple(overrides)


def _set_entries(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [f"{key}={_as_text(item)}" for key, item in value.items()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(
        'run conf: "set" must map dotted keys to values, e.g. {"set": {"train.epochs": 3}}, '
        'or list "key=value" strings'
    )


def resolve_run_config(project: Project, dataset: str, conf: Mapping[str, Any] | None) -> Config:
    """The validated Config of one run: the params file plus the conf's overrides."""
    cfg = project.load_config()
    cfg.dataset(dataset)
    overrides = conf_overrides(conf, dataset)
    if not overrides:
        return cfg
    raw = yaml.safe_load(project.params.read_text(encoding="utf-8")) or {}
    return parse_config(raw, overrides, source="run conf")


def params_mapping(cfg: Config) -> dict[str, Any]:
    """Every parameter of ``cfg``, defaults included, in params.yaml's shape.

    The workspace's params.yaml holds this, so DVC tracks (and dvc.lock
    records) the effective value of every key a stage lists, even defaulted ones.
    """
    data = cfg.model_dump(mode="json", by_alias=True, exclude={"overrides"})
    for entry in data["datasets"].values():
        entry.pop("name", None)
    return data


# --- prepare ------------------------------------------------------------------


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
    from tasks.atomic import atomic_path, write_json, write_text

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
    from tasks.atomic import write_text

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


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _init_tracking_store(cfg: Config, ws: Path, project: Project) -> None:
    """Create a missing embedded SQLite store once, before two DAGs' stages race to."""
    from tasks.tracking import tracking_uri

    uri = tracking_uri(cfg, ws)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.exists() and db.stat().st_size:
        return
    with _file_lock(project.mlflow_dir / ".init.lock"):
        if db.exists() and db.stat().st_size:
            return
        code = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
        proc = subprocess.run(
            [sys.executable, "-c", code, uri], capture_output=True, text=True, env=_stage_env(())
        )
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StageError(f"cannot create the MLflow store {db}: {tail}")


# --- stages -------------------------------------------------------------------


@dataclass(frozen=True)
class StageResult:
    """What one stage task hands to XCom: small values only."""

    stage: str
    dataset: str
    ran: bool
    seconds: float
    workspace: str
    restored: bool = False
    """Not run: DVC's run cache (shared by all workspaces) held outputs for these inputs."""
    outputs: list[str] = field(default_factory=list)
    run_id: str | None = None
    parent_run_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        state = "unchanged, skipped"
        if self.ran:
            state = "ran"
        elif self.restored:
            state = "restored from the run cache"
        text = f"{self.stage}@{self.dataset}: {state} in {self.seconds:.1f} s"
        if self.run_id:
            text += f"; MLflow run {self.run_id}"
        if self.metrics:
            text += "; " + ", ".join(f"{k}={v}" for k, v in self.metrics.items())
        return text


class StageFailed(StageError):
    """A stage command failed. ``retryable`` is False for a user-fixable (exit 2) error."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def _stage_env(overrides: Sequence[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LOCATION_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if overrides:
        env[SET_ENV] = json.dumps(list(overrides))
    return env


def read_run_record(ws: Path) -> dict[str, Any]:
    path = ws / RUN_RECORD
    if not path.exists():
        raise StageError(
            f"{ws} has not been prepared for a run; run the DAG's prepare task first "
            "(or trigger the whole DAG)"
        )
    return json.loads(path.read_text())


def _dvc(ws: Path, args: Sequence[str], overrides: Sequence[str]) -> tuple[int, list[str]]:
    """Run ``dvc <args>`` in ``ws``, echoing its output to the log; returns (code, lines)."""
    cmd = [sys.executable, "-m", "dvc", *args]
    log.info("$ %s  (in %s)", " ".join(["dvc", *args]), ws)
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=ws,
        env=_stage_env(overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            log.info("%s", line)
        code = proc.wait()
    return code, lines


_EXIT = re.compile(r"exited with (-?\d+)")


def _failure(stage: str, dataset: str, lines: list[str]) -> StageFailed:
    """The one-line reason, and whether trying again could help.

    The stage command's own ``error:`` line (exit 2) is user-fixable: no retry.
    A command that crashed otherwise (killed, out of memory) may pass on a
    retry; so may DVC failing to take its lock. Other DVC errors (missing
    params, a broken dvc.yaml) are deterministic.
    """
    text = "\n".join(lines)
    exits = _EXIT.findall(text)
    user_errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if user_errors:
        return StageFailed(f"{stage}@{dataset}: {user_errors[-1]}", retryable=False)
    dvc_errors = [line for line in lines if line.startswith("ERROR")]
    reason = dvc_errors[-1] if dvc_errors else (lines[-1] if lines else "no output")
    if exits:
        retryable = exits[-1] != "2"
    else:
        retryable = "lock" in reason.lower() or not dvc_errors
    return StageFailed(f"{stage}@{dataset} failed: {reason}", retryable=retryable)


def _small(payload: Any, limit: int = 24) -> dict[str, Any]:
    """Top-level scalars of a JSON object (what XCom may carry)."""
    if not isinstance(payload, dict):
        return {}
    small = {}
    for key, value in payload.items():
        if isinstance(value, bool | int | float) or value is None:
            small[key] = value
        elif isinstance(value, str) and len(value) <= 200:
            small[key] = value
        if len(small) >= limit:
            break
    return small


def run_stage(project: Project, dataset: str, stage: str) -> StageResult:
    """``dvc repro --single-item <stage>@<dataset>`` in the dataset's workspace.

    Raises :class:`StageFailed` with the stage command's one-line error.
    """
    ws = project.workspace(dataset)
    record = read_run_record(ws)
    spec = read_stage_graph(ws / "dvc.yaml", dataset).stage(stage)
    start = time.perf_counter()
    code, lines = _dvc(ws, ["repro", "--single-item", spec.target], record.get("overrides", []))
    seconds = round(time.perf_counter() - start, 2)
    if code:
        raise _failure(stage, dataset, lines)
    ran = any(f"Running stage '{spec.target}'" in line for line in lines)
    restored = any(f"Stage '{spec.target}' is cached" in line for line in lines)
    metrics: dict[str, Any] = {}
    for path in spec.metrics:
        target = ws / path
        if target.is_file():
            metrics.update(_small(json.loads(target.read_text())))
    run = _run_ids(ws / "reports" / dataset / "runs" / f"{stage}.json")
    result = StageResult(
        stage=stage,
        dataset=dataset,
        ran=ran,
        seconds=seconds,
        workspace=str(ws),
        restored=restored,
        outputs=list(spec.outputs),
        run_id=run.get("run_id"),
        parent_run_id=run.get("parent_run_id"),
        metrics=metrics,
    )
    _record_stage(ws, result)
    log.info("%s", result)
    return result


def _run_ids(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return _small(json.loads(path.read_text()))
    except json.JSONDecodeError:
        return {}


def _record_stage(ws: Path, result: StageResult) -> None:
    from tasks.atomic import write_json

    record = read_run_record(ws)
    record.setdefault("stages", {})[result.stage] = {"ran": result.ran, "seconds": result.seconds}
    write_json(ws / RUN_RECORD, record)


def stage_command(stage: str, dataset: str, result_json: str | None = None) -> str | StageResult:
    """``python -m tasks dvc-stage``: what a GPU pod or container runs.

    ``result_json`` writes the XCom value there (KubernetesPodOperator reads
    ``/airflow/xcom/return.json``); ``-`` prints it as the last line instead.
    """
    result = run_stage(Project.from_env(), dataset, stage)
    payload = json.dumps(result.xcom(), sort_keys=True)
    if result_json == "-":
        return payload
    if result_json:
        Path(result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(result_json).write_text(payload)
    return result


# --- push ---------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    dataset: str
    workspace: str
    pushed: int
    seconds: float

    def xcom(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"dvc push ({self.dataset}): {self.pushed} file(s) sent in {self.seconds:.1f} s"


_PUSHED = re.compile(r"(\d+) files? pushed")


def push_outputs(project: Project, dataset: str) -> PushResult:
    """``dvc push`` the workspace's outputs (to the project's remote, or ``TASKS_DVC_REMOTE``)."""
    ws = project.workspace(dataset)
    read_run_record(ws)
    start = time.perf_counter()
    code, lines = _dvc(ws, ["push"], ())
    if code:
        raise _failure("push", dataset, lines)
    found = _PUSHED.findall("\n".join(lines))
    result = PushResult(
        dataset, str(ws), int(found[-1]) if found else 0, round(time.perf_counter() - start, 2)
    )
    log.info("%s", result)
    return result
