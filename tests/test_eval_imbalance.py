"""Imbalance metrics (per-class recall, balanced accuracy, G-mean, IBA, F1, precision) and
closed-set identification, checked against values worked out by hand."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from facepipe.eval import EvalInputError
from facepipe.eval.imbalance import closed_set_predictions, imbalance_metrics


def long_tailed_example():
    """Class 0: 50 samples, 40 right (10 predicted as 1). Class 1: 10, 7 right (3 predicted as 0).
    Class 2: 5, 4 right (1 predicted as 1)."""
    y_true = np.array([0] * 50 + [1] * 10 + [2] * 5)
    y_pred = y_true.copy()
    y_pred[:10] = 1
    y_pred[50:53] = 0
    y_pred[60] = 1
    return y_true, y_pred


def test_metrics_match_hand_computation():
    y_true, y_pred = long_tailed_example()
    m = imbalance_metrics(y_true, y_pred)
    recall = np.array([40 / 50, 7 / 10, 4 / 5])
    predicted = np.array([43, 18, 4])  # column sums of the confusion matrix
    precision = np.array([40, 7, 4]) / predicted
    negatives = 65 - np.array([50, 10, 5])
    false_positives = predicted - np.array([40, 7, 4])
    specificity = 1 - false_positives / negatives  # [12/15, 44/55, 60/60]
    np.testing.assert_allclose(m.recall, recall)
    np.testing.assert_allclose(m.precision, precision)
    np.testing.assert_allclose(m.specificity, specificity)
    np.testing.assert_allclose(m.f1, 2 * precision * recall / (precision + recall))
    assert m.support.tolist() == [50, 10, 5]
    assert m.accuracy == pytest.approx(51 / 65)
    assert m.balanced_accuracy == pytest.approx(recall.mean())
    assert m.gmean == pytest.approx(np.prod(recall) ** (1 / 3))
    # IBA (alpha 0.1, squared G-mean), dominance = macro recall - macro specificity.
    assert m.iba == pytest.approx((1 + 0.1 * (recall.mean() - specificity.mean())) * m.gmean ** 2)
    np.testing.assert_allclose(m.gmean_per_class, np.sqrt(recall * specificity))
    np.testing.assert_allclose(m.iba_per_class, (1 + 0.1 * (recall - specificity)) * recall * specificity)
    assert m.macro_f1 == pytest.approx(m.f1.mean())
    assert m.weighted_f1 == pytest.approx(np.average(m.f1, weights=[50, 10, 5]))
    assert m.macro_precision == pytest.approx(precision.mean())
    d = m.to_dict()
    json.dumps(d)
    assert d["per_class"]["1"]["recall"] == pytest.approx(0.7) and d["iba_alpha"] == 0.1
    assert "balanced acc 76.67 %" in m.summary()


def test_majority_class_predictor_is_exposed():
    # 90 % accuracy from always answering the head class: balanced accuracy is 1/3, G-mean 0.
    y_true = np.array([0] * 90 + [1] * 6 + [2] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a never-predicted class must not warn or give NaN
        m = imbalance_metrics(y_true, np.zeros(100, dtype=int))
    assert m.accuracy == pytest.approx(0.9)
    assert m.balanced_accuracy == pytest.approx(1 / 3)
    assert m.gmean == 0.0 and m.iba == 0.0
    assert m.precision.tolist() == [0.9, 0.0, 0.0] and m.macro_f1 < 0.35


def test_perfect_predictions_and_string_labels():
    labels = np.array(["cat", "dog", "dog", "eel", "eel", "eel"])
    m = imbalance_metrics(labels, labels)
    assert m.labels == ["cat", "dog", "eel"]
    assert m.balanced_accuracy == m.gmean == m.macro_f1 == m.macro_precision == 1.0
    assert m.iba == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(EvalInputError, match="equal length"):
        imbalance_metrics([0, 1], [0])
    with pytest.raises(EvalInputError, match="at least 2 classes"):
        imbalance_metrics([1, 1], [1, 1])
    with pytest.raises(EvalInputError, match="no predictions"):
        imbalance_metrics([], [])


def test_closed_set_identification_on_a_hand_made_gallery():
    gallery = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.1]])
    probes = np.array([[0.9, 0.2], [0.1, 5.0], [-1.0, -0.1], [0.7, 0.71]])
    # The last probe lies at 45.4 degrees: 44.6 degrees from "b" (at 90) and 45.4 from "a" (at 0).
    predicted = closed_set_predictions(gallery, ["a", "b", "c"], probes)
    assert predicted.tolist() == ["a", "b", "c", "b"]
    m = imbalance_metrics(["a", "b", "c", "a"], predicted)
    assert m.recall.tolist() == [0.5, 1.0, 1.0] and m.balanced_accuracy == pytest.approx(2.5 / 3)
    with pytest.raises(EvalInputError, match="zero-norm"):
        closed_set_predictions(np.zeros((1, 2)), ["a"], probes)
    with pytest.raises(EvalInputError, match="gallery labels"):
        closed_set_predictions(gallery, ["a"], probes)
