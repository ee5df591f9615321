"""Ranking a sweep's combinations: the best per dataset, the Pareto front of cost and score.

The sweep's comparison (``python -m tasks sweep-report``) asks which combination
goes through the registry gate (the most accurate, then the cheapest) and which
are trade-offs worth keeping in mind (nothing else both cheaper and as good).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """Which points no other point dominates (as cheap or cheaper, as good or better, and
    strictly one of them): the trade-offs worth considering, cost against score."""
    points = list(zip(costs, scores, strict=True))
    return [
        not any((c <= cost and s >= score) and (c < cost or s > score) for c, s in points)
        for cost, score in points
    ]


def best_by_group(
    rows: Sequence[dict[str, Any]], group: str, score: str, cost: str, key: str
) -> dict[Any, Any]:
    """Per ``group`` value, the ``key`` of the row with the highest ``score`` (ties: the
    lower ``cost``, then the smaller key); rows without a score never win."""
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row.get(score) is None:
            continue
        held = best.get(row[group])
        rank = (-row[score], row[cost], row[key])
        if held is None or rank < (-held[score], held[cost], held[key]):
            best[row[group]] = row
    return {name: row[key] for name, row in best.items()}
