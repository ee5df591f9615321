"""Multi-worker GPU stages on Kubernetes: an Indexed Job, its headless Service, its outcome.

No cluster: the DAG is built with ``train.distribute: multi_worker, train.workers: 2``
on the kubernetes backend, the operator's templates are rendered, and the Job and the
Service are built by the provider's own code and serialised as the API server would
get them; then they are read field by field and validated against the OpenAPI schema
of a pinned Kubernetes release (tests/deploy/k8s_openapi.py), as is today's single
pod. The provider needs a kube config to build a Job: the Airflow connection
``kubernetes_default`` names one whose server is unreachable, never contacted.
What the task reports when the Job ends is read from API objects as the API
returns them (JSON deserialised by the Kubernetes client).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tasks.cluster import cluster_from_env
from tasks.config import Config, load_config
from tasks.orchestration.project import Project
from tests.conftest import REPO
from tests.dags.test_backends import (
    DATASET,
    K8S,
    LOGIN,
    PLAN,
    RUN_ID,
    _LaneInstance,
    _main,
    _pod,
    _render,
    _serialized,
)
from tests.deploy.k8s_openapi import DNS_1035_LABEL, assert_valid

JOB_STAGES = ("train", "finetune")
SECRET = "transfer-learning-mlflow"
KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
users: [{name: none, user: {token: never-sent}}]
"""


@pytest.fixture(autouse=True, scope="module")
def kubeconfig(tmp_path_factory):
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(KUBECONFIG)
    connection = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(path)}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(connection))
        yield path


def _config(distribute: str = "multi_worker", workers: int = 2) -> Config:
    """params.yaml with the training cluster set through the Config model (validated)."""
    raw = load_config(REPO / "params.yaml").model_dump(by_alias=True)
    raw["train"] |= {"distribute": distribute, "workers": workers}
    return Config.model_validate(raw)


def _dag(backend_env: dict[str, str], cfg: Config | None = None, state=None):
    from dags.datasets import build_dataset_dag
    from tasks.orchestration.backends import Backend

    project = Project.from_env(REPO, environ={"TASKS_STATE_DIR": str(state)} if state else {})
    dag = build_dataset_dag(project, cfg or _config(), DATASET, Backend.from_env(backend_env))
    return dag, project


def _api(obj) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _job(dag, stage: str, context: dict | None = None) -> tuple[dict, dict]:
    """The Job and the Service the stage's task would create, as the API server gets them."""
    task = dag.get_task(stage)
    if context is None:
        context = _render(dag, task)
    else:
        context = {**context, "task": task}
        task.render_template_fields(context)
    return _api(task.build_job_request_obj(context)), _api(task.worker_service())


def _template(job: dict) -> dict:
    return job["spec"]["template"]


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.fixture(scope="module")
def job_dag(kubeconfig):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml.svc:5000")
        env.delenv("KERAS_HOME", raising=False)
        return _dag({**K8S, "TASKS_K8S_MLFLOW_LOGIN": SECRET})


# --- which tasks become Jobs -------------------------------------------------------------


def test_multi_worker_gpu_stages_are_indexed_jobs_and_the_other_stages_stay(job_dag):
    from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    dag, _ = job_dag
    for stage in JOB_STAGES:
        task = dag.get_task(stage)
        assert isinstance(task, KubernetesJobOperator), stage
        assert task.completion_mode == "Indexed"
        assert task.completions == task.parallelism == task.workers == 2
        assert task.wait_until_job_complete is True and task.random_name_suffix is False
        assert task.do_xcom_push is True and task.get_logs is True  # the chief's result
        assert task.pool == "gpu" and task.pool_slots == 2  # one GPU pool slot per worker pod
        assert task.retries == 2  # after the Job itself gave up: a new Job
    for stage in ("download", "validate", "evaluate", "register"):
        task = dag.get_task(stage)
        assert not isinstance(task, KubernetesPodOperator), stage
        assert type(task).__name__ == "_PythonDecoratedOperator", stage
    assert "Indexed Job of 2 worker pods" in dag.doc_md and "2 slots of pool `gpu`" in dag.doc_md


@pytest.mark.parametrize(
    ("backend_env", "cfg", "expected"),
    [
        (K8S, _config(workers=1), "KubernetesPodOperator"),
        (K8S, _config(distribute="auto", workers=1), "KubernetesPodOperator"),
        ({"TASKS_GPU_BACKEND": "docker"}, _config(), "DockerOperator"),
        ({}, _config(), "_PythonDecoratedOperator"),
    ],
    ids=["one-worker", "not-multi-worker", "docker", "local"],
)
def test_one_worker_or_another_backend_keeps_todays_task(backend_env, cfg, expected):
    """A Job only for several workers on the kubernetes backend; else today's one task,
    one pool slot (the stage itself names a missing cluster: tasks.cluster)."""
    dag, _ = _dag(backend_env, cfg)
    for stage in JOB_STAGES:
        task = dag.get_task(stage)
        assert type(task).__name__ == expected, stage
        assert task.pool == "gpu" and task.pool_slots == 1
    assert "Indexed Job" not in dag.doc_md


def test_an_evaluate_pod_stays_one_pod_when_train_is_a_job():
    from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator

    dag, _ = _dag({**K8S, "TASKS_GPU_STAGES": "train,evaluate"})
    assert isinstance(dag.get_task("train"), KubernetesJobOperator)
    evaluate = dag.get_task("evaluate")
    assert type(evaluate).__name__ == "KubernetesPodOperator" and evaluate.pool_slots == 1
    assert type(dag.get_task("finetune")).__name__ == "_PythonDecoratedOperator"


# --- the Job -------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", JOB_STAGES)
def test_the_job_runs_one_pod_per_worker_and_replaces_a_lost_one(job_dag, stage):
    dag, _ = job_dag
    job, _ = _job(dag, stage)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    # each worker may fail 3 times; the first index out of restarts fails the Job
    assert spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0
    assert "backoffLimit" not in spec  # the per-index limit counts, not a Job-wide one
    # evicted, preempted, on a lost node: replaced without counting
    assert spec["podFailurePolicy"] == {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
        ]
    }
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods with one hostname
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # the Job replaces pods


@pytest.mark.parametrize("stage", JOB_STAGES)
def test_every_worker_pod_is_todays_pod_with_the_workers_addresses(job_dag, stage):
    dag, project = job_dag
    job, service = _job(dag, stage)
    pod = _template(job)["spec"]
    (container,) = pod["containers"]  # no XCom sidecar: a failed pod must end
    assert container["name"] == "base"
    assert container["image"] == "registry.example.com/trainer:1.2"
    assert container["command"] == ["python", "-m", "tasks", "dvc-stage", stage, DATASET]
    assert container["args"] == ["--result-json", "-"]  # the result: the log's last line
    name = job["metadata"]["name"]
    hosts = f"{name}-0.{name}:2222,{name}-1.{name}:2222"
    assert container["env"] == [
        {"name": "TASKS_PROJECT", "value": str(project.root)},
        {"name": "TASKS_STATE_DIR", "value": str(project.state)},
        {"name": "AIRFLOW_CTX_DAG_ID", "value": f"transfer_learning__{DATASET}"},
        {"name": "AIRFLOW_CTX_DAG_RUN_ID", "value": RUN_ID},
        {"name": "AIRFLOW_CTX_TASK_ID", "value": stage},
        {"name": "AIRFLOW_CTX_TRY_NUMBER", "value": "1"},
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml.svc:5000"},
        {"name": "TASKS_WORKER_HOSTS", "value": hosts},
    ]
    assert container["envFrom"] == [{"secretRef": {"name": SECRET}}]
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "2"},
        "requests": {"nvidia.com/gpu": "2"},
    }
    assert container["ports"] == [{"name": "workers", "containerPort": 2222, "protocol": "TCP"}]
    assert container["volumeMounts"] == [{"name": "project", "mountPath": str(project.root)}]
    assert pod["volumes"] == [
        {"name": "project", "persistentVolumeClaim": {"claimName": "project-pvc"}}
    ]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # Kubernetes names pod i <job>-<i>; the subdomain makes it <job>-<i>.<service>
    assert pod["subdomain"] == service["metadata"]["name"] == name and "hostname" not in pod


def test_each_worker_reads_its_place_in_the_cluster_from_the_rendered_env(job_dag):
    """What tasks.cluster makes of the pod's environment plus the index Kubernetes sets."""
    dag, _ = job_dag
    job, _ = _job(dag, "train")
    env = _env(_template(job)["spec"]["containers"][0])
    name = job["metadata"]["name"]
    for index in (0, 1):
        cluster = cluster_from_env(2, {**env, "JOB_COMPLETION_INDEX": str(index)})
        assert cluster.hosts == (f"{name}-0.{name}:2222", f"{name}-1.{name}:2222")
        assert cluster.index == index and cluster.chief is (index == 0)


def test_the_job_and_its_pods_carry_the_labels(job_dag):
    dag, _ = job_dag
    job, service = _job(dag, "train")
    name = job["metadata"]["name"]
    pod_labels = _template(job)["metadata"]["labels"]
    ours = {"app": "transfer-learning", "stage": "train", "dataset": DATASET}
    assert {k: pod_labels[k] for k in ours} == ours
    assert pod_labels["transfer-learning/workers"] == name
    assert (
        pod_labels["dag_id"] == f"transfer_learning__{DATASET}" and pod_labels["try_number"] == "1"
    )
    labels = job["metadata"]["labels"]
    # a later try finds this Job by these (any try number) and deletes it before its own
    assert {k: labels[k] for k in ("dag_id", "task_id")} == {
        "dag_id": f"transfer_learning__{DATASET}",
        "task_id": "train",
    }
    assert labels["run_id"] == pod_labels["run_id"] and "try_number" not in labels
    assert "kubernetes_pod_operator" not in labels
    assert service["metadata"]["labels"]["transfer-learning/workers"] == name


# --- the Service -----------------------------------------------------------------------------


def test_the_headless_service_selects_the_jobs_pods_on_the_workers_port(job_dag):
    dag, _ = job_dag
    job, service = _job(dag, "train")
    name = job["metadata"]["name"]
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert service["metadata"]["name"] == name and service["metadata"]["namespace"] == "ml"
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: DNS names the pods themselves
    assert spec["ports"] == [
        {"name": "workers", "port": 2222, "targetPort": 2222, "protocol": "TCP"}
    ]
    assert spec["publishNotReadyAddresses"] is True
    assert spec["selector"] == {"transfer-learning/workers": name}
    assert spec["selector"].items() <= _template(job)["metadata"]["labels"].items()
    assert "ownerReferences" not in service["metadata"]  # until the Job exists


def test_the_service_belongs_to_the_created_job(job_dag):
    """Deleting the Job (the task, on_kill, its TTL, a person) deletes the Service too."""
    from kubernetes.client import models as k8s

    dag, _ = job_dag
    task = dag.get_task("train")
    _render(dag, task)
    uid = "6f1c0e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
    created = k8s.V1Job(metadata=k8s.V1ObjectMeta(name=task.subdomain, uid=uid))
    service = _api(task.worker_service(created))
    assert service["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": task.subdomain, "uid": uid}
    ]
    assert_valid(service)


# --- names ---------------------------------------------------------------------------------


def _context(dag, task, *, run_id: str = RUN_ID, try_number: int = 1, map_index: int = -1):
    ti = SimpleNamespace(
        dag_id=dag.dag_id, task_id=task.task_id, map_index=map_index, try_number=try_number
    )
    return {"dag": dag, "task": task, "run_id": run_id, "ti": ti}


def test_names_are_fixed_per_try_and_unique_across_runs_and_tries():
    dag, _ = _dag(K8S)
    task = dag.get_task("train")

    def name(**kwargs) -> str:
        job, _ = _job(dag, "train", _context(dag, task, **kwargs))
        return job["metadata"]["name"]

    first = name()
    assert first == name()  # rendered again (a resumed task): the same Job
    assert first.startswith("job-cats-vs-dogs-train-")
    others = {name(try_number=2), name(run_id="scheduled__2026-01-06T00:00:00+00:00")}
    assert first not in others and len(others) == 2
    assert DNS_1035_LABEL.match(first) and len(first) <= 56  # room for "-<index>" in 63


def test_a_long_base_name_is_cut_to_a_valid_job_name():
    from tasks.orchestration.k8s_job import JOB_NAME_MAX, job_name

    name = job_name("A_very-" * 20 + "_train", "dag", "train", "run", -1, 1)
    assert len(name) <= JOB_NAME_MAX and DNS_1035_LABEL.match(name)
    assert name.startswith("job-a-very-a-very-")
    assert job_name("", "dag", "train", "run", -1, 1).startswith("job-")


def test_the_job_name_prefix_is_the_providers():
    from airflow.providers.cncf.kubernetes.operators.job import JOB_NAME_PREFIX

    from tasks.orchestration.k8s_job import JOB_PREFIX

    assert JOB_PREFIX == JOB_NAME_PREFIX


def test_sweep_lanes_run_their_own_jobs_in_their_own_workspaces():
    from dags.sweep import build_sweep_dag
    from tasks.orchestration.backends import Backend

    project = Project.from_env(REPO, environ={})
    names = set()
    for map_index, lane in enumerate(PLAN):
        # each lane's task instance parses the DAG afresh, as Airflow's task runner does
        dag = build_sweep_dag(project, _config(), Backend.from_env(K8S))
        task = dag.get_task("pipeline.train")
        assert task.pool_slots == 2 and task.labels["sweep"] == "true"
        ti = _LaneInstance(
            dag_id=dag.dag_id, task_id=task.task_id, map_index=map_index, try_number=1
        )
        job, _ = _job(dag, "pipeline.train", {"dag": dag, "run_id": RUN_ID, "ti": ti})
        container = _template(job)["spec"]["containers"][0]
        assert container["command"] == [
            "python", "-m", "tasks", "dvc-stage", "train", lane["dataset"],
            "--lane", f"{lane['sweep']}/{lane['key']}",
        ]  # fmt: skip
        assert _template(job)["metadata"]["labels"]["map_index"] == str(map_index)
        assert job["metadata"]["labels"]["map_index"] == str(map_index)
        names.add(job["metadata"]["name"])
        assert _env(container)["TASKS_WORKER_HOSTS"].startswith(f"{job['metadata']['name']}-0.")
    assert len(names) == 2 and all(n.startswith("job-sweep-train-") for n in names)


def test_worker_restarts_come_from_the_environment():
    from tasks.errors import ConfigError
    from tasks.orchestration.backends import Backend

    dag, _ = _dag({**K8S, "TASKS_K8S_WORKER_RESTARTS": "5"})
    job, _ = _job(dag, "finetune")
    assert job["spec"]["backoffLimitPerIndex"] == 5
    with pytest.raises(ConfigError, match="TASKS_K8S_WORKER_RESTARTS: must be a whole number"):
        Backend.from_env({"TASKS_K8S_WORKER_RESTARTS": "three"})


def test_the_job_mounts_a_state_claim_like_a_pod(tmp_path):
    state = tmp_path / "state"
    dag, project = _dag({**K8S, "TASKS_K8S_STATE_PVC": "state-pvc"}, state=state)
    job, _ = _job(dag, "train")
    pod = _template(job)["spec"]
    assert pod["volumes"] == [
        {"name": "project", "persistentVolumeClaim": {"claimName": "project-pvc"}},
        {"name": "state", "persistentVolumeClaim": {"claimName": "state-pvc"}},
    ]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": "project", "mountPath": str(project.root)},
        {"name": "state", "mountPath": str(state)},
    ]
    assert_valid(job)


def test_the_mlflow_login_stays_out_of_the_stored_dag(monkeypatch):
    for name, value in LOGIN.items():
        monkeypatch.setenv(name, value)
    dag, _ = _dag({**K8S, "TASKS_K8S_MLFLOW_LOGIN": SECRET})
    job, _ = _job(dag, "train")
    container = _template(job)["spec"]["containers"][0]
    assert not set(LOGIN) & set(_env(container))
    stored = _serialized(dag)
    assert LOGIN["MLFLOW_TRACKING_PASSWORD"] not in stored and "IndexedJobOperator" in stored


# --- the Kubernetes API's schema --------------------------------------------------------------


@pytest.mark.parametrize("stage", JOB_STAGES)
def test_the_rendered_job_and_service_are_valid_kubernetes_objects(job_dag, stage):
    dag, _ = job_dag
    job, service = _job(dag, stage)
    assert_valid(job)
    assert_valid(service)


@pytest.mark.parametrize("stage", JOB_STAGES)
def test_todays_rendered_pod_is_a_valid_kubernetes_object(stage):
    from tests.dags.test_backends import _dag as pod_dag

    dag, _ = pod_dag({**K8S, "TASKS_K8S_MLFLOW_LOGIN": SECRET})
    pod = _pod(dag, stage)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["base", "airflow-xcom-sidecar"]
    assert _main(pod)["envFrom"] == [{"secretRef": {"name": SECRET}}]
    assert_valid(pod)


def test_tolerations_in_kubernetes_spelling_reach_the_pods_as_the_api_types_them():
    """TASKS_K8S_TOLERATIONS is Kubernetes JSON: ``tolerationSeconds`` as Kubernetes
    spells it, a number (a string would pass Python and fail at the API server)."""
    tolerations = [
        {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        }
    ]
    dag, _ = _dag({**K8S, "TASKS_K8S_TOLERATIONS": json.dumps(tolerations)})
    job, _ = _job(dag, "train")
    assert _template(job)["spec"]["tolerations"] == tolerations
    assert_valid(job)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TASKS_K8S_NODE_SELECTOR", '{"nvidia.com/gpu.count": 8}', "must be a JSON object of"),
        ("TASKS_K8S_NODE_SELECTOR", '["a100"]', "must be a JSON object of"),
        ("TASKS_K8S_TOLERATIONS", '{"key": "gpu"}', "must be a JSON list of tolerations"),
        ("TASKS_K8S_TOLERATIONS", '[{"key": "gpu", "efect": "NoSchedule"}]', "unknown field"),
        (
            "TASKS_K8S_TOLERATIONS",
            '[{"key": "gpu", "tolerationSeconds": "300"}]',
            "tolerationSeconds must be a whole number",
        ),
    ],
)
def test_placement_the_api_server_would_refuse_is_a_parse_error(name, value, message):
    from tasks.errors import ConfigError
    from tasks.orchestration.backends import Backend

    with pytest.raises(ConfigError, match=f"^{name}: {message}") as error:
        Backend.from_env({"TASKS_GPU_BACKEND": "kubernetes", name: value})
    assert "\n" not in str(error.value)


# --- what the task reports when the Job ends -----------------------------------------------


def _pod_from_api(
    name: str,
    index: int,
    phase: str,
    created: str,
    ended: str | None = None,
    exit_code: int | None = None,
    reason: str = "Error",
    conditions: list[dict] | None = None,
):
    """A pod of the Job as the API returns it (JSON, deserialised by the client)."""
    from kubernetes.client import ApiClient

    state = {"running": {"startedAt": created}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": ended}}
    data = {
        "metadata": {
            "name": name,
            "creationTimestamp": created,
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            "labels": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [
                {"name": "base", "image": "t", "imageID": "", "ready": False,
                 "restartCount": 0, "state": state}
            ],
        },
    }  # fmt: skip
    return ApiClient().deserialize(SimpleNamespace(data=json.dumps(data)), "V1Pod")


def _failed_job(reason: str = "FailedIndexes", message: str = "Job has failed indexes"):
    from kubernetes.client import ApiClient

    data = {
        "metadata": {"name": "job-cats-vs-dogs-train-0123456789"},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason,
                                   "message": message}]},
    }  # fmt: skip
    return ApiClient().deserialize(SimpleNamespace(data=json.dumps(data)), "V1Job")


def test_the_failure_names_the_worker_that_failed_first_in_the_last_round():
    """Round 1: worker 1's node was lost, worker 0 failed after it; both were replaced.
    Round 2: worker 0 ran out of memory first, then worker 1's collectives failed."""
    from tasks.orchestration.k8s_job import failure_line, first_failure, latest_pods

    job = "job-cats-vs-dogs-train-0123456789"
    disrupted = [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                  "lastTransitionTime": "2026-01-05T10:10:00Z"}]  # fmt: skip
    pods = [
        _pod_from_api(f"{job}-1-aaaaa", 1, "Failed", "2026-01-05T10:00:00Z", conditions=disrupted),
        _pod_from_api(f"{job}-0-bbbbb", 0, "Failed", "2026-01-05T10:00:00Z",
                      "2026-01-05T10:11:00Z", exit_code=2),
        _pod_from_api(f"{job}-1-ccccc", 1, "Failed", "2026-01-05T10:20:00Z",
                      "2026-01-05T10:31:00Z", exit_code=2),
        _pod_from_api(f"{job}-0-ddddd", 0, "Failed", "2026-01-05T10:20:00Z",
                      "2026-01-05T10:30:00Z", exit_code=137, reason="OOMKilled"),
    ]  # fmt: skip
    assert [pod.metadata.name[-5:] for pod in latest_pods(pods)] == ["ddddd", "ccccc"]
    failed = first_failure(pods)
    assert failed.metadata.name == f"{job}-0-ddddd"
    log = "Epoch 3/10\nKilled\n\n"
    assert failure_line("train", 2, failed, log, _failed_job()) == (
        f"train: worker 0 of 2 failed (exit code 137, OOMKilled; pod {job}-0-ddddd): Killed"
    )
    # only round 1 had happened: the lost worker is named, with how it went
    assert first_failure(pods[:2]).metadata.name == f"{job}-1-aaaaa"
    line = failure_line("train", 2, pods[0], "", _failed_job())
    assert line == (
        f"train: worker 1 of 2 failed (disrupted: DeletionByTaintManager; pod {job}-1-aaaaa): "
        "(no log)"
    )


def test_the_failure_line_is_one_line_with_the_workers_last_log_line():
    from tasks.orchestration.k8s_job import failure_line, first_failure

    job = "job-cats-vs-dogs-train-0123456789"
    pods = [
        _pod_from_api(f"{job}-0-aaaaa", 0, "Running", "2026-01-05T10:00:00Z"),
        _pod_from_api(f"{job}-1-bbbbb", 1, "Failed", "2026-01-05T10:00:00Z",
                      "2026-01-05T10:05:00Z", exit_code=2),
    ]  # fmt: skip
    failed = first_failure(pods)
    log = "Traceback (most recent call last):\n  ...\nerror: train@cats_vs_dogs failed: disk full\n"
    line = failure_line("train", 2, failed, log, _failed_job())
    assert line == (
        f"train: worker 1 of 2 failed (exit code 2; pod {job}-1-bbbbb): "
        "error: train@cats_vs_dogs failed: disk full"
    )
    assert "\n" not in line


def test_a_job_that_failed_without_a_failed_pod_says_why():
    from tasks.orchestration.k8s_job import failure_line, first_failure

    running = [_pod_from_api("job-x-0-aaaaa", 0, "Running", "2026-01-05T10:00:00Z")]
    assert first_failure(running) is None
    line = failure_line(
        "finetune", 2, None, "", _failed_job("DeadlineExceeded", "Job was active too long")
    )
    assert line == (
        "finetune: Kubernetes Job job-cats-vs-dogs-train-0123456789 failed "
        "(DeadlineExceeded: Job was active too long); no worker pod failed"
    )


def test_the_chiefs_result_is_the_last_json_line_of_its_log():
    from tasks.orchestration.k8s_job import chief_result

    result = {"stage": "train", "dataset": DATASET, "ran": True, "seconds": 12.5,
              "workspace": "/p/.workspaces/cats_vs_dogs", "run_id": "abc"}  # fmt: skip
    log = "\n".join(
        [
            "Epoch 1/2",
            '{"not": "a result"}',
            json.dumps(result),
            "W0105 10:00:00.000 atexit.cc:42] collective ops shut down",  # stderr, after it
            "",
        ]
    )
    assert chief_result(log) == result
    follower = json.dumps({"stage": "train", "dataset": DATASET, "worker": 1, "ran": True})
    assert chief_result(follower) is None  # a follower's line is never the stage's result
    assert chief_result("Epoch 1/2\n{truncated") is None
    assert chief_result("") is None
