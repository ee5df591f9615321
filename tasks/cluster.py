"""Training across machines: which worker this process is, from what its launcher gives.

Under ``train.distribute: multi_worker`` a launcher starts the same stage command
once per machine (``train.workers`` of them): a Kubernetes Indexed Job
(``tasks.orchestration.k8s_job``), or a person with one shell per machine. Each
process learns the cluster from its environment, in this order:

1. ``TF_CONFIG``, when the launcher writes TensorFlow's own (Ray Train's
   ``TensorflowTrainer`` does): its ``worker`` list (a ``chief`` entry first,
   if any) and its ``task``.
2. ``TASKS_WORKER_HOSTS``: every worker's ``host[:port]`` in index order,
   comma-separated (port :data:`WORKER_PORT` when left out), and this worker's
   index from ``TASKS_WORKER_INDEX``, else ``JOB_COMPLETION_INDEX`` (which
   Kubernetes sets in every pod of an Indexed Job).

Worker 0 is the chief: it alone writes the phase's model, reports, checkpoint and
MLflow runs. The others train their part of the data and write nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.errors import ConfigError

WORKER_HOSTS_ENV = "TASKS_WORKER_HOSTS"
WORKER_INDEX_ENV = "TASKS_WORKER_INDEX"
JOB_INDEX_ENV = "JOB_COMPLETION_INDEX"
TF_CONFIG_ENV = "TF_CONFIG"
WORKER_PORT = 2222
"""The port the workers' collective ops listen on (TensorFlow's usual one)."""


@dataclass(frozen=True)
class Cluster:
    """The workers training together, and which one this process is."""

    hosts: tuple[str, ...] = ()
    index: int = 0

    @property
    def workers(self) -> int:
        return max(len(self.hosts), 1)

    @property
    def chief(self) -> bool:
        """Worker 0: the one that writes."""
        return self.index == 0

    @property
    def part(self) -> str:
        """This worker's name among them: ``worker-<i>-of-<n>``."""
        return f"worker-{self.index}-of-{self.workers}"

    def tf_config(self) -> dict[str, Any]:
        """TensorFlow's ``TF_CONFIG`` for this worker."""
        return {
            "cluster": {"worker": list(self.hosts)},
            "task": {"type": "worker", "index": self.index},
        }


def cluster_from_env(workers: int | None, environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster this process belongs to, checked against ``train.workers`` (None: as
    the environment says; none there is one worker).

    One worker needs no environment. Anything missing or inconsistent raises a
    one-line :class:`ConfigError` naming the variable and the fix.
    """
    env = os.environ if environ is None else environ
    if env.get(TF_CONFIG_ENV):
        cluster = _from_tf_config(env[TF_CONFIG_ENV])
    elif env.get(WORKER_HOSTS_ENV):
        cluster = _from_hosts(env)
    elif workers is None or workers == 1:
        return Cluster()
    else:
        raise ConfigError(
            f"train.workers={workers} needs the workers' addresses: set {WORKER_HOSTS_ENV}="
            f"host:port,... and {WORKER_INDEX_ENV} (an Indexed Job sets {JOB_INDEX_ENV}), or "
            f"{TF_CONFIG_ENV}; or set train.workers to 1"
        )
    if workers is not None and cluster.workers != workers:
        raise ConfigError(
            f"the launcher names {cluster.workers} worker(s) but train.workers={workers}; "
            "start one worker per train.workers, or set train.workers to match"
        )
    return cluster


def _from_hosts(env: Mapping[str, str]) -> Cluster:
    hosts = tuple(
        host if ":" in host else f"{host}:{WORKER_PORT}"
        for host in (item.strip() for item in env[WORKER_HOSTS_ENV].split(","))
        if host
    )
    name = WORKER_INDEX_ENV if env.get(WORKER_INDEX_ENV) else JOB_INDEX_ENV
    text = env.get(name, "")
    if not text.strip().isdigit():
        raise ConfigError(
            f"{WORKER_HOSTS_ENV} is set but this worker's index is not: set {WORKER_INDEX_ENV} "
            f"to 0..{len(hosts) - 1} (got {name}={text!r})"
        )
    return _checked(hosts, int(text), name)


def _from_tf_config(text: str) -> Cluster:
    try:
        config = json.loads(text)
        spec, task = config["cluster"], config["task"]
        chief = list(spec.get("chief", []))
        hosts = tuple(chief + list(spec.get("worker", [])))
        index = int(task["index"]) + (len(chief) if task["type"] == "worker" else 0)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{TF_CONFIG_ENV} is not TensorFlow's cluster JSON ({error}); write "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
        ) from None
    return _checked(hosts, index, TF_CONFIG_ENV)


def _checked(hosts: tuple[str, ...], index: int, source: str) -> Cluster:
    if not hosts:
        raise ConfigError(f"{source}: no worker addresses; name every worker's host:port")
    if not 0 <= index < len(hosts):
        raise ConfigError(
            f"{source}: worker index {index} is outside the {len(hosts)} worker(s); "
            f"use 0..{len(hosts) - 1}"
        )
    return Cluster(hosts, index)
