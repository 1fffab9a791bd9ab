"""The specimen_shape_rank fusion rule: an object's rank for a class among its image's candidates, for
data whose images hold a typical number of cells of a kind (one white cell in a blood smear)."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.geometry import cell_geometry
from fusion.rules import FusionRule, fit_image_rule, fuse_scores, image_ranks

TWO = ["WBC", "RBC"]


def test_image_ranks_count_the_candidates_scored_higher_for_each_class():
    seg = np.array([1.0, 1.0, 0.5, 1.0])
    cls = np.array([[0.9, 0.1], [0.3, 0.2], [0.9, 0.9], [0.9, 0.05]])
    # WBC joint scores 0.9, 0.3, 0.45, 0.9: the tied pair shares rank 1; RBC 0.1, 0.2, 0.45, 0.05
    np.testing.assert_array_equal(image_ranks(seg, cls), [[1, 3], [4, 2], [3, 1], [1, 4]])
    assert image_ranks(np.zeros(0), np.zeros((0, 2))).shape == (0, 2)


def _image(rng, scale: float, n_pieces: int = 6, size: int = 300):
    """One white cell and pieces of it: the pieces score a little below the whole cell of *their* image,
    but images differ in stain and focus (``scale``), so a piece in a crisp image outscores the whole cell
    of a dull one. Geometry is alike for all; the rank within the image tells the whole cell apart
    directly."""
    n = 1 + n_pieces
    wbc = np.concatenate([[0.9], rng.uniform(0.6, 0.85, n_pieces)]) * scale
    cls = np.column_stack([wbc, np.full(n, 0.05)])
    seg = np.full(n, 0.9)
    xy = rng.uniform(20, size - 60, (n, 2))
    boxes = np.column_stack([xy, xy + 40.0])
    targets = np.zeros((n, 2))
    targets[0, 0] = 1
    return seg, cls, cell_geometry(boxes, np.full(n, 1600.0), size, size), targets


def test_rank_rule_puts_each_image_s_best_candidate_above_every_other_image_s_pieces():
    rng = np.random.default_rng(0)
    train = [_image(rng, scale) for scale in rng.uniform(0.35, 1.0, 30)]
    rule = fit_image_rule("specimen_shape_rank", train, TWO, k=1)
    assert rule.name == "specimen_shape_rank" and len(rule.logistic["WBC"]["coef"]) == 8
    assert rule.logistic["WBC"]["coef"][-1] < 0  # a lower rank (larger r) is less likely the cell
    plain = fit_image_rule("specimen_shape", train, TWO, k=1)
    test = [_image(rng, scale) for scale in (0.4, 1.0, 0.6, 0.9)]
    fused = [fuse_scores(s, c, rule, TWO, g)[:, 0] for s, c, g, _ in test]
    assert min(f[0] for f in fused) > max(f[1:].max() for f in fused)
    # the same features without the rank mix the images up
    fused = [fuse_scores(s, c, plain, TWO, g)[:, 0] for s, c, g, _ in test]
    assert min(f[0] for f in fused) < max(f[1:].max() for f in fused)
    # it round-trips through fusion.json's block and checks its coefficient count
    again = FusionRule.from_config(rule.to_dict() | {"logistic": rule.logistic}, TWO)
    s, c, g, _ = test[0]
    np.testing.assert_allclose(fuse_scores(s, c, again, TWO, g), fuse_scores(s, c, rule, TWO, g))
    with pytest.raises(ValueError, match="need 8 coefficients"):
        FusionRule.from_config({"rule": "specimen_shape_rank",
                                "logistic": {n: {"coef": [0.0] * 7, "intercept": 0.0} for n in TWO}}, TWO)
