"""The suite's own check: a session that leaves a process or a temp folder behind fails.

A pytest session is run on one test that starts a server-like process and makes a
``stack-postgres-*`` folder, then forgets both: the session must fail naming them, and
the process must not outlive it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests.conftest import REPO

FORGETFUL = """
import subprocess, tempfile
from tests.conftest import nothing_left_behind  # noqa: F401  (the suite's autouse check)

def test_forgets_its_server_and_folder():
    subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
    tempfile.mkdtemp(prefix="stack-postgres-")
"""


def _alive(marker: str) -> list[str]:
    alive = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command[:2] == [b"sleep", marker.encode()]:
            alive.append(proc.name)
    return alive


def test_a_session_that_leaves_a_process_and_a_folder_fails_naming_them(tmp_path):
    marker = f"{int(time.time()) % 1000 + 1000}.{os.getpid()}"  # an unusual sleep length
    (tmp_path / "test_forgetful.py").write_text(textwrap.dedent(FORGETFUL.format(marker=marker)))
    before = set(Path(tempfile.gettempdir()).glob("stack-postgres-*"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "TESTS_LEFTOVER_GRACE_S": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    made = set(Path(tempfile.gettempdir()).glob("stack-postgres-*")) - before
    for folder in made:
        folder.rmdir()
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 passed, 1 error" in run.stdout
    assert "the tests left behind" in run.stdout
    assert f"sleep {marker}" in run.stdout
    assert len(made) == 1 and f"temp folder {made.pop()}" in run.stdout
    assert _alive(marker) == []  # killed at the session's end


def test_a_session_that_cleans_up_passes(tmp_path):
    (tmp_path / "test_tidy.py").write_text(
        textwrap.dedent(
            """
            import shutil, subprocess, tempfile
            from tests.conftest import nothing_left_behind  # noqa: F401

            def test_stops_its_server_and_removes_its_folder():
                proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
                shutil.rmtree(tempfile.mkdtemp(prefix="stack-postgres-"))
                proc.kill()
                proc.wait()
            """
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 passed" in run.stdout and "left behind" not in run.stdout
