"""Ranking a sweep's combinations (tasks.ml.ranking): the best per dataset, the Pareto front."""

from __future__ import annotations

import pytest

from tasks.ml.ranking import best_by_group, pareto_front


def test_pareto_front_keeps_only_the_trade_offs():
    #            fast+ok  slow+best  slow+worse  dominated  tie with the first
    costs = [10.0, 50.0, 60.0, 20.0, 10.0]
    scores = [0.80, 0.95, 0.90, 0.70, 0.80]
    assert pareto_front(costs, scores) == [True, True, False, False, True]
    assert pareto_front([5.0], [0.5]) == [True]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError):
        pareto_front([1.0, 2.0], [0.5])


def test_best_by_group_is_the_most_accurate_then_the_cheapest():
    rows = [
        {"ds": "a", "key": "a-vgg", "acc": 0.9, "s": 40.0},
        {"ds": "a", "key": "a-mobile", "acc": 0.9, "s": 10.0},  # as accurate, faster
        {"ds": "a", "key": "a-fast", "acc": 0.7, "s": 1.0},
        {"ds": "b", "key": "b-only", "acc": 0.6, "s": 5.0},
        {"ds": "c", "key": "c-failed", "acc": None, "s": 0.0},  # no score: never wins
    ]
    assert best_by_group(rows, "ds", "acc", "s", "key") == {"a": "a-mobile", "b": "b-only"}
