"""The evaluation metrics are pure functions: check them against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import StageError
from tasks.ml.metrics import (
    average_precision,
    class_probabilities,
    classification_metrics,
    confidence_bins,
    confident_mistakes,
    confusion,
    expected_calibration_error,
    flat_metrics,
    log_loss,
    pr_points,
    reliability,
    roc_auc,
    roc_points,
)


def test_sigmoid_column_becomes_two_class_probabilities():
    probs = class_probabilities(np.array([[0.2], [0.9]]), 2)
    np.testing.assert_allclose(probs, [[0.8, 0.2], [0.1, 0.9]])
    np.testing.assert_allclose(class_probabilities([0.25], 2), [[0.75, 0.25]])
    softmax = np.array([[0.1, 0.7, 0.2]])
    np.testing.assert_allclose(class_probabilities(softmax, 3), softmax)


def test_output_width_must_match_the_classes():
    with pytest.raises(StageError, match="outputs 3 values per image but there are 2 classes"):
        class_probabilities(np.ones((4, 3)) / 3, 2)


def test_confusion_rows_are_actual_columns_predicted():
    matrix = confusion(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 2)
    assert matrix.tolist() == [[1, 1], [1, 2]]


def test_expected_calibration_error_by_hand():
    # Bin (0.5, 0.6]: confidences 0.6, 0.6, one right -> |0.5 - 0.6| = 0.1, weight 2/4.
    # Bin (0.9, 1.0]: confidences 0.95, 1.0, both right -> |1 - 0.975| = 0.025, weight 2/4.
    probs = np.array([[0.6, 0.4], [0.4, 0.6], [0.05, 0.95], [1.0, 0.0]])
    y = np.array([0, 0, 1, 0])
    assert expected_calibration_error(y, probs) == pytest.approx(0.5 * 0.1 + 0.5 * 0.025)


def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    rng = np.random.default_rng(0)
    y = np.array([0] * 4 + [1] * 4)
    probs = np.tile([[0.5, 0.5]], (8, 1))
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)
    sure = np.eye(2)[y]
    assert expected_calibration_error(y, sure) == pytest.approx(0.0)
    assert expected_calibration_error(1 - y, sure) == pytest.approx(1.0)
    assert 0 <= expected_calibration_error(y, rng.dirichlet([1, 1], 8)) <= 1


def test_log_loss_and_roc_auc_by_hand():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 0])
    expected = -np.mean(np.log([0.9, 0.8, 0.4, 0.3]))
    assert log_loss(y, probs) == pytest.approx(expected)
    # positives score 0.8, 0.4; negatives 0.1, 0.7: pairs won 0.8>0.1, 0.8>0.7, 0.4>0.1 -> 3/4
    assert roc_auc(y, probs) == pytest.approx(0.75)
    assert roc_auc(np.array([1, 1]), probs[:2]) is None
    assert log_loss(np.array([1]), np.array([[1.0, 0.0]])) == pytest.approx(-np.log(1e-7))


def test_roc_points_and_ties():
    fpr, tpr = roc_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.5, 0.5]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1])
    # a tie between a positive and a negative counts half
    tied = np.array([[0.5, 0.5], [0.5, 0.5], [0.1, 0.9]])
    assert roc_auc(np.array([0, 1, 1]), tied) == pytest.approx(0.75)


def test_multiclass_auc_is_the_mean_one_vs_rest_auc():
    y = np.array([0, 1, 2, 0])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4]])
    # class 0 vs rest: pos 0.6, 0.3; neg 0.2, 0.5 -> 0.6>0.2, 0.6>0.5, 0.3>0.2 -> 3/4
    # class 1 vs rest: pos 0.7 beats all three -> 1; class 2: pos 0.4 vs 0.1, 0.1, 0.4 -> 2.5/3
    assert roc_auc(y, probs) == pytest.approx((0.75 + 1 + 2.5 / 3) / 3)


def test_classification_metrics_by_hand():
    classes = ["cats", "dogs", "owls"]
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = classification_metrics(y, probs, classes)
    assert m["images"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == {
        "labels": classes,
        "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]],
    }
    cats, dogs, owls = (m["per_class"][c] for c in classes)
    assert (cats["precision"], cats["recall"], cats["support"]) == (0.5, 0.5, 2)
    assert dogs["precision"] == pytest.approx(2 / 3) and dogs["recall"] == 1.0
    assert owls["precision"] == 1.0 and owls["recall"] == 0.5
    assert owls["f1"] == pytest.approx(2 * 0.5 / 1.5)
    f1s = [0.5, 2 * (2 / 3) / (5 / 3), 2 * 0.5 / 1.5]
    assert m["f1_macro"] == pytest.approx(np.mean(f1s))
    assert m["log_loss"] == pytest.approx(-(4 * np.log(0.8) + 2 * np.log(0.1)) / 6)
    # one vs rest, ties count half: cats 5/8 (0.8 ties one owl), dogs 7/8, owls 6/8
    assert m["roc_auc"] == pytest.approx((5 / 8 + 7 / 8 + 6 / 8) / 3)
    assert m["ece"] == pytest.approx(abs(4 / 6 - 0.8))


def test_a_class_never_predicted_has_zero_precision_not_nan():
    m = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["a"]["precision"] == 0.5


def test_flat_metrics_names_every_number_once():
    m = classification_metrics(np.array([0, 1, 1]), np.eye(2)[[0, 1, 0]], ["cats", "dogs"])
    flat = flat_metrics(m)
    assert flat["accuracy"] == pytest.approx(2 / 3)
    assert flat["recall.dogs"] == 0.5
    assert flat["confusion.dogs.cats"] == 1.0
    assert flat["support.cats"] == 1.0
    m["roc_auc"] = None
    assert "roc_auc" not in flat_metrics(m)


def test_no_validation_images_is_a_clear_error():
    with pytest.raises(StageError, match="no validation images"):
        classification_metrics(np.array([], int), np.zeros((0, 2)), ["a", "b"])


def test_confident_mistakes_come_most_confident_first():
    y = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.95, 0.05], [0.6, 0.4], [0.2, 0.8]])
    assert confident_mistakes(y, probs, 16).tolist() == [2, 1, 3]
    assert confident_mistakes(y, probs, 2).tolist() == [2, 1]
    assert confident_mistakes(y, probs, 0).tolist() == []
    assert confident_mistakes(np.array([0]), np.array([[0.9, 0.1]]), 5).tolist() == []


# --- average precision, precision-recall points and the reliability diagram's numbers ---


def test_average_precision_by_hand():
    # P(dogs) ranks: 0.9 (dog) -> P 1, R 1/2; 0.8 (cat) adds no recall; at 0.5 a dog and a cat
    # tie -> P 2/4, R 1. AP = sum of precision x recall added = 1 * 1/2 + 1/2 * 1/2.
    y = np.array([1, 0, 1, 0])
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]])
    assert average_precision(y, probs) == pytest.approx(0.75)
    # AP is of classes[1]: with the classes swapped, cats are the positives, scored
    # 0.5 (tie with a dog) -> P 1/2, R 1/2; then 0.2 -> P 2/3, R 1. AP = 1/4 + 1/3.
    assert average_precision(1 - y, probs[:, ::-1]) == pytest.approx(1 / 4 + 1 / 3)


def test_a_perfect_ranking_has_average_precision_one_and_a_missing_class_none():
    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8], [0.6, 0.4], [0.01, 0.99]])
    assert average_precision(y, probs) == pytest.approx(1.0)
    assert average_precision(np.array([1, 1]), probs[:2]) is None
    assert average_precision(np.array([0, 1, 1]), np.eye(3)[[0, 1, 1]]) is None


def test_multiclass_average_precision_is_the_mean_one_vs_rest_ap():
    y = np.array([0, 1, 2, 0])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4]])
    # class 0: 0.6 (pos) P1 R1/2; 0.5 (neg); 0.3 (pos) P2/3 R1 -> 1/2 + 2/3 * 1/2 = 5/6
    # class 1: its one positive ranks first -> 1
    # class 2: the positive ties the top negative at 0.4 -> P 1/2 at R 1 -> 1/2
    assert average_precision(y, probs) == pytest.approx((5 / 6 + 1 + 1 / 2) / 3)


def test_pr_points_by_hand():
    precision, recall = pr_points(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.5, 0.5]))
    # thresholds 0.5, 0.8, 0.9, then the (precision 1, recall 0) end point
    np.testing.assert_allclose(precision, [0.5, 0.5, 1, 1])
    np.testing.assert_allclose(recall, [1, 0.5, 0.5, 0])


def test_average_precision_is_reported_and_logged():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(y, probs, ["cats", "dogs"])
    # dogs ranked 0.8 (dog), 0.7 (cat), 0.4 (dog), 0.1 (cat): 1 * 1/2 + 2/3 * 1/2
    assert m["average_precision"] == pytest.approx(0.5 + 1 / 3)
    assert flat_metrics(m)["average_precision"] == pytest.approx(0.5 + 1 / 3)
    assert set(m["per_class"]["dogs"]) == {"precision", "recall", "f1", "support"}
    one_class = classification_metrics(np.array([1, 1]), probs[:2], ["cats", "dogs"])
    assert one_class["average_precision"] is None
    assert "average_precision" not in flat_metrics(one_class)


def test_confidence_bins_are_closed_on_the_right():
    confidence = np.array([0.0, 0.1, 0.1000001, 0.5, 0.5000001, 0.6, 0.7, 0.95, 1.0])
    assert confidence_bins(confidence).tolist() == [0, 0, 1, 4, 5, 5, 6, 9, 9]
    assert confidence_bins(np.array([0.5, 0.51, 1.0]), bins=2).tolist() == [0, 1, 1]


def test_reliability_by_hand():
    probs = np.array(
        [
            [0.6, 0.4],  # conf 0.6, bin (0.5, 0.6], right
            [0.4, 0.6],  # conf 0.6, bin (0.5, 0.6], wrong
            [0.5, 0.5],  # conf 0.5, bin (0.4, 0.5], a tie goes to class 0: wrong
            [0.3, 0.7],  # conf 0.7, bin (0.6, 0.7], right
            [0.15, 0.85],  # conf 0.85, bin (0.8, 0.9], wrong
            [0.05, 0.95],  # conf 0.95, bin (0.9, 1], right
            [1.0, 0.0],  # conf 1.0, bin (0.9, 1], right
        ]
    )
    y = np.array([0, 0, 1, 1, 0, 1, 0])
    r = reliability(y, probs)
    np.testing.assert_allclose(r.edges, np.linspace(0, 1, 11))
    assert r.counts.tolist() == [0, 0, 0, 0, 1, 2, 1, 0, 1, 2]
    filled = [4, 5, 6, 8, 9]
    np.testing.assert_allclose(r.accuracy[filled], [0, 0.5, 1, 0, 1])
    np.testing.assert_allclose(r.confidence[filled], [0.5, 0.6, 0.7, 0.85, 0.975])
    empty = [0, 1, 2, 3, 7]
    assert np.isnan(r.accuracy[empty]).all() and np.isnan(r.confidence[empty]).all()
    # gaps 0.5, 0.1, 0.3, 0.85, 0.025 weighted by counts 1, 2, 1, 1, 2 over 7 images
    expected = (0.5 + 2 * 0.1 + 0.3 + 0.85 + 2 * 0.025) / 7
    assert r.ece == pytest.approx(expected)
    assert expected_calibration_error(y, probs) == pytest.approx(expected)


def test_reliability_of_three_classes_and_of_no_images():
    probs = np.array([[0.2, 0.3, 0.5], [0.34, 0.33, 0.33], [0.1, 0.8, 0.1]])
    r = reliability(np.array([2, 1, 1]), probs, bins=5)
    # bins of 0.2: conf 0.5 -> (0.4, 0.6] right; 0.34 -> (0.2, 0.4] wrong; 0.8 -> (0.6, 0.8] right
    assert r.counts.tolist() == [0, 1, 1, 1, 0]
    np.testing.assert_allclose(r.accuracy[1:4], [0, 1, 1])
    np.testing.assert_allclose(r.confidence[1:4], [0.34, 0.5, 0.8])
    assert r.ece == pytest.approx((0.34 + 0.5 + 0.2) / 3)
    none = reliability(np.array([], int), np.zeros((0, 2)))
    assert none.counts.tolist() == [0] * 10 and none.ece == 0.0
