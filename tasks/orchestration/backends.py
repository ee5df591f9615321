"""Where the GPU stages run: the worker itself, a Kubernetes pod, or a Docker container.

:class:`Backend` is read from the environment when Airflow parses the DAGs
(``TASKS_GPU_BACKEND`` = ``local`` | ``kubernetes`` | ``docker``, and the knobs
below); :func:`kubernetes_stage` and :func:`docker_stage` build the operator
that runs ``python -m tasks dvc-stage <stage> <dataset>`` in the trainer image
with the GPUs requested. Under ``train.distribute: multi_worker`` with several
``train.workers``, train and finetune are a Kubernetes Indexed Job instead, one pod
per worker (:mod:`tasks.orchestration.k8s_job`). The kubernetes and docker providers
are imported only when their backend is chosen.

The container must see the project (``TASKS_PROJECT``) and the run state
(``TASKS_STATE_DIR``: the workspaces, the DVC cache, the embedded MLflow store)
at the paths the Airflow workers see them. The docker backend bind-mounts both
(the state only when it is outside the project). A pod mounts the claim
``TASKS_K8S_PVC`` at the project; a state directory outside the project needs
its own claim, ``TASKS_K8S_STATE_PVC`` (it may name the same claim).

The MLflow login (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) never goes into a
templated field, which Airflow stores and shows rendered: a pod gets it from the
Kubernetes Secret ``TASKS_K8S_MLFLOW_LOGIN`` (``envFrom``), a container through
the DockerOperator's ``private_environment``, read from the worker's environment
when the task runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tasks.contract import PROJECT_ENV, STATE_ENV
from tasks.errors import ConfigError
from tasks.orchestration.project import Project

GPU_BACKENDS = ("local", "kubernetes", "docker")


@dataclass(frozen=True)
class Backend:
    """Where the GPU stages run, read from the environment at parse time."""

    kind: str = "local"
    gpu_stages: frozenset[str] = frozenset({"train", "finetune"})
    pool: str = "gpu"
    queue: str | None = None
    image: str = "transfer-learning-trainer:latest"
    gpus_per_task: int = 1
    namespace: str = "default"
    pvc: str = "transfer-learning-project"
    state_pvc: str | None = None
    """The claim mounted at ``TASKS_STATE_DIR`` when that is outside ``TASKS_PROJECT``."""
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, str], ...] = ()
    docker_url: str = "unix://var/run/docker.sock"
    mlflow_secret: str | None = None
    """The Kubernetes Secret holding the pods' MLflow login (``MLFLOW_TRACKING_*`` keys)."""
    worker_restarts: int = 3
    """How often each worker of a multi-worker Job may fail and be replaced (its
    ``backoffLimitPerIndex``); a worker evicted or on a lost node does not count."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Backend:
        env = os.environ if environ is None else environ
        kind = env.get("TASKS_GPU_BACKEND", "local").strip() or "local"
        if kind not in GPU_BACKENDS:
            raise ConfigError(
                f"TASKS_GPU_BACKEND={kind!r} is not allowed; use one of: {', '.join(GPU_BACKENDS)}"
            )
        stages = env.get("TASKS_GPU_STAGES", "train,finetune")
        celery = "CeleryExecutor" in env.get("AIRFLOW__CORE__EXECUTOR", "")
        return cls(
            kind=kind,
            gpu_stages=frozenset(s.strip() for s in stages.split(",") if s.strip()),
            pool=env.get("TASKS_GPU_POOL", "gpu"),
            queue=env.get("TASKS_GPU_QUEUE") or ("gpu" if celery else None),
            image=env.get("TASKS_TRAINER_IMAGE", cls.image),
            gpus_per_task=int(env.get("TASKS_GPUS_PER_TASK", "1")),
            namespace=env.get("TASKS_K8S_NAMESPACE", cls.namespace),
            pvc=env.get("TASKS_K8S_PVC", cls.pvc),
            state_pvc=env.get("TASKS_K8S_STATE_PVC") or None,
            node_selector=_node_selector(env),
            tolerations=_tolerations(env),
            docker_url=env.get("TASKS_DOCKER_URL", cls.docker_url),
            mlflow_secret=env.get("TASKS_K8S_MLFLOW_LOGIN") or None,
            worker_restarts=_count_env(env, "TASKS_K8S_WORKER_RESTARTS", cls.worker_restarts),
        )


def _json_env(env: Mapping[str, str], name: str, default: Any) -> Any:
    text = env.get(name)
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"{name}: is not valid JSON (got {text!r})") from None


def _node_selector(env: Mapping[str, str]) -> dict[str, str]:
    """``TASKS_K8S_NODE_SELECTOR``: node labels, values as strings (``"true"``, ``"8"``)."""
    name = "TASKS_K8S_NODE_SELECTOR"
    value = _json_env(env, name, {"nvidia.com/gpu.present": "true"})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(
            f"{name}: must be a JSON object of label: string, e.g. "
            f'{{"nvidia.com/gpu.present": "true"}} (got {json.dumps(value)})'
        )
    return value


TOLERATION_FIELDS = {"key": str, "operator": str, "value": str, "effect": str}
TOLERATION_FIELDS |= {"tolerationSeconds": int}
"""A toleration as Kubernetes writes it, and each field's JSON type."""


def _tolerations(env: Mapping[str, str]) -> tuple[dict[str, Any], ...]:
    """``TASKS_K8S_TOLERATIONS``: a JSON list of tolerations in Kubernetes' spelling."""
    name = "TASKS_K8S_TOLERATIONS"
    default = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    items = _json_env(env, name, default)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ConfigError(f"{name}: must be a JSON list of tolerations (got {json.dumps(items)})")
    for item in items:
        for field, value in item.items():
            kind = TOLERATION_FIELDS.get(field)
            if kind is None:
                raise ConfigError(
                    f"{name}: unknown field {field!r}; a toleration has "
                    f"{', '.join(TOLERATION_FIELDS)}"
                )
            if not isinstance(value, kind) or isinstance(value, bool):
                word = "a whole number" if kind is int else "a string"
                raise ConfigError(f"{name}: {field} must be {word} (got {json.dumps(value)})")
    return tuple(items)


def toleration(item: Mapping[str, Any]) -> Any:
    """A toleration of :data:`TOLERATION_FIELDS` as the client's model."""
    from kubernetes.client import models as k8s

    fields = {json_name: attr for attr, json_name in k8s.V1Toleration.attribute_map.items()}
    return k8s.V1Toleration(**{fields[field]: value for field, value in item.items()})


def _count_env(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise ConfigError(f"{name}: must be a whole number of 0 or more (got {text!r})")
    return int(text)


def pod_env(project: Project) -> dict[str, str]:
    env = {
        PROJECT_ENV: str(project.root),
        STATE_ENV: str(project.state),
        "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
        "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
        "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
        "AIRFLOW_CTX_TRY_NUMBER": "{{ ti.try_number }}",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "KERAS_HOME"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def mlflow_login() -> dict[str, str]:
    """The worker's MLflow login, for a container's private environment."""
    return {name: os.environ[name] for name in MLFLOW_LOGIN if os.environ.get(name)}


def state_outside_project(project: Project) -> bool:
    """Whether ``TASKS_STATE_DIR`` is not under ``TASKS_PROJECT`` (a container needs both)."""
    return not project.state.resolve().is_relative_to(project.root.resolve())


def _pod_volumes(project: Project, backend: Backend) -> tuple[list[Any], list[Any]]:
    """The project's claim at the project root; with the state elsewhere, its claim there."""
    from kubernetes.client import models as k8s

    def claim(name: str, claim_name: str) -> Any:
        source = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=claim_name)
        return k8s.V1Volume(name=name, persistent_volume_claim=source)

    volumes = [claim("project", backend.pvc)]
    mounts = [k8s.V1VolumeMount(name="project", mount_path=str(project.root))]
    if state_outside_project(project):
        if not backend.state_pvc:
            raise ConfigError(
                f"TASKS_STATE_DIR={project.state} is outside TASKS_PROJECT={project.root}, "
                "and a pod mounts only TASKS_K8S_PVC there; set TASKS_K8S_STATE_PVC to the "
                "claim holding the state (or put the state under the project)"
            )
        if backend.state_pvc == backend.pvc:
            name = "project"
        else:
            name = "state"
            volumes.append(claim(name, backend.state_pvc))
        mounts.append(k8s.V1VolumeMount(name=name, mount_path=str(project.state)))
    return volumes, mounts


@dataclass(frozen=True)
class SweepLane:
    """A sweep lane's stage in a container: the dataset and workspace come from the
    ``plan`` task's combination for this map index (rendered when the task runs)."""

    plan_task: str = "plan"

    def field(self, name: str) -> str:
        return f"{{{{ ti.xcom_pull(task_ids='{self.plan_task}')[ti.map_index]['{name}'] }}}}"

    @property
    def dataset(self) -> str:
        return self.field("dataset")

    @property
    def lane(self) -> str:
        """``<sweep>/<combination>``: ``dvc-stage --lane`` runs in that lane's workspace."""
        return f"{self.field('sweep')}/{self.field('key')}"


def stage_argv(stage: str, dataset: str, lane: SweepLane | None) -> list[str]:
    """``python -m tasks dvc-stage``: what a container runs for one stage."""
    argv = ["python", "-m", "tasks", "dvc-stage", stage, lane.dataset if lane else dataset]
    return [*argv, "--lane", lane.lane] if lane else argv


def pod_args(
    project: Project, dataset: str, stage: str, backend: Backend, lane: SweepLane | None
) -> dict[str, Any]:
    """What every trainer pod of a stage shares, one pod or an Indexed Job's: the image,
    the stage command, the environment and MLflow login Secret, the GPUs, the placement,
    the volumes and the labels."""
    from kubernetes.client import models as k8s

    gpus = str(backend.gpus_per_task)
    volumes, volume_mounts = _pod_volumes(project, backend)
    labels = {"app": "transfer-learning", "stage": stage}
    labels |= {"sweep": "true"} if lane else {"dataset": dataset}
    secret = backend.mlflow_secret
    return {
        "name": f"{dataset}-{stage}".replace("_", "-"),
        "namespace": backend.namespace,
        "image": backend.image,
        "cmds": stage_argv(stage, dataset, lane),
        "env_vars": pod_env(project),
        "env_from": [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))]
        if secret
        else None,
        "container_resources": k8s.V1ResourceRequirements(
            limits={"nvidia.com/gpu": gpus}, requests={"nvidia.com/gpu": gpus}
        ),
        "node_selector": dict(backend.node_selector or {}),
        "tolerations": [toleration(item) for item in backend.tolerations],
        "volumes": volumes,
        "volume_mounts": volume_mounts,
        "labels": labels,
        "get_logs": True,
        "on_finish_action": "delete_pod",
    }


def kubernetes_stage(
    project: Project,
    dataset: str,
    stage: str,
    backend: Backend,
    lane: SweepLane | None = None,
    **task_args: Any,
) -> Any:
    """One GPU stage as a pod; ``lane``: of a sweep lane (``dataset`` then names the pods)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(
        task_id=stage,
        arguments=["--result-json", "/airflow/xcom/return.json"],
        do_xcom_push=True,
        **pod_args(project, dataset, stage, backend, lane),
        **task_args,
    )


def docker_stage(
    project: Project,
    dataset: str,
    stage: str,
    backend: Backend,
    lane: SweepLane | None = None,
    **task_args: Any,
) -> Any:
    """One GPU stage as a container; ``lane``: of a sweep lane."""
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest, Mount

    # The same absolute paths on the host as in the worker (docs/deployment.md).
    paths = [project.root, *([project.state] if state_outside_project(project) else [])]
    return DockerOperator(
        task_id=stage,
        image=backend.image,
        command=[*stage_argv(stage, dataset, lane), "--result-json", "-"],
        environment=pod_env(project),
        private_environment=mlflow_login(),
        device_requests=[DeviceRequest(count=backend.gpus_per_task, capabilities=[["gpu"]])],
        mounts=[Mount(target=str(path), source=str(path), type="bind") for path in paths],
        working_dir=str(project.root),
        user=f"{os.getuid()}:{os.getgid()}",
        docker_url=backend.docker_url,
        auto_remove="success",
        mount_tmp_dir=False,
        do_xcom_push=True,
        **task_args,
    )
