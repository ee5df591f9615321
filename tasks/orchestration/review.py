"""The human approval step of a dataset DAG (``register.approval: human``).

``register`` leaves a candidate that passed the gate at ``@challenger``,
awaiting approval. The DAG then stops at an Airflow human-in-the-loop task
(:data:`APPROVAL_BODY` shows the gate's report); the answer reaches
:func:`apply_review`, which runs ``python -m tasks approve`` in the dataset's
workspace: approve promotes the version, reject leaves it ``@challenger`` with
the reviewer's reason. A candidate the gate refused never asks anyone
(:func:`needs_review`).

Imported when Airflow parses the DAG files: standard library and base modules only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tasks.contract import AWAITING_APPROVAL
from tasks.errors import StageFailed
from tasks.orchestration.dvc import failure, workspace_command
from tasks.orchestration.project import Project
from tasks.orchestration.records import read_workspace_record

log = logging.getLogger(__name__)

APPROVE, REJECT = "Approve", "Reject"

APPROVAL_SUBJECT = (
    "{% set g = ti.xcom_pull(task_ids='register')['metrics'] %}"
    "Promote {{ g.model_name }} v{{ g.version }} to @champion?"
)
APPROVAL_BODY = """\
{% set g = ti.xcom_pull(task_ids='register')['metrics'] %}\
The registry gate passed **{{ g.model_name }} v{{ g.version }}** on the held-out test split \
({{ g.images }} images). It is `@challenger` until you decide.

| | |
|---|---|
| verdict | **{{ g.verdict }}** (rule: promote if {{ g.promote_if | replace('_', ' ') }}) |
| candidate {{ g.metric }} | {{ '%.4f' | format(g.candidate_score) }} |
| champion | {% if g.champion_version %}v{{ g.champion_version }}\
{% if g.champion_score is not none %}: {{ '%.4f' | format(g.champion_score) }}{% endif %}\
{% else %}none yet{% endif %} |
{% if g.difference is not none %}\
| difference | {{ '%+.4f' | format(g.difference) }} \
({{ '%.0f' | format((1 - g.alpha) * 100) }}% CI {{ '%+.4f' | format(g.ci_low) }} to \
{{ '%+.4f' | format(g.ci_high) }}) |
| McNemar exact p | {{ '%.4g' | format(g.p_value) }} ({{ g.candidate_only }} images right only for \
the candidate, {{ g.champion_only }} only for the champion) |
{% endif %}\
| floor | {{ g.floor }} |
| DVC experiment | {{ g.experiment or 'n/a' }} |

**Approve** moves `@champion` to v{{ g.version }} (the current champion keeps `@previous`).
**Reject** leaves it `@challenger`; say why in *reason*.
The full report is `reports/<dataset>/gate.json` in the workspace and on the MLflow register run.
"""


def needs_review(register_result: Mapping[str, Any] | None) -> bool:
    """Whether the register task left a candidate awaiting approval."""
    metrics = (register_result or {}).get("metrics") or {}
    return metrics.get("status") == AWAITING_APPROVAL


@dataclass(frozen=True)
class ReviewResult:
    dataset: str
    version: str
    decision: str
    by: str
    reason: str

    def xcom(self) -> dict[str, Any]:
        return asdict(self)


def review_command(
    dataset: str, version: str, response: Mapping[str, Any]
) -> tuple[list[str], ReviewResult]:
    """The ``python -m tasks approve`` arguments for an approval task's response."""
    chosen = list(response.get("chosen_options") or [])
    if chosen not in ([APPROVE], [REJECT]):
        raise StageFailed(
            f"the approval task returned {chosen!r}; expected one of {APPROVE!r} or {REJECT!r}",
            retryable=False,
        )
    user = response.get("responded_by_user") or {}
    by = str(user.get("name") or user.get("id") or "airflow")
    reason = str((response.get("params_input") or {}).get("reason") or "").strip()
    argv = ["tasks", "approve", dataset, "--version", str(version), "--by", by]
    if chosen == [REJECT]:
        reason = reason or "rejected in Airflow without a reason"
        argv += ["--reject", reason]
    elif reason:
        argv += ["--note", reason]
    decision = "approved" if chosen == [APPROVE] else "rejected"
    return argv, ReviewResult(dataset, str(version), decision, by, reason)


def apply_review(
    project: Project, dataset: str, version: str, response: Mapping[str, Any]
) -> ReviewResult:
    """Run ``python -m tasks approve`` in the workspace with the reviewer's answer."""
    argv, result = review_command(dataset, version, response)
    ws = project.workspace(dataset)
    code, lines = workspace_command(ws, argv, read_workspace_record(ws))
    if code:
        raise failure("approve", dataset, lines)
    log.info("v%s of %s %s by %s", version, dataset, result.decision, result.by)
    return result
