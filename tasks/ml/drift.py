"""Has a drop of new images drifted from what the model was trained on? Four tests.

A model version keeps a :class:`Reference` (made at register): the embeddings of
a seeded sample of its training images (the backbone's pooled features), the
training split's class prior and its confidences on the held-out test split. A
drop is compared with it on

============  =================================================================
``domain``    a domain classifier (logistic regression on the PCA-reduced
              embeddings) telling reference from drop: its cross-validated
              ROC AUC, with a permutation p-value (scikit-learn's
              :func:`~sklearn.model_selection.permutation_test_score`); it
              flags only above ``domain_auc`` too (Evidently's 0.55 default)
``mmd``       maximum mean discrepancy of the PCA-reduced embeddings, RBF
              kernel with the median-heuristic bandwidth, permutation p-value
              (:func:`scipy.stats.permutation_test`), as alibi-detect's
              ``MMDDrift`` after a dimensionality reduction ("Failing Loudly")
``classes``   the predicted-class counts against the training prior
              (chi-square goodness of fit)
``confidence``  the mean top-class confidence against the test split's
              (permutation test of the difference of means)
============  =================================================================

Each test runs at ``alpha / 4`` (Bonferroni), so an in-distribution drop is
flagged by any of them with probability at most ``alpha``. Values in, values
out: no files, no MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TESTS = ("domain", "mmd", "classes", "confidence")


@dataclass(frozen=True)
class DriftSettings:
    """``scoring.drift`` of params.yaml."""

    alpha: float = 0.05
    domain_auc: float = 0.55
    permutations: int = 100
    components: int = 32
    sample: int = 500
    min_images: int = 20
    seed: int = 0

    @property
    def threshold(self) -> float:
        """Each test's significance level."""
        return self.alpha / len(TESTS)


@dataclass(frozen=True)
class Reference:
    """What a drop is compared with: kept with each registered model version."""

    embeddings: np.ndarray
    """(n, d) float32: a seeded sample of the training images' embeddings."""
    prior: np.ndarray
    """(classes,) the training split's class shares."""
    test_confidence: np.ndarray
    """(m,) the model's top-class confidence on each held-out test image."""
    classes: tuple[str, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        """For ``np.savez``; :meth:`from_arrays` reads them back."""
        return {
            "embeddings": self.embeddings.astype(np.float32),
            "prior": self.prior.astype(np.float64),
            "test_confidence": self.test_confidence.astype(np.float32),
            "classes": np.asarray(self.classes),
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> Reference:
        return cls(
            embeddings=np.asarray(arrays["embeddings"], np.float32),
            prior=np.asarray(arrays["prior"], np.float64),
            test_confidence=np.asarray(arrays["test_confidence"], np.float32),
            classes=tuple(str(name) for name in arrays["classes"]),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "images": int(len(self.embeddings)),
            "dimensions": int(self.embeddings.shape[1]),
            "prior": {c: round(float(p), 4) for c, p in zip(self.classes, self.prior, strict=True)},
            "test_images": int(len(self.test_confidence)),
            "test_mean_confidence": round(float(np.mean(self.test_confidence)), 4),
        }


def sample_rows(count: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``size`` of ``count`` rows (all when fewer)."""
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def make_reference(
    embeddings: np.ndarray,
    train_labels: np.ndarray,
    test_probabilities: np.ndarray,
    classes: Sequence[str],
) -> Reference:
    """The reference of a model version from its training embeddings, labels and test scores."""
    counts = np.bincount(np.asarray(train_labels, int), minlength=len(classes)).astype(float)
    return Reference(
        embeddings=np.asarray(embeddings, np.float32),
        prior=counts / max(counts.sum(), 1.0),
        test_confidence=np.asarray(test_probabilities).max(axis=1).astype(np.float32),
        classes=tuple(classes),
    )


def drift_report(
    reference: Reference,
    embeddings: np.ndarray,
    probabilities: np.ndarray,
    settings: DriftSettings,
) -> dict[str, Any]:
    """Every test's statistic, p-value and threshold, and ``drift``: whether any flagged.

    A drop of fewer than ``settings.min_images`` images is not tested
    (``checked: false`` and why): too few to tell drift from chance.
    """
    images, known = len(embeddings), len(reference.embeddings)
    report: dict[str, Any] = {
        "drift": False,
        "checked": min(images, known) >= settings.min_images,
        "alpha": settings.alpha,
        "images": images,
        "reference": reference.summary(),
        "tests": {},
    }
    if not report["checked"]:
        which = (
            f"the drop has {images}"
            if images < settings.min_images
            else (f"the model version's reference has {known}")
        )
        report["reason"] = (
            f"{which} image(s), fewer than scoring.drift.min_images {settings.min_images}: "
            "scored, not tested for drift"
        )
        return report
    rng = np.random.default_rng(settings.seed)
    ref, new = _reduced(reference.embeddings, np.asarray(embeddings, np.float32), settings, rng)
    report["compared"] = {"reference": len(ref), "drop": len(new), "components": ref.shape[1]}
    confidence = np.asarray(probabilities).max(axis=1)
    predicted = np.asarray(probabilities).argmax(axis=1)
    tests = {
        "domain": domain_classifier_test(ref, new, settings),
        "mmd": mmd_test(ref, new, settings),
        "classes": class_share_test(predicted, reference.prior, reference.classes, settings),
        "confidence": confidence_test(confidence, reference.test_confidence, settings),
    }
    report["tests"] = tests
    report["drift"] = any(test["drift"] for test in tests.values())
    report["flagged"] = [name for name, test in tests.items() if test["drift"]]
    return report


def _reduced(
    ref: np.ndarray, new: np.ndarray, settings: DriftSettings, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Both sides sampled to at most ``settings.sample`` rows, standardised and projected
    on the reference's principal components."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if ref.shape[1] != new.shape[1]:
        raise ValueError(
            f"the drop's embeddings have {new.shape[1]} dimensions, the reference's "
            f"{ref.shape[1]}: they come from different models"
        )
    ref = ref[_take(len(ref), settings.sample, rng)]
    new = new[_take(len(new), settings.sample, rng)]
    scaler = StandardScaler().fit(ref)
    components = max(1, min(settings.components, ref.shape[1], len(ref) - 1))
    pca = PCA(components, random_state=settings.seed).fit(scaler.transform(ref))
    return pca.transform(scaler.transform(ref)), pca.transform(scaler.transform(new))


def _take(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(count) if count <= size else np.sort(rng.choice(count, size, replace=False))


def _result(statistic: float, p_value: float, settings: DriftSettings, flagged: bool, **extra: Any):
    return {
        "statistic": round(float(statistic), 6),
        "p_value": round(float(p_value), 6),
        "threshold": settings.threshold,
        "drift": bool(flagged),
        **extra,
    }


def domain_classifier_test(
    ref: np.ndarray, new: np.ndarray, settings: DriftSettings
) -> dict[str, Any]:
    """Cross-validated ROC AUC of reference-vs-drop, with a permutation p-value."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, permutation_test_score

    x = np.concatenate([ref, new])
    y = np.concatenate([np.zeros(len(ref), int), np.ones(len(new), int)])
    folds = min(3, len(ref), len(new))
    auc, _, p_value = permutation_test_score(
        LogisticRegression(solver="liblinear"),
        x,
        y,
        scoring="roc_auc",
        cv=StratifiedKFold(folds, shuffle=True, random_state=settings.seed),
        n_permutations=settings.permutations,
        random_state=settings.seed,
    )
    flagged = p_value < settings.threshold and auc > settings.domain_auc
    return _result(auc, p_value, settings, flagged, auc_threshold=settings.domain_auc)


def mmd_test(ref: np.ndarray, new: np.ndarray, settings: DriftSettings) -> dict[str, Any]:
    """Squared MMD (RBF kernel, median-heuristic bandwidth) with a permutation p-value."""
    from scipy.stats import permutation_test
    from sklearn.metrics.pairwise import euclidean_distances

    both = np.concatenate([ref, new])
    distances = euclidean_distances(both, squared=True)
    median = float(np.median(distances[np.triu_indices(len(both), 1)]))
    gamma = 1.0 / max(median, 1e-12)
    kernel = np.exp(-gamma * distances)
    index = np.arange(len(both), dtype=float)

    def statistic(a: np.ndarray, b: np.ndarray) -> float:
        i, j = a.astype(int), b.astype(int)
        return float(
            kernel[np.ix_(i, i)].mean() + kernel[np.ix_(j, j)].mean()
            - 2 * kernel[np.ix_(i, j)].mean()
        )  # fmt: skip

    result = permutation_test(
        (index[: len(ref)], index[len(ref) :]),
        statistic,
        permutation_type="independent",
        vectorized=False,
        n_resamples=settings.permutations,
        alternative="greater",
        random_state=settings.seed,
    )
    p_value = float(result.pvalue)
    return _result(result.statistic, p_value, settings, p_value < settings.threshold, gamma=gamma)


def class_share_test(
    predicted: np.ndarray, prior: np.ndarray, classes: Sequence[str], settings: DriftSettings
) -> dict[str, Any]:
    """Chi-square goodness of fit of the predicted-class counts to the training prior."""
    from scipy.stats import chisquare

    observed = np.bincount(predicted, minlength=len(classes)).astype(float)
    expected = np.clip(prior, 1e-9, None) / np.clip(prior, 1e-9, None).sum() * observed.sum()
    statistic, p_value = chisquare(observed, expected)
    shares = observed / max(observed.sum(), 1.0)
    return _result(
        statistic,
        p_value,
        settings,
        p_value < settings.threshold,
        share={c: round(float(s), 4) for c, s in zip(classes, shares, strict=True)},
        prior={c: round(float(s), 4) for c, s in zip(classes, prior, strict=True)},
    )


def confidence_test(
    confidence: np.ndarray, test_confidence: np.ndarray, settings: DriftSettings
) -> dict[str, Any]:
    """Permutation test: is the drop's mean confidence below the test split's?"""
    from scipy.stats import permutation_test

    def difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(a, axis=axis) - np.mean(b, axis=axis)

    result = permutation_test(
        (np.asarray(confidence, float), np.asarray(test_confidence, float)),
        difference,
        permutation_type="independent",
        vectorized=True,
        n_resamples=settings.permutations,
        alternative="less",
        random_state=settings.seed,
    )
    p_value = float(result.pvalue)
    return _result(
        result.statistic,
        p_value,
        settings,
        p_value < settings.threshold,
        mean=round(float(np.mean(confidence)), 4),
        test_mean=round(float(np.mean(test_confidence)), 4),
    )
