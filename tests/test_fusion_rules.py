"""Fusion rule arithmetic (hand-computed), the NSCLC hierarchy, and the numpy logistic fit."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.rules import (
    FusionRule,
    apply_hierarchy,
    fit_logistic,
    fit_logistic_rule,
    fuse_scores,
    logit,
    resolve_hierarchy,
    sigmoid,
)

NAMES = ["A", "B"]
SEG = np.array([0.64, 0.25])
CLS = np.array([[0.25, 0.75], [1.0, 0.0]])


def fuse(name: str, weight: float = 0.5, **kw) -> np.ndarray:
    return fuse_scores(SEG, CLS, FusionRule(name=name, weight=weight, **kw), NAMES)


def test_geometric_mean_by_hand():
    # sqrt(0.64*0.25)=0.4, sqrt(0.64*0.75)=0.69282; sqrt(0.25*1)=0.5, 0
    np.testing.assert_allclose(fuse("geometric"), [[0.4, np.sqrt(0.48)], [0.5, 0.0]])
    # w = 0.25: seg^0.25 * cls^0.75
    expected = [[0.64**0.25 * 0.25**0.75, 0.64**0.25 * 0.75**0.75], [0.25**0.25, 0.0]]
    np.testing.assert_allclose(fuse("geometric", 0.25), expected)


def test_product_arithmetic_classifier_by_hand():
    np.testing.assert_allclose(fuse("product"), [[0.16, 0.48], [0.25, 0.0]])
    # 0.3*seg + 0.7*cls
    np.testing.assert_allclose(fuse("arithmetic", 0.3), [[0.192 + 0.175, 0.192 + 0.525], [0.075 + 0.7, 0.075]])
    np.testing.assert_allclose(fuse("classifier"), CLS)


def test_seg_share_splits_the_seg_score_by_class_share():
    # shares (0.25, 0.75) of 0.64; (1, 0) of 0.25
    np.testing.assert_allclose(fuse("seg_share"), [[0.16, 0.48], [0.25, 0.0]])
    out = fuse_scores([0.8], [[0.2, 0.6]], FusionRule("seg_share"), NAMES)
    np.testing.assert_allclose(out, [[0.2, 0.6]])
    # no class evidence at all: an even share, not a division by zero
    np.testing.assert_allclose(fuse_scores([0.8], [[0.0, 0.0]], FusionRule("seg_share"), NAMES), [[0.4, 0.4]])


def test_logistic_scores_by_hand():
    params = {"A": {"coef": [1.0, 2.0, 0.0], "intercept": -0.5}, "B": {"coef": [0.0, 0.0, 1.0], "intercept": 0.0}}
    out = fuse("logistic", logistic=params)
    row0_a = sigmoid(logit(0.64) + 2 * logit(0.25) - 0.5)
    row0_b = sigmoid(logit(0.75))  # max cls of row 0
    np.testing.assert_allclose(out[0], [row0_a, row0_b])
    assert out[1, 1] == pytest.approx(1 - 1e-6, abs=1e-9)  # max cls 1.0 is clipped, not infinite


def test_empty_input_gives_empty_scores():
    assert fuse_scores(np.zeros(0), np.zeros((0, 2)), FusionRule(), NAMES).shape == (0, 2)


def test_hierarchy_lifts_nsclc_to_its_subtypes():
    names = ["SCC", "AC", "SCLC", "NSCLC"]
    h = resolve_hierarchy("auto", names)
    assert h == {"NSCLC": ["SCC", "AC"]}
    scores = np.array([[0.9, 0.2, 0.1, 0.3], [0.1, 0.6, 0.8, 0.7], [0.1, 0.1, 0.9, 0.05]])
    out = apply_hierarchy(scores, names, h)
    np.testing.assert_allclose(out[:, 3], [0.9, 0.7, 0.1])  # max(own, SCC, AC); SCLC does not count
    np.testing.assert_allclose(out[:, :3], scores[:, :3])
    # through a rule as well
    fused = fuse_scores([1.0], [[0.8, 0.1, 0.0, 0.2]], FusionRule("classifier", hierarchy=h), names)
    np.testing.assert_allclose(fused, [[0.8, 0.1, 0.0, 0.8]])


def test_hierarchy_defaults_only_when_names_exist():
    assert resolve_hierarchy("auto", ["epithelial", "lymphocyte"]) == {}
    assert resolve_hierarchy("auto", ["SCC", "NSCLC"]) == {"NSCLC": ["SCC"]}
    assert resolve_hierarchy("none", ["SCC", "AC", "NSCLC"]) == {}
    assert resolve_hierarchy({"a": ["b"]}, ["a", "b"]) == {"a": ["b"]}
    with pytest.raises(ValueError, match="unknown class"):
        resolve_hierarchy({"NSCLC": ["SCC"]}, ["a", "b"])


def test_bad_rule_names_and_weights_are_clear():
    with pytest.raises(ValueError, match="unknown fusion rule"):
        FusionRule("mean")
    with pytest.raises(ValueError, match="weight"):
        FusionRule("geometric", weight=1.5)
    with pytest.raises(ValueError, match="fuse fit"):
        FusionRule("logistic")
    with pytest.raises(ValueError, match="no entry for class"):
        FusionRule.from_config({"rule": "logistic", "logistic": {"A": {"coef": [1, 1, 1], "intercept": 0}}}, NAMES)


def test_rule_round_trips_through_its_dict():
    params = {"A": {"coef": [1.0, 2.0, 0.5], "intercept": -0.5}, "B": {"coef": [0.3, 0.1, 1.0], "intercept": 0.2}}
    rule = FusionRule("logistic", hierarchy={"A": ["B"]}, logistic=params)
    block = rule.to_dict()
    again = FusionRule.from_config(block, NAMES)
    assert again.to_dict() == block
    np.testing.assert_allclose(fuse_scores(SEG, CLS, again, NAMES), fuse_scores(SEG, CLS, rule, NAMES))


def test_logistic_fit_recovers_a_separable_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    true = np.array([2.0, -1.0, 0.5])
    margin = x @ true + 0.3
    keep = np.abs(margin) > 0.2  # a clear gap: linearly separable
    x, y = x[keep], (margin[keep] > 0).astype(float)
    coef, intercept = fit_logistic(x, y, l2=1e-3)
    pred = (x @ coef + intercept) > 0
    assert (pred == (y > 0)).all()
    cosine = coef @ true / (np.linalg.norm(coef) * np.linalg.norm(true))
    assert cosine > 0.98
    assert np.all(np.isfinite(coef))  # the L2 penalty keeps separable data finite


def test_logistic_fit_matches_known_probabilities():
    # Non-separable data drawn from a known model: the fit recovers its coefficients.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 2))
    y = (rng.random(20000) < sigmoid(x @ np.array([1.5, -0.7]) - 0.4)).astype(float)
    coef, intercept = fit_logistic(x, y, l2=0.0 + 1e-8)
    np.testing.assert_allclose(coef, [1.5, -0.7], atol=0.08)
    assert intercept == pytest.approx(-0.4, abs=0.06)


def test_fit_logistic_rule_ranks_positives_first():
    rng = np.random.default_rng(2)
    n = 300
    seg = rng.uniform(0.05, 0.95, n)
    cls = rng.uniform(0.05, 0.95, (n, 2))
    # class A hits need both a confident object and a confident class; B never occurs
    targets = np.stack([(seg > 0.5) & (cls[:, 0] > 0.5), np.zeros(n, bool)], axis=1)
    rule = fit_logistic_rule(seg, cls, targets, NAMES, l2=1e-3)
    assert rule.logistic["A"]["fitted"] and not rule.logistic["B"]["fitted"]
    scores = fuse_scores(seg, cls, rule, NAMES)[:, 0]
    pos, neg = scores[targets[:, 0]], scores[~targets[:, 0]]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.97
    assert np.isfinite(fuse_scores(seg, cls, rule, NAMES)).all()


def test_fit_rejects_one_sided_targets():
    with pytest.raises(ValueError, match="positive and negative"):
        fit_logistic(np.zeros((5, 3)), np.ones(5))
