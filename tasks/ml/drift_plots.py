"""The scoring figures: a drop against its model version's reference (:mod:`tasks.ml.drift`).

Plain numbers in, one PNG out per function, as :mod:`tasks.ml.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.ml.plots import _figure, _save


def class_shares(
    probabilities: np.ndarray, prior: np.ndarray, classes: Sequence[str], drop: str, out: Path
) -> Path:
    """Bars: the share of the drop predicted as each class, beside the training prior."""
    predicted = np.bincount(np.asarray(probabilities).argmax(axis=1), minlength=len(classes))
    shares = predicted / max(predicted.sum(), 1)
    fig = _figure(1.2 * len(classes) + 3, 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    ax.bar(x - 0.2, prior, 0.4, label="training prior", color="#9aa5b1")
    ax.bar(x + 0.2, shares, 0.4, label=f"drop {drop} (predicted)", color="#1f77b4")
    ax.set_xticks(x, list(classes))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of images")
    ax.set_title("Predicted class share vs the training prior")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out)


def confidence_histogram(
    confidence: np.ndarray, test_confidence: np.ndarray, classes: int, drop: str, out: Path
) -> Path:
    """Histograms (as densities) of the top-class confidence: drop vs the held-out test split."""
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    bins = np.linspace(1.0 / max(classes, 1), 1.0, 21)
    ax.hist(test_confidence, bins, density=True, alpha=0.5, label="test split", color="#9aa5b1")
    ax.hist(confidence, bins, density=True, alpha=0.6, label=f"drop {drop}", color="#1f77b4")
    ax.axvline(float(np.mean(test_confidence)), color="#52606d", ls="--", lw=1)
    ax.axvline(float(np.mean(confidence)), color="#1f77b4", ls="--", lw=1)
    ax.set_xlabel("top-class confidence (dashed: means)")
    ax.set_ylabel("density")
    ax.set_title("Confidence vs the test split")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, out)


def embedding_projection(reference: np.ndarray, drop_embeddings: np.ndarray, drop: str, out: Path):
    """Both sets of embeddings on the reference's first two principal components."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(reference)
    pca = PCA(2, random_state=0).fit(scaler.transform(reference))
    ref = pca.transform(scaler.transform(reference))
    new = pca.transform(scaler.transform(drop_embeddings))
    fig = _figure(5.5, 4.6)
    ax = fig.add_subplot()
    ax.scatter(ref[:, 0], ref[:, 1], s=8, alpha=0.4, label="training reference", color="#9aa5b1")
    ax.scatter(new[:, 0], new[:, 1], s=10, alpha=0.7, label=f"drop {drop}", color="#d62728")
    share = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({share[0]:.0%} of the reference's variance)")
    ax.set_ylabel(f"PC2 ({share[1]:.0%})")
    ax.set_title("Embeddings: reference vs drop")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out)
