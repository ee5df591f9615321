"""The scoring DAG's work: which drops wait in the inbox (folders, zips, an S3 prefix on a
real moto_server), how a failed score command is reported, and the drift event's summary.

Running the score command itself on a registered model is tests/e2e/test_scoring_dag.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tasks.errors import StageFailed
from tasks.orchestration.project import Project
from tasks.orchestration.scoring import (
    check_all_scored,
    drift_summary,
    drop_source,
    pending_drops,
    score_command,
    score_failure,
    scoring_reports,
)
from tests.conftest import REPO
from tests.datagen import tiny_params

DATASET = "cats_vs_dogs"


def _project(tmp_path: Path, inbox: str = "inbox") -> Project:
    sources = {ds: f"http://127.0.0.1:9/{ds}.zip" for ds in ("cats_vs_dogs", "ants_vs_bees")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(sources, scoring={"inbox": inbox})))
    return Project(root=tmp_path, params=params, state=tmp_path / "state")


def _zip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.jpg", b"not really a jpeg")
    return path


def _scored(project: Project, drop: str) -> None:
    folder = scoring_reports(project, DATASET, drop)
    folder.mkdir(parents=True)
    (folder / "scored.json").write_text(json.dumps({"drop": drop, "version": "1"}))


@pytest.fixture
def inbox(tmp_path) -> tuple[Project, Path]:
    """A local inbox under the state dir: two folders, a zip, drops being copied in, a stray
    file, and another dataset's drop."""
    project = _project(tmp_path)
    folder = project.state / "inbox" / DATASET
    for name in ("2026-01-02", "2026-01-01", "_copying", ".hidden"):
        (folder / name).mkdir(parents=True)
        (folder / name / "a.jpg").write_bytes(b"x")
    _zip(folder / "batch-3.zip")
    _zip(folder / ".batch-4.zip")  # still being uploaded
    (folder / "README.txt").write_text("drops go here")
    (project.state / "inbox" / "ants_vs_bees" / "other").mkdir(parents=True)
    return project, folder


def test_pending_drops_are_folders_and_zips_by_name_without_hidden_ones(inbox):
    project, folder = inbox
    cfg = project.load_config()
    assert pending_drops(project, cfg, DATASET) == ["2026-01-01", "2026-01-02", "batch-3"]
    assert drop_source(project, cfg, DATASET, "2026-01-01") == str(folder / "2026-01-01")
    assert drop_source(project, cfg, DATASET, "batch-3") == str(folder / "batch-3.zip")
    assert pending_drops(project, cfg, "ants_vs_bees") == ["other"]


def test_a_drop_being_copied_in_is_listed_once_renamed(inbox):
    project, folder = inbox
    (folder / "_copying").rename(folder / "2026-01-03")
    assert "2026-01-03" in pending_drops(project, project.load_config(), DATASET)


def test_scored_drops_are_left_out_unless_rescore(inbox):
    project, _ = inbox
    cfg = project.load_config()
    _scored(project, "2026-01-01")
    _scored(project, "batch-3")
    assert pending_drops(project, cfg, DATASET) == ["2026-01-02"]
    every = ["2026-01-01", "2026-01-02", "batch-3"]
    assert pending_drops(project, cfg, DATASET, rescore=True) == every
    # only the finished marker counts: a drop whose scoring stopped half-way is listed again
    (scoring_reports(project, DATASET, "2026-01-02") / "drift.json").parent.mkdir(parents=True)
    assert pending_drops(project, cfg, DATASET) == ["2026-01-02"]


def test_no_inbox_folder_yet_is_no_drops(tmp_path):
    project = _project(tmp_path)
    assert pending_drops(project, project.load_config(), DATASET) == []


def test_an_absolute_inbox_is_used_as_is(tmp_path):
    elsewhere = tmp_path / "shared" / "inbox"
    (elsewhere / DATASET / "d1").mkdir(parents=True)
    project = _project(tmp_path, inbox=str(elsewhere))
    cfg = project.load_config()
    assert pending_drops(project, cfg, DATASET) == ["d1"]
    assert drop_source(project, cfg, DATASET, "d1") == str(elsewhere / DATASET / "d1")


def test_the_command_writes_its_reports_under_the_state_dir(tmp_path):
    project = _project(tmp_path)
    args = score_command(project, DATASET, "/in/d1", "d1", tmp_path / "r.json")
    assert args == [
        "tasks", "score", DATASET, "/in/d1", "--drop", "d1",
        "--result-json", str(tmp_path / "r.json"),
        "--params", str(project.params), "--root", str(project.state),
    ]  # fmt: skip
    parsed = _parse_score_args(args[1:])
    if parsed is not None:  # once the score command exists: the CLI accepts these arguments
        assert (parsed.dataset, parsed.source, parsed.drop) == (DATASET, "/in/d1", "d1")
        assert parsed.root == str(project.state)


def test_the_command_gets_the_projects_tracking_store(tmp_path, monkeypatch):
    from tasks.orchestration.scoring import score_env

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TASKS_PARENT_RUN_ID", "another-runs-parent")
    project = _project(tmp_path)
    env = score_env(project, project.load_config())
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{project.state / 'mlflow' / 'mlflow.db'}"
    assert env["TASKS_STORE_ROOT"] == str(project.state)
    assert "TASKS_PARENT_RUN_ID" not in env  # a scoring run belongs to no training run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert score_env(project, project.load_config())["MLFLOW_TRACKING_URI"] == (
        "http://mlflow:5000"
    )


def _parse_score_args(args: list[str]):
    from tasks.cli import build_parser

    parser = build_parser()
    try:
        return parser.parse_args(args)
    except SystemExit:
        return None


# --- a failed score command: one line, retry or not -------------------------------------


def test_a_user_fixable_error_fails_at_once_with_its_line():
    lines = ["loading the model", "error: no @champion of cats_vs_dogs-classifier; train first"]
    error = score_failure(DATASET, "d1", 2, lines)
    assert str(error) == (
        "score@cats_vs_dogs d1: no @champion of cats_vs_dogs-classifier; train first"
    )
    assert error.retryable is False


def test_a_crash_is_retried_and_named_by_its_last_line():
    error = score_failure(DATASET, "d1", 1, ["Traceback (most recent call last):", "MemoryError"])
    assert str(error) == "score@cats_vs_dogs d1: MemoryError"
    assert error.retryable is True
    assert score_failure(DATASET, "d1", -9, []).retryable is True
    assert "exit -9" in str(score_failure(DATASET, "d1", -9, []))


def test_score_drop_runs_the_command_as_a_process_and_maps_its_failure(tmp_path):
    """A drop for a dataset the params do not name: the real command's exit 2, one line."""
    from tasks.orchestration.scoring import score_drop

    project = _project(tmp_path)
    (project.state / "inbox" / "flowers" / "d1").mkdir(parents=True)
    with pytest.raises(StageFailed) as caught:
        score_drop(project, "flowers", "d1")
    assert caught.value.retryable is False
    assert str(caught.value).startswith("score@flowers d1: ")
    assert "unknown dataset 'flowers'" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- the drift event's summary and the run's outcome -------------------------------------


def _result(drop: str, drift: bool | None, scored: bool = True, version: str = "3") -> dict:
    flagged = {"statistic": 0.4, "p_value": 0.002, "threshold": 0.0125, "drift": True}
    calm = {"statistic": 0.01, "p_value": 0.6, "threshold": 0.0125, "drift": False}
    return {
        "dataset": DATASET,
        "drop": drop,
        "model": "cats_vs_dogs-classifier",
        "version": version,
        "scored": scored,
        "drift": drift,
        "images": 40,
        "quarantined": 1,
        "run_id": f"run-{drop}",
        "summary": {"mmd": flagged if drift else calm, "domain_classifier": calm},
        "reports": f"reports/{DATASET}/scoring/{drop}",
    }


def test_no_drift_is_no_summary():
    assert drift_summary([]) is None
    assert drift_summary([_result("a", False), _result("b", None), None]) is None
    # already scored by this version (rescore): its event was raised when it was scored
    assert drift_summary([_result("a", True, scored=False)]) is None


def test_the_summary_names_the_drifted_drops_version_and_flagging_tests():
    results = [_result("b", True, version="4"), _result("a", False), _result("c", True)]
    summary = drift_summary(results)
    assert summary == {
        "dataset": DATASET,
        "model": "cats_vs_dogs-classifier",
        "version": "4",
        "drops": ["b", "c"],
        "flagged": ["mmd"],
        "details": [
            {
                "drop": drop,
                "version": version,
                "images": 40,
                "run_id": f"run-{drop}",
                "reports": f"reports/{DATASET}/scoring/{drop}",
                "tests": {"mmd": {"statistic": 0.4, "p_value": 0.002, "threshold": 0.0125}},
            }
            for drop, version in (("b", "4"), ("c", "3"))
        ],
    }
    json.dumps(summary)  # an asset event's extra is JSON


def test_the_run_fails_naming_the_drops_that_failed():
    assert check_all_scored([], []) == "no drops waiting"
    assert check_all_scored(["a", "b"], [_result("a", False), _result("b", True)]) == (
        "2 drop(s) scored"
    )
    with pytest.raises(StageFailed, match=r"1 of 3 drop\(s\) failed to score: b "):
        check_all_scored(["a", "b", "c"], [_result("a", True), _result("c", False)])
    with pytest.raises(StageFailed, match="find_drops failed"):
        check_all_scored(None, [])


def test_importing_it_loads_nothing_heavy():
    code = (
        "import sys, json, tasks.orchestration.scoring; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    heavy = {"boto3", "botocore", "tensorflow", "keras", "mlflow", "pandas", "dvc", "airflow"}
    assert loaded & heavy == set()


# --- an S3 inbox, on a real moto_server ------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server on a free port; the environment a task has for it (endpoint, keys)."""
    from tests.deploy.stack import start_moto

    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import boto3

    client = boto3.client("s3", endpoint_url=s3)
    return client


def test_an_s3_inbox_lists_one_drop_per_prefix(tmp_path, s3_env):
    client = s3_env
    client.create_bucket(Bucket="drops")
    keys = [
        f"team/inbox/{DATASET}/2026-01-01/a.jpg",
        f"team/inbox/{DATASET}/2026-01-01/b.jpg",
        f"team/inbox/{DATASET}/2026-01-02/nested/c.jpg",
        f"team/inbox/{DATASET}/_uploading/d.jpg",
        f"team/inbox/{DATASET}/loose.jpg",
        "team/inbox/ants_vs_bees/other/e.jpg",
    ]
    for key in keys:
        client.put_object(Bucket="drops", Key=key, Body=b"x")
    project = _project(tmp_path, inbox="s3://drops/team/inbox/")
    cfg = project.load_config()
    assert pending_drops(project, cfg, DATASET) == ["2026-01-01", "2026-01-02"]
    assert drop_source(project, cfg, DATASET, "2026-01-02") == (
        f"s3://drops/team/inbox/{DATASET}/2026-01-02/"
    )
    _scored(project, "2026-01-01")
    assert pending_drops(project, cfg, DATASET) == ["2026-01-02"]
    assert pending_drops(project, cfg, DATASET, rescore=True) == ["2026-01-01", "2026-01-02"]
    assert pending_drops(project, cfg, "ants_vs_bees") == ["other"]


def test_an_s3_inbox_at_the_bucket_root(tmp_path, s3_env):
    client = s3_env
    client.create_bucket(Bucket="rootdrops")
    client.put_object(Bucket="rootdrops", Key=f"{DATASET}/d1/a.jpg", Body=b"x")
    project = _project(tmp_path, inbox="s3://rootdrops")
    assert pending_drops(project, project.load_config(), DATASET) == ["d1"]


def test_a_missing_bucket_fails_at_once_and_an_unreachable_endpoint_is_retried(
    tmp_path, s3_env, monkeypatch
):
    project = _project(tmp_path, inbox="s3://no-such-bucket/inbox")
    cfg = project.load_config()
    with pytest.raises(StageFailed, match="NoSuchBucket; check scoring.inbox") as caught:
        pending_drops(project, cfg, DATASET)
    assert caught.value.retryable is False
    from tasks.dev.httpserver import unused_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(StageFailed, match="cannot list the drops in s3://") as caught:
        pending_drops(project, cfg, DATASET)
    assert caught.value.retryable is True
