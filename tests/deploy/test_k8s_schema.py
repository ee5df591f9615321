"""docker/k8s/*.yaml against the Kubernetes API's schema of a pinned release.

The schemas are Kubernetes' own OpenAPI definitions as JSON Schema (the
``kubernetes-validate`` package, strict: no unknown fields), read by
tests/deploy/k8s_openapi.py. The rendered Job, Service and pods of the GPU stages
are validated the same way in tests/dags/test_k8s_job.py. First: the validator does
reject what the API server would.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.deploy.dockerfiles import DOCKER
from tests.deploy.k8s_openapi import (
    KUBERNETES,
    assert_valid,
    name_errors,
    schema_errors,
    schema_file,
)

MANIFESTS = sorted((DOCKER / "k8s").glob("*.yaml"))
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "job-cats-vs-dogs-train-0123456789", "labels": {"app": "tl"}},
    "spec": {
        "clusterIP": "None",
        "selector": {"transfer-learning/workers": "job-cats-vs-dogs-train-0123456789"},
        "ports": [{"name": "workers", "port": 2222, "targetPort": 2222, "protocol": "TCP"}],
    },
}
JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "job-x-0123456789"},
    "spec": {
        "completionMode": "Indexed",
        "completions": 2,
        "parallelism": 2,
        "backoffLimitPerIndex": 3,
        "maxFailedIndexes": 0,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "subdomain": "job-x-0123456789",
                "containers": [
                    {"name": "base", "image": "trainer:1", "ports": [{"containerPort": 2222}]}
                ],
            }
        },
    },
}


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def test_the_pinned_release_has_the_schemas_the_manifests_need():
    assert KUBERNETES.startswith("1.3")
    for kind, api in [
        ("Job", "batch/v1"),
        ("Service", "v1"),
        ("Pod", "v1"),
        ("PersistentVolumeClaim", "v1"),
        ("Role", "rbac.authorization.k8s.io/v1"),
        ("RoleBinding", "rbac.authorization.k8s.io/v1"),
    ]:
        assert schema_file(kind, api).is_file(), (kind, api)


def test_well_formed_examples_pass():
    assert schema_errors(SERVICE) == [] and name_errors(SERVICE) == []
    assert schema_errors(JOB) == [] and name_errors(JOB) == []


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (
            lambda m: m["spec"]["ports"][0].update(port="2222"),
            "spec.ports[0].port: '2222' is not of type 'integer'",
        ),
        (
            lambda m: m["spec"].update(clusterIp="None"),
            "spec: Additional properties are not allowed ('clusterIp' was unexpected)",
        ),
        (
            lambda m: m["spec"].update(publishNotReadyAddresses="yes"),
            "spec.publishNotReadyAddresses: 'yes' is not of type 'boolean'",
        ),
        (
            lambda m: m["spec"].update(selector=["transfer-learning/workers"]),
            "spec.selector: ['transfer-learning/workers'] is not of type 'object'",
        ),
    ],
    ids=["string-port", "misspelt-field", "string-boolean", "list-selector"],
)
def test_the_validator_rejects_a_broken_service(break_it, expected):
    broken = copy.deepcopy(SERVICE)
    break_it(broken)
    errors = schema_errors(broken)
    assert expected in [error.replace(", 'null'", "") for error in errors], errors
    with pytest.raises(AssertionError, match="is not valid for Kubernetes"):
        assert_valid(broken)


def test_the_validator_rejects_a_broken_job():
    broken = copy.deepcopy(JOB)
    spec = broken["spec"]
    spec["completions"] = "2"
    spec["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "2222"
    spec["template"]["spec"]["containers"][0]["gpus"] = 2
    del spec["template"]["spec"]["containers"][0]["name"]
    errors = schema_errors(broken)
    container = "spec.template.spec.containers[0]"
    assert [error.replace(", 'null'", "") for error in errors] == sorted(
        [
            "spec.completions: '2' is not of type 'integer'",
            f"{container}.ports[0].containerPort: '2222' is not of type 'integer'",
            f"{container}: 'name' is a required property",
            f"{container}: Additional properties are not allowed ('gpus' was unexpected)",
        ]
    )
    del spec["template"]
    assert "spec: 'template' is a required property" in schema_errors(broken)


def test_the_validator_rejects_names_and_labels_the_api_server_would():
    broken = copy.deepcopy(SERVICE)
    broken["metadata"]["name"] = "2-workers"  # a Service name starts with a letter
    broken["metadata"]["labels"] = {"bad key!": "x", "ok": "a" * 64}
    assert name_errors(broken) == [
        "metadata.name: '2-workers' is not a valid Service name",
        "metadata.labels: key 'bad key!' is not a valid label key",
        f"metadata.labels[ok]: {'a' * 64!r} is not a valid label value",
    ]
    job = copy.deepcopy(JOB)
    job["metadata"]["name"] = "Job_1"
    job["spec"]["template"]["metadata"] = {
        "labels": {"run_id": "manual__2026-01-05T00:00:00+00:00"}
    }
    assert name_errors(job) == [
        "metadata.name: 'Job_1' is not a valid Job name",
        "spec.template.metadata.labels[run_id]: 'manual__2026-01-05T00:00:00+00:00' is not "
        "a valid label value",
    ]


def test_there_are_manifests_to_check():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == ["Job", "PersistentVolumeClaim", "Role", "RoleBinding"]


@pytest.mark.parametrize(("where", "manifest"), _documents(), ids=[w for w, _ in _documents()])
def test_every_manifest_is_valid_for_the_pinned_release(where, manifest):
    assert_valid(manifest)


def test_the_role_lets_the_airflow_worker_run_a_multi_worker_job():
    """What tasks/orchestration/k8s_job.py asks of the API, beyond the chart's pod launching."""
    role, binding = yaml.safe_load_all((DOCKER / "k8s" / "multi-worker-rbac.yaml").read_text())
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        ("batch", "jobs", "create"),  # the Job
        ("batch", "jobs", "get"),  # wait_until_job_complete
        ("batch", "jobs", "list"),  # an earlier try's Job
        ("batch", "jobs", "delete"),  # when it ends, on_kill, an earlier try's
        ("batch", "jobs/status", "get"),
        ("", "services", "create"),  # the headless Service
        ("", "pods", "list"),  # the workers, when the Job ends
        ("", "pods/log", "get"),  # the chief's result, the failed worker's last line
    }
    assert needed <= granted, needed - granted
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (subject,) = binding["subjects"]
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    namespace = next(e["value"] for e in values["env"] if e["name"] == "TASKS_K8S_NAMESPACE")
    assert subject == {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": namespace}
