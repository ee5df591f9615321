"""The workers of a stage that trains across machines (``train.distribute: multi_worker``).

Every worker of the launch (a pod of the Indexed Job) runs the same
``python -m tasks dvc-stage <stage> <dataset>``. Worker 0, the chief, runs
``dvc repro`` as a stage on one machine does, so DVC skips an unchanged stage and
records what the outputs were built from. The others (:func:`follow_stage`) run
the stage's own command, ``python -m tasks <stage> <dataset>`` (the ``cmd`` of
dvc.yaml), in the same workspace: they train their part of the data and write
nothing.

When DVC does not run the stage (unchanged, or restored from its run cache), the
chief never starts training and the others would wait for it forever. So the
chief leaves a mark in the workspace when its ``dvc repro`` ends
(:func:`chief_done`), named for this launch (the workers' addresses, the DAG run
and the try), and a worker whose command is still running then stops it and ends
with success: there was nothing for it to train.

Imported when Airflow parses the DAG files: standard library and base modules only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.cluster import Cluster
from tasks.errors import ConfigError, StageFailed
from tasks.orchestration.records import read_workspace_record, stage_env

log = logging.getLogger(__name__)

TRAINING_STAGES = frozenset({"train", "finetune"})
MARKS = ".tasks-workers"
"""The workspace folder of the chief's marks."""
POLL_SECONDS = 1.0
STOP_SECONDS = 10.0


def launch_mark(
    ws: Path, stage: str, cluster: Cluster, env: Mapping[str, str] | None = None
) -> Path:
    """Where the chief marks the end of this launch's ``dvc repro``."""
    env = os.environ if env is None else env
    launch = [",".join(cluster.hosts), env.get("AIRFLOW_CTX_DAG_RUN_ID", ""),
              env.get("AIRFLOW_CTX_TRY_NUMBER", "")]  # fmt: skip
    digest = hashlib.sha256("\n".join(launch).encode()).hexdigest()[:16]
    return ws / MARKS / f"{stage}-{digest}.json"


def chief_done(ws: Path, stage: str, cluster: Cluster, ran: bool | None) -> None:
    """The chief's ``dvc repro`` is over (``ran``: whether the stage ran; None: it failed)."""
    mark = launch_mark(ws, stage, cluster)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"stage": stage, "ran": ran, "time": time.time()}))


def follow_stage(ws: Path, dataset: str, stage: str, cluster: Cluster) -> dict[str, Any]:
    """A worker other than the chief: run the stage's command until it ends, or until the
    chief's mark says DVC did not run the stage. Returns the small XCom value."""
    if stage not in TRAINING_STAGES:
        raise ConfigError(
            f"{stage} does not train across machines; only {', '.join(sorted(TRAINING_STAGES))} "
            "run as several workers (worker 0 runs every other stage)"
        )
    mark = launch_mark(ws, stage, cluster)
    cmd = [sys.executable, "-m", "tasks", stage, dataset]
    log.info("$ %s  (in %s, as %s)", " ".join(cmd[1:]), ws, cluster.part)
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ws, env=stage_env(read_workspace_record(ws))) as proc:
        while proc.poll() is None:
            if mark.is_file():
                proc.terminate()
                try:  # TensorFlow waiting for a peer may not let Python act on the signal
                    proc.wait(timeout=STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                note = json.loads(mark.read_text())
                state = "failed" if note.get("ran") is None else "did not run it"
                log.info("%s@%s: the chief's dvc repro %s; %s stops", stage, dataset, state,
                         cluster.part)  # fmt: skip
                return _xcom(stage, dataset, cluster, ran=False, start=start)
            time.sleep(POLL_SECONDS)
    if proc.returncode:
        raise StageFailed(
            f"{stage}@{dataset} failed on {cluster.part} (exit {proc.returncode}); its log "
            "above says why",
            retryable=proc.returncode != 2,
        )
    return _xcom(stage, dataset, cluster, ran=True, start=start)


def _xcom(stage: str, dataset: str, cluster: Cluster, *, ran: bool, start: float) -> dict[str, Any]:
    seconds = round(time.perf_counter() - start, 2)
    return {"stage": stage, "dataset": dataset, "worker": cluster.index, "ran": ran,
            "seconds": seconds}  # fmt: skip
