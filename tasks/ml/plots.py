"""The evaluation figures, drawn with matplotlib's Agg backend (no display needed).

Each function takes plain numbers and arrays (no models, no files to read) and
writes one PNG to ``out``; the evaluate stage decides what goes in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PHASE_LABELS = {"train": "frozen base", "finetune": "fine-tuning"}


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


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], out: Path) -> Path:
    """Counts per (actual, predicted) cell, with the row share in brackets."""
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
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} validation images)")
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    threshold = matrix.max() / 2 if matrix.size and matrix.max() else 0.5
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if matrix[i, j] > threshold else "black"
            text = f"{int(matrix[i, j])}\n({share[i, j]:.0%})"
            ax.text(j, i, text, ha="center", va="center", color=colour)
    return _save(fig, out)


def roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], out: Path) -> Path:
    """ROC of ``classes[1]`` for two classes; one-vs-rest per class for more."""
    from sklearn.metrics import auc

    from tasks.ml.metrics import roc_points

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _figure(5.5, 5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    positives = [1] if len(classes) == 2 else list(range(len(classes)))
    drawn = 0
    for index in positives:
        truth = (y_true == index).astype(int)
        if truth.min() == truth.max():
            continue
        fpr, tpr = roc_points(truth, probs[:, index])
        label = f"{classes[index]} (AUC {auc(fpr, tpr):.3f})"
        ax.plot(fpr, tpr, linewidth=2, label=label)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "ROC undefined: the validation set has one class", ha="center")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    what = f"positive class: {classes[1]}" if len(classes) == 2 else "one vs rest"
    ax.set_title(f"ROC curve ({what})")
    ax.legend(loc="lower right")
    return _save(fig, out)


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
