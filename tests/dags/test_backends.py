"""GPU execution backends: the kubernetes and docker variants parse and carry the GPU resources.

No cluster and no Docker daemon: the operators' templated fields are rendered
and the pod spec is built in dry-run mode (serialised as the API server would get
it), then read field by field: image, command, env, GPU requests and limits,
placement, volumes. The container must see the workspaces, so a state directory
outside the project is mounted too.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.config import load_config
from tasks.orchestration.project import Project
from tests.conftest import REPO

DATASET = "cats_vs_dogs"


RUN_ID = "manual__2026-01-05T00:00:00+00:00"
K8S = {
    "TASKS_GPU_BACKEND": "kubernetes",
    "TASKS_TRAINER_IMAGE": "registry.example.com/trainer:1.2",
    "TASKS_GPUS_PER_TASK": "2",
    "TASKS_K8S_NAMESPACE": "ml",
    "TASKS_K8S_PVC": "project-pvc",
    "TASKS_K8S_NODE_SELECTOR": '{"pool": "a100"}',
}


def _dag(backend_env: dict[str, str], state: Path | None = None):
    """One dataset's DAG on a backend; ``state``: a TASKS_STATE_DIR (default the project)."""
    from dags.datasets import build_dataset_dag
    from tasks.orchestration.backends import Backend

    project = Project.from_env(REPO, environ={"TASKS_STATE_DIR": str(state)} if state else {})
    cfg = load_config(REPO / "params.yaml")
    return build_dataset_dag(project, cfg, DATASET, Backend.from_env(backend_env)), project


def _render(dag, task):
    context = {
        "dag": dag,
        "task": task,
        "run_id": RUN_ID,
        "ti": SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=-1, try_number=1),
    }
    task.render_template_fields(context)
    return context


def _pod(dag, stage: str) -> dict:
    """The pod the stage's KubernetesPodOperator would create, as the API server gets it."""
    from kubernetes.client import ApiClient

    task = dag.get_task(stage)
    pod = task.build_pod_request_obj(_render(dag, task), dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def _main(pod: dict) -> dict:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return container


@pytest.fixture(scope="module")
def k8s_dag():
    """The kubernetes backend, parsed with an MLflow server and a Keras cache configured."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml.svc:5000")
        env.setenv("KERAS_HOME", "/cache/keras")
        return _dag(K8S)


def test_kubernetes_backend_runs_gpu_stages_as_pods_and_cpu_stages_on_the_worker(k8s_dag):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    dag, _ = k8s_dag
    for stage in ("train", "finetune"):
        task = dag.get_task(stage)
        assert isinstance(task, KubernetesPodOperator)
        assert task.pool == "gpu" and task.pool_slots == 1 and task.retries == 2
        assert task.do_xcom_push is True and task.get_logs is True
        assert task.on_finish_action.value == "delete_pod"
    for stage in ("download", "validate", "evaluate", "register"):
        assert type(dag.get_task(stage)).__name__ == "_PythonDecoratedOperator", stage


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_kubernetes_pod_runs_the_stage_command_in_the_trainer_image(k8s_dag, stage):
    dag, _ = k8s_dag
    pod = _pod(dag, stage)
    container = _main(pod)
    assert container["image"] == "registry.example.com/trainer:1.2"
    assert container["command"] == ["python", "-m", "tasks", "dvc-stage", stage, DATASET]
    # The XCom sidecar reads what the stage command writes here.
    assert container["args"] == ["--result-json", "/airflow/xcom/return.json"]
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in container["volumeMounts"]
    sidecars = [c["name"] for c in pod["spec"]["containers"] if c["name"] != "base"]
    assert sidecars == ["airflow-xcom-sidecar"]
    assert pod["spec"]["restartPolicy"] == "Never"  # Airflow retries, not the kubelet
    assert pod["metadata"]["namespace"] == "ml"
    assert pod["metadata"]["name"].startswith(f"cats-vs-dogs-{stage}-")


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_kubernetes_pod_requests_and_limits_the_gpus(k8s_dag, stage):
    """Extended resources need requests == limits; both say TASKS_GPUS_PER_TASK."""
    dag, _ = k8s_dag
    resources = _main(_pod(dag, stage))["resources"]
    assert resources == {"limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "2"}}


def test_kubernetes_pod_env_names_the_project_the_state_and_the_airflow_task(k8s_dag):
    dag, project = k8s_dag
    env = _main(_pod(dag, "finetune"))["env"]
    assert env == [
        {"name": "TASKS_PROJECT", "value": str(project.root)},
        {"name": "TASKS_STATE_DIR", "value": str(project.state)},
        {"name": "AIRFLOW_CTX_DAG_ID", "value": f"transfer_learning__{DATASET}"},
        {"name": "AIRFLOW_CTX_DAG_RUN_ID", "value": RUN_ID},
        {"name": "AIRFLOW_CTX_TASK_ID", "value": "finetune"},
        {"name": "AIRFLOW_CTX_TRY_NUMBER", "value": "1"},
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml.svc:5000"},
        {"name": "KERAS_HOME", "value": "/cache/keras"},
    ]


def test_kubernetes_pod_env_has_no_tracking_uri_when_none_is_set(monkeypatch):
    """Unset, the stage commands use the embedded store under TASKS_STATE_DIR."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    dag, _ = _dag(K8S)
    names = [item["name"] for item in _main(_pod(dag, "train"))["env"]]
    assert "MLFLOW_TRACKING_URI" not in names and "KERAS_HOME" not in names
    assert names[:2] == ["TASKS_PROJECT", "TASKS_STATE_DIR"]


def test_kubernetes_pod_lands_on_the_gpu_pool_with_labels(k8s_dag):
    dag, _ = k8s_dag
    pod = _pod(dag, "train")
    assert pod["spec"]["nodeSelector"] == {"pool": "a100"}
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    labels = pod["metadata"]["labels"]
    assert {k: labels[k] for k in ("app", "dataset", "stage")} == {
        "app": "transfer-learning",
        "dataset": DATASET,
        "stage": "train",
    }
    # The operator's own labels find the pod again on a retry or a re-attach.
    assert labels["dag_id"] == f"transfer_learning__{DATASET}" and labels["task_id"] == "train"


def test_kubernetes_tolerations_and_node_selector_come_from_the_environment():
    tolerations = '[{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute"}]'
    dag, _ = _dag(
        {**K8S, "TASKS_K8S_NODE_SELECTOR": '{"a": "b"}', "TASKS_K8S_TOLERATIONS": tolerations}
    )
    pod = _pod(dag, "train")
    assert pod["spec"]["nodeSelector"] == {"a": "b"}
    assert pod["spec"]["tolerations"] == [
        {"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute"}
    ]


def _claims(pod: dict) -> dict[str, str]:
    return {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }


def _mounts(pod: dict) -> dict[str, str]:
    """mount path -> volume name, the XCom sidecar's volume left out."""
    return {m["mountPath"]: m["name"] for m in _main(pod)["volumeMounts"] if m["name"] != "xcom"}


def test_kubernetes_pod_mounts_the_project_claim_which_holds_the_state(k8s_dag):
    dag, project = k8s_dag
    assert project.state == project.root
    pod = _pod(dag, "train")
    assert _claims(pod) == {"project": "project-pvc"}
    assert _mounts(pod) == {str(project.root): "project"}
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["xcom", "project"]


def test_kubernetes_pod_mounts_a_state_dir_outside_the_project_from_its_claim(tmp_path):
    """The workspaces, the DVC cache and the embedded MLflow store live in TASKS_STATE_DIR:
    a pod that mounted only the project could not see the workspace it must run in."""
    state = tmp_path / "state"
    dag, project = _dag({**K8S, "TASKS_K8S_STATE_PVC": "state-pvc"}, state=state)
    pod = _pod(dag, "train")
    assert _claims(pod) == {"project": "project-pvc", "state": "state-pvc"}
    assert _mounts(pod) == {str(project.root): "project", str(state): "state"}
    env = {item["name"]: item["value"] for item in _main(pod)["env"]}
    assert env["TASKS_STATE_DIR"] == str(state)


def test_kubernetes_state_claim_may_be_the_project_claim(tmp_path):
    state = tmp_path / "state"
    dag, project = _dag({**K8S, "TASKS_K8S_STATE_PVC": "project-pvc"}, state=state)
    pod = _pod(dag, "finetune")
    assert _claims(pod) == {"project": "project-pvc"}  # one volume, mounted twice
    assert _mounts(pod) == {str(project.root): "project", str(state): "project"}


def test_kubernetes_state_dir_outside_the_project_without_a_claim_is_a_parse_error(tmp_path):
    from tasks.errors import ConfigError

    state = tmp_path / "state"
    with pytest.raises(ConfigError) as error:
        _dag(K8S, state=state)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"TASKS_STATE_DIR={state} is outside TASKS_PROJECT={REPO}")
    assert "set TASKS_K8S_STATE_PVC" in message


def test_kubernetes_state_dir_inside_the_project_needs_no_second_claim(tmp_path):
    """A state dir under the project is on the project's claim (TASKS_K8S_STATE_PVC unused)."""
    dag, project = _dag({**K8S, "TASKS_K8S_STATE_PVC": "state-pvc"}, state=REPO / "var")
    pod = _pod(dag, "train")
    assert _claims(pod) == {"project": "project-pvc"}
    assert _mounts(pod) == {str(project.root): "project"}


# --- docker --------------------------------------------------------------------


def _docker(dag, stage: str):
    from airflow.providers.docker.operators.docker import DockerOperator

    task = dag.get_task(stage)
    assert isinstance(task, DockerOperator), stage
    _render(dag, task)
    return task


def _bind_mounts(task) -> list[tuple[str, str, str, bool]]:
    return [(m["Source"], m["Target"], m["Type"], m["ReadOnly"]) for m in task.mounts]


def test_docker_backend_runs_the_stage_command_with_gpus_and_the_project(monkeypatch):
    from airflow.providers.docker.operators.docker import DockerOperator

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.delenv("KERAS_HOME", raising=False)
    dag, project = _dag(
        {
            "TASKS_GPU_BACKEND": "docker",
            "TASKS_GPU_STAGES": "train,evaluate",
            "TASKS_GPUS_PER_TASK": "2",
            "TASKS_TRAINER_IMAGE": "trainer:gpu",
            "TASKS_DOCKER_URL": "tcp://docker:2375",
        }
    )
    for stage in ("train", "evaluate"):
        task = _docker(dag, stage)
        assert task.image == "trainer:gpu"
        assert task.command == [
            "python", "-m", "tasks", "dvc-stage", stage, DATASET, "--result-json", "-"
        ]  # fmt: skip
        assert task.environment == {
            "TASKS_PROJECT": str(project.root),
            "TASKS_STATE_DIR": str(project.state),
            "AIRFLOW_CTX_DAG_ID": f"transfer_learning__{DATASET}",
            "AIRFLOW_CTX_DAG_RUN_ID": RUN_ID,
            "AIRFLOW_CTX_TASK_ID": stage,
            "AIRFLOW_CTX_TRY_NUMBER": "1",
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        }
        (request,) = task.device_requests
        assert (request["Count"], request["Capabilities"]) == (2, [["gpu"]])
        assert request["Driver"] == "" and request["DeviceIDs"] == []  # any GPU, any driver
        assert _bind_mounts(task) == [(str(project.root),) * 2 + ("bind", False)]
        assert task.working_dir == str(project.root)
        assert task.user == f"{os.getuid()}:{os.getgid()}"  # files the worker can read back
        assert task.docker_url == "tcp://docker:2375"
        assert task.auto_remove == "success" and task.mount_tmp_dir is False
        assert task.do_xcom_push is True and task.xcom_all is False  # the last line: the result
        assert task.pool == "gpu" and task.retries == 2
    assert not isinstance(dag.get_task("finetune"), DockerOperator)


def test_docker_backend_binds_a_state_dir_outside_the_project_too(tmp_path):
    """Without it the container runs in a workspace it cannot see."""
    state = tmp_path / "state"
    dag, project = _dag({"TASKS_GPU_BACKEND": "docker"}, state=state)
    for stage in ("train", "finetune"):
        task = _docker(dag, stage)
        assert _bind_mounts(task) == [
            (str(project.root), str(project.root), "bind", False),
            (str(state), str(state), "bind", False),
        ]
        assert task.environment["TASKS_STATE_DIR"] == str(state)


def test_docker_backend_binds_a_state_dir_inside_the_project_once():
    dag, project = _dag({"TASKS_GPU_BACKEND": "docker"}, state=REPO / "var")
    assert _bind_mounts(_docker(dag, "train")) == [(str(REPO), str(REPO), "bind", False)]


def test_local_backend_routes_gpu_stages_to_the_gpu_queue_under_celery():
    dag, _ = _dag({"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"})
    assert dag.get_task("train").queue == "gpu"
    assert dag.get_task("download").queue != "gpu"
    dag, _ = _dag({"TASKS_GPU_POOL": "a100"})
    assert dag.get_task("finetune").pool == "a100"
    assert dag.get_task("finetune").queue != "gpu"


@pytest.mark.parametrize("name", ["TASKS_K8S_NODE_SELECTOR", "TASKS_K8S_TOLERATIONS"])
def test_malformed_json_setting_is_a_one_line_error(name):
    from tasks.errors import ConfigError
    from tasks.orchestration.backends import Backend

    with pytest.raises(ConfigError, match=f"{name}: is not valid JSON"):
        Backend.from_env({"TASKS_GPU_BACKEND": "kubernetes", name: "{pool: a100"})


LOGIN = {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "pw-never-stored-9"}


def _serialized(dag) -> str:
    """The DAG as Airflow stores it in its database (and shows in the UI)."""
    import json

    from airflow.serialization.serialized_objects import DagSerialization

    return json.dumps(DagSerialization.to_dict(dag))


def test_docker_containers_get_the_mlflow_login_privately(monkeypatch):
    for name, value in LOGIN.items():
        monkeypatch.setenv(name, value)
    dag, _ = _dag({"TASKS_GPU_BACKEND": "docker"})
    task = _docker(dag, "train")
    assert task._private_environment == LOGIN  # what the container gets on top
    assert not set(LOGIN) & set(task.environment)  # templated, stored, shown: never the login
    assert LOGIN["MLFLOW_TRACKING_PASSWORD"] not in _serialized(dag)


def test_kubernetes_pods_get_the_mlflow_login_from_a_secret(monkeypatch):
    for name, value in LOGIN.items():
        monkeypatch.setenv(name, value)
    dag, _ = _dag({**K8S, "TASKS_K8S_MLFLOW_LOGIN": "transfer-learning-mlflow"})
    container = _main(_pod(dag, "train"))
    assert container["envFrom"] == [{"secretRef": {"name": "transfer-learning-mlflow"}}]
    assert not set(LOGIN) & {item["name"] for item in container["env"]}
    assert LOGIN["MLFLOW_TRACKING_PASSWORD"] not in _serialized(dag)
    # Without the setting, no secret is referenced (a server without logins).
    plain, _ = _dag(K8S)
    assert not _main(_pod(plain, "train")).get("envFrom")


# --- the sweep DAG: each lane's GPU stages in a pod or container of their own ---------

PLAN = [
    {"sweep": "s1", "key": "cats_vs_dogs--mobilenet_v2", "dataset": "cats_vs_dogs"},
    {"sweep": "s1", "key": "ants_vs_bees--vgg16", "dataset": "ants_vs_bees"},
]


def _sweep_dag(backend_env: dict[str, str]):
    from dags.sweep import build_sweep_dag
    from tasks.orchestration.backends import Backend

    project = Project.from_env(REPO, environ={})
    cfg = load_config(REPO / "params.yaml")
    return build_sweep_dag(project, cfg, Backend.from_env(backend_env))


class _LaneInstance(SimpleNamespace):
    """What a mapped lane's task instance gives its templates: its map index and the plan."""

    def xcom_pull(self, task_ids: str, **_: object) -> object:
        assert task_ids == "plan"
        return PLAN


def _render_lane(dag, task, map_index: int) -> dict:
    ti = _LaneInstance(dag_id=dag.dag_id, task_id=task.task_id, map_index=map_index, try_number=1)
    context = {"dag": dag, "task": task, "run_id": RUN_ID, "ti": ti}
    task.render_template_fields(context)
    return context


@pytest.mark.parametrize("map_index", [0, 1])
def test_sweep_lanes_run_their_gpu_stages_as_pods_in_the_lanes_workspace(map_index):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import ApiClient

    dag = _sweep_dag(K8S)
    lane = PLAN[map_index]
    for stage in ("train", "finetune"):
        task = dag.get_task(f"pipeline.{stage}")
        assert isinstance(task, KubernetesPodOperator)
        pod = task.build_pod_request_obj(_render_lane(dag, task, map_index), dry_run=True)
        container = _main(ApiClient().sanitize_for_serialization(pod))
        assert container["command"] == [
            "python", "-m", "tasks", "dvc-stage", stage, lane["dataset"],
            "--lane", f"{lane['sweep']}/{lane['key']}",
        ]  # fmt: skip
        assert container["args"] == ["--result-json", "/airflow/xcom/return.json"]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
        assert task.pool == "gpu" and task.labels["sweep"] == "true"
    # the stages around them stay on the worker, as in the local backend
    assert not isinstance(dag.get_task("pipeline.validate"), KubernetesPodOperator)
    assert not isinstance(dag.get_task("pipeline.evaluate"), KubernetesPodOperator)


def test_sweep_lanes_run_their_gpu_stages_in_containers_on_the_docker_backend():
    from airflow.providers.docker.operators.docker import DockerOperator

    dag = _sweep_dag({"TASKS_GPU_BACKEND": "docker", "TASKS_TRAINER_IMAGE": "trainer:gpu"})
    task = dag.get_task("pipeline.train")
    assert isinstance(task, DockerOperator)
    _render_lane(dag, task, 1)
    assert task.command == [
        "python", "-m", "tasks", "dvc-stage", "train", "ants_vs_bees",
        "--lane", "s1/ants_vs_bees--vgg16", "--result-json", "-",
    ]  # fmt: skip
    assert task.image == "trainer:gpu" and task.pool == "gpu"


def test_a_lanes_stage_command_runs_in_the_lanes_workspace(tmp_path):
    """What the pod runs, run here: it looks for the lane's workspace, not the dataset's."""
    import subprocess
    import sys

    env = {**os.environ, "TASKS_PROJECT": str(tmp_path), "TASKS_STATE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "tasks", "dvc-stage", "train", DATASET]
    lane = subprocess.run(
        [*command, "--lane", "s1/cats_vs_dogs--vgg16"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert lane.returncode == 2
    expected = tmp_path / ".workspaces" / "sweeps" / "s1" / "cats_vs_dogs--vgg16"
    assert f"error: {expected} has not been prepared for a run" in lane.stderr
    bad = subprocess.run(
        [*command, "--lane", "cats_vs_dogs--vgg16"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --lane 'cats_vs_dogs--vgg16': write it as SWEEP/COMBINATION")
    )
