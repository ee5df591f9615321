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
# Temporary folders tests make outside pytest's tmp_path, each removed by its owner.
OWN_TEMP_PREFIXES = ("stack-postgres-",)


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


def _own_temp_dirs() -> set[str]:
    return {
        p.name
        for p in Path(tempfile.gettempdir()).iterdir()
        if p.name.startswith(OWN_TEMP_PREFIXES)
    }


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """At the session's end no process it started runs and no temp folder of ours is left.

    A leftover fails the teardown of the last test (an error in the report, naming each
    process and folder); the processes are then killed so that they do not outlive the run.
    """
    token = f"{os.getpid()}-{time.time_ns()}"
    os.environ[SESSION_MARK] = token
    temp_before = _own_temp_dirs()
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
    temp_left = sorted(_own_temp_dirs() - temp_before)
    problems = [f"process {pid}: {command}" for pid, command in sorted(left.items())]
    problems += [f"temp folder {Path(tempfile.gettempdir()) / name}" for name in temp_left]
    if problems:
        pytest.fail("the tests left behind (now killed / to remove):\n  " + "\n  ".join(problems))


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
