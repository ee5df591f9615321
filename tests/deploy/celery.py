"""The team topology as real processes on 127.0.0.1: Airflow's CeleryExecutor on Redis.

PostgreSQL holds Airflow's metadata (and Celery's results), Redis is the broker,
and Airflow runs as a team deploys it: the API server (the workers' execution
API), the scheduler, the DAG processor, and Celery workers: one on the
``default`` queue, and GPU workers on the ``gpu`` queue, each with its own
``TASKS_GPUS`` (two fake device ids, so the GPU claim runs) and its own lock
folder, as if each were another machine. Every process can be stopped, killed
(its whole process group, as a machine dies) and started again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.dev.httpserver import unused_port
from tests.deploy.stack import BIN, DB, REPO, Postgres, Process, base_env, http_ok, wait_until

GPU_WORKERS = {"gpu-a": "0,1", "gpu-b": "2,3"}
"""Each GPU worker's fake device ids (``TASKS_GPUS``)."""
HOSTNAME_ENV = "CELERY_TEST_HOSTNAME"
"""Each worker's machine name, as Airflow records it (``core.hostname_callable``)."""
HOSTNAME_MODULE = """import os, socket


def hostname():
    return os.environ.get("CELERY_TEST_HOSTNAME") or socket.getfqdn()
"""
HEARTBEAT_TIMEOUT = 20
RETRY_DELAY = 8
"""The DAG's first retry delay (doubling after): three tries span a broker outage of 20 s."""
"""Seconds without a heartbeat before the scheduler fails a task whose worker is gone."""


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Topology:
    """The running stack: its processes by name, and how to start each again."""

    base: Path
    pg: Postgres
    env: dict[str, str]
    redis_port: int
    api_port: int
    procs: dict[str, Process] = field(default_factory=dict)

    # ------------------------------------------------------------------ processes

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        airflow = str(BIN / "airflow")
        env = dict(self.env)
        if name == "redis":
            args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no"]  # fmt: skip
        elif name == "api-server":
            args = [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port)]
        elif name in ("scheduler", "dag-processor"):
            args = [airflow, name]
        elif name == "worker-default":
            args = [airflow, "celery", "worker", "--queues", "default", "--concurrency", "2",
                    "--celery-hostname", "default@cpu-host"]  # fmt: skip
            env[HOSTNAME_ENV] = "cpu-host"
        elif name in GPU_WORKERS:
            args = [airflow, "celery", "worker", "--queues", "gpu", "--concurrency", "1",
                    "--celery-hostname", f"{name}@{name}-host"]  # fmt: skip
            env |= {
                "TASKS_GPUS": GPU_WORKERS[name],
                "TASKS_GPU_LOCKS": str(self.locks(name)),
                HOSTNAME_ENV: f"{name}-host",
            }
        else:
            raise KeyError(name)
        return args, env

    def locks(self, worker: str) -> Path:
        return self.base / f"gpu-locks-{worker}"

    def start(self, name: str) -> Process:
        args, env = self.command(name)
        log = self.base / f"{name}.log"
        with open(log, "ab") as out:  # appended to: a restarted process keeps its history
            out.write(f"\n=== started {time.strftime('%H:%M:%S')}\n".encode())
            popen = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = Process(name, popen, log)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> float:
        """SIGKILL the process and every process it started, whatever their session (a
        machine gone: the task runner and its ``dvc repro`` and stage process go with it);
        returns when."""
        proc = self.procs[name]
        doomed = [proc.popen.pid, *descendants(proc.popen.pid)]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.popen.wait(10)
        return time.time()

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop(timeout=15)
        self.pg.stop()

    def restart_worker(self, name: str, timeout: float = 180) -> None:
        """Start a Celery worker again (its machine is back) and wait until it is ready."""
        log = self.base / f"{name}.log"
        seen = log.stat().st_size
        proc = self.start(name)

        def ready() -> bool:
            proc.check_alive()
            with open(log, "rb") as handle:
                handle.seek(seen)
                return b" ready." in handle.read()

        wait_until(ready, timeout, f"celery {name} again", log)

    # ------------------------------------------------------------------ readiness

    def wait_ready(self) -> None:
        wait_until(lambda: redis_ping(self.redis_port), 30, "redis", self.base / "redis.log")
        api = self.procs["api-server"]
        wait_until(
            lambda: api.check_alive() and http_ok(f"http://127.0.0.1:{self.api_port}/api/v2/monitor/health"),
            180, "api-server", api.log,
        )  # fmt: skip
        for name in ("worker-default", *GPU_WORKERS):
            proc = self.procs[name]
            wait_until(
                lambda proc=proc: proc.check_alive() and b" ready." in proc.log.read_bytes(),
                180, f"celery {name}", proc.log,
            )  # fmt: skip

    # ------------------------------------------------------------------ airflow

    def airflow(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if done.returncode:
            raise AssertionError(
                f"airflow {' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def sql(self, query: str, args=()) -> list:
        return self.pg.query(
            DB["AIRFLOW_DB_USER"], DB["AIRFLOW_DB_PASSWORD"], "airflow", query, args
        )

    def wait_dag(self, dag_id: str, timeout: float) -> None:
        def parsed() -> bool:
            self.check_alive()
            return bool(self.sql("SELECT 1 FROM dag WHERE dag_id = %s", (dag_id,)))

        wait_until(parsed, timeout, f"DAG {dag_id} parsed", self.base / "dag-processor.log")

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        rows = self.sql(
            "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id)
        )
        return rows[0][0] if rows else None

    def check_alive(self) -> bool:
        for name, proc in self.procs.items():
            if name != "redis":
                proc.check_alive()
        return True

    def tasks(self, dag_id: str, run_id: str) -> dict[tuple[str, int], dict]:
        """The run's task instances (this try's and earlier tries'), by (task, map index)."""
        rows = self.sql(
            "SELECT task_id, map_index, state, try_number, hostname, queue, start_date, end_date"
            " FROM task_instance WHERE dag_id = %s AND run_id = %s",
            (dag_id, run_id),
        )
        keys = ("task_id", "map_index", "state", "try_number", "hostname", "queue", "start", "end")
        return {(row[0], row[1]): dict(zip(keys, row, strict=True)) for row in rows}

    def tries(self, dag_id: str, run_id: str, task_id: str) -> list[dict]:
        """Every try of a task (Airflow 3 keeps them in task_instance_history)."""
        rows = self.sql(
            "SELECT try_number, state, hostname, queue, start_date, end_date"
            " FROM task_instance_history WHERE dag_id = %s AND run_id = %s AND task_id = %s"
            " ORDER BY try_number",
            (dag_id, run_id, task_id),
        )
        keys = ("try_number", "state", "hostname", "queue", "start", "end")
        return [dict(zip(keys, row, strict=True)) for row in rows]


def start_topology(base: Path, project: Path, extra_env: dict[str, str]) -> Topology:
    """PostgreSQL, Redis, the Airflow services and the Celery workers, ready."""
    pg = Postgres().start()
    try:
        subprocess.run(
            ["bash", str(REPO / "docker/postgres/init-databases.sh")],
            env=base_env(**pg.env(), **DB), check=True, capture_output=True,
        )  # fmt: skip
        redis_port, api_port = unused_port(), unused_port()
        (base / "hooks").mkdir()
        (base / "hooks" / "celery_test_hostname.py").write_text(HOSTNAME_MODULE)
        conn = pg.url(
            DB["AIRFLOW_DB_USER"], DB["AIRFLOW_DB_PASSWORD"], "airflow", "postgresql+psycopg2"
        )
        env = base_env(
            AIRFLOW_HOME=str(base / "airflow"),
            AIRFLOW__CORE__DAGS_FOLDER=str(project / "dags"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
            AIRFLOW__API_AUTH__JWT_SECRET="celery-test-jwt-secret-0123456789",
            AIRFLOW__API__SECRET_KEY="celery-test-api-secret",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=conn,
            AIRFLOW__CELERY__BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
            AIRFLOW__CELERY__RESULT_BACKEND=f"db+{conn}",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT),
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
            AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT="90",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="10",
            AIRFLOW__CORE__HOSTNAME_CALLABLE="celery_test_hostname.hostname",
            PYTHONPATH=f"{project}{os.pathsep}{base / 'hooks'}",
            TASKS_PROJECT=str(project),
            TASKS_STATE_DIR=str(project),
            TASKS_RETRY_DELAY_SECONDS=str(RETRY_DELAY),
            DVC_NO_ANALYTICS="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            **extra_env,
        )
        topology = Topology(base, pg, env, redis_port, api_port)
    except BaseException:
        pg.stop()
        raise
    try:
        topology.start("redis")
        topology.airflow("db", "migrate", timeout=300)
        topology.airflow("pools", "set", "gpu", "2", "GPU tasks")
        for name in ("api-server", "scheduler", "dag-processor", "worker-default", *GPU_WORKERS):
            topology.start(name)
        topology.wait_ready()
        return topology
    except BaseException:
        topology.stop_all()
        raise
