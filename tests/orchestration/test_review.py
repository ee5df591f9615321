"""The approval step's glue: the report a reviewer reads, and what each answer runs."""

from __future__ import annotations

import jinja2
import jinja2.sandbox
import pytest

from tasks.errors import StageFailed
from tasks.orchestration.review import (
    APPROVAL_BODY,
    APPROVAL_SUBJECT,
    needs_review,
    review_command,
)

GATE = {
    "status": "awaiting_approval",
    "verdict": "better",
    "version": "4",
    "model_name": "ants_vs_bees-classifier",
    "metric": "accuracy",
    "images": 31,
    "candidate_score": 0.9355,
    "champion_version": "3",
    "champion_score": 0.7419,
    "difference": 0.1935,
    "ci_low": 0.0645,
    "ci_high": 0.3226,
    "p_value": 0.0078,
    "candidate_only": 7,
    "champion_only": 1,
    "alpha": 0.05,
    "promote_if": "better",
    "floor": 0.8,
    "experiment": "ants_vs_bees-manual__2026",
}


class FakeTI:
    def __init__(self, gate):
        self.gate = gate

    def xcom_pull(self, task_ids):
        assert task_ids == "register"
        return {"metrics": self.gate}


def render(template: str, gate: dict) -> str:
    # Airflow renders templates with a sandboxed Jinja environment like this one
    env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(ti=FakeTI(gate))


def test_the_reviewer_sees_the_gate_report_in_words_and_numbers():
    body = render(APPROVAL_BODY, GATE)
    assert "**ants_vs_bees-classifier v4**" in body and "(31 images)" in body
    assert "| verdict | **better** (rule: promote if better) |" in body
    assert "| candidate accuracy | 0.9355 |" in body
    assert "| champion | v3: 0.7419 |" in body
    assert "| difference | +0.1935 (95% CI +0.0645 to +0.3226) |" in body
    assert "| McNemar exact p | 0.0078 (7 images right only for the candidate, 1 only" in body
    assert render(APPROVAL_SUBJECT, GATE) == "Promote ants_vs_bees-classifier v4 to @champion?"


def test_a_first_champion_report_has_no_comparison_rows():
    first = {
        **GATE,
        "champion_version": None,
        "champion_score": None,
        "difference": None,
        "verdict": "first",
    }
    body = render(APPROVAL_BODY, first)
    assert "| champion | none yet |" in body
    assert "McNemar" not in body and "difference" not in body


def test_only_a_candidate_awaiting_approval_asks_anyone():
    assert needs_review({"metrics": GATE})
    assert not needs_review({"metrics": {**GATE, "status": "rejected"}})
    assert not needs_review(None)


def test_each_answer_becomes_one_approve_command():
    user = {"id": "7", "name": "ada"}
    argv, result = review_command(
        "ants_vs_bees",
        "4",
        {
            "chosen_options": ["Approve"],
            "params_input": {"reason": "ok"},
            "responded_by_user": user,
        },
    )
    assert argv == [
        "tasks",
        "approve",
        "ants_vs_bees",
        "--version",
        "4",
        "--by",
        "ada",
        "--note",
        "ok",
    ]
    assert result.decision == "approved"
    argv, result = review_command(
        "ants_vs_bees",
        "4",
        {"chosen_options": ["Reject"], "params_input": {}, "responded_by_user": user},
    )
    assert argv[-2:] == ["--reject", "rejected in Airflow without a reason"]
    assert result.decision == "rejected"
    with pytest.raises(StageFailed, match="expected one of 'Approve' or 'Reject'"):
        review_command("ants_vs_bees", "4", {"chosen_options": ["Approve", "Reject"]})
