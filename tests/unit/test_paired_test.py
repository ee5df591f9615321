"""The paired gate: McNemar's exact test and the paired bootstrap, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from tasks.errors import StageError
from tasks.ml.paired_test import compare, mcnemar_exact, paired_bootstrap


def probs_for(correct: np.ndarray, y: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Two-class probabilities that are right exactly where ``correct`` is True."""
    predicted = np.where(correct, y, 1 - y)
    p1 = np.where(predicted == 1, confidence, 1 - confidence)
    return np.stack([1 - p1, p1], axis=1)


Y = np.array([0, 1] * 20)  # 40 images, balanced


def test_mcnemar_counts_only_discordant_pairs_and_matches_the_binomial():
    cand = np.array([True] * 30 + [False] * 10)
    champ = np.array([True] * 20 + [False] * 10 + [True] * 2 + [False] * 8)
    p, cand_only, champ_only = mcnemar_exact(cand, champ)
    assert (cand_only, champ_only) == (10, 2)
    # two-sided exact binomial: P(X <= 2) + P(X >= 10) for X ~ Bin(12, 1/2)
    by_hand = sum(stats.binom.pmf(k, 12, 0.5) for k in (0, 1, 2, 10, 11, 12))
    assert p == pytest.approx(by_hand)
    assert mcnemar_exact(cand, cand) == (1.0, 0, 0)


@pytest.mark.slow
def test_the_bootstrap_interval_brackets_the_difference_and_is_reproducible():
    rng = np.random.default_rng(0)
    cand_right = rng.random(40) < 0.9
    champ_right = rng.random(40) < 0.6
    cand, champ = probs_for(cand_right, Y), probs_for(champ_right, Y)
    low, high, used = paired_bootstrap(Y, cand, champ, "accuracy", 0.05, 2000, seed=3)
    diff = cand_right.mean() - champ_right.mean()
    assert low < diff < high and used == 2000
    assert (low, high, used) == paired_bootstrap(Y, cand, champ, "accuracy", 0.05, 2000, seed=3)
    narrow = paired_bootstrap(Y, cand, champ, "accuracy", 0.5, 2000, seed=3)
    assert low < narrow[0] <= narrow[1] < high  # a 50% interval sits inside the 95% one
    f1 = paired_bootstrap(Y, cand, champ, "f1_macro", 0.05, 300, seed=3)
    assert f1[0] < f1[1]


def test_identical_models_are_equivalent_with_a_zero_interval():
    right = np.arange(40) % 5 != 0
    same = probs_for(right, Y)
    result = compare(Y, same, same.copy())
    assert result.verdict == "equivalent"
    assert (result.difference, result.low, result.high, result.p_value) == (0, 0, 0, 1.0)


@pytest.mark.parametrize("method", ["mcnemar", "bootstrap"])
def test_a_far_worse_candidate_is_worse_and_a_far_better_one_better(method):
    good, bad = probs_for(np.ones(40, bool), Y), probs_for(np.arange(40) % 2 == 0, Y)
    worse = compare(Y, bad, good, method=method)
    better = compare(Y, good, bad, method=method)
    assert (worse.verdict, better.verdict) == ("worse", "better")
    assert worse.difference == pytest.approx(-0.5) and worse.high < 0 < better.low
    assert worse.p_value == pytest.approx(2 * 0.5**20)
    assert "on 40 test images (0 right only for the candidate, 20 only for the champion)" in (
        worse.evidence()
    )


def test_one_image_apart_is_not_significant():
    right = np.ones(40, bool)
    one_wrong = right.copy()
    one_wrong[7] = False
    result = compare(Y, probs_for(one_wrong, Y), probs_for(right, Y))
    assert result.verdict == "equivalent" and result.p_value == 1.0
    assert result.difference == pytest.approx(-1 / 40)


def test_mismatched_inputs_are_refused():
    with pytest.raises(StageError, match="scored on different images"):
        compare(Y, probs_for(np.ones(40, bool), Y), probs_for(np.ones(39, bool), Y[:39]))
    with pytest.raises(StageError, match="no test images"):
        compare(Y[:0], np.zeros((0, 2)), np.zeros((0, 2)))
