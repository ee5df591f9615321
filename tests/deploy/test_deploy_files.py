"""The deployment files, checked without a Docker engine.

- docker/compose.yaml as a real compose implementation resolves it with
  docker/.env.example (``docker-compose config``: tests/deploy/dockerfiles.py;
  test_compose_config.py checks images, ports, secrets, the GPU worker and a broken
  file) validates against the Compose specification's JSON schema (vendored:
  tests/deploy/compose-spec.json, from the compose-spec project via the
  check-jsonschema package, Apache-2.0) and keeps the stack's rules: health
  checks and start-up order, non-root services, the secrets check, the per-service
  S3 keys;
- every Dockerfile pins its base images by version, ends as a non-root USER,
  declares no secret in ENV/ARG, copies only files that exist and that its
  .dockerignore lets through, and pins the versions uv.lock pins (hadolint lints
  them too: test_dockerfile_lint.py);
- mlflow/serve.sh picks its mode from the environment; docker/*.sh behave.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.dockerfiles import (
    COMPOSE,
    CONSOLE,
    DOCKER,
    ENV_EXAMPLE,
    REPO,
    SECRET_NAME,
    arg_defaults,
    env_names,
    flags,
    from_image,
    lock_versions,
    parse_dockerfile,
    pinned,
    read_env_file,
    resolved,
    stages,
    variables,
)

HERE = Path(__file__).parent
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
ONE_SHOT = {
    "check-secrets",
    "minio-volume-init",
    "createbuckets",
    "mlflow-accounts",
    "airflow-init",
    "trainer",
}
ROOT_ALLOWED = {"minio-volume-init"}  # chown of a fresh volume, no network, then exits


@pytest.fixture
def compose() -> dict:
    """docker/compose.yaml as ``docker-compose config`` resolves it with .env.example."""
    return resolved()


def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


# --- compose --------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec_schema(compose):
    schema = json.loads((HERE / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    # with the top-level name compose 1.29 does not know (test_compose_config.py)
    document = {"name": yaml.safe_load(COMPOSE.read_text())["name"], **compose}
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_schema_rejects_a_broken_compose_file(compose):
    """The schema check has teeth: a typo'd key and a bad condition fail."""
    schema = json.loads((HERE / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    messages = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(broken)]
    assert any("helthcheck" in m for m in messages)
    assert any("service_ready" in m for m in messages)


def test_every_variable_is_in_env_example():
    """The names the files read (a text scan: compose 1.29 does not list them). The other
    way round, .env.example holding nothing the stack does not read, and secrets being
    required with no default or literal, are checked by the compose implementation
    (test_compose_config.py)."""
    used = variables(COMPOSE.read_text()) | variables(CONSOLE.read_text())
    documented = set(read_env_file(ENV_EXAMPLE))
    assert used - documented == set()


def test_long_running_services_have_health_checks_and_run_as_non_root(compose):
    for name, service in services(compose).items():
        user = str(service.get("user", ""))
        if name in ROOT_ALLOWED:
            assert service.get("network_mode") == "none" and service.get("restart") == "no"
            continue
        assert user, f"{name}: no user"
        assert user.split(":")[0] not in ("root", "0"), f"{name} runs as root"
        if name not in ONE_SHOT:
            assert "healthcheck" in service, f"{name}: no healthcheck"
            assert service.get("restart") == "unless-stopped", name


def test_start_up_order_waits_for_health(compose):
    svc = services(compose)
    for name, service in svc.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in svc, f"{name} depends on unknown {dependency}"
            expected = (
                "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            )
            assert rule["condition"] == expected, f"{name} -> {dependency}"
            if expected == "service_healthy":
                assert "healthcheck" in svc[dependency]
    assert set(svc["mlflow"]["depends_on"]) == {"postgres", "createbuckets"}
    for name in ("airflow-scheduler", "airflow-worker", "airflow-apiserver"):
        assert {"postgres", "redis", "mlflow", "airflow-init"} <= set(svc[name]["depends_on"])


def run_check_secrets(values: dict[str, str], names: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], **values, "CHECK_VARIABLES": names}
    return subprocess.run(
        ["sh", str(DOCKER / "check-secrets.sh")], env=env, capture_output=True, text=True
    )


def test_the_stack_refuses_the_example_placeholder_secrets(compose):
    check = services(compose)["check-secrets"]
    names = check["environment"]["CHECK_VARIABLES"]
    env = read_env_file(ENV_EXAMPLE)
    placeholders = {k for k, v in env.items() if v.startswith("change-me")}
    assert placeholders and placeholders <= set(names.split())  # none forgotten
    refused = run_check_secrets(check["environment"], names)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert set(refused.stderr.split("secret(s):")[1].split(";")[0].split()) == placeholders
    assert "change-me" not in refused.stderr.replace("change-me-*", "")  # names, no values
    real = {k: f"real-{i:02d}-{'x' * 20}" for i, k in enumerate(names.split())}
    accepted = run_check_secrets(real, names)
    assert accepted.returncode == 0, accepted.stderr
    assert "x" * 20 not in accepted.stdout
    one_empty = run_check_secrets({**real, "REDIS_PASSWORD": ""}, names)
    assert one_empty.returncode == 1 and "REDIS_PASSWORD" in one_empty.stderr
    # Every service waits for the check, directly or through what it depends on.
    svc = services(compose)

    def reaches(name: str) -> bool:
        deps = svc[name].get("depends_on") or {}
        return "check-secrets" in deps or any(reaches(d) for d in deps)

    for name in svc:
        if name not in ("check-secrets", "trainer"):
            assert reaches(name), f"{name} starts without the secrets check"
    assert check["network_mode"] == "none"


def test_mlflow_asks_for_logins_and_each_service_holds_its_own_s3_key(compose):
    """Which setting goes where, with values of their own: test_compose_config.py."""
    env = read_env_file(ENV_EXAMPLE)
    svc = services(compose)
    mlflow_env = svc["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_AUTH"] == "basic"
    airflow_env = svc["airflow-scheduler"]["environment"]
    assert airflow_env["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_PIPELINE_USER"]
    assert airflow_env["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_PIPELINE_PASSWORD"]
    assert mlflow_env["AWS_ACCESS_KEY_ID"] == env["S3_MLFLOW_ACCESS_KEY"]
    assert airflow_env["AWS_ACCESS_KEY_ID"] == env["S3_PIPELINE_ACCESS_KEY"]
    assert mlflow_env["AWS_ACCESS_KEY_ID"] != airflow_env["AWS_ACCESS_KEY_ID"]
    # The policy each key gets allows one bucket, whole, and nothing else.
    policy = json.loads((DOCKER / "minio" / "bucket-policy.json").read_text())
    (statement,) = policy["Statement"]
    assert statement["Resource"] == ["arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"]
    script = svc["createbuckets"]["command"][0]
    assert 'grant "$$S3_MLFLOW_ACCESS_KEY" "$$S3_MLFLOW_SECRET_KEY" "$$MLFLOW_BUCKET"' in script
    assert 'grant "$$S3_PIPELINE_ACCESS_KEY" "$$S3_PIPELINE_SECRET_KEY" "$$DVC_BUCKET"' in script
    assert "readwrite" not in script
    accounts = svc["mlflow-accounts"]
    assert accounts["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert "mlflow-accounts" in svc["airflow-worker"]["depends_on"]


def test_mlflow_server_mode_postgres_backend_and_proxied_s3_artifacts(compose):
    mlflow = services(compose)["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert mlflow["build"]["dockerfile"] == "docker/mlflow.Dockerfile"


def test_airflow_speaks_to_the_stack_by_configuration(compose):
    svc = services(compose)
    worker = svc["airflow-worker"]["environment"]
    assert worker["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert worker["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert worker["AIRFLOW__CELERY__BROKER_URL"].endswith("@redis:6379/0")
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["TASKS_DVC_REMOTE"] == "s3://dvc/store"
    assert worker["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                 "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"):  # fmt: skip
        assert name in svc, name
        assert "state:/opt/airflow/state:rw" in svc[name]["volumes"], name
    commands = {name: str(svc[name].get("command")) for name in svc}
    assert commands["airflow-apiserver"] == "api-server"
    assert commands["airflow-dag-processor"] == "dag-processor"
    assert commands["airflow-triggerer"] == "triggerer"
    assert "--queues default" in commands["airflow-worker"]
    # The buckets the services use are the ones the one-shot job creates.
    script = "\n".join(svc["createbuckets"]["command"])
    assert "mc mb --ignore-existing" in script
    assert svc["createbuckets"]["environment"]["MLFLOW_BUCKET"] == "mlflow"
    assert svc["createbuckets"]["environment"]["DVC_BUCKET"] == "dvc"
    init = svc["postgres"]["volumes"][1].split(":")
    assert (DOCKER / init[0]).resolve() == DOCKER / "postgres" / "init-databases.sh"
    assert init[1].startswith("/docker-entrypoint-initdb.d/")


# --- Dockerfiles ----------------------------------------------------------------------


def test_there_are_three_images():
    assert {p.name for p in DOCKERFILES} == {
        "airflow.Dockerfile",
        "trainer.Dockerfile",
        "mlflow.Dockerfile",
    }


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_bases_runs_as_non_root_and_holds_no_secret(path):
    instructions = parse_dockerfile(path)
    aliases = set()
    for stage in stages(instructions):
        image, alias = from_image(stage[0])
        assert image in aliases or pinned(image), f"{path.name}:{stage[0].line} {image}"
        if alias:
            aliases.add(alias)
    for item in instructions:
        source = flags(item.value).get("from")
        if item.keyword == "COPY" and source:
            assert source in aliases or pinned(source), f"{path.name}:{item.line} {source}"
    final = stages(instructions)[-1]
    users = [item.value for item in final if item.keyword == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name} ends as root"
    secrets = [name for name in env_names(instructions) if SECRET_NAME.search(name)]
    assert secrets == [], f"{path.name} declares {secrets}"
    assert not any(item.keyword == "ADD" and "://" in item.value for item in instructions)


def test_the_lint_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nENV DB_PASSWORD=hunter2\nRUN true\n")
    instructions = parse_dockerfile(bad)
    ((image, _),) = [from_image(s[0]) for s in stages(instructions)]
    assert not pinned(image)
    assert not pinned("python") and not pinned("registry:5000/python")
    assert pinned("python:3.11.14-slim-bookworm") and pinned("ghcr.io/mlflow/mlflow:v3.17.2")
    assert [n for n in env_names(instructions) if SECRET_NAME.search(n)] == ["DB_PASSWORD"]
    assert not any(i.keyword == "USER" for i in instructions)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_its_dockerignore_admits(path):
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    admitted = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "**" in ignore
    for item in parse_dockerfile(path):
        if item.keyword != "COPY" or "from" in flags(item.value):
            continue
        sources = [w for w in item.value.split() if not w.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (REPO / source).exists(), f"{path.name}:{item.line} {source} missing"
            assert any(
                source == entry or source.startswith(entry + "/") or Path(source).match(entry)
                for entry in admitted
            ), f"{path.name}: {source} is excluded by its .dockerignore"


def test_images_pin_what_uv_lock_pins():
    lock = lock_versions()
    airflow = parse_dockerfile(DOCKER / "airflow.Dockerfile")
    image, _ = from_image(stages(airflow)[-1][0])
    assert image == f"apache/airflow:{lock['apache-airflow']}-python3.11"
    args = arg_defaults(airflow)
    assert args["AIRFLOW_VERSION"] == lock["apache-airflow"]
    assert args["TF_GROUP"] == "cpu"

    trainer = parse_dockerfile(DOCKER / "trainer.Dockerfile")
    assert arg_defaults(trainer)["TF_GROUP"] == "gpu"
    # both groups are locked at the same TensorFlow: the images install what uv.lock pins
    assert lock["tensorflow"] == lock["tensorflow-cpu"]
    image, _ = from_image(stages(trainer)[-1][0])
    assert image.startswith("python:3.11.")

    mlflow = parse_dockerfile(DOCKER / "mlflow.Dockerfile")
    image, _ = from_image(stages(mlflow)[-1][0])
    assert image == f"ghcr.io/mlflow/mlflow:v{lock['mlflow']}"
    run = " ".join(i.value for i in mlflow if i.keyword == "RUN")
    for package in ("psycopg2-binary", "boto3"):
        assert f"{package}=={lock[package]}" in run

    uv_images = {
        from_image(stage[0])[0]
        for path in DOCKERFILES
        for stage in stages(parse_dockerfile(path))
        if "astral-sh/uv" in stage[0].value
    }
    assert uv_images <= {f"ghcr.io/astral-sh/uv:{lock_uv_version()}"}


def lock_uv_version() -> str:
    """The uv that wrote uv.lock is the one the images use to read it."""
    images = {
        from_image(stage[0])[0].rpartition(":")[2]
        for path in DOCKERFILES
        for stage in stages(parse_dockerfile(path))
        if "astral-sh/uv" in stage[0].value
    }
    assert len(images) == 1, images
    return images.pop()


# --- scripts --------------------------------------------------------------------------


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        ["bash", str(REPO / "mlflow/serve.sh"), *args],
        env={**base, "MLFLOW_SERVE_DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
    )


def test_serve_defaults_to_embedded_sqlite_in_the_mlflow_folder():
    result = serve({})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "mode=embedded auth=none"
    command = lines[1]
    assert f"--backend-store-uri sqlite:///{REPO}/mlflow/mlflow.db" in command
    assert f"--default-artifact-root {REPO}/mlflow/artifacts" in command
    assert "--no-serve-artifacts" in command and "--workers 1" in command
    assert "--host 127.0.0.1 --port 5000" in command


def test_serve_switches_to_server_mode_from_the_environment():
    result = serve(
        {
            "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:pw@db:5432/mlflow",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
            "MLFLOW_HOST": "0.0.0.0",
        },
        "--expose-prometheus",
        "/tmp/metrics",
    )
    assert result.returncode == 0, result.stderr
    mode, command = result.stdout.splitlines()
    assert mode == "mode=server auth=none"
    assert "--backend-store-uri postgresql+psycopg2://mlflow:pw@db:5432/mlflow" in command
    assert "--serve-artifacts --artifacts-destination s3://mlflow/artifacts" in command
    assert "--host 0.0.0.0" in command and "--workers 2" in command
    assert command.rstrip().endswith("--expose-prometheus /tmp/metrics")
    assert "sqlite" not in command


def test_serve_with_basic_auth_keeps_accounts_in_the_backend_database():
    backend = "postgresql+psycopg2://mlflow:pw@db:5432/mlflow"
    result = serve(
        {
            "MLFLOW_BACKEND_STORE_URI": backend,
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
            "MLFLOW_AUTH": "basic",
            "MLFLOW_AUTH_ADMIN_USERNAME": "root-admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret-value",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-value",
        }
    )
    assert result.returncode == 0, result.stderr
    mode, command = result.stdout.splitlines()
    assert command.rstrip().endswith("--app-name basic-auth")
    config = Path(mode.split("config=")[1])
    try:
        assert config.stat().st_mode & 0o077 == 0  # readable by the server's user only
        text = config.read_text()
    finally:
        shutil.rmtree(config.parent)
    assert f"database_uri = {backend}" in text  # its own tables in the MLflow database
    assert "default_permission = READ" in text and "admin_username = root-admin" in text
    assert "secret-value" not in text + result.stdout  # the password stays in the environment


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MLFLOW_AUTH": "ldap"}, "MLFLOW_AUTH='ldap' is not known"),
        ({"MLFLOW_AUTH": "basic"}, "needs MLFLOW_AUTH_ADMIN_PASSWORD"),
        (
            {"MLFLOW_AUTH": "basic", "MLFLOW_AUTH_ADMIN_PASSWORD": "x"},
            "needs MLFLOW_FLASK_SERVER_SECRET_KEY",
        ),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://x@db/m"}, "MLFLOW_ARTIFACTS_DESTINATION"),
        ({"MLFLOW_ARTIFACTS_DESTINATION": "s3://b/a"}, "MLFLOW_BACKEND_STORE_URI"),
        (
            {
                "MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db",
                "MLFLOW_ARTIFACTS_DESTINATION": "s3://b",
            },
            "database URL",
        ),
        (
            {"MLFLOW_BACKEND_STORE_URI": "postgresql://db/m", "MLFLOW_ARTIFACTS_DESTINATION": "x"},
            "object-store URL",
        ),
    ],
)
def test_serve_rejects_a_half_configured_server_mode(env, message):
    result = serve(env)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dvc_remote_script_refuses_a_non_s3_url_and_a_non_dvc_folder(tmp_path):
    script = str(DOCKER / "dvc-remote.sh")
    (tmp_path / ".dvc").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKS_", "DVC_"))}
    bad = subprocess.run(
        ["bash", script, str(tmp_path)],
        env={**env, "TASKS_DVC_REMOTE": "/srv/remote"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "s3://bucket/path" in bad.stderr
    outside = subprocess.run(
        ["bash", script, str(tmp_path / "nowhere")], env=env, capture_output=True, text=True
    )
    assert outside.returncode == 2 and "not a DVC project" in outside.stderr
    unset = subprocess.run(["bash", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert unset.returncode == 0 and "keeping the project's default remote" in unset.stderr
    assert not (tmp_path / ".dvc" / "config.local").exists()


def test_trainer_entrypoint_runs_stage_commands_and_full_commands():
    script = str(DOCKER / "trainer-entrypoint.sh")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    stage = subprocess.run(["bash", script, "--help"], env=env, capture_output=True, text=True)
    assert stage.returncode == 0 and "dvc-stage" in stage.stdout
    full = subprocess.run(
        ["bash", script, "python", "-c", "print('as given')"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert full.returncode == 0 and full.stdout.strip() == "as given"


# --- Kubernetes -------------------------------------------------------------------------


def test_helm_values_run_gpu_stages_as_pods_on_the_shared_project_volume():
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    pvc, seed = yaml.safe_load_all((DOCKER / "k8s" / "project-pvc.yaml").read_text())
    env = {item["name"]: item["value"] for item in values["env"]}
    lock = lock_versions()

    assert values["executor"] in ("KubernetesExecutor", "CeleryExecutor")
    assert values["airflowVersion"] == lock["apache-airflow"]
    assert pinned(
        f"{values['images']['airflow']['repository']}:{values['images']['airflow']['tag']}"
    )
    assert pinned(env["TASKS_TRAINER_IMAGE"])
    assert seed["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{values['images']['airflow']['repository']}:{values['images']['airflow']['tag']}"
    )

    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    claim = pvc["metadata"]["name"]
    (volume,) = values["volumes"]
    (mount,) = values["volumeMounts"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim == env["TASKS_K8S_PVC"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == env["TASKS_PROJECT"]
    assert env["AIRFLOW__CORE__DAGS_FOLDER"].startswith(env["TASKS_PROJECT"])

    assert env["TASKS_GPU_BACKEND"] == "kubernetes"
    assert "nvidia.com/gpu" in env["TASKS_K8S_NODE_SELECTOR"]
    assert json.loads(env["TASKS_K8S_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    assert env["TASKS_DVC_REMOTE"].startswith("s3://")
    # credentials only by reference to Kubernetes secrets
    assert not [name for name in env if SECRET_NAME.search(name)]
    assert {s["envName"] for s in values["secret"]} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    # the trainer pods read the same MLflow login from the same secret
    mlflow_secrets = {s["secretName"] for s in values["secret"] if "MLFLOW" in s["envName"]}
    assert mlflow_secrets == {env["TASKS_K8S_MLFLOW_LOGIN"]}
    assert values["postgresql"]["enabled"] is False and values["data"]["metadataSecretName"]


def load_accounts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlflow_accounts", REPO / "mlflow/accounts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ADMIN_LOGIN = {
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "admin-password-long",
}


def test_accounts_reads_the_pipeline_and_the_readers_from_the_environment():
    module = load_accounts()
    env = {
        **ADMIN_LOGIN,
        "MLFLOW_PIPELINE_PASSWORD": "p" * 24,
        "MLFLOW_READERS": "alice:" + "a" * 16 + "  bob:" + "b:c" * 5,
    }
    pipeline, readers = module.accounts(env)
    assert pipeline == ("pipeline", "p" * 24)
    assert readers == [("alice", "a" * 16), ("bob", "b:c" * 5)]  # a password may hold ':'


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MLFLOW_TRACKING_PASSWORD": ""}, "MLFLOW_TRACKING_PASSWORD is not set"),
        ({"MLFLOW_PIPELINE_PASSWORD": "change-me-mlflow-pipeline"}, "MLFLOW_PIPELINE_PASSWORD:"),
        ({"MLFLOW_PIPELINE_PASSWORD": "short"}, "shorter than 12"),
        ({"MLFLOW_READERS": "alice"}, "MLFLOW_READERS entry 1 is not name:password"),
        ({"MLFLOW_READERS": "pipeline:" + "x" * 20}, "named twice"),
        ({"MLFLOW_READERS": "admin:" + "x" * 20}, "named twice (or is the admin)"),
    ],
)
def test_accounts_refuses_a_bad_setting_in_one_line(env, message):
    module = load_accounts()
    full = {**ADMIN_LOGIN, "MLFLOW_PIPELINE_PASSWORD": "p" * 24, **env}
    with pytest.raises(module.AccountError) as caught:
        module.accounts(full)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "change-me-mlflow-pipeline" not in str(caught.value)


def test_createbuckets_gives_each_key_a_policy_for_its_own_bucket(compose, tmp_path):
    """The job's script run by a POSIX sh (no bash-isms: the mc image's shell is minimal),
    with ``mc`` replaced by a recorder (no MinIO here) and the policy mounted where compose
    mounts it: each key gets docker/minio/bucket-policy.json for its own bucket."""
    job = services(compose)["createbuckets"]
    mount = next(v for v in job["volumes"] if v.startswith(f"{DOCKER}/minio/bucket-policy.json:"))
    target = mount.split(":")[1]
    script = job["command"][0].replace("$$", "$").replace(target, str(tmp_path / "policy.json"))
    (tmp_path / "policy.json").write_text((DOCKER / "minio" / "bucket-policy.json").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "mc"
    recorder.write_text(
        '#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
        'if [ "$2 $3" = "policy create" ]; then cat "$6" > "$MC_LOG.$5"; fi\n'
    )
    recorder.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MC_LOG": str(tmp_path / "mc.log"),
        "MINIO_ROOT_USER": "root",
        "MINIO_ROOT_PASSWORD": "root-pw",
        "S3_MLFLOW_ACCESS_KEY": "mlflow-server",
        "S3_MLFLOW_SECRET_KEY": "s1",
        "S3_PIPELINE_ACCESS_KEY": "pipeline",
        "S3_PIPELINE_SECRET_KEY": "s2",
        "MLFLOW_BUCKET": "ml-artifacts",
        "DVC_BUCKET": "dvc-store",
    }
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert "admin user add store mlflow-server s1" in calls
    assert "admin policy attach store ml-artifacts-only --user mlflow-server" in calls
    assert "admin policy attach store dvc-store-only --user pipeline" in calls
    assert not [c for c in calls if "readwrite" in c]
    for bucket in ("ml-artifacts", "dvc-store"):
        policy = json.loads((tmp_path / f"mc.log.{bucket}-only").read_text())
        (statement,) = policy["Statement"]
        assert statement["Resource"] == [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
