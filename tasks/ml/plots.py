"""The evaluation figures, drawn with matplotlib's Agg backend (no display needed).

Each function takes plain numbers and arrays (no models, no files to read) and
writes one PNG to ``out``; the evaluate stage decides what goes in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PHASE_LABELS = {"train": "frozen base", "finetune": "fine-tuning"}
METRIC_NAMES = (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
"""The per-class bars: (key in ``per_class``, legend label)."""


def _figure(width: float, height: float) -> Figure:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def _message(fig: Figure, text: str) -> None:
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, wrap=True)


def _draw_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], split: str) -> Figure:
    matrix = np.asarray(matrix)
    size = max(3.5, 1.0 + 0.9 * len(classes))
    fig = _figure(size + 1, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} {split} images)")
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    threshold = matrix.max() / 2 if matrix.size and matrix.max() else 0.5
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if matrix[i, j] > threshold else "black"
            text = f"{int(matrix[i, j])}\n({share[i, j]:.0%})"
            ax.text(j, i, text, ha="center", va="center", color=colour)
    return fig


def confusion_matrix(
    matrix: np.ndarray, classes: Sequence[str], out: Path, split: str = "test"
) -> Path:
    """Counts per (actual, predicted) cell, with the row share in brackets."""
    return _save(_draw_confusion_matrix(matrix, classes, split), out)


def _positives(classes: Sequence[str]) -> tuple[list[int], str]:
    """The classes drawn as positives (``classes[1]``, or each one vs the rest) and what to say."""
    if len(classes) == 2:
        return [1], f"positive class: {classes[1]}"
    return list(range(len(classes))), "one vs rest"


def _curve_figure(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> tuple[Figure, Any, list[tuple[int, np.ndarray, np.ndarray]], str]:
    """A curve plot's figure and axes, and per class with a curve (one that is neither
    absent nor alone in ``y_true``): its index, its 0/1 truth and its scores."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _figure(5.5, 5)
    positives, what = _positives(classes)
    curves = []
    for index in positives:
        truth = (y_true == index).astype(int)
        if truth.min() != truth.max():
            curves.append((index, truth, probs[:, index]))
    return fig, fig.add_subplot(1, 1, 1), curves, what


def _draw_roc_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], split: str
) -> Figure:
    from sklearn.metrics import auc

    from tasks.ml.metrics import roc_points

    fig, ax, curves, what = _curve_figure(y_true, probs, classes)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    for index, truth, scores in curves:
        fpr, tpr = roc_points(truth, scores)
        ax.plot(fpr, tpr, linewidth=2, label=f"{classes[index]} (AUC {auc(fpr, tpr):.3f})")
    if not curves:
        ax.text(0.5, 0.5, f"ROC undefined: the {split} set has one class", ha="center")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curve ({what}; {len(y_true)} {split} images)")
    ax.legend(loc="lower right")
    return fig


def roc_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], out: Path, split: str = "test"
) -> Path:
    """ROC of ``classes[1]`` for two classes; one-vs-rest per class for more."""
    return _save(_draw_roc_curves(y_true, probs, classes, split), out)


def _draw_precision_recall_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], split: str
) -> Figure:
    from sklearn.metrics import average_precision_score

    from tasks.ml.metrics import pr_points

    fig, ax, curves, what = _curve_figure(y_true, probs, classes)
    for index, truth, scores in curves:
        precision, recall = pr_points(truth, scores)
        label = f"{classes[index]} (AP {average_precision_score(truth, scores):.3f})"
        (line,) = ax.plot(recall, precision, linewidth=2, drawstyle="steps-post", label=label)
        # a classifier without skill has precision = the positive share at every recall
        ax.axhline(truth.mean(), linestyle=":", linewidth=1.5, color=line.get_color())
    if curves:
        rate = "its positive share" if len(curves) == 1 else "each class's share"
        ax.plot([], [], linestyle=":", color="grey", label=f"no skill (dotted: {rate})")
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, f"precision-recall undefined: the {split} set has one class", ha="center")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall curve ({what}; {len(y_true)} {split} images)")
    return fig


def precision_recall_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], out: Path, split: str = "test"
) -> Path:
    """Precision against recall of ``classes[1]`` for two classes; one-vs-rest per class for more.

    The legend gives each curve's average precision; a dotted line in the curve's
    colour marks no skill (precision = that class's share of the images).
    """
    return _save(_draw_precision_recall_curves(y_true, probs, classes, split), out)


def _draw_reliability_diagram(
    y_true: np.ndarray, probs: np.ndarray, ece: float, split: str
) -> Figure:
    from tasks.ml.metrics import reliability

    numbers = reliability(y_true, probs)
    edges, counts = numbers.edges, numbers.counts
    centres = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    filled = counts > 0
    fig = _figure(5.5, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.bar(
        centres[filled],
        numbers.accuracy[filled],
        width=width[filled],
        edgecolor="black",
        alpha=0.7,
        label="accuracy per bin",
    )
    top.plot(
        numbers.confidence[filled],
        numbers.accuracy[filled],
        "o",
        color="tab:red",
        label="mean confidence, accuracy",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="best", fontsize=9)
    top.set_title(f"Reliability diagram ({int(counts.sum())} {split} images, ECE {ece:.3f})")
    bars = bottom.bar(centres, counts, width=width, edgecolor="black", color="tab:grey")
    bottom.bar_label(bars, labels=[str(int(c)) if c else "" for c in counts], fontsize=8)
    bottom.set_ylim(0, max(1, int(counts.max())) * 1.3)
    bottom.set_xlabel("confidence (top class probability)")
    bottom.set_ylabel("images")
    return fig


def reliability_diagram(
    y_true: np.ndarray, probs: np.ndarray, out: Path, ece: float, split: str = "test"
) -> Path:
    """Accuracy against top-class confidence per bin, the diagonal, and images per bin below.

    Bars on the diagonal are calibrated; below it, over-confident. ``ece`` (the
    reported number) goes in the title.
    """
    return _save(_draw_reliability_diagram(y_true, probs, ece, split), out)


def _draw_per_class_metrics(per_class: dict[str, dict[str, float]], split: str) -> Figure:
    names = list(per_class)
    fig = _figure(max(5.5, 1.6 * len(names) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(names))
    width = 0.8 / len(METRIC_NAMES)
    for offset, (key, label) in enumerate(METRIC_NAMES):
        values = [float(per_class[name][key]) for name in names]
        shift = (offset - (len(METRIC_NAMES) - 1) / 2) * width
        bars = ax.bar(positions + shift, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    supports = [int(per_class[name]["support"]) for name in names]
    ticks = [f"{name}\n(n={n})" for name, n in zip(names, supports, strict=True)]
    ax.set_xticks(positions, ticks)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.legend(loc="upper center", ncols=len(METRIC_NAMES), bbox_to_anchor=(0.5, -0.18))
    ax.set_title(f"Precision, recall and F1 per class ({sum(supports)} {split} images)")
    return fig


def per_class_metrics(
    per_class: dict[str, dict[str, float]], out: Path, split: str = "test"
) -> Path:
    """Grouped bars of precision, recall and F1 per class; each tick gives the class's support.

    ``per_class`` is the ``per_class`` entry of ``classification_metrics``.
    """
    return _save(_draw_per_class_metrics(per_class, split), out)


def training_curves(history: pd.DataFrame | None, out: Path, missing: str = "") -> Path:
    """Loss and accuracy per global epoch, both phases on one figure.

    A dashed vertical line marks where each later phase starts, and each phase's
    span is labelled at the top of the panels.
    """
    if history is None or history.empty:
        fig = _figure(10, 4)
        _message(fig, missing or "no training history recorded")
        return _save(fig, out)
    from matplotlib.ticker import MaxNLocator

    history = history.sort_values("epoch", kind="stable")
    phases = list(dict.fromkeys(history["phase"]))
    fig = _figure(11, 4.2)
    panels = [("loss", "loss"), ("accuracy", "accuracy")]
    for position, (metric, title) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, position)
        for column, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            if column in history and history[column].notna().any():
                name = "train" if column == metric else "validation"
                ax.plot(history["epoch"], history[column], style, markersize=4, label=name)
        for phase_index, phase in enumerate(phases):
            epochs = history.loc[history["phase"] == phase, "epoch"]
            start, end = float(epochs.min()), float(epochs.max())
            if phase_index:
                boundary = start - 0.5
                ax.axvline(boundary, color="black", linestyle=":", linewidth=1.5)
            ax.text(
                (start + end) / 2,
                1.01,
                PHASE_LABELS.get(phase, phase),
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=9,
                fontweight="bold",
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(title)
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.set_title(title, pad=18)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle("Training curves (dotted line: phase boundary)", y=1.04)
    return _save(fig, out)


def _grid(count: int, columns: int = 4) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def image_grid(
    images: Sequence[np.ndarray], titles: Sequence[str], out: Path, title: str, empty: str
) -> Path:
    """Thumbnails with a caption each; ``empty`` is written on the figure when none."""
    if not images:
        fig = _figure(6, 2.5)
        _message(fig, empty)
        fig.suptitle(title)
        return _save(fig, out)
    rows, columns = _grid(len(images))
    fig = _figure(3 * columns, 3.2 * rows + 0.4)
    for index, (image, caption) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, columns, index + 1)
        ax.imshow(np.asarray(image).astype(np.uint8))
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, out)


def gradcam_overlays(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray] | None,
    titles: Sequence[str],
    out: Path,
    note: str = "",
    feature_map: tuple[int, int] | None = None,
) -> Path:
    """Each image (top) and the Grad-CAM heatmap laid over it (bottom).

    ``feature_map`` (height, width of the backbone's output) goes in the title:
    a 1x1 map can only light up the whole image.
    """
    if heatmaps is None or not images:
        fig = _figure(6, 2.5)
        _message(fig, note or "no images for Grad-CAM")
        fig.suptitle("Grad-CAM")
        return _save(fig, out)
    columns = len(images)
    fig = _figure(2.8 * columns, 6)
    for index, (image, heat, caption) in enumerate(zip(images, heatmaps, titles, strict=True)):
        top = fig.add_subplot(2, columns, index + 1)
        top.imshow(np.asarray(image).astype(np.uint8))
        top.set_title(caption, fontsize=9)
        top.axis("off")
        bottom = fig.add_subplot(2, columns, columns + index + 1)
        bottom.imshow(np.asarray(image).astype(np.uint8))
        bottom.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        bottom.axis("off")
    grid = f" ({feature_map[0]}x{feature_map[1]} feature map)" if feature_map else ""
    fig.suptitle(f"Grad-CAM: where the backbone's features drove the predicted class{grid}")
    return _save(fig, out)


def _draw_pareto(
    labels: Sequence[str],
    seconds: Sequence[float],
    accuracy: Sequence[float],
    front: Sequence[bool],
    title: str,
) -> Figure:
    fig = _figure(7.5, 5)
    ax = fig.add_subplot(1, 1, 1)
    x, y = np.asarray(seconds, float), np.asarray(accuracy, float)
    on = np.asarray(front, bool)
    ax.scatter(x[~on], y[~on], s=60, color="tab:gray", label="dominated", zorder=2)
    ax.scatter(x[on], y[on], s=80, color="tab:red", label="Pareto front", zorder=3)
    order = np.argsort(x[on])
    ax.plot(x[on][order], y[on][order], color="tab:red", linewidth=1, zorder=1)
    span = float(x.max()) if len(x) else 1.0
    placed: list[tuple[float, float, int]] = []
    for index in np.lexsort((x, -y)):  # top to bottom, left to right
        px, py = float(x[index]), float(y[index])
        # labels of points close together take different lines instead of overprinting
        taken = {k for qx, qy, k in placed if abs(px - qx) < 0.2 * span and abs(py - qy) < 0.04}
        line = next(k for k in range(len(placed) + 1) if k not in taken)
        placed.append((px, py, line))
        ax.annotate(
            labels[index], (px, py), textcoords="offset points", xytext=(6, 6 - 12 * line),
            fontsize=9,
        )  # fmt: skip
    ax.set_xlabel("training seconds (train + finetune)")
    ax.set_ylabel("test accuracy")
    low = min(0.0, float(y.min()) - 0.05) if len(y) else 0.0
    ax.set_ylim(low, 1.05)
    ax.set_xlim(0, float(x.max()) * 1.25 + 1 if len(x) else 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    return fig


def pareto_plot(
    labels: Sequence[str],
    seconds: Sequence[float],
    accuracy: Sequence[float],
    front: Sequence[bool],
    out: Path,
    title: str = "Test accuracy against training time",
) -> Path:
    """One point per combination (training seconds, test accuracy), the Pareto front in red."""
    return _save(_draw_pareto(labels, seconds, accuracy, front, title), out)
