"""Classification metrics: numpy in, numbers out.

Accuracy, precision/recall/F1, the confusion matrix, ROC/AUC and log loss come
from ``sklearn.metrics``; the expected calibration error has no scikit-learn
function and is ours. ``evaluate`` and the registry gate use exactly these
definitions, so a reported number and a gate decision can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size.

    Confidence is the top class probability; bin ``b`` holds ``(b/bins, (b+1)/bins]``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    if not len(y_true):
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            total += members.mean() * gap
    return float(total)


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
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    if len(set(y_true.tolist())) < n_classes:
        return None
    positives = [1] if n_classes == 2 else range(n_classes)
    return float(np.mean([skm.roc_auc_score(y_true == k, probs[:, k]) for k in positives]))


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
