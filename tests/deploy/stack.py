"""The compose stack's services as real processes on 127.0.0.1, for tests without Docker.

PostgreSQL from the distribution's server binaries (run as the ``postgres`` user
when we are root: the server refuses to run as root), an S3 endpoint from
``moto_server``, and the MLflow server started through ``mlflow/serve.sh`` with the
same environment the compose file gives it. Every process is started in its own
session and stopped, with its children, by :meth:`Process.stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.dev.httpserver import unused_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INSTALL_HINT = "run `bash tests/deploy/install_stack_deps.sh` (installs Debian's postgresql)"


# The same names as docker/.env.example; the values are throwaway test secrets.
DB = {
    "AIRFLOW_DB_USER": "airflow",
    "AIRFLOW_DB_PASSWORD": "airflow-test-pw",
    "AIRFLOW_DB_NAME": "airflow",
    "MLFLOW_DB_USER": "mlflow",
    "MLFLOW_DB_PASSWORD": "mlflow-test-pw",
    "MLFLOW_DB_NAME": "mlflow",
}

# What moto_server (werkzeug) and mlflow server (uvicorn) print once they listen.
LISTENING = re.compile(r"running on https?://127\.0\.0\.1:(\d+)", re.IGNORECASE)


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tail}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment, minus anything that points at another store.

    Bytecode caching stays on: every server and client here imports mlflow or
    airflow, and recompiling them in each process costs seconds.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "AWS_", "AIRFLOW", "DVC_", "PG", "TASKS_"))
        and k != "PYTHONDONTWRITEBYTECODE"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class Process:
    """A started server: its Popen, its log file, stopped with its whole process group."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, args: Sequence[str], env: dict[str, str], log: Path) -> Process:
        handle = open(log, "wb")  # noqa: SIM115 - owned by the child
        popen = subprocess.Popen(
            list(args), env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()
        return cls(name, popen, log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> bool:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")
        return True

    def announced_port(self, timeout: float) -> int:
        """The port a server started on port 0 says it listens on (its log's first
        ``Running on http://127.0.0.1:PORT``)."""
        found: list[int] = []

        def listening() -> bool:
            self.check_alive()
            match = LISTENING.search(self.log.read_text(errors="replace"))
            if match:
                found.append(int(match.group(1)))
            return bool(match)

        wait_until(listening, timeout, f"{self.name} listening", self.log)
        return found[0]

    def stop(self, timeout: float = 5) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        try:  # children that outlived their parent (uvicorn workers)
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def install_failure() -> str:
    """The last lines of a failed ``install_stack_deps.sh`` run, or "" (see that script)."""
    log = Path(os.environ.get("STACK_DEPS_LOG", REPO / ".venv" / "stack-deps-failed.log"))
    if not log.is_file():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-3:])


def postgres_bin() -> Path:
    """The folder with ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    bindirs = os.environ.get("POSTGRES_BINDIRS", "/usr/lib/postgresql/*/bin")
    candidates = sorted(
        glob.glob(f"{bindirs}/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        failed = install_failure()
        reason = f"the install failed: {failed}" if failed else INSTALL_HINT
        raise RuntimeError(f"PostgreSQL server binaries not found; {reason}")
    return Path(candidates[-1]).parent


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with password (scram) logins."""

    password: str = "stack-superuser"
    superuser: str = "postgres"
    port: int = field(default_factory=unused_port)
    root: Path | None = None

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return args
        try:
            pwd.getpwnam("postgres")
        except KeyError as error:
            raise RuntimeError(f"no 'postgres' user to run the server; {INSTALL_HINT}") from error
        return ["runuser", "-u", "postgres", "--", *args]

    def start(self) -> Postgres:
        bindir = postgres_bin()
        # Not under pytest's tmp_path: its parents are 0700 root, unreadable to `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="stack-postgres-"))
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        data = self.root / "data"
        subprocess.run(
            self._as_owner(
                [
                    str(bindir / "initdb"),
                    "-D", str(data),
                    "-U", self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "-E", "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )  # fmt: skip
        # PostgreSQL cannot bind port 0: a free port is picked (unused_port), and picked
        # again when another process took it between the pick and the bind.
        for attempt in range(5):
            if attempt:
                self.port = unused_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port}"
                f" -c unix_socket_directories={self.root}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            log = self.root / "log"
            seen = log.stat().st_size if log.exists() else 0  # pg_ctl -l appends
            started = subprocess.run(
                self._as_owner(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log),
                     "-o", options, "-w", "-t", "30", "start"]
                ),
                capture_output=True,
                text=True,
            )  # fmt: skip
            if started.returncode == 0:
                break
            server_log = log.read_bytes()[seen:].decode(errors="replace") if log.exists() else ""
            if "could not bind" not in server_log:
                raise RuntimeError(
                    f"pg_ctl start failed (exit {started.returncode}): "
                    f"{started.stderr.strip()}\n{server_log[-2000:]}"
                )
        else:
            raise RuntimeError(f"PostgreSQL could not bind a free port in 5 tries:\n{server_log}")
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        subprocess.run(
            self._as_owner(
                [str(postgres_bin() / "pg_ctl"), "-D", str(self.root / "data"),
                 "-m", "immediate", "-w", "stop"]
            ),
            capture_output=True,
        )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def env(self) -> dict[str, str]:
        """libpq settings for psql as the superuser (what init-databases.sh reads)."""
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": self.superuser,
            "PGPASSWORD": self.password,
        }

    def url(self, user: str, password: str, db: str, driver: str = "postgresql") -> str:
        return f"{driver}://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def query(self, user: str, password: str, db: str, sql: str, args: Sequence = ()) -> list:
        import psycopg2

        with (
            psycopg2.connect(
                host="127.0.0.1", port=self.port, user=user, password=password, dbname=db
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(sql, args)
            return cur.fetchall()


def start_moto(log: Path) -> tuple[Process, str]:
    proc = Process.start(
        "moto_server",
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", "0"],
        base_env(),
        log,
    )
    url = f"http://127.0.0.1:{proc.announced_port(30)}"
    wait_until(lambda: proc.check_alive() and http_ok(f"{url}/moto-api/"), 30, "moto_server", log)
    return proc, url
