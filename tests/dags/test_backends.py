"""GPU execution backends: the kubernetes and docker variants parse and carry the GPU resources.

No cluster and no Docker daemon: the operators' templated fields are rendered
and the pod spec is built in dry-run mode.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tasks.config import load_config
from tasks.orchestration.project import Project
from tests.conftest import REPO

DATASET = "cats_vs_dogs"


def _dag(backend_env: dict[str, str]):
    from dags.transfer_learning import Backend, build_dataset_dag

    project = Project.from_env(REPO, environ={})
    cfg = load_config(REPO / "params.yaml")
    return build_dataset_dag(project, cfg, DATASET, Backend.from_env(backend_env)), project


def _render(dag, task):
    context = {
        "dag": dag,
        "task": task,
        "run_id": "manual__2026-01-05T00:00:00+00:00",
        "ti": SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=-1, try_number=1),
    }
    task.render_template_fields(context)
    return context


def test_kubernetes_backend_runs_gpu_stages_as_pods_with_gpu_limits():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    dag, project = _dag(
        {
            "TASKS_GPU_BACKEND": "kubernetes",
            "TASKS_TRAINER_IMAGE": "registry.example.com/trainer:1.2",
            "TASKS_GPUS_PER_TASK": "2",
            "TASKS_K8S_NAMESPACE": "ml",
            "TASKS_K8S_PVC": "project-pvc",
            "TASKS_K8S_NODE_SELECTOR": '{"pool": "a100"}',
        }
    )
    for stage in ("train", "finetune"):
        task = dag.get_task(stage)
        assert isinstance(task, KubernetesPodOperator)
        assert task.pool == "gpu" and task.retries == 2
        context = _render(dag, task)
        pod = task.build_pod_request_obj(context, dry_run=True)
        container = pod.spec.containers[0]
        assert container.image == "registry.example.com/trainer:1.2"
        assert container.command == ["python", "-m", "tasks", "dvc-stage", stage, DATASET]
        assert container.args == ["--result-json", "/airflow/xcom/return.json"]
        assert container.resources.limits == {"nvidia.com/gpu": "2"}
        assert pod.metadata.namespace == "ml"
        assert pod.spec.node_selector == {"pool": "a100"}
        assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [
            ("nvidia.com/gpu", "Exists", "NoSchedule")
        ]
        (volume,) = [v for v in pod.spec.volumes if v.persistent_volume_claim]
        assert volume.persistent_volume_claim.claim_name == "project-pvc"
        mounts = {m.name: m.mount_path for m in container.volume_mounts}
        assert mounts["project"] == str(project.root)
        env = {e.name: e.value for e in container.env}
        assert env["AIRFLOW_CTX_DAG_ID"] == f"transfer_learning__{DATASET}"
        assert env["AIRFLOW_CTX_DAG_RUN_ID"] == "manual__2026-01-05T00:00:00+00:00"
        assert env["TASKS_PROJECT"] == str(project.root)
        assert task.do_xcom_push is True
    # CPU stages stay on the worker.
    assert type(dag.get_task("download")).__name__ == "_PythonDecoratedOperator"
    assert type(dag.get_task("evaluate")).__name__ == "_PythonDecoratedOperator"


def test_docker_backend_requests_gpus_and_binds_the_project():
    from airflow.providers.docker.operators.docker import DockerOperator

    dag, project = _dag({"TASKS_GPU_BACKEND": "docker", "TASKS_GPU_STAGES": "train,evaluate"})
    for stage in ("train", "evaluate"):
        task = dag.get_task(stage)
        assert isinstance(task, DockerOperator)
        _render(dag, task)
        assert task.image == "transfer-learning-trainer:latest"
        assert task.command[-2:] == ["--result-json", "-"]
        (request,) = task.device_requests
        assert request["Capabilities"] == [["gpu"]] and request["Count"] == 1
        (mount,) = task.mounts
        assert mount["Source"] == mount["Target"] == str(project.root)
        assert mount["Type"] == "bind"
        assert task.environment["AIRFLOW_CTX_DAG_RUN_ID"] == "manual__2026-01-05T00:00:00+00:00"
        assert task.pool == "gpu"
    assert not isinstance(dag.get_task("finetune"), DockerOperator)


def test_local_backend_routes_gpu_stages_to_the_gpu_queue_under_celery():
    dag, _ = _dag({"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"})
    assert dag.get_task("train").queue == "gpu"
    assert dag.get_task("download").queue != "gpu"
    dag, _ = _dag({"TASKS_GPU_POOL": "a100"})
    assert dag.get_task("finetune").pool == "a100"
    assert dag.get_task("finetune").queue != "gpu"


@pytest.mark.parametrize("name", ["TASKS_K8S_NODE_SELECTOR", "TASKS_K8S_TOLERATIONS"])
def test_malformed_json_setting_is_a_one_line_error(name):
    from dags.transfer_learning import Backend
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{name}: is not valid JSON"):
        Backend.from_env({"TASKS_GPU_BACKEND": "kubernetes", name: "{pool: a100"})
