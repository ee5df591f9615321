"""A stage across machines as its workers run it (``tasks.orchestration.workers``).

The other workers run the stage's own command; when the chief's ``dvc repro`` ends
without running the stage, its mark stops a worker that is still waiting for it.
Here a real worker 1 starts ``python -m tasks train`` in a real workspace and waits
for a chief that never trains, until the chief's mark appears.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from tasks.cluster import Cluster
from tasks.errors import ConfigError
from tasks.orchestration.records import write_workspace_record
from tasks.orchestration.workers import chief_done, follow_stage, launch_mark
from tests.datagen import tiny_params
from tests.model.conftest import make_workspace
from tests.model.test_distribute import free_ports

HOSTS = ("127.0.0.1:1", "127.0.0.1:2")


def test_the_mark_names_one_launch():
    ws, pair = Path("ws"), Cluster(HOSTS, 1)
    first = launch_mark(
        ws, "train", pair, {"AIRFLOW_CTX_DAG_RUN_ID": "r", "AIRFLOW_CTX_TRY_NUMBER": "1"}
    )
    again = launch_mark(
        ws,
        "train",
        Cluster(HOSTS, 0),
        {"AIRFLOW_CTX_DAG_RUN_ID": "r", "AIRFLOW_CTX_TRY_NUMBER": "1"},
    )
    assert first == again  # every worker of the launch looks for the chief's one mark
    others = [
        launch_mark(
            ws, "train", pair, {"AIRFLOW_CTX_DAG_RUN_ID": "r", "AIRFLOW_CTX_TRY_NUMBER": "2"}
        ),
        launch_mark(
            ws, "train", pair, {"AIRFLOW_CTX_DAG_RUN_ID": "s", "AIRFLOW_CTX_TRY_NUMBER": "1"}
        ),
        launch_mark(
            ws, "finetune", pair, {"AIRFLOW_CTX_DAG_RUN_ID": "r", "AIRFLOW_CTX_TRY_NUMBER": "1"}
        ),
        launch_mark(ws, "train", Cluster(("a:1", "b:1"), 1), {"AIRFLOW_CTX_DAG_RUN_ID": "r"}),
    ]
    assert len({first, *others}) == 5  # a retry never reads an earlier try's mark


def test_only_the_training_stages_have_workers(tmp_path):
    with pytest.raises(ConfigError, match="evaluate does not train across machines"):
        follow_stage(tmp_path, "cats_vs_dogs", "evaluate", Cluster(HOSTS, 1))


@pytest.mark.slow
def test_a_worker_waiting_for_a_chief_that_did_not_train_stops_at_its_mark(
    tmp_path, monkeypatch, offline_weights
):
    paths = make_workspace(tmp_path / "ws", {"train": 4, "validation": 4})
    train = {"weights": str(offline_weights), "distribute": "multi_worker", "workers": 2}
    params = tiny_params({"cats_vs_dogs": "http://127.0.0.1:1/x.zip"}, train=train)
    (paths.root / "params.yaml").write_text(yaml.safe_dump(params))
    write_workspace_record(paths.root, {"dataset": "cats_vs_dogs"})  # as prepare leaves it
    hosts = tuple(f"127.0.0.1:{port}" for port in free_ports(2))  # no chief listens on the first
    monkeypatch.setenv("TASKS_WORKER_HOSTS", ",".join(hosts))
    monkeypatch.setenv("TASKS_WORKER_INDEX", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cluster = Cluster(hosts, 1)

    # the chief's dvc repro found the stage unchanged: it marks the launch after a while
    marked = threading.Timer(8, chief_done, (paths.root, "train", cluster, False))
    marked.start()
    start = time.monotonic()
    try:
        result = follow_stage(paths.root, "cats_vs_dogs", "train", cluster)
    finally:
        marked.cancel()
    waited = time.monotonic() - start
    assert result["ran"] is False and (result["worker"], result["stage"]) == (1, "train")
    assert 8 <= waited < 60, waited  # it waited for the chief, then stopped at the mark
    assert not paths.frozen_model.exists()  # and wrote nothing
