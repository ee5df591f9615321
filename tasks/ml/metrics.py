"""Classification metrics: numpy in, numbers out.

Accuracy, precision/recall/F1, the confusion matrix, ROC/AUC, average precision
and log loss come from ``sklearn.metrics``; the reliability diagram's per-bin
accuracy and confidence from ``sklearn.calibration.calibration_curve``. The
expected calibration error has no scikit-learn function: it is the count-weighted
gap of those same bins (:func:`reliability`), so the number and the diagram agree.
``evaluate`` and the registry gate use exactly these definitions, so a reported
number and a gate decision can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn import metrics as skm

from tasks.errors import StageError

ECE_BINS = 10
SCALAR_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "roc_auc",
    "average_precision",
    "log_loss",
    "ece",
)
LOG_LOSS_CLIP = 1e-7
"""Probabilities are clipped here before the log: one confident mistake costs -log(1e-7)."""


def class_probabilities(outputs: Any, n_classes: int) -> np.ndarray:
    """The model's raw output as an (images, classes) probability array.

    Two classes may come as one sigmoid column, P(classes[1]); it becomes
    ``[1 - p, p]``. Anything else must already have one column per class.
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise StageError(f"the model outputs shape {out.shape}; expected (images, classes)")
    if out.shape[1] == 1 and n_classes == 2:
        return np.hstack([1.0 - out, out])
    if out.shape[1] != n_classes:
        raise StageError(
            f"the model outputs {out.shape[1]} values per image but there are {n_classes} "
            "classes; retrain it for this dataset's classes"
        )
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with actual class as row, predicted class as column."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


def confidence_bins(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The bin index (0 to ``bins - 1``) of each confidence in [0, 1].

    Bins are equal-width and closed on the right, ``(b/bins, (b+1)/bins]`` (0 falls in
    bin 0), exactly as ``calibration_curve(strategy="uniform")`` assigns them.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(confidence, dtype=np.float64))


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's numbers: top-class confidence against accuracy, per bin.

    ``edges`` has ``bins + 1`` values from 0 to 1; ``counts`` (images per bin),
    ``accuracy`` (share predicted right) and ``confidence`` (mean top-class
    probability) have one value per bin, NaN for the two means of an empty bin.
    """

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        """Mean |accuracy - confidence| over the bins, weighted by their image counts."""
        total = int(self.counts.sum())
        if not total:
            return 0.0
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(self.counts[filled] / total * gaps))


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Per-bin counts, accuracy and mean confidence of the top class (see :class:`Reliability`).

    Confidence is the top class probability and the binary target is "the top
    class is the true class"; ``sklearn.calibration.calibration_curve`` (uniform
    bins, :func:`confidence_bins`) gives the two means of the filled bins.
    """
    from sklearn.calibration import calibration_curve

    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    accuracy = np.full(bins, np.nan)
    confidence = np.full(bins, np.nan)
    if not len(y_true):
        return Reliability(edges, np.zeros(bins, np.int64), accuracy, confidence)
    top = np.clip(probs.max(axis=1), 0.0, 1.0)
    correct = (probs.argmax(axis=1) == y_true).astype(int)
    counts = np.bincount(confidence_bins(top, bins), minlength=bins).astype(np.int64)
    filled = counts > 0
    accuracy[filled], confidence[filled] = calibration_curve(
        correct, top, pos_label=1, n_bins=bins, strategy="uniform"
    )
    return Reliability(edges, counts, accuracy, confidence)


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size.

    Confidence is the top class probability; bin ``b`` holds ``(b/bins, (b+1)/bins]``.
    The bins are those of :func:`reliability`, so this is its diagram's gap.
    """
    return reliability(y_true, probs, bins).ece


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at :data:`LOG_LOSS_CLIP`)."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), LOG_LOSS_CLIP, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(skm.log_loss(y_true, probs, labels=np.arange(probs.shape[1])))


def roc_points(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every distinct score threshold.

    ``truth`` is 1 for positives; both classes must be present.
    """
    fpr, tpr, _ = skm.roc_curve(truth, scores, drop_intermediate=False)
    return fpr, tpr


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of ``classes[1]`` (two classes) or the mean one-vs-rest AUC; None if undefined."""
    return _one_vs_rest(skm.roc_auc_score, y_true, probs)


def _one_vs_rest(score: Any, y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """``score(truth, scores)`` of ``classes[1]`` (two classes) or its mean over each class
    against the rest; None when a class is absent (the score is undefined)."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    if len(set(y_true.tolist())) < n_classes:
        return None
    positives = [1] if n_classes == 2 else range(n_classes)
    return float(np.mean([score(y_true == k, probs[:, k]) for k in positives]))


def pr_points(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precisions, recalls) over every distinct score threshold, recall falling to 0.

    ``truth`` is 1 for positives; the last point is (precision 1, recall 0), as
    ``sklearn.metrics.precision_recall_curve`` ends.
    """
    precision, recall, _ = skm.precision_recall_curve(truth, scores)
    return precision, recall


def average_precision(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Average precision of ``classes[1]`` (two classes) or the mean one-vs-rest AP.

    AP is the precision at each threshold weighted by the recall it adds (the
    area under the step precision-recall curve); None if a class is absent.
    """
    return _one_vs_rest(skm.average_precision_score, y_true, probs)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """All evaluation numbers for integer labels and an (images, classes) probability array."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probs has shape {probs.shape}; expected ({len(y_true)}, {n_classes})")
    if not len(y_true):
        raise StageError("there are no validation images to evaluate on")
    y_pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "images": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": roc_auc(y_true, probs),
        "average_precision": average_precision(y_true, probs),
        "log_loss": log_loss(y_true, probs),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": {
            "labels": list(classes),
            "matrix": confusion(y_true, y_pred, n_classes).tolist(),
        },
    }


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, limit: int) -> np.ndarray:
    """Indices of wrongly classified images, most confident first, at most ``limit``."""
    probs = np.asarray(probs)
    wrong = np.flatnonzero(probs.argmax(axis=1) != np.asarray(y_true))
    order = np.argsort(-probs.max(axis=1)[wrong], kind="stable")
    return wrong[order][: max(0, limit)]


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of :func:`classification_metrics` under flat names, for MLflow."""
    flat = {key: float(metrics[key]) for key in SCALAR_METRICS if metrics.get(key) is not None}
    flat["images"] = float(metrics["images"])
    for name, values in metrics["per_class"].items():
        for key, value in values.items():
            flat[f"{key}.{name}"] = float(value)
    labels = metrics["confusion_matrix"]["labels"]
    for i, row in enumerate(metrics["confusion_matrix"]["matrix"]):
        for j, count in enumerate(row):
            flat[f"confusion.{labels[i]}.{labels[j]}"] = float(count)
    return flat


def metric_intervals(
    y_true: np.ndarray, probs: np.ndarray, confidence: float = 0.95, resamples: int = 1000
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (:func:`scipy.stats.bootstrap`, images resampled with
    their labels) of accuracy, macro F1 and ROC AUC; a metric undefined on the data is left
    out."""
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    y_true = np.asarray(y_true, int)
    predicted = np.asarray(probs).argmax(axis=1)
    classes = np.arange(np.asarray(probs).shape[1])

    def accuracy(i: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(y_true[i] == predicted[i], axis=axis)

    def f1_macro(i: np.ndarray, axis: int = -1) -> np.ndarray:
        truth, guess = y_true[i][..., None], predicted[i][..., None]
        tp = np.sum((truth == classes) & (guess == classes), axis=-2)
        wrong = np.sum(truth == classes, axis=-2) + np.sum(guess == classes, axis=-2) - 2 * tp
        return np.mean(np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0), axis=-1)

    def area(i: np.ndarray) -> float:
        value = roc_auc(y_true[i.astype(int)], np.asarray(probs)[i.astype(int)])
        return np.nan if value is None else value

    index = np.arange(len(y_true))
    plans = [("accuracy", accuracy, True, resamples), ("f1_macro", f1_macro, True, resamples)]
    if roc_auc(y_true, probs) is not None:
        plans.append(("roc_auc", area, False, min(resamples, 200)))
    intervals = {}
    for name, statistic, vectorized, count in plans:
        with warnings.catch_warnings():  # every resample equal (a perfect score): no spread
            warnings.simplefilter("ignore", DegenerateDataWarning)
            result = bootstrap(
                (index,),
                statistic,
                vectorized=vectorized,
                n_resamples=count,
                confidence_level=confidence,
                method="percentile",
                random_state=0,
            )
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            intervals[name] = (round(float(low), 4), round(float(high), 4))
    return intervals
