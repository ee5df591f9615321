"""One way to run a command for the orchestration layer and report its failure.

A stage, git or an MLflow helper runs as a process (MLflow's store migrations and
TensorFlow stay out of the Airflow worker). A failure becomes one line: what was
being done and the last line the process printed on stderr (else stdout).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tasks.errors import StageError


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The last line a finished process printed (stderr first), without ``error: ``."""
    text = proc.stderr.strip() or proc.stdout.strip() or "no output"
    return text.splitlines()[-1].removeprefix("error: ")


def run_checked(
    argv: Sequence[str], doing: str, *, cwd: Path, env: Mapping[str, str] | None = None
) -> str:
    """Run ``argv`` in ``cwd``; its stdout. On failure a :class:`StageError`:
    ``"<doing>: <the process's last line>"``."""
    proc = subprocess.run(
        list(argv), cwd=cwd, capture_output=True, text=True, env=None if env is None else dict(env)
    )
    if proc.returncode:
        raise StageError(f"{doing}: {last_line(proc)}")
    return proc.stdout
