"""Image-level triage metrics against hand-worked cases."""
from __future__ import annotations

import pytest

from experiments.triage import sensitivity_at_specificity, triage_metrics


def test_perfect_separation():
    m = triage_metrics({"a": True, "b": True, "c": False}, {"a": 0.9, "b": 0.8, "c": 0.1})
    assert m["roc_auc"] == 1.0
    assert m["sensitivity_at_95_specificity"] == 1.0
    assert (m["n_cancer"], m["n_healthy"]) == (2, 1)


def test_missing_score_counts_as_zero_and_ties_half():
    m = triage_metrics({"a": True, "b": False}, {"b": 0.0})
    assert m["roc_auc"] == pytest.approx(0.5)


def test_sensitivity_respects_specificity():
    # 20 healthy images, one of which scores above every cancer image but one.
    labels = [False] * 20 + [True] * 4
    scores = [0.1] * 19 + [0.85] + [0.9, 0.8, 0.7, 0.05]
    # At 95% specificity one false alarm (1/20) is allowed: threshold 0.7 catches 3 of 4.
    assert sensitivity_at_specificity(labels, scores, 0.95) == pytest.approx(0.75)
    # At 100% specificity only the 0.9 image is above the worst healthy score.
    assert sensitivity_at_specificity(labels, scores, 1.0) == pytest.approx(0.25)


def test_one_class_only_gives_none():
    m = triage_metrics({"a": False, "b": False}, {"a": 0.3})
    assert m["roc_auc"] is None and m["sensitivity_at_95_specificity"] is None
