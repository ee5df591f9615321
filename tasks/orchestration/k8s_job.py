"""A multi-worker GPU stage on Kubernetes: an Indexed Job, one pod per worker.

Under ``train.distribute: multi_worker`` with ``train.workers: N`` > 1, the kubernetes
backend runs train and finetune as one ``KubernetesJobOperator`` task whose Job has
``completionMode: Indexed`` and ``completions = parallelism = N``. Every pod runs the
stage command of a single-pod stage (``python -m tasks dvc-stage <stage> <dataset>``)
with the same image, environment, MLflow login Secret, GPUs, placement and volumes
(:func:`tasks.orchestration.backends.pod_args`). Kubernetes gives each pod its index
(``JOB_COMPLETION_INDEX``) and the hostname ``<job>-<index>``; worker 0, the chief,
runs ``dvc repro``, the others follow (``tasks.cluster``).

Names. One try of one task instance owns the Job ``job-<dataset>-<stage>-<hash>``
(``job-sweep-<stage>-<hash>`` in a sweep lane): the hash is of the DAG, task, run, map
index and try number, so concurrent runs, sweep lanes and retries never collide, and
the name is known when the templates are rendered (no random suffix). Its headless
Service (``clusterIP: None``) has the same name and selects the pods by the label
:data:`WORKERS_LABEL`; the pods' ``subdomain`` is that Service, so worker *i* resolves
as ``<job>-<i>.<job>`` and ``TASKS_WORKER_HOSTS`` lists those, port
:data:`~tasks.cluster.WORKER_PORT`, in index order.

Lifetime. The task creates the Job, then the Service owned by the Job (an
``ownerReference``): whoever deletes the Job (this task when the Job ends, ``on_kill``
when the task is stopped, the Job's ``ttlSecondsAfterFinished``, a person) deletes its
pods and the Service with it. A Job of an earlier try that is still there (its Airflow
worker died) is deleted first, so two tries never train in the same workspace.

A lost worker. The pods end by themselves (no XCom sidecar: a sidecar would keep a
failed pod running, so the Job could neither replace it nor finish). Each index may
fail ``backoffLimitPerIndex`` times (``TASKS_K8S_WORKER_RESTARTS``) and is then
replaced, only once the failed pod is gone (``podReplacementPolicy: Failed``: never two
pods with one hostname); a pod evicted, preempted or on a lost node (condition
``DisruptionTarget``) does not count (``podFailurePolicy``). When a worker dies,
TensorFlow's collective ops fail on the others, so their pods fail too and are replaced:
all N start again and the chief resumes the phase from its checkpoint on the shared
volume. ``maxFailedIndexes: 0``: once any index has used up its restarts the Job fails
(its remaining pods are stopped) and so does the task, with one line naming the worker
that failed first and its last log line (:func:`failure_line`); Airflow's retries then
start a new Job. On success the task returns the chief's result: the last line of its
log (``--result-json -``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tasks.cluster import WORKER_HOSTS_ENV, WORKER_PORT
from tasks.orchestration.backends import Backend, SweepLane, pod_args
from tasks.orchestration.project import Project

if TYPE_CHECKING:
    from tasks.config import Config

MULTI_WORKER_STAGES = frozenset({"train", "finetune"})
"""The stages that train under ``train.distribute`` (evaluate runs in one pod)."""
JOB_PREFIX = "job-"
"""What ``KubernetesJobOperator`` puts before every Job name."""
JOB_NAME_MAX = 56
"""A Job name this long leaves room for ``-<index>`` in its pods' 63-character hostnames."""
WORKERS_LABEL = "transfer-learning/workers"
"""The pods' label (value: the Job's name) that the headless Service selects."""
PORT_NAME = "workers"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
JOB_TTL_SECONDS = 24 * 3600
"""A Job this task could not delete (its worker died) goes a day after it ends."""
BASE_CONTAINER = "base"
TASK_INSTANCE_LABELS = ("dag_id", "task_id", "run_id", "map_index")
"""The operator's pod labels that name a task instance (any try), put on the Job too."""


def indexed_workers(cfg: Config, backend: Backend, stage: str) -> int:
    """How many pods run ``stage``: ``train.workers`` for a multi-worker stage on the
    kubernetes backend, else 1 (one pod, container or worker process)."""
    if backend.kind != "kubernetes" or stage not in backend.gpu_stages:
        return 1
    if stage not in MULTI_WORKER_STAGES or cfg.train.distribute != "multi_worker":
        return 1
    return cfg.train.workers


def job_name(
    base: str, dag_id: str, task_id: str, run_id: str, map_index: int, try_number: int
) -> str:
    """``job-<base>-<hash>``: one try of one task instance's Job (and Service) name, a
    DNS-1035 label short enough for ``-<index>`` after it."""
    key = "\n".join(map(str, (dag_id, task_id, run_id, map_index, try_number)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")
    slug = slug[: JOB_NAME_MAX - len(JOB_PREFIX) - len(digest) - 1].rstrip("-")
    return f"{JOB_PREFIX}{slug}-{digest}" if slug else f"{JOB_PREFIX}{digest}"


def worker_hosts(job: str, workers: int, port: int = WORKER_PORT) -> list[str]:
    """Each worker's ``host:port`` in index order: ``<job>-<i>.<service>`` (service = job)."""
    return [f"{job}-{index}.{job}:{port}" for index in range(workers)]


# --- what the Job's pods tell when it ends (plain functions of the API's objects) ---------


def worker_index(pod: Any) -> int:
    """The pod's completion index (-1: not a pod of an Indexed Job)."""
    meta = pod.metadata
    text = (meta.annotations or {}).get(INDEX_KEY) or (meta.labels or {}).get(INDEX_KEY)
    return int(text) if text and text.isdigit() else -1


def _created(pod: Any) -> datetime:
    return pod.metadata.creation_timestamp or datetime.min.replace(tzinfo=UTC)


def latest_pods(pods: Iterable[Any]) -> list[Any]:
    """The newest pod of each worker (the replaced ones left out), in index order."""
    newest: dict[int, Any] = {}
    for pod in pods:
        index = worker_index(pod)
        if index >= 0 and (index not in newest or _created(pod) > _created(newest[index])):
            newest[index] = pod
    return [newest[index] for index in sorted(newest)]


def _terminated(pod: Any) -> Any | None:
    for status in (pod.status and pod.status.container_statuses) or []:
        if status.name == BASE_CONTAINER and status.state and status.state.terminated:
            return status.state.terminated
    return None


def _ended(pod: Any) -> datetime:
    terminated = _terminated(pod)
    if terminated and terminated.finished_at:
        return terminated.finished_at
    times = [c.last_transition_time for c in pod.status.conditions or [] if c.last_transition_time]
    return max(times, default=_created(pod))


def first_failure(pods: Iterable[Any]) -> Any | None:
    """The worker whose failure ended the Job: of each worker's newest pod, the failed one
    that ended first (the others' collective ops failed after it). None: no pod failed."""
    failed = [pod for pod in latest_pods(pods) if pod.status and pod.status.phase == "Failed"]
    return min(failed, key=_ended, default=None)


def _cause(pod: Any) -> str:
    terminated = _terminated(pod)
    if terminated and terminated.exit_code is not None:
        reason = terminated.reason if terminated.reason not in (None, "Error") else None
        return f"exit code {terminated.exit_code}" + (f", {reason}" if reason else "")
    for condition in pod.status.conditions or []:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            return f"disrupted: {condition.reason}"
    return pod.status.reason or "no exit code"


def last_line(text: str | None) -> str:
    """The last non-blank line of a log."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure_line(stage: str, workers: int, pod: Any | None, log: str, job: Any) -> str:
    """One line for a failed Job: which worker failed first, how, and its last log line."""
    if pod is None:
        failed = [c for c in (job.status and job.status.conditions) or [] if c.type == "Failed"]
        reason = f"{failed[0].reason}: {failed[0].message}" if failed else "no reason given"
        return (
            f"{stage}: Kubernetes Job {job.metadata.name} failed ({reason}); no worker pod failed"
        )
    line = last_line(log) or "(no log)"
    return (
        f"{stage}: worker {worker_index(pod)} of {workers} failed ({_cause(pod)}; "
        f"pod {pod.metadata.name}): {line}"
    )


def chief_result(log: str) -> dict[str, Any] | None:
    """The chief's stage result: the last JSON object line of its log that names a stage."""
    for line in reversed((log or "").splitlines()):
        if not line.strip().startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "stage" in value and value.get("worker", 0) == 0:
            return value
    return None


# --- the operator -------------------------------------------------------------------------


def kubernetes_job_stage(
    project: Project,
    dataset: str,
    stage: str,
    backend: Backend,
    workers: int,
    lane: SweepLane | None = None,
    **task_args: Any,
) -> Any:
    """``stage`` as an Indexed Job of ``workers`` pods, each the pod of a single-pod stage."""
    from kubernetes.client import models as k8s

    port = k8s.V1ContainerPort(name=PORT_NAME, container_port=WORKER_PORT, protocol="TCP")
    return _operator_class()(
        task_id=stage,
        stage=stage,
        workers=workers,
        restarts=backend.worker_restarts,
        arguments=["--result-json", "-"],  # the chief's result: its log's last line
        ports=[port],
        completion_mode="Indexed",
        completions=workers,
        parallelism=workers,
        ttl_seconds_after_finished=JOB_TTL_SECONDS,
        random_name_suffix=False,
        wait_until_job_complete=True,
        deferrable=False,
        do_xcom_push=True,
        **pod_args(project, dataset, stage, backend, lane),
        **task_args,
    )


def replace_lost_workers(spec: Any, restarts: int) -> None:
    """The Job's failure policy (module doc): each index may fail ``restarts`` times and
    is replaced once its pod is gone; a disrupted pod does not count; any index out of
    restarts fails the Job."""
    from kubernetes.client import models as k8s

    spec.backoff_limit_per_index = restarts
    spec.max_failed_indexes = 0
    spec.pod_replacement_policy = "Failed"
    disrupted = k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")
    spec.pod_failure_policy = k8s.V1PodFailurePolicy(
        rules=[k8s.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[disrupted])]
    )


def headless_service(job: str, namespace: str, labels: dict[str, str], owner: Any = None) -> Any:
    """The headless Service (named ``job``) that gives the workers their addresses;
    ``owner``: the created Job, whose deletion takes the Service with it."""
    from kubernetes.client import models as k8s

    refs = None
    if owner is not None:
        meta = owner.metadata
        refs = [
            k8s.V1OwnerReference(api_version="batch/v1", kind="Job", name=meta.name, uid=meta.uid)
        ]
    port = k8s.V1ServicePort(
        name=PORT_NAME, port=WORKER_PORT, target_port=WORKER_PORT, protocol="TCP"
    )
    spec = k8s.V1ServiceSpec(
        cluster_ip="None",
        selector={WORKERS_LABEL: job},
        ports=[port],
        publish_not_ready_addresses=True,  # resolvable as soon as a pod has its IP
    )
    meta = k8s.V1ObjectMeta(name=job, namespace=namespace, labels=labels, owner_references=refs)
    return k8s.V1Service(api_version="v1", kind="Service", metadata=meta, spec=spec)


@functools.cache
def _operator_class() -> type:
    """``IndexedJobOperator``, made on first use: the provider loads with the backend."""
    from airflow.providers.cncf.kubernetes.backcompat.backwards_compat_converters import (
        convert_env_vars,
    )
    from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
    from kubernetes.client import models as k8s

    class IndexedJobOperator(KubernetesJobOperator):
        """A ``KubernetesJobOperator`` for training workers: its Job, the workers' headless
        Service, and the chief's result or the failed worker's line (module doc)."""

        def __init__(self, *, stage: str, workers: int, restarts: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stage = stage
            self.workers = workers
            self.restarts = restarts
            self.base_name = self.name

        def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
            """Rendered, the task knows its try: the Job's name and the workers' hosts."""
            super().render_template_fields(context, jinja_env)
            ti = context["ti"]
            job = job_name(
                self.base_name, ti.dag_id, ti.task_id, context["run_id"], ti.map_index,
                ti.try_number,
            )  # fmt: skip
            self.name = job.removeprefix(JOB_PREFIX)  # the provider puts the prefix back
            self.subdomain = job
            self.labels = {**self.labels, WORKERS_LABEL: job}
            hosts = ",".join(worker_hosts(job, self.workers))
            env = [
                item for item in convert_env_vars(self.env_vars) if item.name != WORKER_HOSTS_ENV
            ]
            self.env_vars = [*env, k8s.V1EnvVar(name=WORKER_HOSTS_ENV, value=hosts)]

        def build_job_request_obj(self, context: Any = None) -> Any:
            push, self.do_xcom_push = self.do_xcom_push, False  # no sidecar: the pods end
            try:
                job = super().build_job_request_obj(context)
            finally:
                self.do_xcom_push = push
            # which task instance, any try: a later try finds (and deletes) this Job by them
            ti_labels = self._get_ti_pod_labels(context, include_try_number=False)
            ti_labels = {key: ti_labels[key] for key in TASK_INSTANCE_LABELS if key in ti_labels}
            job.metadata.labels = {**(job.metadata.labels or {}), **ti_labels}
            replace_lost_workers(job.spec, self.restarts)
            return job

        def worker_service(self, owner: Any = None) -> Any:
            """The headless Service naming the workers; ``owner``: the created Job."""
            return headless_service(self.subdomain, self.namespace, dict(self.labels), owner)

        def execute(self, context: Any) -> Any:
            request = self.build_job_request_obj(context)
            self._delete_earlier_tries(request)
            self.job = self.hook.create_job(request)  # the API's answer: its uid owns the Service
            try:
                namespace = request.metadata.namespace
                self.client.create_namespaced_service(namespace, self.worker_service(self.job))
                self.job = self.hook.wait_until_job_complete(
                    job_name=request.metadata.name,
                    namespace=namespace,
                    job_poll_interval=self.job_poll_interval,
                )
                return self._outcome(request)
            finally:
                self._delete_job(request)

        def _outcome(self, request: Any) -> Any:
            from airflow.sdk.exceptions import AirflowException

            name, namespace = request.metadata.name, request.metadata.namespace
            selector = f"{JOB_NAME_LABEL}={name}"
            pods = self.client.list_namespaced_pod(namespace, label_selector=selector).items
            logs = {pod.metadata.name: self._log(pod) for pod in latest_pods(pods)}
            if self.hook.is_job_failed(job=self.job):
                pod = first_failure(pods)
                log = logs.get(pod.metadata.name, "") if pod is not None else ""
                raise AirflowException(failure_line(self.stage, self.workers, pod, log, self.job))
            chief = next((pod for pod in latest_pods(pods) if worker_index(pod) == 0), None)
            result = chief_result(logs.get(chief.metadata.name, "")) if chief else None
            if result is None:
                raise AirflowException(
                    f"Job {name} succeeded but worker 0 printed no result line "
                    "(dvc-stage --result-json -); see its log above"
                )
            return result

        def _log(self, pod: Any) -> str:
            """The pod's log (written to the task log when ``get_logs``), or '' if gone."""
            from kubernetes.client.rest import ApiException

            name, index = pod.metadata.name, worker_index(pod)
            try:
                text = self.client.read_namespaced_pod_log(
                    name=name,
                    namespace=pod.metadata.namespace,
                    container=BASE_CONTAINER,
                    tail_lines=None if self.get_logs else 100,
                )
            except ApiException as error:
                self.log.warning("no log of worker %d (pod %s): %s", index, name, error.reason)
                return ""
            for line in text.splitlines() if self.get_logs else []:
                self.log.info("[worker %d] %s", index, line)
            return text

        def _delete_earlier_tries(self, request: Any) -> None:
            labels = request.metadata.labels
            selector = ",".join(f"{k}={labels[k]}" for k in TASK_INSTANCE_LABELS if k in labels)
            namespace = request.metadata.namespace
            for job in self.job_client.list_namespaced_job(
                namespace, label_selector=selector
            ).items:
                if job.metadata.name != request.metadata.name:
                    self.log.warning("deleting Job %s of an earlier try", job.metadata.name)
                    self._delete(job.metadata.name, namespace)

        def _delete_job(self, request: Any) -> None:
            if self.on_finish_action.value != "keep_pod":
                self._delete(request.metadata.name, request.metadata.namespace)

        def _delete(self, name: str, namespace: str) -> None:
            """Delete a Job; its pods and its Service (owned by it) go with it."""
            from kubernetes.client.rest import ApiException

            try:
                self.job_client.delete_namespaced_job(
                    name=name, namespace=namespace, propagation_policy="Background"
                )
            except ApiException as error:
                if error.status != 404:
                    self.log.warning("could not delete Job %s: %s", name, error.reason)

    IndexedJobOperator.__qualname__ = IndexedJobOperator.__name__
    return IndexedJobOperator
