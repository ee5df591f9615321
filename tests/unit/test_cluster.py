"""Which worker a process is, read from what its launcher gives (``tasks.cluster``), and
which rows of the manifest each worker reads (``tasks.ml.inputs.worker_rows``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.cluster import WORKER_PORT, Cluster, cluster_from_env
from tasks.config import TrainConfig
from tasks.errors import ConfigError, StageError
from tasks.ml.inputs import worker_rows

HOSTS = "job-0.svc:2222,job-1.svc:2222,job-2.svc"


def test_hosts_and_the_index_kubernetes_gives_make_tensorflows_cluster():
    cluster = cluster_from_env(3, {"TASKS_WORKER_HOSTS": HOSTS, "JOB_COMPLETION_INDEX": "2"})
    assert cluster.hosts == ("job-0.svc:2222", "job-1.svc:2222", f"job-2.svc:{WORKER_PORT}")
    assert (cluster.index, cluster.workers, cluster.chief, cluster.part) == (
        2, 3, False, "worker-2-of-3",
    )  # fmt: skip
    assert cluster.tf_config() == {
        "cluster": {"worker": list(cluster.hosts)},
        "task": {"type": "worker", "index": 2},
    }
    # our own index variable wins over the Job's
    env = {"TASKS_WORKER_HOSTS": HOSTS, "TASKS_WORKER_INDEX": "0", "JOB_COMPLETION_INDEX": "2"}
    assert cluster_from_env(3, env).chief


def test_a_launchers_own_tf_config_is_used_as_given_chief_first():
    config = {
        "cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
        "task": {"type": "worker", "index": 1},
    }
    cluster = cluster_from_env(3, {"TF_CONFIG": json.dumps(config), "TASKS_WORKER_HOSTS": "x:1"})
    assert (cluster.hosts, cluster.index) == (("a:1", "b:1", "c:1"), 2)


def test_one_worker_needs_no_environment():
    assert cluster_from_env(1, {}) == Cluster()
    assert (Cluster().workers, Cluster().chief) == (1, True)


@pytest.mark.parametrize(
    ("workers", "env", "message"),
    [
        (2, {}, "train.workers=2 needs the workers' addresses: set TASKS_WORKER_HOSTS"),
        (2, {"TASKS_WORKER_HOSTS": HOSTS, "TASKS_WORKER_INDEX": "0"},
         "the launcher names 3 worker(s) but train.workers=2"),
        (3, {"TASKS_WORKER_HOSTS": HOSTS}, "this worker's index is not: set TASKS_WORKER_INDEX"),
        (3, {"TASKS_WORKER_HOSTS": HOSTS, "TASKS_WORKER_INDEX": "3"},
         "TASKS_WORKER_INDEX: worker index 3 is outside the 3 worker(s); use 0..2"),
        (3, {"TF_CONFIG": "{not json"}, "TF_CONFIG is not TensorFlow's cluster JSON"),
    ],
)  # fmt: skip
def test_a_bad_launch_is_one_line_naming_the_variable_and_the_fix(workers, env, message):
    with pytest.raises(ConfigError) as error:
        cluster_from_env(workers, env)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_more_than_one_worker_needs_the_multi_worker_strategy():
    assert TrainConfig(distribute="multi_worker", workers=4).workers == 4
    with pytest.raises(ValueError, match="workers=2 trains across machines, which needs"):
        TrainConfig(workers=2)


def _manifest() -> pd.DataFrame:
    rows = [("train", "ok")] * 7 + [("validation", "ok")] * 4 + [("train", "bad")] * 2
    rows += [("test", "ok")] * 3
    frame = pd.DataFrame(rows, columns=["split", "status"])
    frame["path"] = [f"img{i}.jpg" for i in range(len(frame))]
    return frame.sample(frac=1, random_state=0)  # splits interleaved, as a manifest may be


def test_each_worker_reads_its_own_run_of_every_split_and_together_all_of_them():
    manifest = _manifest()
    parts = [worker_rows(manifest, index, 3) for index in range(3)]
    for split, total in (("train", 7), ("validation", 4), ("test", 3)):
        sizes = [int((part["split"] == split).sum()) for part in parts]
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1, (split, sizes)
    paths = [path for part in parts for path in part["path"]]
    assert sorted(paths) == sorted(manifest.loc[manifest["status"] == "ok", "path"])
    for part in parts:  # manifest order kept (shards are read in it)
        assert list(part.index) == [i for i in manifest.index if i in set(part.index)]
    assert worker_rows(manifest, 0, 1) is manifest


def test_a_split_smaller_than_the_workers_is_refused_with_the_fix():
    with pytest.raises(StageError, match="the 'test' split has 3 usable image.s. for 4 workers"):
        worker_rows(_manifest(), 0, 4)
