"""The drift tests (tasks.ml.drift) on synthetic embeddings: each test flags the shift it
is meant for, not the others' noise; thresholds, sampling and the small-drop rule."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.ml.drift import (
    DriftSettings,
    Reference,
    drift_report,
    make_reference,
    sample_rows,
)

SETTINGS = DriftSettings(permutations=99)
CLASSES = ("cats", "dogs")


def reference(rng: np.random.Generator, size: int = 300) -> Reference:
    labels = rng.integers(0, 2, size)
    confidence = rng.uniform(0.7, 1.0, 120)
    return make_reference(
        rng.normal(size=(size, 8)),
        labels,
        np.column_stack([confidence, 1 - confidence]),
        CLASSES,
    )


def drop_probabilities(rng: np.random.Generator, count: int, share: float = 0.5) -> np.ndarray:
    """Confidences like the reference's test split; ``share`` of images predicted dogs."""
    confidence = rng.uniform(0.7, 1.0, count)
    dogs = rng.uniform(size=count) < share
    return np.where(
        dogs[:, None], np.column_stack([1 - confidence, confidence]),
        np.column_stack([confidence, 1 - confidence]),
    )  # fmt: skip


def test_each_test_runs_at_alpha_over_four_and_a_same_distribution_drop_passes():
    rng = np.random.default_rng(0)
    report = drift_report(
        reference(rng), rng.normal(size=(80, 8)), drop_probabilities(rng, 80), SETTINGS
    )
    assert report["checked"] and report["drift"] is False and report["flagged"] == []
    assert set(report["tests"]) == {"domain", "mmd", "classes", "confidence"}
    for test in report["tests"].values():
        assert test["threshold"] == pytest.approx(0.0125)
        assert test["p_value"] >= test["threshold"]
    assert report["reference"]["images"] == 300 and report["reference"]["dimensions"] == 8


@pytest.mark.parametrize(
    ("shift", "expected"),
    [
        ("mean", {"domain", "mmd"}),
        ("one_class", {"classes"}),
        ("unsure", {"confidence"}),
    ],
)
def test_a_shift_is_flagged_by_the_test_meant_to_catch_it(shift, expected):
    rng = np.random.default_rng(1)
    ref = reference(rng)
    embeddings = rng.normal(size=(80, 8))
    probabilities = drop_probabilities(rng, 80)
    if shift == "mean":
        embeddings[:, :3] += 1.0
    elif shift == "one_class":
        probabilities = drop_probabilities(rng, 80, share=0.0)
    else:
        confidence = rng.uniform(0.5, 0.7, 80)
        probabilities = np.column_stack([confidence, 1 - confidence])
        probabilities[::2] = probabilities[::2, ::-1]
    report = drift_report(ref, embeddings, probabilities, SETTINGS)
    assert report["drift"] is True
    assert set(report["flagged"]) == expected


def test_the_domain_classifier_needs_both_a_small_p_value_and_an_auc_over_the_floor():
    rng = np.random.default_rng(2)
    ref = reference(rng)
    shifted = rng.normal(size=(80, 8))
    shifted[:, 0] += 0.6
    strict = drift_report(ref, shifted, drop_probabilities(rng, 80), SETTINGS)["tests"]["domain"]
    assert strict["drift"] and strict["statistic"] > 0.55
    lenient = DriftSettings(permutations=99, domain_auc=0.99)
    tests = drift_report(ref, shifted, drop_probabilities(rng, 80), lenient)["tests"]
    assert tests["domain"]["p_value"] < 0.0125 and not tests["domain"]["drift"]


def test_a_drop_or_reference_under_min_images_is_scored_but_not_tested():
    rng = np.random.default_rng(3)
    report = drift_report(reference(rng), rng.normal(size=(5, 8)), drop_probabilities(rng, 5),
                          SETTINGS)  # fmt: skip
    assert report == {**report, "checked": False, "drift": False, "tests": {}}
    assert "the drop has 5 image(s), fewer than scoring.drift.min_images 20" in report["reason"]
    small = reference(rng, size=10)
    report = drift_report(small, rng.normal(size=(40, 8)), drop_probabilities(rng, 40), SETTINGS)
    assert "the model version's reference has 10 image(s)" in report["reason"]


def test_embeddings_of_another_model_are_refused_in_one_line():
    rng = np.random.default_rng(4)
    message = "have 4 dimensions, the reference's 8: they come from different models"
    with pytest.raises(ValueError, match=message):
        drift_report(reference(rng), rng.normal(size=(40, 4)), drop_probabilities(rng, 40),
                     SETTINGS)  # fmt: skip


def test_at_most_sample_rows_per_side_enter_the_tests_and_the_result_is_seeded():
    rng = np.random.default_rng(5)
    ref = reference(rng)
    new, probabilities = rng.normal(size=(300, 8)) + 0.2, drop_probabilities(rng, 300)
    settings = DriftSettings(permutations=99, sample=50, components=4)
    first = drift_report(ref, new, probabilities, settings)
    assert first["compared"] == {"reference": 50, "drop": 50, "components": 4}
    assert drift_report(ref, new, probabilities, settings) == first
    whole = drift_report(ref, new, probabilities, DriftSettings(permutations=99))
    assert whole["compared"] == {"reference": 300, "drop": 300, "components": 8}


def test_the_reference_round_trips_through_its_arrays_and_samples_are_seeded():
    rng = np.random.default_rng(6)
    ref = reference(rng)
    back = Reference.from_arrays(ref.arrays())
    assert back.classes == CLASSES
    np.testing.assert_allclose(back.embeddings, ref.embeddings, rtol=1e-6)
    np.testing.assert_allclose(back.prior, ref.prior)
    assert list(sample_rows(5, 10, 0)) == [0, 1, 2, 3, 4]
    picked = sample_rows(1000, 20, 7)
    assert len(set(picked)) == 20 and list(picked) == sorted(picked)
    assert list(picked) == list(sample_rows(1000, 20, 7))
