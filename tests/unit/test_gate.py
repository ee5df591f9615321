"""The registry gate's verdict (tasks.ml.gate): the floor, the paired test, the approval rule."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import RegisterConfig
from tasks.ml.gate import decide, gate_verdict
from tasks.ml.paired_test import compare
from tests.unit.test_paired_test import Y, probs_for


def _cmp(verdict: str):
    good, bad = probs_for(np.ones(40, bool), Y), probs_for(np.arange(40) % 2 == 0, Y)
    pairs = {"worse": (bad, good), "better": (good, bad), "equivalent": (good, good.copy())}
    return compare(Y, *pairs[verdict])


@pytest.mark.parametrize(
    ("rule", "verdict", "passes", "words"),
    [
        ("better", "better", True, "significantly better than champion v3 by McNemar's"),
        ("better", "worse", False, "significantly worse than champion v3"),
        ("better", "equivalent", False, "so champion v3 stays (register.promote_if: better)"),
        ("not_worse", "equivalent", True, "takes over (register.promote_if: not_worse)"),
        ("not_worse", "worse", False, "significantly worse"),
    ],
)
def test_gate_verdict_follows_the_rule(rule, verdict, passes, words):
    cfg = RegisterConfig(floor=0.5, promote_if=rule)
    comparison = _cmp(verdict)
    ok, word, reason = gate_verdict(cfg, comparison.candidate, comparison, "3")
    assert (ok, word) == (passes, verdict)
    assert words in reason and "McNemar p=" in reason


def test_gate_verdict_floor_and_first_champion():
    cfg = RegisterConfig(floor=0.8)
    assert gate_verdict(cfg, 0.79, None) == (
        False,
        "below_floor",
        "test accuracy 0.7900 is below the floor 0.8000",
    )
    assert gate_verdict(cfg, 0.8, None)[:2] == (True, "first")  # exactly at the floor passes
    ok, word, reason = gate_verdict(cfg, 0.9, None, "2", "champion v2 predicts other classes")
    assert (ok, word) == (True, "incomparable") and "predicts other classes" in reason


def test_below_the_floor_keeps_the_comparisons_verdict_and_says_both():
    comparison = _cmp("worse")  # candidate accuracy 0.5
    ok, word, reason = gate_verdict(
        RegisterConfig(floor=0.8), comparison.candidate, comparison, "3"
    )
    assert (ok, word) == (False, "worse")
    assert reason.startswith("test accuracy 0.5000 is below the floor 0.8000; and significantly")
    better = _cmp("better")  # a better candidate that still misses a high floor is refused
    ok, word, _ = gate_verdict(RegisterConfig(floor=0.8), 0.7, better, "3")
    assert (ok, word) == (False, "better")


@pytest.mark.parametrize(
    ("approval", "verdict", "status"),
    [
        ("auto", "better", "promoted"),
        ("human", "better", "awaiting_approval"),
        ("auto", "worse", "rejected"),
        ("human", "worse", "rejected"),  # a refused candidate never waits for a person
    ],
)
def test_decide_applies_the_approval_rule_to_a_passing_candidate(approval, verdict, status):
    comparison = _cmp(verdict)
    cfg = RegisterConfig(floor=0.5, approval=approval)
    decided = decide(cfg, comparison.candidate, comparison, "3")
    assert (decided.status, decided.verdict) == (status, verdict)
    waits = decided.reason.endswith("waits at @challenger for approval (register.approval: human)")
    assert waits is (status == "awaiting_approval")
    assert decided.reason.startswith(gate_verdict(cfg, comparison.candidate, comparison, "3")[2])
