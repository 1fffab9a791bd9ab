"""Classifier validation metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from classification.metrics import (
    average_precision,
    balanced_accuracy,
    classification_metrics,
    multiclass_balanced_accuracy,
    roc_auc,
)


def test_auc_counts_pairs_and_half_ties():
    y = [1, 0, 1, 0]
    assert roc_auc(y, [0.9, 0.1, 0.8, 0.2]) == 1.0
    assert roc_auc(y, [0.1, 0.9, 0.2, 0.8]) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie = 1/2, (0.5, 0.2) win, (0.7, 0.5) win, (0.7, 0.2) win → 3.5 / 4
    assert roc_auc(y, [0.5, 0.5, 0.7, 0.2]) == pytest.approx(0.875)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_average_precision_matches_the_stepwise_definition():
    # ranking: pos, neg, pos → precision at the two recall steps 1/1 and 2/3
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # a tie group is admitted at once: both at 0.5 → one step of recall 1 at precision 1/2
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_balanced_accuracy():
    assert balanced_accuracy([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.75)
    assert multiclass_balanced_accuracy([0, 0, 1, 2], [0, 1, 1, 2], 3) == pytest.approx((0.5 + 1 + 1) / 3)


def test_report_has_per_class_and_cancer_auc_and_skips_undefined_classes():
    labels = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 0]], np.float32)
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.9], [0.1, 0.2, 0.3], [0.3, 0.1, 0.1]], np.float32)
    m = classification_metrics(labels, probs, ["SCC", "AC", "NSCLC"], prefix="val_")
    assert m["val_auc_SCC"] == 1.0 and m["val_auc_AC"] == 1.0 and m["val_auc_NSCLC"] == 1.0
    assert m["val_cancer_auc"] == 1.0
    assert m["val_mean_auc"] == 1.0
    # a class without positives: NaN, left out of the mean
    m2 = classification_metrics(labels[:, :2] * [1, 0], probs[:, :2], ["SCC", "AC"])
    assert math.isnan(m2["auc_AC"]) and m2["mean_auc"] == 1.0


def test_softmax_report_has_accuracy():
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    probs = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]] * 0.8 + 0.05
    m = classification_metrics(labels, probs, ["a", "b", "c"], head="softmax")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert "cancer_auc" not in m
