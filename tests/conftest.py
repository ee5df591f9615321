"""Shared fixtures: tiny generated data, never the network."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Quiet, deterministic, offline defaults for every test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# No tool phones home from a test (the socket guard would refuse it and fail the test).
for _name, _value in {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
    "GX_ANALYTICS_ENABLED": "False",
}.items():
    os.environ.setdefault(_name, _value)


# What a DAG run needs of the project: the copies the end-to-end tests make.
PIPELINE_FILES = (
    "tasks",
    "dags",
    "dvc.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
    "data/feedback/README.md",  # validate's data/feedback dep must exist
)


def copy_project(dst: Path, items: Sequence[str]) -> Path:
    """The project's ``items`` (files or folders, without bytecode) copied under ``dst``."""
    for item in items:
        src, target = REPO / item, dst / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    return dst


def git_project(
    dst: Path, items: Sequence[str], params: dict | None = None, env: dict | None = None
) -> Path:
    """:func:`copy_project`, with ``params`` as its params.yaml, committed to a fresh git
    repository: the checkout a user clones or a deployment holds."""
    copy_project(dst, items)
    if params is not None:
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (
        ["init", "-q"],
        ["config", "user.email", "ci@example.com"],
        ["config", "user.name", "CI"],
        ["add", "-A"],
        ["commit", "-qm", "project"],
    ):
        subprocess.run(["git", *args], cwd=dst, env=env, check=True, capture_output=True)
    return dst


# Every process the session starts inherits this variable (unless given an environment
# built from nothing); the session's end finds leftovers by it, orphans included.
SESSION_MARK = "TESTS_SESSION_ID"
# Folders the session keeps in its temp folder on purpose (removed with it at the end).
SESSION_FOLDERS: set[Path] = set()
_NETWORK_LOG = ".network.log"
_OWN_TMP = pytest.StashKey[Path]()
# Repo-root entries tools make while the suite runs (coverage's data files, the caches of
# pytest and import-linter; each is git-ignored).
_ROOT_TOOL_FILES = (".coverage", ".pytest_cache", ".import_linter_cache")


def pytest_configure(config):
    """Every process of this session writes its temp files in one folder of its own.

    ``TMPDIR`` points there (the processes it starts inherit it, and xdist's workers make
    theirs inside it); pytest's own ``tmp_path`` folders stay where they were. The socket
    guard goes on here, for this process and, via ``PYTHONPATH``, the ones it starts.
    """
    from tests.netguard import netguard

    root = os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    own = Path(tempfile.mkdtemp(prefix="tests-tmp-", dir=os.environ.get("TMPDIR") or root))
    own.chmod(0o1777)  # as /tmp: the servers run as other users (PostgreSQL) write there too
    os.environ["TMPDIR"] = str(own)
    tempfile.tempdir = None
    config.stash[_OWN_TMP] = own
    os.environ[netguard.LOG_VARIABLE] = str(own / _NETWORK_LOG)
    guard = str(REPO / "tests/netguard")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [guard, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    netguard.install()


def pytest_unconfigure(config):
    own = config.stash.get(_OWN_TMP, None)
    if own is not None:
        if not os.environ.get("DEBUG_KEEP_TMP"):
            shutil.rmtree(own, ignore_errors=True)


def _session_processes(token: str) -> dict[int, str]:
    """Live processes (not this one) whose environment carries ``SESSION_MARK=token``."""
    needle = f"{SESSION_MARK}={token}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if command.strip():  # a zombie has no command line: its parent reaps it
            found[pid] = command.strip()[:200]
    return found


# What libraries keep in TMPDIR: TensorFlow's autograph sources and their bytecode (removed
# at exit), a session stamp its native code writes while converting a model, the lock file
# MLflow takes to create a database's tables (kept on purpose, one per database), and
# multiprocessing's socket folder (removed at exit).
_LIBRARY_TEMP = ("__autograph_generated_file", "__pycache__", ".ses", "db_init_lock-", "pymp-")


def _temp_left(own: Path) -> list[Path]:
    return sorted(
        p
        for p in own.iterdir()
        if p.name != _NETWORK_LOG
        and not p.name.startswith(_LIBRARY_TEMP)
        and p.resolve() not in SESSION_FOLDERS
    )


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(request):
    """At the session's end no process it started runs and its temp folder is empty.

    A leftover fails the teardown of the last test (an error in the report, naming each
    process and file); the processes are then killed so that they do not outlive the run,
    and the folder goes with the session.
    """
    token = f"{os.getpid()}-{time.time_ns()}"
    os.environ[SESSION_MARK] = token
    yield
    # servers being stopped get a moment to exit
    deadline = time.monotonic() + float(os.environ.get("TESTS_LEFTOVER_GRACE_S", "10"))
    while (left := _session_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    problems = [f"process {pid}: {command}" for pid, command in sorted(left.items())]
    problems += [
        f"temp folder {p}"
        + (f" (holding {', '.join(sorted(os.listdir(p))[:4])})" if p.is_dir() else "")
        for p in _temp_left(request.config.stash[_OWN_TMP])
    ]
    if problems:
        pytest.fail("the tests left behind (now killed / to remove):\n  " + "\n  ".join(problems))


@pytest.fixture(scope="session")
def _invariant_state(request, tmp_path_factory):
    from tests.invariants import RunningRuns

    own = request.config.stash[_OWN_TMP]
    log = own / _NETWORK_LOG
    log.touch()
    roots = [RunningRuns(tmp_path_factory.getbasetemp()), RunningRuns(own)]
    return {"roots": roots, "log": log, "offset": 0, "repo": set(os.listdir(REPO)), "seen": set()}


@pytest.fixture(autouse=True)
def leaves_things_as_it_found_them(_invariant_state):
    """After every test: no MLflow run left RUNNING in any store under the session's temp
    folders, none open in this process, no new entry in the project folder, and no
    connection beyond loopback (tests/invariants.py, tests/netguard)."""
    from tests.invariants import active_run

    yield
    state = _invariant_state
    running = {run for root in state["roots"] for run in root.check()} - state["seen"]
    state["seen"] |= running  # each reported once, by the test that left it
    problems = [f"MLflow run left RUNNING: {run}" for run in sorted(running)]
    if run_id := active_run():
        problems.append(f"MLflow run {run_id} still active in the test process")
    new = sorted(
        name for name in set(os.listdir(REPO)) - state["repo"]
        if not name.startswith(_ROOT_TOOL_FILES)
    )  # fmt: skip
    problems += [f"new entry in the project folder: {REPO / name}" for name in new]
    with state["log"].open(encoding="utf-8") as log:
        log.seek(state["offset"])
        refused = log.read()
        state["offset"] = log.tell()
    problems += [f"connection beyond loopback: {line}" for line in refused.splitlines()]
    if problems:
        state["repo"] |= set(new)  # reported once, not again by every later test
        pytest.fail("the test left behind:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def write_params(tmp_path):
    """Write a params mapping to ``tmp_path/params.yaml``; returns its path."""

    def _write(params: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    return _write


@pytest.fixture(scope="session")
def archive_server():
    """A loopback HTTP server for the whole session: ``archive_server.add(path, bytes, **faults)``.

    Returns the URL; faults and the request log are per path (see tasks/dev/httpserver.py).
    """
    from tasks.dev.httpserver import ArchiveServer

    with ArchiveServer() as server:
        yield server


@pytest.fixture(scope="session")
def offline_weights(tmp_path_factory) -> Path:
    """A MobileNetV2 ``.weights.h5`` pretrained offline at 32 px (made once per session).

    ``tasks.dev.offline_weights.make_offline_weights`` pretrains it on a generated
    source task: with random weights the frozen features are collapsed and a head
    stays at chance (the tiny pipelines then score 0.5, a one-class model), so every
    run that must learn (the model tests, the e2e and deploy pipelines) uses this
    real weights file, made without the network.
    """
    from tasks.dev.offline_weights import make_offline_weights

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_32.weights.h5"
    return make_offline_weights("mobilenet_v2", path, image_size=32)
