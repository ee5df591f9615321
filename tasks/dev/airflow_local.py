"""Airflow on this machine, with all of its state inside the project.

``python -m tasks.dev.airflow_local run`` (``make run``) runs every dataset DAG with
``airflow dags test`` (one after the other, tasks in-process) and then the
summary DAG, on a SQLite Airflow database under ``.airflow/``; it ends by
printing where the results are and how much time Airflow itself added. A conf
that names ``backbones`` runs the sweep DAG instead (``make run CONF='{"backbones":
["mobilenet_v2", "efficientnet_b0"]}'``) and prints its comparison table.

``python -m tasks.dev.airflow_local standalone`` (``make airflow``) starts
``airflow standalone`` (api-server, scheduler, dag-processor, triggerer) and
the MLflow UI, for the scheduled experience.

Nothing here imports Airflow: it only sets the environment (``AIRFLOW_HOME``,
``AIRFLOW__CORE__DAGS_FOLDER``, ...; never ``~/airflow``) and runs the
``airflow`` command of this virtualenv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.contract import WORKSPACE_RECORD
from tasks.errors import ConfigError, StageError
from tasks.orchestration.project import DAG_PREFIX, SUMMARY_DAG_ID, SWEEP_DAG_ID, Project
from tasks.tracking.runs import comparison_url

ADMIN_USER = "admin"
SQLITE_CONNECT_ARGS = {"timeout": 60}
"""How long an Airflow process waits for SQLite's write lock (Python's default is 5 s: the
API server's audit-log insert of a triggered run failed after 5 s while the scheduler and
the DAG processor wrote on 2 busy cores). Read by Airflow via ``sql_alchemy_connect_args``.
That insert blocks the API server's event loop while it waits, so this is also the longest
the API server stops answering; docs/deployment.md says what a user sees and does."""
SQLITE_CONNECT_ARGS_ASYNC = {"timeout": 60}


@dataclass
class LocalAirflow:
    """One Airflow installation: ``home`` holds airflow.cfg, airflow.db and logs."""

    project: Project
    home: Path
    port: int = 8080
    parallelism: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def bin(self) -> Path:
        return Path(sys.executable).parent

    def env(self) -> dict[str, str]:
        """The environment every ``airflow`` command of this installation runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CTX_")}
        base = f"http://127.0.0.1:{self.port}"
        env.update(
            {
                "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.project.root / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(self.parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": base,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__SCHEDULER__STANDALONE_DAG_PROCESSOR": "True",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                "TASKS_PROJECT": str(self.project.root),
                "TASKS_PARAMS": str(self.project.params),
                "TASKS_STATE_DIR": str(self.project.state),
                "NO_COLOR": "1",
            }
        )
        # The DAG files import this project's `tasks`, not another checkout's install.
        paths = [str(self.project.root), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if self.project.remote:
            env["TASKS_DVC_REMOTE"] = self.project.remote
        env.update(self.extra_env)
        if env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite").startswith("sqlite"):
            for key, name in (("", "SQLITE_CONNECT_ARGS"), ("_ASYNC", "SQLITE_CONNECT_ARGS_ASYNC")):
                env.setdefault(
                    f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS{key}",
                    f"tasks.dev.airflow_local.{name}",
                )
        return env

    def airflow(self, *args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(self.bin / "airflow"), *args], env=self.env(), text=True, **kwargs
        )
        if check and proc.returncode:
            raise StageError(f"airflow {' '.join(args)} failed (exit {proc.returncode})")
        return proc

    def migrate(self) -> None:
        """Create or upgrade the SQLite metadata database (idempotent)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.airflow("db", "migrate", capture_output=True)

    def set_gpu_pool(self, slots: int, pool: str | None = None) -> None:
        """The pool that caps concurrent GPU tasks (``schedule.gpus`` slots)."""
        name = pool or os.environ.get("TASKS_GPU_POOL", "gpu")
        self.airflow(
            "pools", "set", name, str(slots), "GPU tasks (schedule.gpus)", capture_output=True
        )

    def prepare(self) -> None:
        cfg = self.project.load_config()
        self.migrate()
        self.set_gpu_pool(cfg.schedule.gpus)

    def dags_test(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> float:
        """``airflow dags test`` one DAG; returns its wall time. Raises StageError on failure."""
        args = ["dags", "test", dag_id]
        if conf:
            args += ["--conf", json.dumps(conf)]
        print(f"\n== airflow {shlex.join(args)}", flush=True)
        start = time.perf_counter()
        env = self.env()
        # An interactive run should fail in seconds, not wait out the scheduled retry delays.
        env.setdefault("TASKS_RETRY_DELAY_SECONDS", "3")
        cause = ""
        # `dags test` runs the tasks in its own process: their logs come on its output, not
        # under logs/dag_id=...; a copy is kept to read after the terminal has scrolled.
        transcript = self.home / "logs" / "dags-test" / f"{dag_id}.log"
        transcript.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(transcript, "w") as copy,
            subprocess.Popen(
                [str(self.bin / "airflow"), *args],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            ) as proc,
        ):
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                copy.write(line)
                if "StageFailed: " in line:
                    cause = line.split("StageFailed: ", 1)[1].strip()
        seconds = time.perf_counter() - start
        if proc.returncode:
            detail = f"\n{cause}" if cause else "; the task logs there name the stage"
            raise StageError(
                f"DAG {dag_id} failed (exit {proc.returncode}); its output is in {transcript}"
                f"{detail}"
            )
        return seconds


def stage_seconds(project: Project, dataset: str) -> float:
    """Seconds the stage commands of the dataset's latest run took (from its workspace record)."""
    path = project.workspace(dataset) / WORKSPACE_RECORD
    if not path.exists():
        return 0.0
    stages = json.loads(path.read_text()).get("stages", {})
    return float(sum(entry.get("seconds", 0.0) for entry in stages.values()))


def run_dags(
    airflow: LocalAirflow,
    datasets: Sequence[str] | None = None,
    conf: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``dags test`` each dataset DAG, then the summary DAG; returns timings per DAG."""
    cfg = airflow.project.load_config()
    airflow.prepare()
    timings: dict[str, dict[str, float]] = {}
    for ds in datasets or list(cfg.datasets):
        cfg.dataset(ds)
        total = airflow.dags_test(f"{DAG_PREFIX}{ds}", conf)
        stages = stage_seconds(airflow.project, ds)
        timings[ds] = {"total": total, "stages": stages, "airflow": total - stages}
    timings["summary"] = {"total": airflow.dags_test(SUMMARY_DAG_ID)}
    return timings


def run_sweep(airflow: LocalAirflow, conf: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``dags test`` the sweep DAG with ``conf`` (one that names ``backbones``)."""
    airflow.prepare()
    return {"sweep": {"total": airflow.dags_test(SWEEP_DAG_ID, conf)}}


def sweep_results(project: Project) -> str:
    """Where the latest sweep's comparison is."""
    folder = project.reports / "sweep"
    sweeps = sorted(folder.glob("*/comparison.md"), key=lambda p: p.stat().st_mtime)
    if not sweeps:
        return ""
    latest = sweeps[-1].parent
    plots = " ".join(p.name for p in sorted(latest.glob("pareto_*.png")))
    return f"\nSweep comparison: {latest}/comparison.md (and {plots})\n{sweeps[-1].read_text()}"


MLFLOW_UI_RUNS = "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
"""The MLflow UI's experiments in its model-training view (3.x opens on GenAI otherwise)."""


def where_to_look(project: Project, home: Path) -> str:
    cfg = project.load_config()
    store = project.mlflow_dir
    lines = ["", "Results:"]
    lines.append(f"  summary        {project.reports / 'summary.md'}")
    for ds in cfg.datasets:
        lines.append(f"  {ds:<14} {project.workspace(ds) / 'reports' / ds}/")
    lines += [
        "  MLflow UI      "
        f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
        f"sqlite:///{store / 'mlflow.db'} --port 5000   (then open "
        f"{MLFLOW_UI_RUNS})",
    ]
    for ds, experiment_id in experiment_ids(store / "mlflow.db", list(cfg.datasets)).items():
        url = comparison_url("http://127.0.0.1:5000", experiment_id)
        lines.append(f"  MLflow runs    {ds}: {url}")
    lines += [
        f"  DAG output     {home / 'logs' / 'dags-test'}/<dag id>.log  (the tasks' logs)",
    ]
    lines += experiments_to_restore(project, list(cfg.datasets))
    return "\n".join(lines)


def experiment_ids(db: Path, names: Sequence[str]) -> dict[str, str]:
    """The ids of the experiments ``names`` in the embedded store ``db`` (those it has)."""
    import sqlite3

    if not db.is_file():
        return {}
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT name, experiment_id FROM experiments").fetchall()
    found = {name: str(experiment_id) for name, experiment_id in rows}
    return {name: found[name] for name in names if name in found}


def experiments_to_restore(project: Project, datasets: Sequence[str]) -> list[str]:
    """Each dataset's latest run as a DVC experiment, and the commands that restore it."""
    lines = ["", "DVC experiments (one per DAG run; `dvc exp show` in the project lists them):"]
    for ds in datasets:
        path = project.workspace(ds) / WORKSPACE_RECORD
        record = json.loads(path.read_text()) if path.exists() else {}
        name = record.get("experiment")
        if not name or not record.get("experiment_rev"):
            lines.append(f"  {ds:<14} no recorded run yet")
            continue
        lines.append(f"  {ds:<14} {name}")
        if record.get("git_remote"):
            lines.append(
                f"  {'':<14} restore: cd {record['git_remote']} && dvc exp apply {name}"
                " && dvc pull   (in another clone: dvc exp pull origin first; "
                "docs/reproducing.md, Lineage)"
            )
        else:
            ws = project.workspace(ds)
            lines.append(f"  {'':<14} restore: cd {ws} && dvc exp apply {name} && dvc checkout")
    return lines


def print_timings(timings: Mapping[str, Mapping[str, float]]) -> None:
    print("\nTimings (s): total `airflow dags test`, stage commands, Airflow's share")
    for name, t in timings.items():
        if "stages" in t:
            print(f"  {name:<14} {t['total']:7.1f} {t['stages']:7.1f} {t['airflow']:7.1f}")
        else:
            print(f"  {name:<14} {t['total']:7.1f}")


def stop_group(proc: subprocess.Popen, first: int = signal.SIGINT, grace: float = 20.0) -> int:
    """Stop a process started with ``start_new_session=True`` and everything in its group.

    ``first`` (Ctrl-C by default) lets it shut down cleanly; after ``grace``
    seconds the group gets SIGTERM, then SIGKILL (idle executor workers can
    outlive their scheduler otherwise).
    """
    for sig, wait in ((first, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig != signal.SIGKILL:
            try:  # stragglers left in the group once the leader is gone
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        break
    return proc.wait()


def standalone(airflow: LocalAirflow, mlflow_port: int = 5000) -> int:
    """``airflow standalone`` plus the MLflow UI, until Ctrl-C."""
    airflow.prepare()
    store = airflow.project.mlflow_dir
    store.mkdir(parents=True, exist_ok=True)
    mlflow_ui = subprocess.Popen(
        [
            str(airflow.bin / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
        env=airflow.env(),
        start_new_session=True,
    )
    passwords = airflow.home / "simple_auth_manager_passwords.json.generated"
    print(
        f"\nAirflow UI: http://127.0.0.1:{airflow.port}  user {ADMIN_USER}, password in "
        f"{passwords} (printed below on first start)\nMLflow UI:  http://127.0.0.1:{mlflow_port}"
        "\nDAGs start paused: unpause them in the UI. Ctrl-C stops both.\n",
        flush=True,
    )
    proc = subprocess.Popen(
        [str(airflow.bin / "airflow"), "standalone"], env=airflow.env(), start_new_session=True
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(mlflow_ui, signal.SIGTERM, grace=10.0)
        stop_group(proc)


def _conf(args: argparse.Namespace) -> dict[str, Any] | None:
    conf: dict[str, Any] = json.loads(args.conf) if args.conf else {}
    if not isinstance(conf, dict):
        raise ConfigError('--conf: must be a JSON object, e.g. \'{"backbone": "vgg16"}\'')
    if args.overrides:
        conf.setdefault("set", [])
        if isinstance(conf["set"], dict):
            conf["set"] = [f"{k}={json.dumps(v)}" for k, v in conf["set"].items()]
        conf["set"] = [*conf["set"], *args.overrides]
    return conf or None


# After an error whose fix is a parameter override: how `make run` spells one.
MAKE_RUN_HINT = (
    "hint: `make run` takes such overrides as SET='key=value' (several separated by spaces), "
    "e.g. make run SET='datasets.cats_vs_dogs.mirrors=[\"file:///path/to.zip\"]'; with no "
    "network at all, `make demo` runs the same DAGs on generated data"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.dev.airflow_local", description=__doc__)
    parser.add_argument("command", choices=["run", "standalone"])
    parser.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    parser.add_argument("--conf", help='DAG run conf, e.g. \'{"backbone": "vgg16"}\'')
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--home", help="AIRFLOW_HOME (default: <state>/.airflow)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW_PORT", 8080)))
    args = parser.parse_args(argv)
    project = Project.from_env()
    home = Path(args.home) if args.home else project.state / ".airflow"
    airflow = LocalAirflow(project, home.resolve(), port=args.port)
    try:
        if args.command == "standalone":
            return standalone(airflow)
        conf = _conf(args)
        if conf and {"backbones", "recipes"} & set(conf):  # a sweep, compared
            timings = run_sweep(airflow, conf)
            print(sweep_results(project))
        else:
            timings = run_dags(airflow, args.dataset, conf)
    except (ConfigError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        if "--set '" in str(error):
            print(MAKE_RUN_HINT, file=sys.stderr)
        return 2
    print_timings(timings)
    print(where_to_look(project, home))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
