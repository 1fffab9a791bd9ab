"""Explainability AUC: rank formula and 8-bit histograms against a plain pairwise count with ties."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from experiments.explain_auc import (
    auc_from_histograms,
    explainability_auc,
    level_histograms,
    roc_auc,
    roc_auc_uint8,
)


def pairwise_auc(labels, scores) -> float:
    """The definition: over all (positive, negative) pairs, 1 if the positive scores higher, ½ if tied."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(8))
def test_rank_and_histogram_auc_equal_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 120))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False
    levels = int(rng.choice([2, 5, 256]))  # few levels → many ties
    scores = rng.integers(0, levels, n).astype(np.uint8)
    expected = pairwise_auc(labels.tolist(), scores.tolist())
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert roc_auc_uint8(labels.astype(np.uint8), scores) == pytest.approx(expected, abs=1e-12)


def test_known_values():
    mask = np.array([[0, 0, 1, 1]], np.uint8)
    assert roc_auc_uint8(mask, np.array([[0, 10, 200, 255]], np.uint8)) == 1.0
    assert roc_auc_uint8(mask, np.array([[255, 200, 10, 0]], np.uint8)) == 0.0
    assert roc_auc_uint8(mask, np.full((1, 4), 7, np.uint8)) == 0.5
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # sklearn's doc example


def test_mask_values_above_one_count_as_positive():
    sal = np.array([[1, 2, 3]], np.uint8)
    assert roc_auc_uint8(np.array([[0, 255, 255]], np.uint8), sal) == roc_auc_uint8(np.array([[0, 1, 1]], np.uint8), sal)


def test_single_class_is_an_error():
    with pytest.raises(ValueError):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        roc_auc_uint8(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8))


def test_histogram_auc_is_exact_for_counts_beyond_int64_products():
    pos = np.zeros(256, np.int64)
    neg = np.zeros(256, np.int64)
    pos[[10, 200]] = [3_000_000_001, 5_000_000_003]
    neg[[10, 100]] = [7_000_000_005, 11]
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    exact = Fraction(3_000_000_001 * 7_000_000_005, 2) + 5_000_000_003 * n_neg
    assert auc_from_histograms(pos, neg) == pytest.approx(float(exact / (n_pos * n_neg)), rel=1e-15)


def test_level_histograms_count_every_pixel():
    rng = np.random.default_rng(3)
    mask = rng.random((17, 23)) > 0.5
    sal = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    pos, neg = level_histograms(mask, sal)
    assert pos.sum() == mask.sum() and neg.sum() == (~mask).sum()
    assert pos[sal[0, 0]] >= int(mask[0, 0])


def _images():
    rng = np.random.default_rng(11)
    out = []
    for i, (h, w) in enumerate([(20, 30), (40, 10), (25, 25)]):
        mask = (rng.random((h, w)) < 0.2 + 0.2 * i).astype(np.uint8)
        sal = np.clip(mask * (60 * (i + 1)) + rng.integers(0, 120, (h, w)), 0, 255).astype(np.uint8)
        out.append((f"img{i}", mask, sal))
    return out


def test_per_image_mean_and_pooled_differ_and_each_matches_its_definition():
    images = _images()
    per = explainability_auc(images)
    pooled = explainability_auc(images, pooled=True)
    expected_mean = np.mean([roc_auc(m.ravel() > 0, s.ravel()) for _, m, s in images])
    all_mask = np.concatenate([m.ravel() for _, m, _ in images]) > 0
    all_sal = np.concatenate([s.ravel() for _, _, s in images])
    assert per.auc == pytest.approx(expected_mean, abs=1e-12)
    assert pooled.auc == pytest.approx(roc_auc(all_mask, all_sal), abs=1e-12)
    assert abs(per.auc - pooled.auc) > 1e-3
    assert per.n_used == pooled.n_used == 3


def test_single_valued_masks_are_skipped_per_image_but_pooled_over_all_pixels():
    images = _images()
    healthy = ("healthy", np.zeros((8, 8), np.uint8), np.full((8, 8), 250, np.uint8))
    per = explainability_auc(images + [healthy])
    assert per.single_valued == ["healthy"]
    assert per.auc == pytest.approx(explainability_auc(images).auc)
    assert per.n_used == 3
    pooled = explainability_auc(images + [healthy], pooled=True)
    assert pooled.n_used == 4
    assert pooled.auc < explainability_auc(images, pooled=True).auc  # the hot healthy image is penalised


def test_no_usable_image_gives_none():
    res = explainability_auc([("a", np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8))])
    assert res.auc is None and res.single_valued == ["a"]
    assert explainability_auc([]).auc is None
