"""Create or update the accounts of an MLflow server started with MLFLOW_AUTH=basic.

Run as the admin, once the server is up (the compose stack's `mlflow-accounts` job
does); running it again is safe, and is how a password is rotated:

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 \\
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    MLFLOW_PIPELINE_USER=pipeline MLFLOW_PIPELINE_PASSWORD=... \\
    MLFLOW_READERS="alice:... bob:..." python mlflow/accounts.py

The accounts (docs/deployment.md has the whole table):
  pipeline  logs runs, registers models and moves their aliases: it manages what it
            creates, and is granted MANAGE on every experiment and registered model
            that already exists (made before authentication, or by an admin).
  readers   (MLFLOW_READERS, space-separated name:password) read every run, model and
            artifact (the server's default permission, READ) and change nothing of the
            pipeline's.
Neither is an admin. Passwords come from the environment only; none is printed.
"""

from __future__ import annotations

import os
import sys

MIN_PASSWORD = 12


class AccountError(Exception):
    """A bad setting: one line naming the variable and the fix."""


def accounts(environ: dict[str, str]) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """The pipeline account and the readers from ``environ``, checked."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if not environ.get(name):
            raise AccountError(f"{name} is not set; the admin's server address and login")
    pipeline = (environ.get("MLFLOW_PIPELINE_USER", "pipeline"), "MLFLOW_PIPELINE_PASSWORD")
    readers = []
    for index, entry in enumerate(environ.get("MLFLOW_READERS", "").split()):
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise AccountError(
                f"MLFLOW_READERS entry {index + 1} is not name:password; "
                "separate the accounts by spaces"
            )
        readers.append((name, password))
    pairs = [(pipeline[0], environ.get(pipeline[1], ""))] + readers
    where = {pipeline[0]: pipeline[1]} | {name: "MLFLOW_READERS" for name, _ in readers}
    names = [name for name, _ in pairs]
    admin = environ["MLFLOW_TRACKING_USERNAME"]
    for name, password in pairs:
        if name == admin or names.count(name) > 1:
            raise AccountError(
                f"{where[name]}: the account {name!r} is named twice (or is the admin)"
            )
        if len(password) < MIN_PASSWORD or password.startswith("change-me"):
            raise AccountError(
                f"{where[name]}: the password of {name!r} is a placeholder or shorter than "
                f"{MIN_PASSWORD} characters; generate one (openssl rand -hex 24)"
            )
    return pairs[0], readers


def apply(pipeline: tuple[str, str], readers: list[tuple[str, str]]) -> list[str]:
    """Create or update every account on the server; what was done, one line each."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    done = []
    for name, password in [pipeline, *readers]:
        try:
            auth.create_user(name, password)
            done.append(f"created {name}")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.update_user_password(name, password)
            done.append(f"updated the password of {name}")
        auth.update_user_admin(name, False)
    # What exists already was not created by the pipeline account: grant it.
    client = MlflowClient()
    user = pipeline[0]
    experiments = client.search_experiments(view_type=ViewType.ALL, max_results=50000)
    models = client.search_registered_models(max_results=1000)
    resources = [("experiment", e.experiment_id) for e in experiments]
    for kind, resource in resources + [("registered_model", m.name) for m in models]:
        try:
            auth.grant_user_permission(user, kind, resource, "MANAGE")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.revoke_user_permission(user, kind, resource)  # whatever it was: MANAGE now
            auth.grant_user_permission(user, kind, resource, "MANAGE")
    done.append(
        f"{user} manages {len(experiments)} existing experiment(s) and {len(models)} model(s)"
    )
    return done


def main() -> int:
    try:
        pipeline, readers = accounts(dict(os.environ))
    except AccountError as error:
        print(f"mlflow-accounts: {error}", file=sys.stderr)
        return 2
    try:
        done = apply(pipeline, readers)
    except Exception as error:
        code = getattr(error, "error_code", "")
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            message = (
                f"{os.environ['MLFLOW_TRACKING_URI']} refused the admin login "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD; use the server's "
                "MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD"
            )
        else:  # the server's answer, one line
            message = (str(error).strip() or type(error).__name__).splitlines()[0]
        print(f"mlflow-accounts: {message}", file=sys.stderr)
        return 1
    for line in done:
        print(f"mlflow-accounts: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
