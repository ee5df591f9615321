"""Paired comparison of two classifiers on the same images: is the candidate better?

The registry gate asks this of a candidate and the re-scored champion, on the
held-out test split. Two tests, both on the *same* images (pairing removes the
difference in difficulty between image sets):

- **McNemar's exact test** (accuracy): only the discordant images count, those
  one model gets right and the other wrong. Under "equally accurate" each is
  a fair coin, so the p-value is the exact two-sided binomial test
  (``scipy.stats.binomtest``) of ``candidate_only`` out of the discordant ones.
- **A paired bootstrap interval** of the metric difference (candidate minus
  champion): resample the images with replacement, score both models on each
  resample, and take the ``alpha/2`` and ``1 - alpha/2`` percentiles. Works for
  any metric. (Written with numpy rather than ``scipy.stats.bootstrap``
  because a resample that holds one class only has no ROC AUC: such
  resamples are dropped here, where scipy would return NaN.)

``register.method`` picks which one decides; both are always reported, so a
reader sees the difference, its interval and the p-value together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from tasks.errors import StageError
from tasks.ml import metrics

BETTER = "better"
EQUIVALENT = "equivalent"
WORSE = "worse"
METHODS = ("mcnemar", "bootstrap")


@dataclass(frozen=True)
class Comparison:
    """Candidate vs champion on the same ``images``, in numbers and one verdict."""

    metric: str
    method: str
    """Which test decided: ``mcnemar`` or ``bootstrap``."""
    alpha: float
    images: int
    candidate: float
    champion: float
    difference: float
    """candidate - champion."""
    low: float
    high: float
    """The paired bootstrap's ``1 - alpha`` interval of the difference."""
    p_value: float
    """McNemar's exact two-sided p-value (accuracy: who is right on which image)."""
    candidate_only: int
    """Images only the candidate classifies correctly."""
    champion_only: int
    """Images only the champion classifies correctly."""
    resamples: int
    verdict: str
    """``better``, ``equivalent`` or ``worse`` (significantly, at ``alpha``)."""

    @property
    def confidence(self) -> float:
        return 1.0 - self.alpha

    def evidence(self) -> str:
        """The numbers behind the verdict, in one clause a person reads once."""
        return (
            f"{self.metric} {self.candidate:.4f} vs {self.champion:.4f}, difference "
            f"{self.difference:+.4f} ({self.confidence:.0%} CI {self.low:+.4f} to "
            f"{self.high:+.4f}), McNemar p={self.p_value:.4g} on {self.images} test images "
            f"({self.candidate_only} right only for the candidate, {self.champion_only} only "
            f"for the champion)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "confidence": self.confidence}


def _scorer(metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """``(y_true, probs) -> score`` for ``metric``; NaN where the metric is undefined."""

    def accuracy(y: np.ndarray, p: np.ndarray) -> float:
        return float(np.mean(p.argmax(axis=1) == y))

    def f1_macro(y: np.ndarray, p: np.ndarray) -> float:
        labels = np.arange(p.shape[1])
        return float(
            skm.f1_score(y, p.argmax(axis=1), labels=labels, average="macro", zero_division=0)
        )

    def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
        value = metrics.roc_auc(y, p)
        return float("nan") if value is None else value

    scorers = {"accuracy": accuracy, "f1_macro": f1_macro, "roc_auc": roc_auc}
    if metric not in scorers:
        raise StageError(f"cannot compare models on {metric!r}; use one of {', '.join(scorers)}")
    return scorers[metric]


def mcnemar_exact(
    candidate_correct: np.ndarray, champion_correct: np.ndarray
) -> tuple[float, int, int]:
    """(two-sided exact p-value, images only the candidate gets right, only the champion)."""
    candidate_only = int(np.sum(candidate_correct & ~champion_correct))
    champion_only = int(np.sum(champion_correct & ~candidate_correct))
    discordant = candidate_only + champion_only
    if discordant == 0:
        return 1.0, 0, 0
    p_value = stats.binomtest(candidate_only, discordant, 0.5, alternative="two-sided").pvalue
    return float(p_value), candidate_only, champion_only


def paired_bootstrap(
    y_true: np.ndarray,
    candidate: np.ndarray,
    champion: np.ndarray,
    metric: str,
    alpha: float,
    resamples: int,
    seed: int,
) -> tuple[float, float, int]:
    """(low, high): percentile interval of metric(candidate) - metric(champion); resamples used."""
    score = _scorer(metric)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    diffs = np.empty(resamples)
    if metric == "accuracy":  # vectorised: the mean of per-image correctness differences
        right = (candidate.argmax(axis=1) == y_true).astype(float)
        right -= champion.argmax(axis=1) == y_true
        for start in range(0, resamples, 500):
            rows = rng.integers(0, n, (min(500, resamples - start), n))
            diffs[start : start + len(rows)] = right[rows].mean(axis=1)
    else:
        for i in range(resamples):
            rows = rng.integers(0, n, n)
            diffs[i] = score(y_true[rows], candidate[rows]) - score(y_true[rows], champion[rows])
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        raise StageError(
            f"{metric} is undefined on every bootstrap resample of the test images "
            "(too few images per class?); use register.metric: accuracy"
        )
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high), int(len(diffs))


def compare(
    y_true: np.ndarray,
    candidate: np.ndarray,
    champion: np.ndarray,
    metric: str = "accuracy",
    method: str = "mcnemar",
    alpha: float = 0.05,
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Compare two (images, classes) probability arrays for the same labelled images."""
    y_true = np.asarray(y_true, dtype=int)
    candidate = np.asarray(candidate, dtype=np.float64)
    champion = np.asarray(champion, dtype=np.float64)
    if method not in METHODS:
        raise StageError(f"unknown comparison method {method!r}; use one of {', '.join(METHODS)}")
    if candidate.shape != champion.shape or candidate.shape[0] != len(y_true):
        raise StageError(
            f"the two models were scored on different images: {candidate.shape} vs "
            f"{champion.shape} for {len(y_true)} labels"
        )
    if not len(y_true):
        raise StageError("there are no test images to compare the models on")
    score = _scorer(metric)
    cand_score, champ_score = score(y_true, candidate), score(y_true, champion)
    p_value, candidate_only, champion_only = mcnemar_exact(
        candidate.argmax(axis=1) == y_true, champion.argmax(axis=1) == y_true
    )
    low, high, used = paired_bootstrap(y_true, candidate, champion, metric, alpha, resamples, seed)
    if method == "mcnemar":
        significant = p_value < alpha
        ahead = candidate_only > champion_only
    else:
        significant = low > 0 or high < 0
        ahead = low > 0
    verdict = EQUIVALENT if not significant else (BETTER if ahead else WORSE)
    return Comparison(
        metric=metric,
        method=method,
        alpha=alpha,
        images=len(y_true),
        candidate=cand_score,
        champion=champ_score,
        difference=cand_score - champ_score,
        low=low,
        high=high,
        p_value=p_value,
        candidate_only=candidate_only,
        champion_only=champion_only,
        resamples=used,
        verdict=verdict,
    )
