"""One task, its own GPUs (tasks.gpus): claims by real processes on real lock files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import StageError
from tasks.gpus import parse_ids

HOLDER = """
import os, sys, time
from tasks.gpus import claim_gpus
claim = claim_gpus()
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
journal = sys.argv[2] if len(sys.argv) > 2 else None
if journal:
    open(journal, "a").write(f"{os.getpid()} claimed\\n")
time.sleep(float(sys.argv[1]))
if journal:
    open(journal, "a").write(f"{os.getpid()} done\\n")
"""


def _env(locks: Path, gpus: str = "0,1,2", per_task: int = 1, wait: float = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_GPU")}
    env.update(
        TASKS_GPUS=gpus,
        TASKS_GPUS_PER_TASK=str(per_task),
        TASKS_GPU_LOCKS=str(locks),
        TASKS_GPU_WAIT_SECONDS=str(wait),
    )
    return env


def _hold(
    locks: Path, seconds: float = 60, *journal: str, **kwargs
) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(seconds), *journal],
        env=_env(locks, **kwargs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return proc, line


def test_concurrent_tasks_get_disjoint_gpus_and_a_killed_task_frees_its_own(tmp_path):
    first, a = _hold(tmp_path)
    second, b = _hold(tmp_path, per_task=2)
    try:
        assert a == "0"
        assert b == "1,2"
        third = subprocess.run(
            [sys.executable, "-c", HOLDER, "0"],
            env=_env(tmp_path, wait=0),
            capture_output=True,
            text=True,
        )
        assert third.returncode != 0
        assert (
            "no 1 free GPU(s) among TASKS_GPUS=0,1,2 after 0 s (held by other tasks); size the "
            "Airflow gpu pool to the GPU count divided by TASKS_GPUS_PER_TASK"
        ) in third.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
        again, c = _hold(tmp_path)
        again.kill()
        assert c == "0"  # the kernel dropped the killed task's lock
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_task_waits_for_a_gpu_to_be_freed(tmp_path):
    journal = str(tmp_path / "journal")
    holder, _ = _hold(tmp_path, 2, journal, gpus="0")
    waiter = subprocess.run(
        [sys.executable, "-c", HOLDER, "0", journal],
        env=_env(tmp_path, gpus="0", wait=120),
        capture_output=True,
        text=True,
    )
    holder.wait()
    assert waiter.returncode == 0, waiter.stderr
    assert waiter.stdout.strip() == "0"
    events = [line.split()[1] for line in Path(journal).read_text().splitlines()]
    assert events == ["claimed", "done", "claimed", "done"]  # one at a time, never both


def test_without_tasks_gpus_nothing_is_claimed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_GPU")}
    env["CUDA_VISIBLE_DEVICES"] = "5"
    out = subprocess.run(
        [sys.executable, "-c", "from tasks.gpus import claim_gpus; import os; "
         "print(claim_gpus(), os.environ['CUDA_VISIBLE_DEVICES'])"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["None", "5"]


def test_claiming_after_tensorflow_started_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['tensorflow'] = object(); "
         "from tasks.gpus import claim_gpus; claim_gpus()"],
        env=_env(tmp_path), capture_output=True, text=True,
    )  # fmt: skip
    assert "TASKS_GPUS is set but TensorFlow was imported before the GPUs were claimed" in (
        out.stderr
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0,gpu1", "'gpu1' is not a GPU index or UUID; list the worker's GPUs as in "),
        ("0,0", "names a GPU twice; list each GPU once"),
    ],
)
def test_bad_gpu_lists_name_the_problem(value, message):
    with pytest.raises(StageError, match=message):
        parse_ids(value)


def test_ids_and_uuids_are_read_as_cuda_visible_devices_writes_them():
    assert parse_ids(" 0, 1,3 ") == ("0", "1", "3")
    assert parse_ids("GPU-8f6c,MIG-1a2b") == ("GPU-8f6c", "MIG-1a2b")
    assert parse_ids("") == ()


def test_more_gpus_per_task_than_listed_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", HOLDER, "0"], env=_env(tmp_path, gpus="0", per_task=2),
        capture_output=True, text=True,
    )  # fmt: skip
    assert (
        "TASKS_GPUS_PER_TASK=2 but TASKS_GPUS names only 1 GPU(s) (0); lower "
        "TASKS_GPUS_PER_TASK or list more GPUs"
    ) in out.stderr
