"""One task, its own GPUs: a stage process claims GPUs no other task holds.

A GPU worker that runs several tasks at once (a Celery worker with
``--concurrency`` equal to its GPU count, ``airflow standalone`` on a GPU
workstation) names the GPUs its tasks share in ``TASKS_GPUS`` (e.g.
``0,1,2,3``, or ``all``: those in ``CUDA_VISIBLE_DEVICES``, else every GPU
``nvidia-smi`` lists). Each stage process that trains or scores claims
``TASKS_GPUS_PER_TASK`` of them (default 1) before TensorFlow starts, by
taking an exclusive ``flock`` on ``<TASKS_GPU_LOCKS>/gpu-<id>.lock``, and sets
``CUDA_VISIBLE_DEVICES`` to exactly those: TensorFlow then sees only them (as
``GPU:0``...). The locks belong to the process, so the kernel drops them when
it exits, however it exits (a SIGKILL or an OOM kill included): a crashed
task never strands a GPU.

Without ``TASKS_GPUS`` nothing is claimed and the process sees whatever it was
given: a Kubernetes pod or Docker container gets its own GPUs from the runtime
(``TASKS_GPUS_PER_TASK`` is the count it requests), a laptop has one.

Cheap to import: no TensorFlow here (it must not be loaded before the claim).
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tasks.contract import GPU_LOCKS_ENV, GPU_WAIT_ENV, GPUS_ENV, GPUS_PER_TASK_ENV
from tasks.errors import StageError

log = logging.getLogger(__name__)

DEFAULT_LOCKS = "/tmp/tasks-gpu-locks"
DEFAULT_WAIT = 600.0


@dataclass
class GpuClaim:
    """The GPUs this process holds (their lock files stay open until it exits)."""

    ids: tuple[str, ...]
    handles: list[IO[str]] = field(default_factory=list, repr=False)

    def release(self) -> None:
        for handle in self.handles:
            handle.close()
        self.handles.clear()


_held: GpuClaim | None = None


def claim_gpus(env: Mapping[str, str] | None = None, poll_seconds: float = 1.0) -> GpuClaim | None:
    """Claim this process's GPUs and restrict ``CUDA_VISIBLE_DEVICES`` to them.

    Returns None when ``TASKS_GPUS`` is unset. Waits up to
    ``TASKS_GPU_WAIT_SECONDS`` (default 600) while every GPU is held by other
    tasks, then fails with a one-line error. Claiming twice in one process
    returns the first claim.
    """
    global _held
    env = os.environ if env is None else env
    if _held is not None:
        return _held
    ids = worker_gpus(env)
    if not ids:
        return None
    if "tensorflow" in sys.modules:
        raise StageError(
            f"{GPUS_ENV} is set but TensorFlow was imported before the GPUs were claimed; "
            "claim them first (tasks.gpus.claim_gpus) so the task sees only its own"
        )
    count = _positive_int(env, GPUS_PER_TASK_ENV, 1)
    if count > len(ids):
        raise StageError(
            f"{GPUS_PER_TASK_ENV}={count} but {GPUS_ENV} names only {len(ids)} GPU(s) "
            f"({','.join(ids)}); lower {GPUS_PER_TASK_ENV} or list more GPUs"
        )
    folder = Path(env.get(GPU_LOCKS_ENV) or DEFAULT_LOCKS)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StageError(
            f"cannot create the GPU lock folder {folder} ({error.strerror}); set {GPU_LOCKS_ENV} "
            "to a writable folder shared by the worker's tasks"
        ) from None
    wait = float(env.get(GPU_WAIT_ENV) or DEFAULT_WAIT)
    deadline = time.monotonic() + wait
    announced = False
    while True:
        claim = _try_claim(folder, ids, count)
        if claim is not None:
            break
        if time.monotonic() >= deadline:
            raise StageError(
                f"no {count} free GPU(s) among {GPUS_ENV}={','.join(ids)} after {wait:.0f} s "
                "(held by other tasks); size the Airflow gpu pool to the GPU count divided by "
                f"{GPUS_PER_TASK_ENV}, or raise {GPU_WAIT_ENV}"
            )
        if not announced:
            log.info("all of GPUs %s are held by other tasks; waiting", ",".join(ids))
            announced = True
        time.sleep(poll_seconds)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claim.ids)
    log.info("claimed GPU(s) %s (CUDA_VISIBLE_DEVICES)", ",".join(claim.ids))
    _held = claim
    return claim


def _try_claim(folder: Path, ids: tuple[str, ...], count: int) -> GpuClaim | None:
    claim = GpuClaim(ids=())
    taken: list[str] = []
    for gpu in ids:
        handle = open(folder / f"gpu-{gpu}.lock", "a+")  # noqa: SIM115 - held for the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        claim.handles.append(handle)
        taken.append(gpu)
        if len(taken) == count:
            claim.ids = tuple(taken)
            return claim
    claim.release()
    return None


def worker_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    """The GPUs ``TASKS_GPUS`` names (``all``: the visible ones, as the worker sees them)."""
    value = env.get(GPUS_ENV, "").strip()
    if value != "all":
        return parse_ids(value)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return parse_ids(visible)
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        raise StageError(
            f"{GPUS_ENV}=all but nvidia-smi cannot list the GPUs here; install the NVIDIA "
            f"driver (and container toolkit), or list the GPUs, e.g. {GPUS_ENV}=0,1"
        ) from None
    return parse_ids(",".join(listing.split()))


def parse_ids(value: str) -> tuple[str, ...]:
    """``"0, 1,2"`` -> ``("0", "1", "2")``; an error for anything but GPU indices or UUIDs."""
    ids = tuple(part.strip() for part in value.split(",") if part.strip())
    for gpu in ids:
        if not (gpu.isdigit() or gpu.startswith(("GPU-", "MIG-"))):
            raise StageError(
                f"{GPUS_ENV}={value!r}: {gpu!r} is not a GPU index or UUID; list the worker's "
                "GPUs as in CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3"
            )
    if len(set(ids)) != len(ids):
        raise StageError(f"{GPUS_ENV}={value!r} names a GPU twice; list each GPU once")
    return ids


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise StageError(f"{name}={raw!r} must be a whole number of GPUs, 1 or more")
    return value
