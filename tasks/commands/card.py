"""``card``: print a registered model version's model card (:mod:`tasks.tracking.card`).

``python -m tasks card <dataset> [--version N]``: the ``@champion`` by default. The
card is rendered now from the facts ``register`` stored and MLflow's live records
(aliases, export checks, scoring runs): the same text the registry shows as the
version's description after its last refresh.
"""

from __future__ import annotations

from tasks.config import Config
from tasks.errors import StageError
from tasks.paths import DatasetPaths


def run(cfg: Config, paths: DatasetPaths, version: str | None = None) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.tracking.card import render_card
    from tasks.tracking.registry import CHAMPION, registered_model_name
    from tasks.tracking.store import server_errors, store_exists, tracking_uri

    name = registered_model_name(cfg, paths.dataset)
    uri = tracking_uri(cfg, paths.root)
    if not store_exists(uri):
        raise StageError(f"no MLflow store at {uri}; run the pipeline (or register) first")
    with server_errors(uri, f"python -m tasks card {paths.dataset}"):
        client = MlflowClient(uri)
        if version is None:
            try:
                version = str(client.get_model_version_by_alias(name, CHAMPION).version)
            except MlflowException:
                raise StageError(
                    f"{name} has no @{CHAMPION} yet; pass --version N (see `python -m tasks "
                    f"history {paths.dataset}`)"
                ) from None
        return render_card(client, name, version).rstrip()
