"""docker/compose.yaml (and docker/compose.console.yaml) read by a real compose implementation.

``docker-compose config`` (Debian 12's docker-compose 1.29, no Docker daemon:
tests/deploy/dockerfiles.py runs it) interpolates docker/.env.example, merges the
anchors and the console override, validates, and prints what ``up`` would use. The
tests assert on that resolved output: the images, the ports bound to 127.0.0.1, the
GPU worker's queue and device, every setting of .env.example reaching the stack,
secrets required (a missing one fails naming it), and a broken file refused.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.dockerfiles import (
    COMPOSE,
    CONSOLE,
    DOCKER,
    ENV_EXAMPLE,
    REPO,
    SECRET_NAME,
    compose_run,
    config_warnings,
    env_text,
    pinned,
    read_env_file,
    resolved,
)

ENV = read_env_file(ENV_EXAMPLE)
SECRETS = sorted(k for k in ENV if SECRET_NAME.search(k) and not k.endswith("_USER"))
AIRFLOW = [
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
]


def services(config: dict) -> dict[str, dict]:
    return config["services"]


def leaves(value) -> list[str]:
    """Every scalar of the resolved configuration, as text (keys included)."""
    if isinstance(value, dict):
        return [text for k, v in value.items() for text in [str(k), *leaves(v)]]
    if isinstance(value, list):
        return [text for item in value for text in leaves(item)]
    return [str(value)]


def distinct_values() -> dict[str, str]:
    """For each setting of .env.example a value found nowhere else, valid where it goes."""
    values = {}
    for i, (key, value) in enumerate(sorted(ENV.items())):
        if value.isdigit():  # ports, uids, counts
            values[key] = str(42000 + i)
        elif re.fullmatch(r"\d+\.\d+\.\d+\.\d+", value):
            values[key] = f"127.0.{100 + i}.1"
        else:
            values[key] = f"{value}-v{i:02d}x" if value else f"v{i:02d}x"
    return values


# --- the tool ---------------------------------------------------------------------------


def test_the_compose_implementation_resolves_the_stack_without_a_daemon():
    config = resolved()
    assert "check-secrets" in services(config) and "airflow-worker-gpu" in services(config)
    # Nothing to say: every variable is set by .env.example, nothing is deprecated.
    assert config_warnings() == ""
    # The same environment has no daemon to reach: a command that needs one fails.
    ps = compose_run("ps")
    assert ps.returncode != 0
    assert "Error while fetching server API version" in ps.stderr


def test_compose_1_29_refuses_only_the_top_level_name():
    """The one line the runner leaves out: 1.29 predates the specification's ``name``
    (docker/compose#9412); Compose v2 reads it. Everything else 1.29 accepts."""
    raw = yaml.safe_load(COMPOSE.read_text())
    assert raw["name"] == "transfer-learning"
    refused = compose_run("config", keep_name=True)
    assert refused.returncode == 1
    reasons = refused.stderr.split("is invalid because:\n", 1)[1].split("\n\n", 1)[0]
    assert reasons.splitlines() == ["'name' does not match any of the regexes: '^x-'"]


# --- what .env.example sets -------------------------------------------------------------


def test_every_setting_of_env_example_reaches_the_stack_where_it_belongs():
    """Each setting given a value of its own: the resolved stack (with the console) holds
    every one (.env.example holds nothing the stack does not read), each where it belongs."""
    values = distinct_values()
    config = resolved(env_text(**values), [CONSOLE])
    text = "\n".join(leaves(config))
    assert [key for key, value in values.items() if value not in text] == []
    svc = services(config)

    image = {
        "mlflow": "MLFLOW_IMAGE",
        "mlflow-accounts": "MLFLOW_IMAGE",
        "trainer": "TRAINER_IMAGE",
        "airflow-worker-gpu": "AIRFLOW_GPU_IMAGE",
        **{name: "AIRFLOW_IMAGE" for name in AIRFLOW if name != "airflow-worker-gpu"},
    }
    for name, variable in image.items():
        assert svc[name]["image"] == f"{values[variable]}:{values['IMAGE_TAG']}", name
    assert svc["minio"]["image"] == values["MINIO_IMAGE"]
    assert svc["createbuckets"]["image"] == values["MC_IMAGE"]

    # Each service holds its own S3 key and the MLflow login the pipeline uses.
    mlflow = svc["mlflow"]["environment"]
    assert mlflow["AWS_ACCESS_KEY_ID"] == values["S3_MLFLOW_ACCESS_KEY"]
    assert mlflow["AWS_SECRET_ACCESS_KEY"] == values["S3_MLFLOW_SECRET_KEY"]
    assert mlflow["MLFLOW_AUTH_ADMIN_USERNAME"] == values["MLFLOW_ADMIN_USER"]
    assert mlflow["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg2://{values['MLFLOW_DB_USER']}:{values['MLFLOW_DB_PASSWORD']}"
        f"@postgres:5432/{values['MLFLOW_DB_NAME']}"
    )
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{values['MLFLOW_BUCKET']}/artifacts"
    accounts = svc["mlflow-accounts"]["environment"]
    assert accounts["MLFLOW_TRACKING_USERNAME"] == values["MLFLOW_ADMIN_USER"]
    assert accounts["MLFLOW_PIPELINE_USER"] == values["MLFLOW_PIPELINE_USER"]
    for name in AIRFLOW:
        env = svc[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == values["S3_PIPELINE_ACCESS_KEY"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == values["S3_PIPELINE_SECRET_KEY"], name
        assert env["MLFLOW_TRACKING_USERNAME"] == values["MLFLOW_PIPELINE_USER"], name
        assert env["MLFLOW_TRACKING_PASSWORD"] == values["MLFLOW_PIPELINE_PASSWORD"], name
        assert env["TASKS_DVC_REMOTE"] == f"s3://{values['DVC_BUCKET']}/{values['DVC_PREFIX']}"
        assert env["TASKS_TRAINER_IMAGE"] == svc["trainer"]["image"], name
        assert env["AIRFLOW__CELERY__BROKER_URL"] == (
            f"redis://:{values['REDIS_PASSWORD']}@redis:6379/0"
        )
        assert svc[name]["user"] == f"{values['AIRFLOW_UID']}:0", name
    # The job creates the buckets the services use.
    buckets = svc["createbuckets"]["environment"]
    assert (buckets["MLFLOW_BUCKET"], buckets["DVC_BUCKET"]) == (
        values["MLFLOW_BUCKET"],
        values["DVC_BUCKET"],
    )
    # MinIO runs as the user its volume is handed to.
    minio_user = f"{values['MINIO_UID']}:{values['MINIO_GID']}"
    console = f"{values['BIND_ADDRESS']}:{values['MINIO_CONSOLE_PORT']}:9001/tcp"
    assert svc["minio"]["ports"] == [console]
    assert svc["minio"]["user"] == svc["createbuckets"]["user"] == minio_user
    assert svc["minio-volume-init"]["command"] == ["chown", "-R", minio_user, "/data"]


def test_every_secret_comes_from_env_not_a_literal_or_a_default():
    """Every secret-named variable of every service carries a value of .env.example's."""
    values = distinct_values()
    secrets = {values[key] for key in SECRETS}
    checked = 0
    for name, service in services(resolved(env_text(**values), [CONSOLE])).items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert any(s in str(value) for s in secrets), f"{name}: {key} is not from .env"
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", SECRETS)
def test_a_missing_secret_stops_compose_naming_it(name):
    assert len(SECRETS) >= 15
    refused = compose_run("config", "--quiet", env=env_text(drop=[name]))
    assert refused.returncode == 1
    assert "Missing mandatory value" in refused.stderr
    assert f"set {name} in docker/.env" in refused.stderr


def test_an_empty_secret_counts_as_missing():
    """``${X:?...}``: empty is refused too (one run; docker/check-secrets.sh refuses an
    empty secret again at start-up, test_deploy_files.py)."""
    refused = compose_run("config", "--quiet", env=env_text(**dict.fromkeys(SECRETS, "")))
    assert refused.returncode == 1
    assert re.search(r"set (\w+) in docker/\.env", refused.stderr)[1] in SECRETS


def test_a_setting_with_a_default_may_be_left_out():
    """The counterpart: a non-secret setting left out takes the compose file's default."""
    config = resolved(env_text(drop=["MLFLOW_WORKERS", "IMAGE_TAG", "S3_REGION"]))
    assert services(config)["mlflow"]["environment"]["MLFLOW_WORKERS"] == "2"
    assert services(config)["mlflow"]["image"] == "transfer-learning-mlflow:0.1.0"
    assert services(config)["mlflow"]["environment"]["AWS_DEFAULT_REGION"] == "us-east-1"


# --- images -----------------------------------------------------------------------------


def test_images_are_built_here_or_pinned_and_every_build_finds_its_dockerfile():
    svc = services(resolved())
    built = {}
    for name, service in svc.items():
        build = service.get("build")
        if build is None:
            assert pinned(service["image"]), f"{name}: {service['image']} is not pinned"
            continue
        assert build["context"] == str(REPO), name
        assert (REPO / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        built[service["image"]] = build
    assert set(built) == {
        "transfer-learning-airflow:0.1.0",
        "transfer-learning-airflow-gpu:0.1.0",
        "transfer-learning-mlflow:0.1.0",
        "transfer-learning-trainer:0.1.0",
    }
    assert built["transfer-learning-airflow-gpu:0.1.0"]["args"] == {"TF_GROUP": "gpu"}
    assert "args" not in built["transfer-learning-airflow:0.1.0"]  # the Dockerfile's cpu
    # The accounts job runs the image the mlflow service builds.
    assert svc["mlflow-accounts"]["image"] == svc["mlflow"]["image"]
    assert {svc[name]["image"] for name in AIRFLOW if name != "airflow-worker-gpu"} == {
        "transfer-learning-airflow:0.1.0"
    }
    # Bind mounts resolve into docker/ (the real tool makes them absolute).
    mounts = [
        volume.split(":")[0]
        for service in svc.values()
        for volume in service.get("volumes", [])
        if volume.startswith("/")
    ]
    assert len(mounts) == 3
    for source in mounts:
        assert source.startswith(f"{DOCKER}/") and (DOCKER / source).is_file(), source


# --- ports ------------------------------------------------------------------------------


def published(config: dict) -> dict[str, list[str]]:
    return {name: svc["ports"] for name, svc in services(config).items() if svc.get("ports")}


def test_ports_bind_to_loopback_unless_bind_address_says_otherwise():
    expected = {
        "mlflow": ["127.0.0.1:5000:5000/tcp"],
        "airflow-apiserver": ["127.0.0.1:8080:8080/tcp"],
    }
    assert published(resolved()) == expected
    assert published(resolved(env_text(drop=["BIND_ADDRESS"]))) == expected  # the default
    moved = published(resolved(env_text(MLFLOW_PORT="15000", AIRFLOW_PORT="18080")))
    assert moved == {
        "mlflow": ["127.0.0.1:15000:5000/tcp"],
        "airflow-apiserver": ["127.0.0.1:18080:8080/tcp"],
    }
    exposed = published(resolved(env_text(BIND_ADDRESS="0.0.0.0")))
    assert exposed == {
        "mlflow": ["0.0.0.0:5000:5000/tcp"],
        "airflow-apiserver": ["0.0.0.0:8080:8080/tcp"],
    }


def test_the_minio_console_is_off_unless_the_override_file_is_added():
    minio = services(resolved())["minio"]
    assert minio["environment"]["MINIO_BROWSER"] == "off" and "ports" not in minio
    with_console = resolved(overrides=[CONSOLE])
    minio = services(with_console)["minio"]
    assert minio["environment"]["MINIO_BROWSER"] == "on"
    assert minio["ports"] == ["127.0.0.1:9001:9001/tcp"]
    assert minio["environment"]["MINIO_ROOT_USER"] == ENV["MINIO_ROOT_USER"]  # merged, not lost
    assert published(with_console) == {**published(resolved()), "minio": minio["ports"]}
    exposed = resolved(env_text(BIND_ADDRESS="0.0.0.0", MINIO_CONSOLE_PORT="19001"), [CONSOLE])
    assert services(exposed)["minio"]["ports"] == ["0.0.0.0:19001:9001/tcp"]


# --- the GPU worker ---------------------------------------------------------------------


def test_the_gpu_worker_reserves_nvidia_gpus_and_consumes_the_gpu_queue():
    svc = services(resolved())
    # Only the GPU worker and the trainer image wait for a profile; `up` starts the rest.
    profiles = {name: s["profiles"] for name, s in svc.items() if "profiles" in s}
    assert profiles == {"airflow-worker-gpu": ["gpu"], "trainer": ["trainer"]}
    gpu = svc["airflow-worker-gpu"]
    assert gpu["command"] == "celery worker --queues gpu --concurrency 1"
    assert svc["airflow-worker"]["command"] == "celery worker --queues default"
    assert (
        gpu["environment"]["TASKS_GPU_QUEUE"]
        == svc["airflow-worker"]["environment"]["TASKS_GPU_QUEUE"]
        == "gpu"
    )
    assert gpu["environment"]["TASKS_GPUS"] == "all"
    assert gpu["environment"]["DUMB_INIT_SETSID"] == "0"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    # 1.29 keeps an interpolated count as text ("1"); Compose v2 reads it as a number.
    assert device == {"driver": "nvidia", "capabilities": ["gpu"], "count": "1"}
    assert gpu["healthcheck"] == svc["airflow-worker"]["healthcheck"]
    assert gpu["depends_on"] == svc["airflow-worker"]["depends_on"]

    two = services(resolved(env_text(GPU_COUNT="2")))
    assert two["airflow-worker-gpu"]["command"] == "celery worker --queues gpu --concurrency 2"
    (device,) = two["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "2"
    assert two["airflow-init"]["environment"]["TASKS_GPU_POOL_SLOTS"] == "2"  # one slot per GPU


# --- a broken file ----------------------------------------------------------------------

BROKEN = {
    "typo'd key": (
        "    healthcheck:\n      test:\n        - CMD\n        - python",
        "    helthcheck:\n      test:\n        - CMD\n        - python",
        "Unsupported config option for services.mlflow: 'helthcheck'",
    ),
    "unknown condition": (
        "      postgres:\n        condition: service_healthy\n      createbuckets:",
        "      postgres:\n        condition: service_ready\n      createbuckets:",
        'services.mlflow.depends_on.postgres.condition contains "service_ready"',
    ),
    "undefined dependency": (
        "      createbuckets:\n        condition: service_completed_successfully\n"
        "    restart: unless-stopped",
        "      createbucket:\n        condition: service_completed_successfully\n"
        "    restart: unless-stopped",
        "Service 'mlflow' depends on service 'createbucket' which is undefined",
    ),
    "bad interpolation": (
        '"${BIND_ADDRESS:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"',
        '"${BIND_ADDRESS:-127.0.0.1}:${MLFLOW_PORT:-5000:5000"',
        'Invalid interpolation format for "ports" option in service "mlflow"',
    ),
    "undeclared volume": (
        "volumes:\n  postgres-data:\n",
        "volumes:\n",
        'Named volume "postgres-data:/var/lib/postgresql/data:rw" is used in service "postgres"',
    ),
    "not a number": (
        "      retries: 10\n      start_period: 60s",
        "      retries: ten\n      start_period: 60s",
        "service.mlflow.healthcheck.retries",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_the_compose_implementation_refuses_a_broken_file(case):
    old, new, message = BROKEN[case]
    text = COMPOSE.read_text()
    assert text.count(old) == 1, f"{case}: the file changed, update the edit"
    refused = compose_run("config", "--quiet", text=text.replace(old, new))
    assert refused.returncode == 1
    assert message in refused.stderr
