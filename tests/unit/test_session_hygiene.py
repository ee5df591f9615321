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
from pathlib import Path

from tests.conftest import REPO

FORGETFUL = """
import pathlib, subprocess, tempfile
from tests.conftest import nothing_left_behind  # noqa: F401  (the suite's autouse check)

def test_forgets_its_server_and_folder():
    server = subprocess.Popen(["sleep", "300"], start_new_session=True)
    pathlib.Path("server.pid").write_text(str(server.pid))
    tempfile.mkdtemp(prefix="stack-postgres-")
"""


def _running(pid: str) -> bool:
    """Whether the process runs (a killed one waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _session(folder: Path, test: str) -> subprocess.CompletedProcess:
    """A pytest session of its own on ``test`` (a module's source), run in ``folder``."""
    (folder / "test_inner.py").write_text(textwrap.dedent(test))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO), "TESTS_LEFTOVER_GRACE_S": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_session_that_leaves_a_process_and_a_folder_fails_naming_them(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("stack-postgres-*"))
    run = _session(tmp_path, FORGETFUL)
    made = set(Path(tempfile.gettempdir()).glob("stack-postgres-*")) - before
    for folder in made:
        folder.rmdir()
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 passed, 1 error" in run.stdout
    assert "the tests left behind" in run.stdout
    pid = (tmp_path / "server.pid").read_text()
    assert f"process {pid}: sleep 300" in run.stdout
    assert len(made) == 1 and f"temp folder {made.pop()}" in run.stdout
    assert not _running(pid)  # killed at the session's end


def test_a_session_that_cleans_up_passes(tmp_path):
    run = _session(
        tmp_path,
        """
        import shutil, subprocess, tempfile
        from tests.conftest import nothing_left_behind  # noqa: F401

        def test_stops_its_server_and_removes_its_folder():
            proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
            shutil.rmtree(tempfile.mkdtemp(prefix="stack-postgres-"))
            proc.kill()
            proc.wait()
        """,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 passed" in run.stdout and "left behind" not in run.stdout
