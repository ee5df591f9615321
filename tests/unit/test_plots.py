"""The evaluation figures: each PNG is written and decodes, and what it shows is checked.

The public functions save straight to a file, so the checks read the Figure from
the private ``_draw_*`` function each one saves: titles, legend entries, the
drawn points and bar heights against the numbers of ``tasks.ml.metrics``.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.ml import plots
from tasks.ml.metrics import (
    average_precision,
    classification_metrics,
    expected_calibration_error,
    pr_points,
    reliability,
)

BINARY = ["cats", "dogs"]
THREE = ["ants", "bees", "owls"]


def scored(n_classes: int, n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a noisy but better-than-chance probability array."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 1, (n, n_classes))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def assert_png(path, min_width: int = 300) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes every pixel: a truncated file fails here
        assert image.width >= min_width and image.height >= 250
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10  # not a blank canvas


def legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_precision_recall_of_two_classes_is_drawn_for_the_positive_class(tmp_path):
    y, probs = scored(2)
    fig = plots._draw_precision_recall_curves(y, probs, BINARY, "test")
    (ax,) = fig.axes
    title = ax.get_title()
    assert "positive class: dogs" in title and f"{len(y)} test images" in title
    ap = average_precision(y, probs)
    assert legend_texts(ax) == [
        f"dogs (AP {ap:.3f})",
        "no skill (dotted: its positive share)",
    ]
    curve, no_skill = ax.lines[0], ax.lines[1]
    precision, recall = pr_points((y == 1).astype(int), probs[:, 1])
    np.testing.assert_allclose(curve.get_xdata(), recall)
    np.testing.assert_allclose(curve.get_ydata(), precision)
    assert curve.get_drawstyle() == "steps-post"  # the step curve whose area is the AP
    np.testing.assert_allclose(no_skill.get_ydata(), [(y == 1).mean()] * 2)

    out = plots.precision_recall_curves(y, probs, BINARY, tmp_path / "pr" / "curve.png")
    assert out == tmp_path / "pr" / "curve.png"
    assert_png(out)


def test_precision_recall_of_three_classes_has_one_curve_per_class():
    y, probs = scored(3)
    fig = plots._draw_precision_recall_curves(y, probs, THREE, "validation")
    (ax,) = fig.axes
    assert "one vs rest" in ax.get_title() and "validation images" in ax.get_title()
    texts = legend_texts(ax)
    assert len(texts) == len(THREE) + 1
    for index, name in enumerate(THREE):
        truth = (y == index).astype(int)
        one_vs_rest = average_precision(truth, np.stack([1 - probs[:, index], probs[:, index]], 1))
        assert texts[index] == f"{name} (AP {one_vs_rest:.3f})"
    assert texts[-1].startswith("no skill")
    # the mean of the per-curve APs is the reported macro AP
    per_curve = [float(t.split("AP ")[1].rstrip(")")) for t in texts[:-1]]
    assert np.mean(per_curve) == pytest.approx(average_precision(y, probs), abs=1e-3)


def test_precision_recall_with_one_class_says_so():
    y = np.zeros(4, int)
    fig = plots._draw_precision_recall_curves(y, np.tile([[0.7, 0.3]], (4, 1)), BINARY, "test")
    (ax,) = fig.axes
    assert not ax.lines and ax.get_legend() is None
    assert [t.get_text() for t in ax.texts] == [
        "precision-recall undefined: the test set has one class"
    ]


def test_reliability_diagram_shows_the_bins_and_their_counts(tmp_path):
    probs = np.array([[0.6, 0.4], [0.4, 0.6], [0.3, 0.7], [0.15, 0.85], [0.05, 0.95], [1, 0]])
    y = np.array([0, 0, 1, 0, 1, 0])
    ece = expected_calibration_error(y, probs)
    fig = plots._draw_reliability_diagram(y, probs, ece, "test")
    top, bottom = fig.axes
    assert top.get_title() == f"Reliability diagram (6 test images, ECE {ece:.3f})"
    # accuracy bars for the filled bins (0.5, 0.6], (0.6, 0.7], (0.8, 0.9], (0.9, 1]
    bars = top.containers[0]
    assert [round(b.get_x() + b.get_width() / 2, 2) for b in bars] == [0.55, 0.65, 0.85, 0.95]
    np.testing.assert_allclose([b.get_height() for b in bars], [0.5, 1, 0, 1])
    diagonal = top.lines[0]
    np.testing.assert_allclose(diagonal.get_xdata(), [0, 1])
    np.testing.assert_allclose(diagonal.get_ydata(), [0, 1])
    points = top.lines[1]
    np.testing.assert_allclose(points.get_xdata(), [0.6, 0.7, 0.85, 0.975])
    # beneath: images per bin, all ten bins, labelled with the count (blank when empty)
    counts = [b.get_height() for b in bottom.containers[0]]
    assert counts == [0, 0, 0, 0, 0, 2, 1, 0, 1, 2]
    assert [t.get_text() for t in bottom.texts] == ["", "", "", "", "", "2", "1", "", "1", "2"]
    assert bottom.get_ylabel() == "images"

    out = plots.reliability_diagram(y, probs, tmp_path / "reliability.png", ece, split="test")
    assert_png(out)


def test_reliability_diagram_title_carries_the_reported_ece_and_split():
    y, probs = scored(3, n=200, seed=1)
    ece = expected_calibration_error(y, probs)
    fig = plots._draw_reliability_diagram(y, probs, ece, "validation")
    top, bottom = fig.axes
    assert f"ECE {ece:.3f}" in top.get_title() and "200 validation images" in top.get_title()
    expected = reliability(y, probs).counts
    assert [b.get_height() for b in bottom.containers[0]] == expected.tolist()
    assert sum(expected) == 200


def test_per_class_metrics_bars_are_the_numbers(tmp_path):
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    per_class = classification_metrics(y, probs, THREE)["per_class"]
    fig = plots._draw_per_class_metrics(per_class, "test")
    (ax,) = fig.axes
    assert ax.get_title() == "Precision, recall and F1 per class (6 test images)"
    assert legend_texts(ax) == ["precision", "recall", "F1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{n}\n(n=2)" for n in THREE]
    heights = [[b.get_height() for b in bars] for bars in ax.containers]
    np.testing.assert_allclose(heights[0], [0.5, 2 / 3, 1.0])  # precision
    np.testing.assert_allclose(heights[1], [0.5, 1.0, 0.5])  # recall
    np.testing.assert_allclose(heights[2], [0.5, 0.8, 2 / 3])  # F1
    # each group sits on its class's tick, precision left of recall left of F1
    lefts = np.array([[b.get_x() for b in bars] for bars in ax.containers])
    assert (np.diff(lefts, axis=0) > 0).all() and (np.diff(lefts, axis=1) > 0).all()

    out = plots.per_class_metrics(per_class, tmp_path / "per_class.png", split="validation")
    assert_png(out)


@pytest.mark.parametrize("split", ["test", "validation"])
def test_confusion_matrix_and_roc_name_the_split(split, tmp_path):
    y, probs = scored(2, n=40)
    matrix = np.array([[15, 5], [3, 17]])
    keyword = {} if split == "test" else {"split": split}
    fig = plots._draw_confusion_matrix(matrix, BINARY, split)
    assert fig.axes[0].get_title() == f"Confusion matrix (40 {split} images)"
    fig = plots._draw_roc_curves(y, probs, BINARY, split)
    assert fig.axes[0].get_title() == f"ROC curve (positive class: dogs; 40 {split} images)"
    assert_png(plots.confusion_matrix(matrix, BINARY, tmp_path / "cm.png", **keyword), 250)
    assert_png(plots.roc_curves(y, probs, BINARY, tmp_path / "roc.png", **keyword))
    one_class = plots._draw_roc_curves(np.ones(3, int), probs[:3], BINARY, split)
    assert one_class.axes[0].texts[0].get_text() == f"ROC undefined: the {split} set has one class"


def test_pareto_labels_of_points_close_together_take_different_lines():
    labels = ["inception", "xception", "default", "hymenoptera", "tutorial", "block5"]
    seconds = [41.4, 56.4, 23.9, 33.0, 32.7, 35.4]
    accuracy = [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    front = [True, False, True, False, False, False]
    fig = plots._draw_pareto(labels, seconds, accuracy, front, "t")
    (ax,) = fig.axes
    fig.canvas.draw()
    boxes = {t.get_text(): t.get_window_extent() for t in ax.texts}
    assert set(boxes) == set(labels)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)
