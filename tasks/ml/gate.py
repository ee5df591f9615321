"""The registry gate's verdict: values in, a decision out (no registry, no files).

A candidate passes when it reaches ``register.floor`` on ``register.metric`` and
the paired comparison with the champion re-scored on the same test images
(:mod:`tasks.ml.paired_test`) finds it significantly ``better``, or, with
``register.promote_if: not_worse``, not significantly ``worse``. Without a
champion (``first``) or without a comparison (``incomparable``) the floor alone
decides. With ``register.approval: human`` a passing candidate waits for a person.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.config import RegisterConfig
from tasks.contract import AWAITING_APPROVAL, PROMOTED, REJECTED
from tasks.ml.paired_test import BETTER, WORSE, Comparison

FIRST, BELOW_FLOOR, INCOMPARABLE = "first", "below_floor", "incomparable"
_SLACK = 1e-9


@dataclass(frozen=True)
class Verdict:
    status: str
    """``promoted``, ``rejected`` or ``awaiting_approval``."""
    verdict: str
    """``better``/``equivalent``/``worse`` against the champion; ``first``,
    ``below_floor`` or ``incomparable`` when no comparison decided."""
    reason: str
    """The decision in one line, with the evidence."""


def decide(
    cfg: RegisterConfig,
    candidate: float,
    comparison: Comparison | None,
    champion_version: str | None = None,
    note: str = "",
) -> Verdict:
    """The gate's decision, the approval rule included."""
    passed, verdict, reason = gate_verdict(cfg, candidate, comparison, champion_version, note)
    if not passed:
        return Verdict(REJECTED, verdict, reason)
    if cfg.approval == "human":
        waits = "; it waits at @challenger for approval (register.approval: human)"
        return Verdict(AWAITING_APPROVAL, verdict, reason + waits)
    return Verdict(PROMOTED, verdict, reason)


def gate_verdict(
    cfg: RegisterConfig,
    candidate: float,
    comparison: Comparison | None,
    champion_version: str | None = None,
    note: str = "",
) -> tuple[bool, str, str]:
    """(whether the gate passes, the verdict word, the reason in one line).

    The verdict is the paired comparison's (``better``/``equivalent``/``worse``);
    without one it is ``first`` (no champion), ``incomparable`` (``note`` says
    why) or, below the floor, ``below_floor``. The floor applies in every case.
    """
    metric = cfg.metric
    floor = f"test {metric} {candidate:.4f} is below the floor {cfg.floor:.4f}"
    below = candidate + _SLACK < cfg.floor
    if comparison is None:
        if below:
            return False, BELOW_FLOOR, floor
        if champion_version is None:
            why, verdict = "no champion yet", FIRST
        else:
            why = note or f"champion v{champion_version} cannot be compared"
            verdict = INCOMPARABLE
        reaches = f"test {metric} {candidate:.4f} reaches the floor {cfg.floor:.4f}"
        return True, verdict, f"{reaches}; {why}"
    passed, reason = _compared(cfg, comparison, f"champion v{champion_version}")
    if below:
        return False, comparison.verdict, f"{floor}; and {reason}"
    return passed, comparison.verdict, reason


def _compared(cfg: RegisterConfig, comparison: Comparison, who: str) -> tuple[bool, str]:
    """Whether the paired comparison lets the candidate through, and why."""
    test = "McNemar's exact test" if cfg.method == "mcnemar" else "the paired bootstrap interval"
    by = f"by {test} (alpha {cfg.alpha:g})"
    evidence = comparison.evidence()
    if comparison.verdict == WORSE:
        return False, f"significantly worse than {who} {by}: {evidence}"
    if comparison.verdict == BETTER:
        return True, f"significantly better than {who} {by}: {evidence}"
    if cfg.promote_if == "not_worse":
        return True, (
            f"equivalent to {who} {by}: not significantly worse, so it takes over "
            f"(register.promote_if: not_worse); {evidence}"
        )
    return False, (
        f"equivalent to {who} {by}: no significant difference, so {who} stays "
        f"(register.promote_if: better); {evidence}"
    )
