"""Both phases distributed: over two devices of one machine, and across two machines.

``mirrored``: the stage processes start with the CPU split in two (as a two-GPU
node looks to TensorFlow) and train under ``tf.distribute.MirroredStrategy``.
``multi_worker``: two stage processes, one CPU replica each, train together under
``MultiWorkerMirroredStrategy`` over gRPC on loopback, as two machines of an
Indexed Job would (``TASKS_WORKER_HOSTS`` / ``TASKS_WORKER_INDEX``).

Each is compared with the same phases in one process on one device (``none``, run
once for the module): it must train on both replicas (global batch and learning
rate scaled by the replica count) and reach the single-device result within 0.15
validation accuracy on this tiny, learnable data. Across machines the chief alone
writes the model and the MLflow runs, and a pair that lost a worker mid-phase
resumes from the chief's checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from tasks.cluster import WORKER_HOSTS_ENV, WORKER_INDEX_ENV
from tests.datagen import tiny_params
from tests.model.conftest import make_workspace

pytestmark = pytest.mark.slow

DATASET = "cats_vs_dogs"
TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tasks.cli import main
sys.exit(main(sys.argv[1:]))
"""
RATES = {"train": 0.003, "finetune": 1e-5}
ACROSS = ["--set", "train.distribute=multi_worker", "--set", "train.workers=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, offline_weights) -> SimpleNamespace:
    """The params, and an MLflow store of this module's own for the stage processes."""
    tmp = tmp_path_factory.mktemp("distribute")
    params = tmp / "params.yaml"
    train = {"weights": str(offline_weights), "epochs": 15, "batch_size": 8}
    train |= {"optimizer": "adam", "learning_rate": RATES["train"], "feature_cache": "auto"}
    sources = {DATASET: "http://127.0.0.1:1/x.zip"}
    params.write_text(yaml.safe_dump(tiny_params(sources, train=train, finetune={"epochs": 2})))
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKS_")}
    return SimpleNamespace(
        tmp=tmp, params=params, store=store, env=env | {"MLFLOW_TRACKING_URI": store}
    )


def _stage(setup, root: Path, stage: str, *args: str, prefix=()) -> None:
    done = subprocess.run(
        [sys.executable, *prefix, stage, DATASET, "--params", str(setup.params), "--root",
         str(root), *args],
        capture_output=True, text=True, env=setup.env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def single(setup) -> dict:
    """Both phases in one process on one device: the result the others must reach."""
    paths = make_workspace(setup.tmp / "none", {"train": 24, "validation": 12})
    for stage in ("train", "finetune"):
        _stage(setup, paths.root, stage, "--set", "train.distribute=none", prefix=["-m", "tasks"])
    return json.loads(paths.candidate.read_text())


def _runs(setup, distribute: str) -> dict[str, list]:
    """The MLflow phase runs of ``distribute``, by phase."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(setup.store)
    experiment = client.get_experiment_by_name(DATASET)
    runs = client.search_runs([experiment.experiment_id], f"params.distribute = '{distribute}'")
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.data.tags["phase"], []).append(run)
    return found


def _assert_close(single: dict, results: dict) -> None:
    for phase in ("train", "finetune"):
        one, two = single[phase], results[phase]
        assert one["val_accuracy"] >= 0.8 and two["val_accuracy"] >= 0.8, (single, results)
        assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.15, (single, results)


def test_mirrored_training_matches_one_device(setup, single):
    paths = make_workspace(setup.tmp / "mirrored", {"train": 24, "validation": 12})
    for stage in ("train", "finetune"):
        _stage(
            setup, paths.root, stage, "--set", "train.distribute=mirrored", prefix=["-c", TWO_CPUS]
        )

    for phase, runs in _runs(setup, "mirrored").items():
        (params,) = [run.data.params for run in runs]
        assert (params["replicas"], params["devices"], params["workers"]) == (
            "2",
            "CPU:0, CPU:1",
            "1",
        )
        assert params["global_batch_size"] == "16"
        assert float(params["scaled_learning_rate"]) == pytest.approx(2 * RATES[phase])
    (one,) = _runs(setup, "none")["train"]
    assert (one.data.params["replicas"], one.data.params["global_batch_size"]) == ("1", "8")
    _assert_close(single, json.loads(paths.candidate.read_text()))


# ------------------------------------------------------------------ across machines


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_pair(setup, root: Path, stage: str, logs: Path, *args: str) -> list[subprocess.Popen]:
    """Both workers of ``stage``, each logging to ``logs/<stage>-<i>.log``."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for index in (0, 1):
        env = setup.env | {WORKER_HOSTS_ENV: hosts, WORKER_INDEX_ENV: str(index)}
        with open(logs / f"{stage}-{index}.log", "a") as log:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tasks",
                        stage,
                        DATASET,
                        "--params",
                        str(setup.params),
                        "--root",
                        str(root),
                        *ACROSS,
                        *args,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )  # fmt: skip
            )
    return procs


def _wait(procs: list[subprocess.Popen], logs: Path, stage: str, timeout: float = 600) -> None:
    for index, proc in enumerate(procs):
        code = proc.wait(timeout=timeout)
        assert code == 0, (logs / f"{stage}-{index}.log").read_text()[-3000:]


def _ok_rows(paths, split: str) -> int:
    manifest = pd.read_parquet(paths.manifest)
    return int(((manifest["split"] == split) & (manifest["status"] == "ok")).sum())


EPOCH_LINE = re.compile(r"(train|finetune) epoch (\d+)/\d+: .*\((\d+\.\d+) s")


def _epoch_seconds(log: Path) -> list[float]:
    return [float(m.group(3)) for m in EPOCH_LINE.finditer(log.read_text())]


def test_two_workers_train_both_phases_like_one_process(setup, single):
    paths = make_workspace(setup.tmp / "multi", {"train": 24, "validation": 12})
    logs = setup.tmp / "multi-logs"
    for stage in ("train", "finetune"):
        _wait(_start_pair(setup, paths.root, stage, logs), logs, stage)
        follower = (logs / f"{stage}-1.log").read_text()
        assert "trained as worker-1-of-2" in follower and "worker 0 wrote the model" in follower
        seconds = [_epoch_seconds(logs / f"{stage}-{i}.log") for i in (0, 1)]
        assert len(seconds[0]) == len(seconds[1]) > 0  # in step: every epoch on both
        print(f"{stage} epoch seconds: worker 0 {seconds[0]}, worker 1 {seconds[1]}")

    # the chief alone wrote: one run per phase, the pair's figures, no follower caches left
    for phase, runs in _runs(setup, "multi_worker").items():
        (run,) = runs
        params = run.data.params
        assert (params["workers"], params["replicas"], params["devices"]) == ("2", "2", "CPU:0")
        assert params["global_batch_size"] == "16"
        assert float(params["scaled_learning_rate"]) == pytest.approx(2 * RATES[phase])
        assert params["train_images"] == str(_ok_rows(paths, "train"))  # both parts
    for part in ("worker-0-of-2", "worker-1-of-2"):  # each worker's caches, removed at the end
        caches = paths.array_cache(part)
        assert caches.is_dir() and not [p for p in caches.rglob("*") if p.is_file()]
    results = json.loads(paths.candidate.read_text())
    print(f"val accuracy: one process {single['finetune']['val_accuracy']:.4f}, two workers "
          f"{results['finetune']['val_accuracy']:.4f}")  # fmt: skip
    _assert_close(single, results)


def _finished(state: Path) -> int:
    """Epochs the chief's checkpoint has committed."""
    try:
        return len(json.loads(state.read_text())["finished"])
    except (OSError, ValueError, KeyError):
        return 0


RESUMED = re.compile(r"phase 1 resumes after epoch (\d+)")


def test_a_pair_that_lost_a_worker_resumes_from_the_chiefs_checkpoint(setup):
    from mlflow.tracking import MlflowClient

    paths = make_workspace(setup.tmp / "killed", {"train": 24, "validation": 12})
    logs = setup.tmp / "killed-logs"
    epochs = 6  # end to end on the images (no feature cache): epochs long enough to hit one
    args = ["--set", "train.feature_cache=off", "--set", f"train.epochs={epochs}",
            "--set", f"train.early_stopping_patience={epochs}"]  # fmt: skip
    state = paths.checkpoint("train") / "state.json"

    first = _start_pair(setup, paths.root, "train", logs, *args)
    deadline = time.monotonic() + 300
    while _finished(state) < 2:
        assert all(proc.poll() is None for proc in first), (logs / "train-0.log").read_text()[
            -2000:
        ]
        assert time.monotonic() < deadline, "the pair committed no second epoch in 300 s"
        time.sleep(0.05)
    os.killpg(first[1].pid, signal.SIGKILL)  # worker 1, mid-epoch 3 (or later)
    killed = time.monotonic()
    try:  # TensorFlow's health check fails the chief's collective ops when a peer is gone
        first[0].wait(timeout=180)
        detected = f"the chief exited {first[0].returncode} after {time.monotonic() - killed:.1f} s"
    except subprocess.TimeoutExpired:
        os.killpg(first[0].pid, signal.SIGKILL)
        first[0].wait()
        detected = "the chief was still waiting after 180 s and was killed"
    print(f"worker 1 killed after {_finished(state)} committed epochs; {detected}")
    assert first[0].returncode != 0
    said = [
        line
        for line in (logs / "train-0.log").read_text().splitlines()
        if line.startswith("error:")
    ]
    if first[0].returncode == 1:  # it saw the peer go: one line saying how the phase goes on
        assert len(said) == 1 and "another worker stopped during the fit" in said[0], said
        assert "start all 2 workers again and the phase resumes" in said[0]

    # the pair starts again, as the Indexed Job replaces its failed pods
    _wait(_start_pair(setup, paths.root, "train", logs, *args), logs, "train")
    chief, follower = ((logs / f"train-{i}.log").read_text() for i in (0, 1))
    (after,) = [int(n) for n in RESUMED.findall(chief)]
    assert 2 <= after < epochs
    assert f"phase 1 resumes after epoch {after} on worker-1-of-2" in follower
    history = pd.read_csv(paths.phase_history("train"))
    assert list(history["epoch"]) == list(range(1, epochs + 1))  # each epoch once
    assert not paths.checkpoint("train").exists()  # done with once the model is saved
    client = MlflowClient(setup.store)
    experiment = client.get_experiment_by_name(DATASET)
    runs = client.search_runs(
        [experiment.experiment_id], "tags.phase = 'train' and params.feature_cache = 'False'"
    )
    resumed = [run for run in runs if run.data.tags.get("resumed_after_epoch") == str(after)]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    candidate = json.loads(paths.candidate.read_text()) if paths.candidate.exists() else None
    assert candidate is None  # phase 1 only: the fine-tune never ran here
    assert paths.frozen_model.is_file()
