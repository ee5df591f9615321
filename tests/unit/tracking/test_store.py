from __future__ import annotations

import pytest

from tasks.tracking.store import tracking_uri


def test_default_store_is_sqlite_under_the_workspace(cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(cfg, tmp_path) == "http://127.0.0.1:5000"


def test_dvc_temp_experiments_log_to_the_project_store(cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp_workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12"
    temp_workspace.mkdir(parents=True)
    expected = f"sqlite:///{(tmp_path / 'project').resolve()}/mlflow/mlflow.db"
    assert tracking_uri(cfg, temp_workspace) == expected


def refused(code: str, endpoint: str = "/api/2.0/mlflow/runs/search"):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    status = 401 if code == "UNAUTHENTICATED" else 403
    body = "You are not authenticated." if status == 401 else "Permission denied"
    return MlflowException(
        f"API request to endpoint {endpoint} failed with error code {status} != 200. "
        f"Response body: '{body}'",
        error_code=ErrorCode.Value(code),
    )


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ({}, "requires a login and MLFLOW_TRACKING_USERNAME is not set"),
        ({"MLFLOW_TRACKING_USERNAME": "pipeline"}, "MLFLOW_TRACKING_PASSWORD is not set"),
        (
            {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-value"},
            "refused the login of MLFLOW_TRACKING_USERNAME=pipeline; "
            "check MLFLOW_TRACKING_PASSWORD",
        ),
    ],
)
def test_a_refused_login_names_the_variable_to_fix(monkeypatch, login, expected):
    from tasks.tracking.store import access_error

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in login.items():
        monkeypatch.setenv(name, value)
    wrapped = RuntimeError("ending the run failed")
    wrapped.__cause__ = refused("UNAUTHENTICATED")
    for error in (refused("UNAUTHENTICATED"), wrapped):
        message = access_error(error, "http://mlflow:5000")
        assert message.startswith("MLflow tracking server http://mlflow:5000 ")
        assert expected in message and "\n" not in message
        assert "s3cr3t" not in message


def test_a_denied_request_names_the_account_and_the_request(monkeypatch):
    from tasks.tracking.store import access_error

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "viewer")
    message = access_error(refused("PERMISSION_DENIED", "/api/2.0/mlflow/registered-models/alias"))
    assert "denied MLFLOW_TRACKING_USERNAME=viewer the request" in message
    assert "/api/2.0/mlflow/registered-models/alias" in message
    assert "pipeline account" in message
    # anything else is not a login problem
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ErrorCode

    missing = MlflowException("no such run", error_code=ErrorCode.Value("RESOURCE_DOES_NOT_EXIST"))
    assert missing.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert access_error(missing) is None
    assert access_error(ValueError("x")) is None
