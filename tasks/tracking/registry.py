"""The model registry: the registered model's name, its aliases and their history.

``@champion`` is the served model, ``@challenger`` a refused (or not yet
approved) candidate, ``@previous`` the champion it replaced. MLflow keeps only
where an alias points now; every move is also appended to the registered
model's tags (:func:`record_alias_move`), read back by :func:`alias_history`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tasks.config import Config
from tasks.tracking.store import access_error

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
"""Registry aliases: the served model, a refused (or not yet approved) candidate, the
champion it replaced."""


def registered_model_name(cfg: Config, dataset: str) -> str:
    return f"{cfg.tracking.experiment_prefix}{dataset}-classifier"


HISTORY_TAG = "alias_history."
"""Registered-model tag prefix: one tag per alias move, ``alias_history.<UTC time>.v<version>``.

MLflow keeps only where an alias points now; these tags keep where it pointed
before (they live with the registered model, so they survive runs being deleted).
"""
_HISTORY_REASON = 600


def current_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None (no such alias or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        _raise_unless_missing(client, name, error)
        return None


def _raise_unless_missing(client: MlflowClient, name: str, error: Exception) -> None:
    """Re-raise ``error`` unless it says that registered model ``name`` (or its alias) does
    not exist. A server with logins answers 403 for a model that does not exist yet; a
    refused login, or a denial on a model that does, is raised."""
    if not access_error(error):
        return
    if getattr(error, "error_code", "") == "PERMISSION_DENIED":
        escaped = name.replace("'", "\\'")
        if not client.search_registered_models(filter_string=f"name = '{escaped}'"):
            return
    raise error


def promote_version(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    """``version`` becomes ``@champion``; the champion it replaces keeps ``@previous``."""
    if previous is not None and previous != version:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, CHAMPION, version)
    challenger = current_alias(client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)


def record_alias_move(client: MlflowClient, name: str, entry: dict[str, Any]) -> str:
    """Append ``entry`` (version, alias, decision, reason, run…) to the model's history tags.

    Returns the tag key. Keys sort by time, so reading them back in key order
    replays the moves.
    """
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    key = f"{HISTORY_TAG}{now:%Y%m%dT%H%M%S.%f}Z.v{entry['version']}"
    record = {"time": now.isoformat(timespec="seconds"), **entry}
    if len(str(record.get("reason", ""))) > _HISTORY_REASON:
        record["reason"] = str(record["reason"])[: _HISTORY_REASON - 1] + "…"
    client.set_registered_model_tag(name, key, json.dumps(record, sort_keys=True))
    return key


def alias_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of registered model ``name``, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as error:
        _raise_unless_missing(client, name, error)
        return []
    moves = []
    for key in sorted(k for k in tags if k.startswith(HISTORY_TAG)):
        try:
            moves.append(json.loads(tags[key]))
        except json.JSONDecodeError:
            continue
    return moves


def champion_tenures(moves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Who held ``@champion`` from when until when (``until`` None: still holds it)."""
    tenures: list[dict[str, Any]] = []
    for move in moves:
        if move.get("alias") != CHAMPION:
            continue
        if tenures and tenures[-1]["until"] is None:
            tenures[-1]["until"] = move["time"]
        tenures.append({"version": str(move["version"]), "since": move["time"], "until": None})
    return tenures


def format_history(name: str, moves: list[dict[str, Any]]) -> str:
    """The history as a person reads it: each move, then who was ``@champion`` when."""
    if not moves:
        return f"{name}: no alias moves recorded yet (run register first)"
    lines = [f"{name}: alias moves, oldest first"]
    for move in moves:
        who = f" by {move['by']}" if move.get("by") else ""
        previous = f", previous champion v{move['previous']}" if move.get("previous") else ""
        verdict = f" [{move['verdict']}]" if move.get("verdict") else ""
        lines.append(
            f"  {move['time']}  v{move['version']} -> @{move['alias']}  "
            f"{move.get('decision', '')}{verdict}{who}{previous}"
        )
        if move.get("reason"):
            lines.append(f"      {move['reason']}")
        where = [f"run {move['run_id']}"] if move.get("run_id") else []
        if move.get("experiment"):
            where.append(f"DVC experiment {move['experiment']}")
        if where:
            lines.append(f"      {', '.join(where)}")
    tenures = champion_tenures(moves)
    lines.append(f"@{CHAMPION}, who held it when:")
    if not tenures:
        lines.append("  nobody yet")
    for tenure in tenures:
        until = tenure["until"] or "now"
        lines.append(f"  v{tenure['version']}  {tenure['since']} -> {until}")
    return "\n".join(lines)
