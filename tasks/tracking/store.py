"""Where the MLflow store is, and what to say when it cannot be used.

:func:`tracking_uri` is the one place that knows the store's location (the
environment, ``tracking.uri``, else the embedded SQLite store of the project);
:func:`server_errors` turns an unreachable or refusing tracking server into a
one-line :class:`~tasks.errors.StageError` that names the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.config import Config, load_config
from tasks.contract import PARAMS_ENV, STORE_ENV
from tasks.errors import ConfigError, StageError

"""Set by the orchestrator: the folder holding the shared embedded store (``mlflow/``)."""
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")


def tracking_uri(cfg: Config | None, root: str | Path = ".") -> str:
    """``$MLFLOW_TRACKING_URI``, else ``tracking.uri``, else the embedded SQLite store.

    ``cfg`` None (commands outside a stage, such as ``predict``): the params
    file ``$TASKS_PARAMS`` (default ``params.yaml``) is read if it exists.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if cfg is None:
        params = Path(os.environ.get(PARAMS_ENV, "params.yaml"))
        try:
            cfg = load_config(params) if params.is_file() else None
        except ConfigError:
            cfg = None
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{store_root(Path(root)) / 'mlflow' / 'mlflow.db'}"


def store_exists(uri: str) -> bool:
    """False only for an embedded SQLite store whose file is not there yet."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def store_root(root: Path) -> Path:
    """The project folder that holds the embedded store.

    ``dvc exp run --temp`` and queued experiments run in a copy under
    ``<project>/.dvc/tmp/exps/``; their runs belong in the project's store, not
    in the copy that DVC deletes afterwards. A scheduled run's workspace is
    told where the shared store is (``$TASKS_STORE_ROOT``).
    """
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).resolve()
    resolved = Path(root).resolve()
    parts = resolved.parts
    for index in range(len(parts) - 3):
        if parts[index + 1 : index + 4] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[: index + 1])
    return resolved


@contextmanager
def server_errors(uri: str, rerun: str) -> Iterator[None]:
    """Turn "the tracking server cannot be reached" into a one-line StageError.

    MLflow raises an ``MlflowException`` holding the whole failed request (or,
    ending the run on the way out, a second one); with an ``http(s)://`` store
    that could not be reached (refused, timed out, still failing after MLflow's
    retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``)
    the error names the server and the fix instead. ``rerun``: the command to run again.
    """
    try:
        yield
    except Exception as error:
        denied = access_error(error, uri)
        if denied:
            raise StageError(f"{denied}, then rerun `{rerun}`") from None
        full = artifact_store_full(error)
        if full:
            raise StageError(f"{full} `{rerun}`") from None
        reason = unreachable_reason(error) if uri.startswith(("http://", "https://")) else None
        if reason is None:
            raise
        raise StageError(
            f"MLflow tracking server {uri} unreachable ({reason}); start it, or point "
            f"MLFLOW_TRACKING_URI (or tracking.uri) at a running one, then rerun `{rerun}`"
        ) from None


def artifact_store_full(error: BaseException) -> str | None:
    """The one line for a local MLflow artifact store that ran out of space (MLflow writes
    through a temp file, so its ``OSError`` names no file), else None."""
    from tasks.io import storage_error

    store = None
    trace = error.__traceback__
    while trace is not None:
        if "mlflow/store/artifact" in trace.tb_frame.f_code.co_filename.replace("\\", "/"):
            store = getattr(trace.tb_frame.f_locals.get("self"), "artifact_dir", None) or store
        trace = trace.tb_next
    if store is None:
        return None
    return storage_error(error, f"logging artifacts to the MLflow artifact store {store}", store)


def access_error(error: BaseException | None, uri: str | None = None) -> str | None:
    """What to fix when an authenticating server (``mlflow/serve.sh`` with ``MLFLOW_AUTH``)
    refused the request behind ``error`` (401: no or wrong login; 403: the account may not);
    ``None`` for any other error. Names the variables to set, never a password."""
    codes = {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    error = next((e for e in _causes(error) if getattr(e, "error_code", "") in codes), None)
    if error is None:
        return None
    server = f"MLflow tracking server {uri or os.environ.get('MLFLOW_TRACKING_URI', '')}".rstrip()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if error.error_code == "PERMISSION_DENIED":
        request = str(error).split(" failed", 1)[0].removeprefix("API request to endpoint ")
        return (
            f"{server} denied MLFLOW_TRACKING_USERNAME={user} the request {request}: run the "
            "pipeline as the pipeline account (read-only accounts cannot write runs or move "
            "aliases)"
        )
    if not user or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        missing = "MLFLOW_TRACKING_USERNAME" if not user else "MLFLOW_TRACKING_PASSWORD"
        return (
            f"{server} requires a login and {missing} is not set; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the pipeline account's"
        )
    return (
        f"{server} refused the login of MLFLOW_TRACKING_USERNAME={user}; check "
        "MLFLOW_TRACKING_PASSWORD (or ask the MLflow admin to reset the account)"
    )


def unreachable_reason(error: BaseException | None) -> str | None:
    """Why a server could not be reached, when ``error`` or what it was raised from says so."""
    import requests

    for cause in _causes(error):
        if isinstance(cause, requests.exceptions.Timeout):
            return "timed out"
        if isinstance(cause, requests.exceptions.ConnectionError):
            return "connection refused" if "refused" in str(cause) else "connection failed"
        if isinstance(cause, requests.exceptions.RetryError):
            return "still failing after retries"
    return None


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and what it was raised from or during, each once."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
