"""The team stack without Docker: the compose services as real processes on 127.0.0.1.

PostgreSQL (databases made by docker/postgres/init-databases.sh), an S3 endpoint
(moto_server, with the buckets the compose `createbuckets` job makes), the MLflow
server started by mlflow/serve.sh in server mode (Postgres backend, artifacts
proxied to S3) and Airflow on the Postgres metadata database, configured by the
same environment variables as docker/compose.yaml. The real DAG file
(dags/) runs a tiny pipeline through it with `airflow dags
test`: its workspace (a git checkout of the deployed commit), `dvc repro` of
every stage, MLflow over HTTP (the server proxies artifacts to S3), the run
recorded as a DVC experiment pushed to the project, and its outputs pushed to
the S3 remote named by TASKS_DVC_REMOTE. The tests then read Postgres and the
buckets directly, and pull the data back.

Needs PostgreSQL's server binaries (`bash tests/deploy/install_stack_deps.sh`)
and asyncpg (Airflow 3's async engine on PostgreSQL).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PIPELINE_FILES, git_project
from tests.datagen import learnable_train, make_archive, tiny_params
from tests.deploy.stack import (
    BIN,
    DB,
    REPO,
    Postgres,
    Process,
    base_env,
    http_ok,
    start_moto,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REGION = "us-east-1"
# MLflow accounts (docker/.env.example's MLFLOW_ADMIN_*, MLFLOW_PIPELINE_*, MLFLOW_READERS)
ADMIN = ("admin", "admin-test-password-1")
PIPELINE = ("pipeline", "pipeline-test-password-1")
READER = ("viewer", "viewer-test-password-1")
FLASK_SECRET = "flask-test-secret-value-1"
MLFLOW_BUCKET = "mlflow"
DVC_BUCKET = "dvc"
DATASET = "cats_vs_dogs"
DAG_ID = f"transfer_learning__{DATASET}"
# What a DAG run needs of the project (the e2e copies), less pyproject.toml: not needed here
PROJECT_FILES = [item for item in PIPELINE_FILES if item != "pyproject.toml"]
TASKS = ["prepare", "download", "validate", "train", "finetune", "evaluate", "register"]
# The gate's floor: the model must get both of its 2 test images right (a one-class model
# scores 0.5). Measured like the e2e tests (tests/e2e/test_dvc_pipeline.py): with offline-made
# weights and 15 head epochs this dataset scores 1.0.
FLOOR = 0.75
TASKS += ["record", "finish", "needs_approval"]


@dataclass
class Stack:
    pg: Postgres
    s3_url: str
    mlflow_url: str
    airflow_env: dict[str, str]
    dags: Path
    keys_by_user: dict[str, dict[str, str]]
    """S3 keys (AWS_* variables) the S3 server enforces: mlflow-server and pipeline hold one
    bucket each (docker/minio/bucket-policy.json); auditor, the tests' own, reads both."""
    logs: Path

    def mlflow_sql(self, sql: str, args=()) -> list:
        return self.pg.query(DB["MLFLOW_DB_USER"], DB["MLFLOW_DB_PASSWORD"], "mlflow", sql, args)

    def airflow_sql(self, sql: str, args=()) -> list:
        return self.pg.query(DB["AIRFLOW_DB_USER"], DB["AIRFLOW_DB_PASSWORD"], "airflow", sql, args)

    def s3(self, user: str = "auditor"):
        import boto3

        keys = self.keys_by_user[user]
        return boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            region_name=REGION,
        )

    def secrets(self) -> dict[str, str]:
        """Every secret the stack was given, by where it came from."""
        found = {
            "postgres superuser": self.pg.password,
            "airflow db": DB["AIRFLOW_DB_PASSWORD"],
            "mlflow db": DB["MLFLOW_DB_PASSWORD"],
            "mlflow admin": ADMIN[1],
            "mlflow pipeline": PIPELINE[1],
            "mlflow reader": READER[1],
            "flask secret": FLASK_SECRET,
        }
        for user, keys in self.keys_by_user.items():
            found[f"s3 {user}"] = keys["AWS_SECRET_ACCESS_KEY"]
        return found

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def run(args, env, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if importlib.util.find_spec("asyncpg") is None:
        raise RuntimeError(
            "asyncpg is not installed: Airflow 3 needs it (its async engine) to run on PostgreSQL"
        )
    base = tmp_path_factory.mktemp("stack")
    pg = Postgres()
    started: list[Process] = []
    try:
        pg.start()
        run(["bash", REPO / "docker/postgres/init-databases.sh"], base_env(**pg.env(), **DB))

        moto, s3_url = start_moto(base / "moto.log")
        started.append(moto)
        keys_by_user = s3_keys(s3_url)

        mlflow_env = base_env(
            **keys_by_user["mlflow-server"],
            AWS_DEFAULT_REGION=REGION,
            MLFLOW_AUTH="basic",
            MLFLOW_AUTH_ADMIN_USERNAME=ADMIN[0],
            MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
            MLFLOW_FLASK_SERVER_SECRET_KEY=FLASK_SECRET,
            MLFLOW_BACKEND_STORE_URI=pg.url(
                DB["MLFLOW_DB_USER"], DB["MLFLOW_DB_PASSWORD"], "mlflow", "postgresql+psycopg2"
            ),
            MLFLOW_ARTIFACTS_DESTINATION=f"s3://{MLFLOW_BUCKET}/artifacts",
            MLFLOW_S3_ENDPOINT_URL=s3_url,
            MLFLOW_PORT="0",  # it prints the port it got
        )
        mlflow = Process.start(
            "mlflow server", ["bash", REPO / "mlflow/serve.sh"], mlflow_env, base / "mlflow.log"
        )
        started.append(mlflow)

        # Airflow migrates its schema while the MLflow server migrates its own.
        dags = base / "dags"
        dags.mkdir()
        airflow_env = base_env(
            AIRFLOW_HOME=str(base / "airflow"),
            AIRFLOW__CORE__DAGS_FOLDER=str(dags),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=pg.url(
                DB["AIRFLOW_DB_USER"], DB["AIRFLOW_DB_PASSWORD"], "airflow", "postgresql+psycopg2"
            ),
            TASKS_DVC_REMOTE=f"s3://{DVC_BUCKET}/store",
            AWS_ENDPOINT_URL_S3=s3_url,
            DVC_NO_ANALYTICS="1",
            TF_CPP_MIN_LOG_LEVEL="2",
            AWS_DEFAULT_REGION=REGION,
            **keys_by_user["pipeline"],
        )
        run(["airflow", "db", "migrate"], airflow_env)
        mlflow_url = f"http://127.0.0.1:{mlflow.announced_port(150)}"
        wait_until(
            lambda: mlflow.check_alive() and http_ok(f"{mlflow_url}/health"),
            150,
            "MLflow server",
            mlflow.log,
        )
        # The compose stack's `mlflow-accounts` job, logged in as the admin.
        accounts = run(
            [BIN / "python", REPO / "mlflow/accounts.py"],
            base_env(
                MLFLOW_TRACKING_URI=mlflow_url,
                MLFLOW_TRACKING_USERNAME=ADMIN[0],
                MLFLOW_TRACKING_PASSWORD=ADMIN[1],
                MLFLOW_PIPELINE_USER=PIPELINE[0],
                MLFLOW_PIPELINE_PASSWORD=PIPELINE[1],
                MLFLOW_READERS=":".join(READER),
            ),
        )
        (base / "accounts.log").write_text(accounts.stdout + accounts.stderr)
        # The pipeline logs in from the environment, as in docker/compose.yaml.
        airflow_env.update(
            MLFLOW_TRACKING_URI=mlflow_url,
            MLFLOW_TRACKING_USERNAME=PIPELINE[0],
            MLFLOW_TRACKING_PASSWORD=PIPELINE[1],
        )
        yield Stack(pg, s3_url, mlflow_url, airflow_env, dags, keys_by_user, base)
    finally:
        for proc in reversed(started):
            proc.stop()
        pg.stop()


def s3_keys(url: str) -> dict[str, dict[str, str]]:
    """The buckets, and what the compose `createbuckets` job makes: a key per service, each
    with docker/minio/bucket-policy.json for its bucket. Then the S3 server enforces them."""
    import boto3

    root = {"endpoint_url": url, "region_name": REGION}
    root |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
        boto3.client("s3", **root).create_bucket(Bucket=bucket)
    iam = boto3.client("iam", **root)
    template = (REPO / "docker/minio/bucket-policy.json").read_text()
    policies = {
        "mlflow-server": template.replace("BUCKET", MLFLOW_BUCKET),
        "pipeline": template.replace("BUCKET", DVC_BUCKET),
        "auditor": json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}
                ],
            }
        ),
    }
    keys = {}
    for user, document in policies.items():
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-only", PolicyDocument=document)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
    # From now on every request needs a known key, and its policy must allow the action.
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    return keys


@pytest.fixture(scope="module")
def pipeline(stack, tmp_path_factory, archive_server, offline_weights):
    """The real cats_vs_dogs DAG through the stack; returns what the tests inspect.

    The model is MobileNetV2 at 32 px on offline-made weights, up to 15 head epochs
    (cached features) and one fine-tuning epoch; it must learn to pass the gate's floor.
    """
    base = tmp_path_factory.mktemp("pipeline")
    archive = make_archive(base / "served.zip", DATASET, {"train": 8, "validation": 4}, 40)
    url = archive_server.add("/stack/cats_vs_dogs.zip", archive.read_bytes())
    params = tiny_params(
        {DATASET: url},
        {"train": 8, "validation": 4},
        train=learnable_train(offline_weights),
        finetune={"epochs": 1},
        evaluate={"gradcam_images": 1, "mistakes": 2},
        register={"floor": FLOOR, "promote_if": "not_worse"},
        schedule={"cron": None, "owner": "ci", "retries": 0, "gpus": 1},
    )
    # the deployed checkout
    project = git_project(base / "project", PROJECT_FILES, params, stack.airflow_env)
    env = {
        **stack.airflow_env,
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "PYTHONPATH": str(project),
        "TASKS_PROJECT": str(project),
        "TASKS_STATE_DIR": str(project),
        "TASKS_RETRY_DELAY_SECONDS": "1",
    }
    run(["airflow", "pools", "set", "gpu", "1", "GPU tasks"], env)
    start = time.perf_counter()
    result = run(["airflow", "dags", "test", DAG_ID], env, timeout=900)
    print(f"\nairflow dags test {DAG_ID}: {time.perf_counter() - start:.1f} s")
    (stack.logs / "dags-test.log").write_text(result.stdout + result.stderr)
    ws = project / ".workspaces" / DATASET
    return {"project": project, "workspace": ws, "tasks": TASKS, "env": env}


def test_airflow_run_is_recorded_in_postgres(stack, pipeline):
    runs = stack.airflow_sql("SELECT state FROM dag_run WHERE dag_id = %s", (DAG_ID,))
    assert runs == [("success",)]
    tasks = dict(
        stack.airflow_sql("SELECT task_id, state FROM task_instance WHERE dag_id = %s", (DAG_ID,))
    )
    # register.approval is auto: needs_approval passes and the approval step is skipped
    skipped = {"approve": "skipped", "promote": "skipped"}
    assert tasks == {**{name: "success" for name in pipeline["tasks"]}, **skipped}


def test_mlflow_runs_and_registered_model_live_in_postgres(stack, pipeline):
    ((experiment_id, location),) = stack.mlflow_sql(
        "SELECT experiment_id, artifact_location FROM experiments WHERE name = %s", (DATASET,)
    )
    # Created by the server (proxied artifacts), not pinned to a local folder by
    # tasks/tracking/runs.py.
    assert location.startswith("mlflow-artifacts:")
    tags_sql = (
        "SELECT r.run_uuid, r.status, t.key, t.value FROM runs r"
        " JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.experiment_id = %s"
    )
    runs: dict[str, dict[str, str]] = {}
    for run_id, status, key, value in stack.mlflow_sql(tags_sql, (experiment_id,)):
        runs.setdefault(run_id, {"status": status})[key] = value
    phases = {tags["phase"]: tags for tags in runs.values() if "phase" in tags}
    assert set(phases) == {"train", "finetune", "evaluate", "register"}
    experiment = json.loads((pipeline["workspace"] / ".tasks-run.json").read_text())
    for tags in phases.values():
        assert tags["status"] == "FINISHED"
        assert tags["airflow.dag_id"] == DAG_ID  # lineage from the Airflow task's context
        assert tags["dataset"] == DATASET
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git.commit"])
        assert tags["dvc.exp_name"] == experiment["experiment"]
    # One pipeline execution: prepare opened the parent, every stage joined it, finish ended it.
    parents = {tags["mlflow.parentRunId"] for tags in phases.values()}
    assert len(parents) == 1
    parent = runs[parents.pop()]
    assert parent["pipeline.parent"] == "true" and parent["status"] == "FINISHED"
    assert parent["dvc.exp_name"] == experiment["experiment"]
    assert parent["dvc.exp_rev"] == experiment["experiment_rev"]
    assert len(runs) == 5  # the parent and its four children, nothing else
    accuracy = stack.mlflow_sql(
        "SELECT m.value FROM latest_metrics m JOIN tags t ON t.run_uuid = m.run_uuid"
        " WHERE t.key = 'phase' AND t.value = 'evaluate' AND m.key = 'test.accuracy'"
    )
    assert len(accuracy) == 1
    assert accuracy[0][0] >= FLOOR  # it learned: a one-class model gets 0.5

    name = f"{DATASET}-classifier"
    assert stack.mlflow_sql("SELECT name FROM registered_models WHERE name = %s", (name,))
    versions = stack.mlflow_sql(
        "SELECT version FROM model_versions WHERE name = %s AND current_stage != %s",
        (name, "Deleted_Internal"),  # MLflow keeps a deleted version's row
    )
    assert versions == [(1,)]
    aliases = stack.mlflow_sql(
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (name,)
    )
    assert ("champion", 1) in aliases  # the first model reached the floor
    assert not list(pipeline["workspace"].rglob("mlflow.db"))  # no local store on the worker


def phase_run_id(stack: Stack, phase: str) -> str:
    ((run_id,),) = stack.mlflow_sql(
        "SELECT run_uuid FROM tags WHERE key = 'phase' AND value = %s", (phase,)
    )
    return run_id


def test_train_and_finetune_runs_log_every_epoch_in_postgres(stack, pipeline):
    metric_sql = "SELECT key, step, value FROM metrics WHERE run_uuid = %s"
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    per_phase = {}
    for phase, epochs in (("train", "15"), ("finetune", "1")):
        run_id = phase_run_id(stack, phase)
        per_epoch = {
            (key, s): value
            for key, s, value in stack.mlflow_sql(metric_sql, (run_id,))
            if key in keys
        }
        steps = sorted({s for _, s in per_epoch})
        assert set(per_epoch) == {(key, s) for key in keys for s in steps}, phase
        per_phase[phase] = (steps, per_epoch)
        params = dict(
            stack.mlflow_sql("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
        )
        assert params["backbone"] == "mobilenet_v2" and params["image_size"] == "32"
        assert params["epochs"] == epochs
        # The history CSV went through the server into the bucket.
        history = f"{run_id}/artifacts/history/"
        assert any(history in key for key in stack.keys(MLFLOW_BUCKET, "artifacts/")), phase
    # Phase 1 ran epochs 1..n (early stopping may end it before 15); the finetune phase's one
    # epoch is numbered after them.
    train_steps, train_epochs = per_phase["train"]
    assert train_steps == list(range(1, len(train_steps) + 1)) and len(train_steps) <= 15
    assert per_phase["finetune"][0] == [len(train_steps) + 1]
    # It learned: on the 6 validation images a one-class model scores 0.5.
    assert max(v for (key, _), v in train_epochs.items() if key == "val_accuracy") > 0.5
    finetune_metrics = {
        key for key, _, _ in stack.mlflow_sql(metric_sql, (phase_run_id(stack, "finetune"),))
    }
    assert {"frozen_val_accuracy", "finetuned_val_accuracy"} <= finetune_metrics


def test_trained_models_reach_the_dvc_remote(stack, pipeline):
    models = pipeline["workspace"] / "models" / DATASET
    keys = set(stack.keys(DVC_BUCKET, "store/"))
    candidate = json.loads((models / "candidate.json").read_text())
    assert candidate["path"] in (
        f"models/{DATASET}/frozen.keras",
        f"models/{DATASET}/finetuned.keras",
    )
    for phase, name in (("train", "frozen.keras"), ("finetune", "finetuned.keras")):
        md5 = hashlib.md5((models / name).read_bytes()).hexdigest()
        assert f"store/files/md5/{md5[:2]}/{md5[2:]}" in keys, name
        # The file DVC pushed is the one the phase's MLflow run recorded.
        ((tag,),) = stack.mlflow_sql(
            "SELECT value FROM tags WHERE run_uuid = %s AND key = 'model.md5'",
            (phase_run_id(stack, phase),),
        )
        assert tag == md5, name


def test_model_and_plots_live_in_the_object_store(stack, pipeline):
    ((source,),) = stack.mlflow_sql(
        "SELECT source FROM model_versions WHERE name = %s", (f"{DATASET}-classifier",)
    )
    model_id = source.removeprefix("models:/")
    keys = stack.keys(MLFLOW_BUCKET, "artifacts/")
    model_keys = [k for k in keys if f"/models/{model_id}/artifacts/" in k]
    assert {"MLmodel", "requirements.txt"} <= {k.rsplit("/", 1)[-1] for k in model_keys}
    assert any(k.endswith(".png") for k in keys)  # the evaluate stage's plots
    mlmodel = (
        stack.s3()
        .get_object(
            Bucket=MLFLOW_BUCKET, Key=next(k for k in model_keys if k.endswith("/MLmodel"))
        )["Body"]
        .read()
    )
    assert b"signature" in mlmodel
    # And the server hands them back to a client over HTTP, to a read-only account too.
    status, body = mlflow_api(stack, READER, "GET", f"logged-models/{model_id}")
    assert status == 200 and body["model"]["info"]["model_id"] == model_id


def test_dvc_pushes_to_s3_and_pulls_back_byte_identical(stack, pipeline):
    ws = pipeline["workspace"]
    keys = stack.keys(DVC_BUCKET, "store/")
    files = sorted(p for p in (ws / "models" / DATASET).rglob("*") if p.is_file())
    images = sorted((ws / "data" / "raw" / DATASET).rglob("*.jpg"))
    assert {"frozen.keras", "finetuned.keras", "candidate.json"} <= {p.name for p in files}
    assert len(images) == 24
    assert len([k for k in keys if "/md5/" in k]) >= len(files) + len(images)
    # The remote lives only in the git-ignored config.local; no secret in any config.
    committed = (ws / ".dvc" / "config").read_text()
    local = (ws / ".dvc" / "config.local").read_text()
    assert "s3://" not in committed
    assert f"s3://{DVC_BUCKET}/store" in local
    assert stack.keys_by_user["pipeline"]["AWS_SECRET_ACCESS_KEY"] not in committed + local
    ignored = run(["git", "check-ignore", ".dvc/config.local"], stack.airflow_env, cwd=ws)
    assert ignored.stdout.strip() == ".dvc/config.local"

    # The run is an experiment in the project: a fresh clone restores it from the S3 remote.
    name = json.loads((ws / ".tasks-run.json").read_text())["experiment"]
    clone = pipeline["project"].parent / "clone"
    run(["git", "clone", "-q", str(pipeline["project"]), str(clone)], stack.airflow_env)
    bash = f"bash {REPO / 'docker/dvc-remote.sh'} ."
    run(
        ["bash", "-c", f"TASKS_DVC_REMOTE=s3://{DVC_BUCKET}/store {bash}"], stack.airflow_env, clone
    )
    pull = ["exp", "pull", "--remote", "tasks", "origin", name]
    for args in (pull, ["exp", "apply", name], ["pull", "--remote", "tasks"]):
        run([BIN / "dvc", *args], stack.airflow_env, cwd=clone)
    for path in [*files, *images]:
        assert (clone / path.relative_to(ws)).read_bytes() == path.read_bytes(), path


def mlflow_api(stack: Stack, login: tuple[str, str] | None, method: str, path: str, body=None):
    """One REST call to the MLflow server as ``login`` (None: no login); (status, JSON or {})."""
    import base64

    headers = {"Content-Type": "application/json"}
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    url = f"{stack.mlflow_url}/api/2.0/mlflow/{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}


MODEL = f"{DATASET}-classifier"
# account x action -> what the server must answer (the table in docs/deployment.md)
PERMISSIONS = {
    ("nobody", "search runs"): "refused",
    ("nobody", "read @champion"): "refused",
    ("wrong password", "search runs"): "refused",
    ("viewer", "search runs"): "allowed",
    ("viewer", "read @champion"): "allowed",
    ("viewer", "set @champion"): "refused",
    ("viewer", "delete a run"): "refused",
    ("viewer", "log to a pipeline run"): "refused",
    ("pipeline", "search runs"): "allowed",
    ("pipeline", "set @champion"): "allowed",
    ("pipeline", "delete a run"): "allowed",
    ("pipeline", "log to a pipeline run"): "allowed",
    ("pipeline", "manage accounts"): "refused",
    ("admin", "set @champion"): "allowed",
    ("admin", "manage accounts"): "allowed",
}


def test_mlflow_lets_each_account_do_what_it_may_and_nothing_more(stack, pipeline):
    """Each call is judged by what it did, not only by its status: a write must show in the
    store when allowed and must not when refused (each targets a visible change, undone)."""
    logins = {
        "nobody": None,
        "wrong password": (PIPELINE[0], "not-the-password"),
        "viewer": READER,
        "pipeline": PIPELINE,
        "admin": ADMIN,
    }
    ((experiment_id,),) = stack.mlflow_sql(
        "SELECT experiment_id FROM experiments WHERE name = %s", (DATASET,)
    )
    champion_sql = (
        "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'"
    )
    ((champion,),) = stack.mlflow_sql(champion_sql, (MODEL,))
    evaluate_run = phase_run_id(stack, "evaluate")
    # a second version (a copy of the champion), for @champion to move to where a call may
    # move it; removed after
    copy = {"name": MODEL, "source": f"models:/{MODEL}/{champion}"}
    status, body = mlflow_api(stack, ADMIN, "POST", "model-versions/create", copy)
    assert status == 200, body
    other = int(body["model_version"]["version"])

    def scratch_run() -> str:  # a finished run of the pipeline's experiment, to be deleted
        status, body = mlflow_api(
            stack, PIPELINE, "POST", "runs/create", {"experiment_id": str(experiment_id)}
        )
        assert status == 200
        run_id = body["run"]["info"]["run_id"]
        update = {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)}
        assert mlflow_api(stack, PIPELINE, "POST", "runs/update", update)[0] == 200
        return run_id

    def deleted(run_id: str) -> bool:
        return bool(stack.mlflow_sql(
            "SELECT 1 FROM runs WHERE run_uuid = %s AND lifecycle_stage = 'deleted'", (run_id,)
        ))  # fmt: skip

    def tagged(key: str) -> bool:
        return bool(stack.mlflow_sql(
            "SELECT 1 FROM tags WHERE run_uuid = %s AND key = %s", (evaluate_run, key)
        ))  # fmt: skip

    def call(account: str, action: str) -> tuple[int, bool]:
        """(status, whether the call did what it asks) for one cell, its change undone."""
        login = logins[account]
        if action == "search runs":
            status, answer = mlflow_api(
                stack, login, "POST", "runs/search", {"experiment_ids": [str(experiment_id)]}
            )
            return status, evaluate_run in {r["info"]["run_id"] for r in answer.get("runs", [])}
        if action == "read @champion":
            path = f"registered-models/alias?name={MODEL}&alias=champion"
            status, answer = mlflow_api(stack, login, "GET", path)
            return status, answer.get("model_version", {}).get("version") == str(champion)
        if action == "manage accounts":
            status, answer = mlflow_api(stack, login, "GET", f"users/get?username={READER[0]}")
            return status, answer.get("user", {}).get("username") == READER[0]
        if action == "set @champion":
            moved = {"name": MODEL, "alias": "champion", "version": str(other)}
            status, _ = mlflow_api(stack, login, "POST", "registered-models/alias", moved)
            done = stack.mlflow_sql(champion_sql, (MODEL,)) == [(other,)]
            back = {**moved, "version": str(champion)}
            assert mlflow_api(stack, ADMIN, "POST", "registered-models/alias", back)[0] == 200
            return status, done
        if action == "delete a run":
            run_id = scratch_run()
            status, _ = mlflow_api(stack, login, "POST", "runs/delete", {"run_id": run_id})
            done = deleted(run_id)
            if not done:
                assert (
                    mlflow_api(stack, PIPELINE, "POST", "runs/delete", {"run_id": run_id})[0] == 200
                )
            return status, done
        assert action == "log to a pipeline run"
        key = f"probe.{account.replace(' ', '_')}"
        tag = {"run_id": evaluate_run, "key": key, "value": "yes"}
        status, _ = mlflow_api(stack, login, "POST", "runs/set-tag", tag)
        done = tagged(key)
        if done:
            mlflow_api(
                stack, ADMIN, "POST", "runs/delete-tag", {"run_id": evaluate_run, "key": key}
            )
        return status, done

    measured = {}
    try:
        for account, action in PERMISSIONS:
            status, done = call(account, action)
            assert status in (200, 401, 403), (account, action, status)
            assert done == (status == 200), (account, action, status, done)
            measured[(account, action)] = "allowed" if done else "refused"
            if account in ("nobody", "wrong password"):
                assert status == 401, (account, action)
            elif not done:
                assert status == 403, (account, action)
    finally:
        deleted_version = {"name": MODEL, "version": str(other)}
        assert (
            mlflow_api(stack, ADMIN, "DELETE", "model-versions/delete", deleted_version)[0] == 200
        )
    print("\naccount x action (MLflow server, basic auth):")
    for (account, action), verdict in measured.items():
        print(f"  {account:15} {action:22} {verdict}")
    assert measured == PERMISSIONS
    # as it was: @champion on its version, one version, the evaluate run live and untagged
    assert stack.mlflow_sql(champion_sql, (MODEL,)) == [(champion,)]
    live = "SELECT version FROM model_versions WHERE name = %s AND current_stage != %s"
    assert stack.mlflow_sql(live, (MODEL, "Deleted_Internal")) == [(champion,)]  # soft-deleted
    assert not deleted(evaluate_run) and not any(
        tagged(f"probe.{a}") for a in ("viewer", "pipeline")
    )


# Each bucket's owner: the key that must reach it (and checks what the others left there).
BUCKET_OWNER = {MLFLOW_BUCKET: "mlflow-server", DVC_BUCKET: "pipeline"}


def test_each_s3_key_reaches_its_own_bucket_only(stack, pipeline):
    """Listing and writing are each tried, whatever the other answered; a write counts by
    whether the object is there afterwards (looked up with the bucket owner's key)."""
    from botocore.exceptions import ClientError

    measured = {}
    for user in ("mlflow-server", "pipeline"):
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            client, key = stack.s3(user), f"probe/{user}-key-check"
            calls = {
                "list": (client.list_objects_v2, {"Bucket": bucket, "MaxKeys": 1}),
                "write": (client.put_object, {"Bucket": bucket, "Key": key, "Body": b"x"}),
            }
            verdicts = {}
            for action, (method, kwargs) in calls.items():
                try:
                    method(**kwargs)
                    verdicts[action] = "allowed"
                except ClientError as error:
                    assert error.response["Error"]["Code"] == "AccessDenied", error
                    verdicts[action] = "refused"
            owner = stack.s3(BUCKET_OWNER[bucket])
            listed = owner.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
            written = [o["Key"] for o in listed] == [key]
            assert written == (verdicts["write"] == "allowed"), (user, bucket, verdicts)
            if written:
                owner.delete_object(Bucket=bucket, Key=key)
            assert verdicts["list"] == verdicts["write"], (user, bucket, verdicts)
            measured[(user, bucket)] = verdicts["write"]
    print("\nS3 key x bucket:", measured)
    assert measured == {
        ("mlflow-server", MLFLOW_BUCKET): "allowed",
        ("mlflow-server", DVC_BUCKET): "refused",
        ("pipeline", MLFLOW_BUCKET): "refused",  # its artifacts go through the MLflow server
        ("pipeline", DVC_BUCKET): "allowed",
    }


@pytest.mark.parametrize(
    ("login", "named"),
    [
        ({}, "MLFLOW_TRACKING_USERNAME is not set"),
        ({"MLFLOW_TRACKING_USERNAME": PIPELINE[0]}, "MLFLOW_TRACKING_PASSWORD is not set"),
        (
            {"MLFLOW_TRACKING_USERNAME": PIPELINE[0], "MLFLOW_TRACKING_PASSWORD": "wrong-one"},
            "refused the login of MLFLOW_TRACKING_USERNAME=pipeline; "
            "check MLFLOW_TRACKING_PASSWORD",
        ),
    ],
)
def test_a_missing_or_wrong_login_is_one_line_naming_the_variable(stack, pipeline, login, named):
    env = {k: v for k, v in pipeline["env"].items() if not k.startswith("MLFLOW_TRACKING_USER")}
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    result = subprocess.run(
        [BIN / "python", "-m", "tasks", "history", DATASET],
        env={**env, **login},
        cwd=pipeline["workspace"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert stack.mlflow_url in lines[0]
    assert "wrong-one" not in result.stderr


def test_no_secret_reaches_a_log_an_mlflow_param_or_tag(stack, pipeline):
    texts = {}
    for table, sql in (
        ("params", "SELECT key, value FROM params"),
        ("run tags", "SELECT key, value FROM tags"),
        ("experiment tags", "SELECT key, value FROM experiment_tags"),
        ("model tags", "SELECT key, value FROM registered_model_tags"),
        ("version tags", "SELECT key, value FROM model_version_tags"),
    ):
        rows = stack.mlflow_sql(sql)
        assert rows or table in ("experiment tags", "model tags", "version tags"), table
        texts[f"mlflow {table}"] = "\n".join(f"{k}={v}" for k, v in rows)
    logs = sorted(stack.logs.glob("*.log"))  # the servers', the accounts job's, dags test's
    airflow_logs = Path(stack.airflow_env["AIRFLOW_HOME"]) / "logs"
    logs += [p for p in airflow_logs.rglob("*") if p.is_file()]
    for path in logs:
        texts[str(path)] = path.read_text(errors="replace")
    assert any("dags-test" in name for name in texts) and len(texts) > 6
    for where, text in texts.items():
        for name, secret in stack.secrets().items():
            assert secret not in text, f"the {name} secret is in {where}"


def test_init_databases_is_idempotent(stack):
    env = base_env(**stack.pg.env(), **DB)
    run(["bash", REPO / "docker/postgres/init-databases.sh"], env)
    owners = dict(
        stack.pg.query(
            stack.pg.superuser,
            stack.pg.password,
            "postgres",
            "SELECT datname, pg_get_userbyid(datdba) FROM pg_database"
            " WHERE datname IN ('airflow', 'mlflow')",
        )
    )
    assert owners == {"airflow": "airflow", "mlflow": "mlflow"}


def test_serve_script_embedded_mode_serves_the_project_sqlite_store(tmp_path):
    store = tmp_path / "store"
    env = base_env(MLFLOW_EMBEDDED_DIR=str(store), MLFLOW_PORT="0")
    server = Process.start(
        "mlflow embedded", ["bash", str(REPO / "mlflow/serve.sh")], env, tmp_path / "log"
    )
    try:
        url = f"http://127.0.0.1:{server.announced_port(90)}"
        wait_until(
            lambda: server.check_alive() and http_ok(f"{url}/health"), 90, "embedded", server.log
        )
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/experiments/create",
            data=json.dumps({"name": "embedded-check"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            experiment_id = json.load(response)["experiment_id"]
    finally:
        server.stop()
    with sqlite3.connect(store / "mlflow.db") as db:
        row = db.execute(
            "SELECT name, artifact_location FROM experiments WHERE experiment_id = ?",
            (int(experiment_id),),
        ).fetchone()
    assert row[0] == "embedded-check"
    assert row[1].startswith((str(store / "artifacts"), (store / "artifacts").as_uri()))
