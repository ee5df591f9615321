"""``approve``: a person's decision on a candidate the gate passed (``register.approval: human``).

With human approval, ``register`` leaves a candidate that passed the gate at
``@challenger`` with ``gate.decision = awaiting_approval``. This command (or the
Airflow approval task, which runs it) settles it:

- **approve**: the version becomes ``@champion`` and the champion it was
  compared with keeps ``@previous``; refused if ``@champion`` moved since the
  gate ran (the comparison would no longer hold: run ``register`` again);
- **reject**: the version stays ``@challenger``, with the reviewer's reason.

The decision goes to the version's tags (``gate.decision``, ``gate.reviewed_by``,
``gate.review_reason``), to the register run's tags, and to the registered
model's alias history. No file is rewritten: ``gate.json`` is the register
stage's DVC output and keeps what the gate said.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.config import Config
from tasks.contract import AWAITING_APPROVAL
from tasks.errors import StageError
from tasks.paths import DatasetPaths
from tasks.tracking.registry import CHALLENGER, CHAMPION, registered_model_name

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


@dataclass(frozen=True)
class Review:
    model_name: str
    version: str
    approved: bool
    by: str
    reason: str
    alias: str
    previous: str | None

    def __str__(self) -> str:
        if self.approved:
            kept = f"; v{self.previous} keeps @previous" if self.previous else ""
            head = f"approve: {self.model_name} v{self.version} -> @{CHAMPION} (approved by "
            return f"{head}{self.by}){kept}" + (f"\n  note: {self.reason}" if self.reason else "")
        return (
            f"approve: {self.model_name} v{self.version} stays @{CHALLENGER} (rejected by "
            f"{self.by})\n  reason: {self.reason}"
        )


def _awaiting_version(client: MlflowClient, name: str, version: str | None) -> ModelVersion:
    """The version to decide on: ``version``, or the one ``@challenger`` points at."""
    from mlflow.exceptions import MlflowException

    try:
        if version is None:
            found = client.get_model_version_by_alias(name, CHALLENGER)
        else:
            found = client.get_model_version(name, version)
    except MlflowException:
        what = f"version {version}" if version else f"an @{CHALLENGER}"
        raise StageError(
            f"{name} has no {what}; run `python -m tasks register` first "
            "(`python -m tasks history` lists the versions the gate has seen)"
        ) from None
    status = found.tags.get("gate.decision", "")
    if status != AWAITING_APPROVAL:
        raise StageError(
            f"{name} v{found.version} is not awaiting approval (gate.decision: "
            f"{status or 'none'}); only a candidate that passed the gate with "
            "register.approval: human can be approved or rejected"
        )
    return found


def _history_reason(reason: str, gate_reason: str) -> str:
    """The alias history's reason: the reviewer's, with the gate's after it."""
    return f"{reason} (gate: {gate_reason})" if reason else gate_reason


def _tag_review(
    client: MlflowClient, candidate: ModelVersion, decision: str, by: str, reason: str
) -> None:
    """The review on the model version and on the register run that logged it."""
    tags = {"gate.decision": decision, "gate.reviewed_by": by, "gate.review_reason": reason}
    for key, value in tags.items():
        client.set_model_version_tag(candidate.name, str(candidate.version), key, value)
    if candidate.run_id:
        for key, value in tags.items():
            client.set_tag(candidate.run_id, key, value)


def run(
    cfg: Config,
    paths: DatasetPaths,
    approve: bool,
    by: str,
    reason: str = "",
    version: str | None = None,
) -> Review:
    """Promote (``approve``) or reject the candidate awaiting approval."""
    from mlflow import MlflowClient

    from tasks.tracking.registry import current_alias, promote_version, record_alias_move
    from tasks.tracking.store import tracking_uri

    if not approve and not reason.strip():
        raise StageError("a rejection needs a reason: pass --reject 'what is wrong with it'")
    name = registered_model_name(cfg, paths.dataset)
    client = MlflowClient(tracking_uri(cfg, paths.root))
    candidate = _awaiting_version(client, name, version)
    number = str(candidate.version)
    compared_with = candidate.tags.get("gate.champion_version") or None
    champion = current_alias(client, name, CHAMPION)
    now = None if champion is None else str(champion.version)
    if approve and now != compared_with:
        raise StageError(
            f"@{CHAMPION} moved since the gate ran (it compared v{number} with "
            f"{'v' + compared_with if compared_with else 'no champion'}, now "
            f"{'v' + now if now else 'none'}); run `python -m tasks register "
            f"{paths.dataset}` again to compare with the current champion"
        )

    # Apply the answer: the alias, the version's and the run's tags, the alias history
    decision = "approved" if approve else "rejected"
    if approve:
        promote_version(client, name, number, now)
    _tag_review(client, candidate, decision, by, reason)
    record_alias_move(
        client,
        name,
        {
            "version": number,
            "alias": CHAMPION if approve else CHALLENGER,
            "decision": decision,
            "verdict": candidate.tags.get("gate.verdict"),
            "by": by,
            "previous": now if approve else None,
            "reason": _history_reason(reason, candidate.tags.get("gate.reason", "")),
            "run_id": candidate.run_id,
            "experiment": candidate.tags.get("dvc.exp_name"),
        },
    )
    return Review(
        model_name=name,
        version=number,
        approved=approve,
        by=by,
        reason=reason,
        alias=CHAMPION if approve else CHALLENGER,
        previous=now if approve else None,
    )
