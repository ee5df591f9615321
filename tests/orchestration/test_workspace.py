"""What the DAG tasks call (workspaces, the DVC runner, the experiment record) on a toy DVC
pipeline: real git, dvc and MLflow (SQLite), no Airflow.

The toy project has the real params.yaml schema and a two-stage ``foreach``
pipeline whose command is a tiny script, so each ``dvc repro`` takes a second.
``project`` is a plain folder (the workspace keeps its own snapshot history:
local-only experiments); ``git_project`` is a git checkout, whose runs are
pushed back to it as DVC experiments.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tasks.errors import ConfigError, StageError, StageFailed
from tasks.orchestration.dvc import push_outputs, run_stage
from tasks.orchestration.experiments import record_experiment
from tasks.orchestration.parent_run import finish_pipeline
from tasks.orchestration.project import Project
from tasks.orchestration.records import read_workspace_record
from tasks.orchestration.runconf import conf_overrides
from tasks.orchestration.workspace import git, prepare_workspace
from tests.datagen import tiny_params

DATASETS = ("cats_vs_dogs", "ants_vs_bees")

STEP = """\
import json, os, sys
from pathlib import Path

stage, ds = sys.argv[1], sys.argv[2]
if os.environ.get("TOY_FAIL") == stage:
    print("error: the toy stage refuses; set TOY_FAIL= to fix", file=sys.stderr)
    sys.exit(2)
if os.environ.get("TOY_CRASH") == stage:
    raise MemoryError("toy out of memory")
if os.environ.get("TOY_HANG") == stage:
    Path(os.environ["TOY_PID_FILE"]).write_text(str(os.getpid()))
    import time
    time.sleep(600)
out = Path("out") / ds
out.mkdir(parents=True, exist_ok=True)
if stage == "first":
    run = os.environ.get("TASKS_RUN_OVERRIDES", "[]")
    (out / "first.txt").write_text(run + "\\n" + ds + "\\n" + os.environ.get("TASKS_SET", "unset"))
else:
    (out / "model.bin").write_bytes(os.urandom(64))
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.75, "detail": {"a": 1}}))
    runs = Path("reports") / ds / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "second.json").write_text(json.dumps({"run_id": "r-123", "parent_run_id": "p-9"}))
"""

DVC_YAML = """\
stages:
  first:
    foreach: ${datasets}
    do:
      cmd: python step.py first ${key}
      deps:
        - step.py
      params:
        - train.epochs
      outs:
        - out/${key}/first.txt
  second:
    foreach: ${datasets}
    do:
      cmd: python step.py second ${key}
      deps:
        - out/${key}/first.txt
        - step.py
      outs:
        - out/${key}/model.bin
        - reports/${key}/runs/second.json:
            cache: false
      metrics:
        - out/${key}/metrics.json:
            cache: false
"""


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_store) -> Project:
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(
        textwrap.dedent(
            """\
            [core]
                remote = local
                autostage = true
            ['remote "local"']
                url = ../remote
            """
        )
    )
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "step.py").write_text(STEP)
    sources = {ds: f"http://127.0.0.1:9/{ds}.zip" for ds in DATASETS}
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(sources), sort_keys=False))
    (root / ".gitignore").write_text("/.workspaces/\n/.tasks-run.json\n/mlflow/\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    for name in ("TASKS_PARAMS", "TASKS_ROOT", "TASKS_SET", "TOY_FAIL", "TOY_CRASH", "TOY_HANG"):
        monkeypatch.delenv(name, raising=False)
    return Project.from_env(root, environ={})


def test_friendly_conf_keys_map_to_dotted_params():
    conf = {"backbone": "vgg16", "finetune_epochs": 5, "mirrors": ["file:///srv/m.zip"]}
    assert conf_overrides(conf, "ants_vs_bees") == (
        "train.backbone=vgg16",
        "finetune.epochs=5",
        'datasets.ants_vs_bees.mirrors=["file:///srv/m.zip"]',
    )
    # Values keep their JSON type through the CLI's YAML parse ("7" stays a string).
    assert conf_overrides(
        {"set": {"train.epochs": 3, "train.weights": "none", "train.seed": "7"}}, "x"
    ) == ("train.epochs=3", "train.weights=none", 'train.seed="7"')
    assert conf_overrides({"set": ["train.epochs=3"]}, "x") == ("train.epochs=3",)
    assert conf_overrides(None, "x") == () == conf_overrides({}, "x")


def test_unknown_conf_key_is_a_one_line_error_listing_the_keys():
    with pytest.raises(ConfigError) as error:
        conf_overrides({"backbon": "vgg16"}, "x")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("run conf: unknown key 'backbon'; use one of: backbone,")
    with pytest.raises(ConfigError, match='"set" must map dotted keys'):
        conf_overrides({"set": 3}, "x")


@pytest.mark.parametrize("conf", [["train.epochs=3"], "backbone=vgg16", 3])
def test_a_conf_that_is_not_an_object_is_a_one_line_error_with_an_example(conf):
    with pytest.raises(ConfigError) as error:
        conf_overrides(conf, "x")
    assert str(error.value) == 'run conf: must be a JSON object, e.g. {"backbone": "vgg16"}'


@pytest.mark.slow
def test_prepare_writes_the_run_params_into_the_workspace_only(project):
    before = project.params.read_text()
    prepared = prepare_workspace(
        project, "cats_vs_dogs", {"finetune_epochs": 4, "set": {"train.epochs": 3}}, run_id="r1"
    )
    ws = project.workspace("cats_vs_dogs")
    assert prepared.workspace == str(ws)
    assert prepared.overrides == ("finetune.epochs=4", "train.epochs=3")
    assert project.params.read_text() == before
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["train"]["epochs"] == 3 and params["finetune"]["epochs"] == 4
    # Defaults are written out, so DVC can track every key a stage lists.
    assert params["tracking"]["experiment_prefix"] == ""
    assert params["augmentation"]["flip"] == "horizontal"
    assert (ws / "dvc.yaml").read_text() == DVC_YAML
    assert (ws / "step.py").read_text() == STEP
    local = (ws / ".dvc" / "config.local").read_text()
    assert "no_scm" not in local
    assert f"dir = {project.root / '.dvc' / 'cache'}" in local
    assert f"url = {project.root / 'remote'}" in local
    record = read_workspace_record(ws)
    assert record["overrides"] == ["finetune.epochs=4", "train.epochs=3"]
    assert record["run_id"] == "r1"
    # Not a git checkout: the workspace commits snapshots of the pipeline files itself.
    assert record["git_remote"] is None
    assert git(ws, "rev-parse", "HEAD") == record["baseline"] == prepared.baseline
    assert git(ws, "show", "HEAD:step.py") == STEP.strip()
    assert record["experiment"] == "cats_vs_dogs-r1"
    # The pipeline's MLflow parent run is open for the whole DAG run.
    parent = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(record["parent_run_id"])
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["pipeline.parent"] == "true"
    assert parent.data.params["train.epochs"] == "3"


@pytest.mark.slow
def test_bad_conf_fails_prepare_with_one_line_and_leaves_the_workspace(project):
    prepare_workspace(project, "cats_vs_dogs", {"finetune_epochs": 4})
    ws = project.workspace("cats_vs_dogs")
    params_before = (ws / "params.yaml").read_text()
    with pytest.raises(ConfigError) as error:
        prepare_workspace(project, "cats_vs_dogs", {"backbone": "resnet"})
    message = str(error.value)
    assert message.startswith("run conf: train.backbone: 'resnet' is not allowed; use one of:")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"run conf: train.epochs: .*greater than 0"):
        prepare_workspace(project, "cats_vs_dogs", {"set": {"train.epochs": 0}})
    assert (ws / "params.yaml").read_text() == params_before
    assert read_workspace_record(ws)["overrides"] == ["finetune.epochs=4"]


@pytest.mark.slow
def test_stage_runs_once_then_is_skipped_until_its_params_change(project):
    ws = project.workspace("cats_vs_dogs")
    prepare_workspace(project, "cats_vs_dogs")
    first = run_stage(project, "cats_vs_dogs", "first")
    assert first.ran and first.outputs == ["out/cats_vs_dogs/first.txt"]
    second = run_stage(project, "cats_vs_dogs", "second")
    assert second.ran
    assert second.metrics == {"accuracy": 0.75}  # nested values stay out of XCom
    assert (second.run_id, second.parent_run_id) == ("r-123", "p-9")
    assert json.dumps(second.xcom())  # XCom-serialisable
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"first@cats_vs_dogs", "second@cats_vs_dogs"}
    assert lock["stages"]["first@cats_vs_dogs"]["params"]["params.yaml"] == {"train.epochs": 2}

    prepare_workspace(project, "cats_vs_dogs")
    assert not run_stage(project, "cats_vs_dogs", "first").ran
    prepare_workspace(project, "cats_vs_dogs", {"epochs": 5})
    rerun = run_stage(project, "cats_vs_dogs", "first")
    assert rerun.ran
    # The stage command sees the overrides (to record them in MLflow).
    written = (ws / "out" / "cats_vs_dogs" / "first.txt").read_text().splitlines()[0]
    assert json.loads(written) == ["train.epochs=5"]
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    assert lock["stages"]["first@cats_vs_dogs"]["params"]["params.yaml"] == {"train.epochs": 5}
    stages = read_workspace_record(ws)["stages"]
    assert set(stages) == {"first"} and stages["first"]["seconds"] > 0
    # Back to the file's params: DVC's run cache restores the earlier outputs, no rerun.
    prepare_workspace(project, "cats_vs_dogs")
    back = run_stage(project, "cats_vs_dogs", "first")
    assert (back.ran, back.restored) == (False, True)
    assert "restored from the run cache" in str(back)


@pytest.mark.slow
def test_user_error_is_not_retryable_and_a_crash_is(project, monkeypatch):
    prepare_workspace(project, "ants_vs_bees")
    monkeypatch.setenv("TOY_FAIL", "first")
    with pytest.raises(StageFailed) as error:
        run_stage(project, "ants_vs_bees", "first")
    assert str(error.value) == ("first@ants_vs_bees: the toy stage refuses; set TOY_FAIL= to fix")
    assert error.value.retryable is False
    monkeypatch.setenv("TOY_FAIL", "")
    monkeypatch.setenv("TOY_CRASH", "first")
    with pytest.raises(StageFailed) as error:
        run_stage(project, "ants_vs_bees", "first")
    assert error.value.retryable is True
    assert "exited with 1" in str(error.value)


def test_stage_before_prepare_says_what_to_do(project):
    with pytest.raises(StageError, match="run the DAG's prepare task first"):
        run_stage(project, "cats_vs_dogs", "first")


@pytest.mark.slow
def test_two_datasets_run_at_once_and_push_to_one_remote(project):
    """One workspace per dataset: no DVC lock contention, one shared cache and remote."""
    for ds in DATASETS:
        prepare_workspace(project, ds)
    errors: list[BaseException] = []

    def pipeline(ds: str) -> None:
        try:
            for stage in ("first", "second"):
                assert run_stage(project, ds, stage).ran
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=pipeline, args=(ds,)) for ds in DATASETS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    cache = project.root / ".dvc" / "cache"
    assert len([p for p in cache.rglob("*") if p.is_file()]) >= 4
    assert not any((project.workspace(ds) / ".dvc" / "cache").exists() for ds in DATASETS)

    pushed = push_outputs(project, "cats_vs_dogs")
    assert pushed.pushed == 2  # first.txt and model.bin; uncached outputs stay local
    remote = project.root / "remote"
    assert len([p for p in remote.rglob("*") if p.is_file()]) == 2
    assert push_outputs(project, "cats_vs_dogs").pushed == 0
    assert push_outputs(project, "ants_vs_bees").pushed == 2


@pytest.mark.slow
def test_workspace_env_does_not_leak_the_callers_params(project, monkeypatch, tmp_path):
    """A TASKS_PARAMS pointing elsewhere (e.g. make demo's) must not reach the stage."""
    prepare_workspace(project, "cats_vs_dogs", {"epochs": 7})
    monkeypatch.setenv("TASKS_PARAMS", str(tmp_path / "elsewhere.yaml"))
    monkeypatch.setenv("TASKS_SET", '["train.epochs=1"]')
    run_stage(project, "cats_vs_dogs", "first")
    written = project.workspace("cats_vs_dogs") / "out" / "cats_vs_dogs" / "first.txt"
    assert json.loads(written.read_text().splitlines()[0]) == ["train.epochs=7"]
    # the run's overrides are in the workspace's params.yaml: named, not applied again
    assert written.read_text().splitlines()[2] == "unset"


# --- runs as DVC experiments (the project a git checkout) ---------------------------


def sh(cwd, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr[-2000:]}"
    return proc.stdout


def dvc(cwd, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


@pytest.fixture
def git_project(project) -> Project:
    sh(project.root, "git", "init", "-q")
    sh(project.root, "git", "add", "-A")
    sh(
        project.root,
        "git",
        "-c",
        "user.email=ci@example.com",
        "-c",
        "user.name=CI",
        "commit",
        "-qm",
        "pipeline",
    )
    return project


def restore(project: Project, name: str, clone) -> object:
    """docs/reproducing.md's recipe in a fresh clone. The toy's remote is a folder given relative to
    the project, so the clone names it (an S3 remote would need no such line)."""
    sh(clone.parent, "git", "clone", "-q", str(project.root), str(clone))
    dvc(clone, "remote", "add", "--local", "store", str(project.root / "remote"))
    dvc(clone, "exp", "pull", "--remote", "store", "origin", name)
    dvc(clone, "exp", "apply", name)
    dvc(clone, "pull", "--remote", "store")
    return clone


def scheduled_run(project: Project, dataset: str, conf: dict | None, run_id: str) -> dict:
    """What one DAG run does: prepare, every stage, record, finish."""
    prepared = prepare_workspace(project, dataset, conf, run_id=run_id)
    for stage in ("first", "second"):
        run_stage(project, dataset, stage)
    record = record_experiment(project, dataset)
    finish_pipeline(project, dataset, prepared.xcom(), None)
    return {"prepared": prepared, "record": record}


@pytest.mark.slow
def test_a_scheduled_run_is_an_experiment_a_fresh_clone_restores(git_project, tmp_path):
    project = git_project
    run = scheduled_run(
        project, "cats_vs_dogs", {"epochs": 3}, "scheduled__2026-11-30T00:00:00+00:00"
    )
    name = run["record"].name
    assert name == "cats_vs_dogs-scheduled__2026-11-30T00-00-00-00-00"
    assert run["record"].baseline == sh(project.root, "git", "rev-parse", "HEAD").strip()

    # The project lists it, with its params and metrics, beside local experiments.
    shown = json.loads(dvc(project.root, "exp", "show", "--json"))
    experiments = {
        exp["name"]: exp
        for entry in shown
        for exp in (entry.get("experiments") or [])
        if exp.get("name")
    }
    assert name in experiments
    data = experiments[name]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 3
    assert data["metrics"]["out/cats_vs_dogs/metrics.json"]["data"]["accuracy"] == 0.75

    # A fresh clone fetches, applies and pulls it: the outputs come back byte for byte.
    clone = restore(project, name, tmp_path / "clone")
    ws = project.workspace("cats_vs_dogs")
    for out in ("out/cats_vs_dogs/first.txt", "out/cats_vs_dogs/model.bin"):
        assert (clone / out).read_bytes() == (ws / out).read_bytes(), out
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["epochs"] == 3

    # MLflow's parent run spans the DAG run and names the experiment.
    parent = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run["prepared"].parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.exp_name"] == name
    assert parent.data.tags["dvc.exp_rev"] == run["record"].rev
    assert parent.info.end_time >= parent.info.start_time + 2000  # it spanned the stages


@pytest.mark.slow
def test_two_runs_with_different_conf_are_two_restorable_experiments(git_project, tmp_path):
    project = git_project
    first = scheduled_run(project, "cats_vs_dogs", {"epochs": 3}, "run-a")["record"]
    second = scheduled_run(project, "cats_vs_dogs", {"epochs": 4}, "run-b")["record"]
    assert first.name != second.name and first.rev != second.rev
    for record, epochs in ((first, 3), (second, 4)):
        clone = restore(project, record.name, tmp_path / record.name)
        written = (clone / "out" / "cats_vs_dogs" / "first.txt").read_text().splitlines()[0]
        assert json.loads(written) == [f"train.epochs={epochs}"]


@pytest.mark.slow
def test_both_datasets_at_once_are_two_experiments_without_lock_errors(git_project):
    project = git_project
    errors: list[BaseException] = []
    names: dict[str, str] = {}

    def dag(ds: str) -> None:
        try:
            names[ds] = scheduled_run(project, ds, None, f"{ds}-together")["record"].name
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=dag, args=(ds,)) for ds in DATASETS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    refs = sh(project.root, "git", "for-each-ref", "--format=%(refname)", "refs/exps")
    for ds in DATASETS:
        assert names[ds] in refs


@pytest.mark.slow
def test_a_killed_stage_is_retried_and_no_run_is_left_running(git_project, tmp_path, monkeypatch):
    project = git_project
    good = scheduled_run(project, "ants_vs_bees", None, "good")
    ws = project.workspace("ants_vs_bees")
    lock_before = (ws / "dvc.lock").read_text()

    prepared = prepare_workspace(project, "ants_vs_bees", {"epochs": 5}, run_id="killed")
    pid_file = tmp_path / "stage.pid"
    monkeypatch.setenv("TOY_HANG", "first")
    monkeypatch.setenv("TOY_PID_FILE", str(pid_file))
    outcome: list[BaseException] = []

    def stage() -> None:
        try:
            run_stage(project, "ants_vs_bees", "first")
        except BaseException as error:  # noqa: BLE001 - asserted below
            outcome.append(error)

    thread = threading.Thread(target=stage)
    thread.start()
    deadline = time.monotonic() + 120
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    thread.join(timeout=120)
    assert len(outcome) == 1 and isinstance(outcome[0], StageFailed)
    assert outcome[0].retryable  # killed, not a user error: Airflow retries
    assert (ws / "dvc.lock").read_text() == lock_before  # the last good record stands

    monkeypatch.delenv("TOY_HANG")
    assert run_stage(project, "ants_vs_bees", "first").ran  # the retry
    run_stage(project, "ants_vs_bees", "second")
    record_experiment(project, "ants_vs_bees")
    finish_pipeline(project, "ants_vs_bees", prepared.xcom(), None)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_run(prepared.parent_run_id).info.experiment_id
    mine = f"tags.`tasks.workspace` = '{ws.resolve()}'"
    assert len(client.search_runs([experiment], mine)) == 2  # the good run's and this one's
    assert client.search_runs([experiment], f"{mine} and attributes.status = 'RUNNING'") == []
    assert client.get_run(good["prepared"].parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_failed_run_ends_its_parent_run_failed_naming_the_task(git_project, monkeypatch):
    project = git_project
    prepared = prepare_workspace(project, "cats_vs_dogs", None, run_id="fails")
    monkeypatch.setenv("TOY_FAIL", "second")
    run_stage(project, "cats_vs_dogs", "first")
    with pytest.raises(StageFailed):
        run_stage(project, "cats_vs_dogs", "second")
    outcome = finish_pipeline(project, "cats_vs_dogs", prepared.xcom(), "second")
    assert outcome.status == "FAILED" and "second failed" in outcome.message
    parent = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(prepared.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["pipeline.failed_task"] == "second"
    # A conf that fails prepare opens no run, and finish says so instead of ending an old one.
    assert "before it started" in finish_pipeline(project, "cats_vs_dogs", None, "prepare").message


@pytest.mark.slow
def test_an_unchanged_scheduled_rerun_runs_no_stage(git_project):
    project = git_project
    scheduled_run(project, "cats_vs_dogs", {"epochs": 3}, "first")
    prepare_workspace(project, "cats_vs_dogs", {"epochs": 3}, run_id="again")
    results = [run_stage(project, "cats_vs_dogs", stage) for stage in ("first", "second")]
    assert [r.ran for r in results] == [False, False]
    record = record_experiment(project, "cats_vs_dogs")
    assert record.pushed == 0  # the same outputs: nothing new for the remote


def test_a_scheduled_run_gets_the_fed_back_drops_from_the_shared_cache(git_project):
    """``feedback`` versions a drop with ``dvc add``; the workspace (a clone of HEAD) holds
    only its .dvc file until prepare checks the images out of the shared cache."""
    project = git_project
    drop = project.root / "data" / "feedback" / "cats_vs_dogs" / "week1"
    (drop / "cats").mkdir(parents=True)
    (drop / "cats" / "c.jpg").write_bytes(b"a cat's bytes")
    dvc(project.root, "add", str(drop.relative_to(project.root)))
    sh(project.root, "git", "add", "-A")
    sh(project.root, "git", "-c", "user.email=ci@example.com", "-c", "user.name=CI",
       "commit", "-qm", "feedback: cats_vs_dogs week1 (1 images)")  # fmt: skip
    ws = project.workspace("cats_vs_dogs")
    prepare_workspace(project, "cats_vs_dogs", {}, run_id="manual__feedback")
    copy = ws / "data" / "feedback" / "cats_vs_dogs" / "week1" / "cats" / "c.jpg"
    assert copy.read_bytes() == b"a cat's bytes"
    assert (ws / "data" / "feedback" / "cats_vs_dogs" / "week1.dvc").is_file()


@contextlib.contextmanager
def git_daemon(repo: Path, push: bool) -> Iterator[str]:
    """``git daemon`` serving ``repo`` on loopback; it refuses pushes unless ``push``."""
    from tasks.dev.httpserver import unused_port

    port = unused_port()
    argv = ["git", "daemon", "--listen=127.0.0.1", f"--port={port}", "--export-all",
            "--reuseaddr", "--informative-errors", f"--base-path={repo.parent}"]  # fmt: skip
    proc = subprocess.Popen([*argv, *(["--enable=receive-pack"] if push else []), str(repo)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "git daemon did not start"
                time.sleep(0.1)
        yield f"git://127.0.0.1:{port}/{repo.name}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_refused_git_push_of_the_experiment_fails_record_in_one_line_and_the_retry_pushes(
    git_project,
):
    """The project's git server refuses the push (``git daemon`` without receive-pack, as a
    read-only remote answers) → record fails in one line naming the refusal; the outputs and
    the experiment saved in the workspace are kept → the retry, pushes allowed, pushes it."""
    from tasks.orchestration.records import update_workspace_record

    project = git_project
    prepared = prepare_workspace(project, "cats_vs_dogs", None, run_id="refused")
    for stage in ("first", "second"):
        run_stage(project, "cats_vs_dogs", stage)
    ws = project.workspace("cats_vs_dogs")
    model = (ws / "out/cats_vs_dogs/model.bin").read_bytes()

    with git_daemon(project.root, push=False) as url:
        update_workspace_record(ws, git_remote=url)
        with pytest.raises(StageFailed) as refused:
            record_experiment(project, "cats_vs_dogs")
    message = str(refused.value)
    print(message)
    assert "\n" not in message and refused.value.retryable
    assert message == (
        f"record@cats_vs_dogs: the git remote {url} refused experiment {prepared.experiment} "
        f"(unexpected error - service not enabled: /{project.root.name}); it stays saved in "
        f"{ws}: let the pipeline account push refs/exps there, then retry the task"
    )
    assert sh(project.root, "git", "for-each-ref", "refs/exps") == ""  # nothing arrived
    assert sh(ws, "git", "for-each-ref", "refs/exps")  # saved in the workspace, kept
    assert (ws / "out/cats_vs_dogs/model.bin").read_bytes() == model

    with git_daemon(project.root, push=True) as url:
        update_workspace_record(ws, git_remote=url)
        record = record_experiment(project, "cats_vs_dogs")  # the retry
    pushed = sh(project.root, "git", "for-each-ref", "--format=%(objectname)", "refs/exps")
    assert pushed.split() == [record.rev]
    finish_pipeline(project, "cats_vs_dogs", prepared.xcom(), None)
