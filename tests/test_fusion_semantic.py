"""The semantic_shape fusion rule: the shape rule plus a K+1-class segmentation U-Net's own class
probability, fitted on validation candidates only and offered only when the U-Net gives one."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.rules import FusionRule, fit_image_rule, fuse_scores, label_marginals
from tests.test_fusion_fit import NAMES, FakePipeline, _dataset
from tests.test_fusion_shape import TWO, _image


def _with_unet(rng, image):
    """The classifier cannot tell SCC cells from the look-alikes (same class scores); the U-Net,
    which sees their surroundings, gives the cells a higher SCC probability."""
    seg, cls, geometry, targets = image
    cls = cls.copy()
    cls[:, 0] = rng.uniform(0.6, 0.95, len(seg))
    positive = targets[:, 0] == 1
    unet = np.column_stack([np.where(positive, rng.uniform(0.55, 0.9, len(seg)), rng.uniform(0.05, 0.45, len(seg))),
                            rng.uniform(0.0, 0.2, len(seg))])
    geometry = np.zeros_like(geometry)  # nothing in the geometry either
    return seg, cls, geometry, targets, unet


def test_semantic_shape_rule_uses_the_unet_class_probability():
    rng = np.random.default_rng(0)
    train = [_with_unet(rng, _image(rng)) for _ in range(15)]
    rule = fit_image_rule("semantic_shape", train, TWO)
    assert rule.logistic["SCC"]["fitted"] and len(rule.logistic["SCC"]["coef"]) == 6
    assert rule.logistic["SCC"]["coef"][-1] > 0  # more U-Net evidence, higher score
    seg, cls, geometry, targets, unet = _with_unet(np.random.default_rng(1), _image(np.random.default_rng(1)))
    fused = fuse_scores(seg, cls, rule, TWO, geometry, unet)
    assert fused[targets[:, 0] == 1, 0].min() > fused[targets[:, 0] == 0, 0].max()
    # the shape rule on the same candidates cannot separate them
    shape = fit_image_rule("shape", [im[:4] for im in train], TWO)
    plain = fuse_scores(seg, cls, shape, TWO, geometry)
    assert plain[targets[:, 0] == 1, 0].min() < plain[targets[:, 0] == 0, 0].max()
    again = FusionRule.from_config(rule.to_dict(), TWO)
    np.testing.assert_allclose(fuse_scores(seg, cls, again, TWO, geometry, unet), fused)
    with pytest.raises(ValueError, match="K\\+1-class segmentation U-Net"):
        fuse_scores(seg, cls, rule, TWO, geometry)
    with pytest.raises(ValueError, match="3 class probabilities but the classifier 2"):
        fuse_scores(seg, cls, rule, TWO, geometry, np.zeros((len(seg), 3)))


def test_label_marginals_give_parents_their_children_s_mass():
    probs = np.array([[0.5, 0.2, 0.1, 0.1], [0.0, 0.0, 0.6, 0.3]])
    out = label_marginals(probs, NAMES, {"NSCLC": ["SCC", "AC"]})
    np.testing.assert_allclose(out[:, 3], [0.8, 0.3])
    np.testing.assert_allclose(out[:, :3], probs[:, :3])


class SemanticPipeline(FakePipeline):
    """The fake candidates plus U-Net class probabilities that agree with the truth."""

    def candidates(self, image):
        cand = super().candidates(image)
        n = len(cand.boxes)
        cand.seg_class_probs = np.clip(cand.cls_probs + self._rng.normal(0, 0.1, (n, len(NAMES))), 0, 1)
        return cand


def test_fit_fusion_offers_the_semantic_rule_only_with_unet_class_probabilities(tmp_path):
    from experiments.fuse_fit import fit_fusion

    ds = _dataset(tmp_path, n=12)
    plain = fit_fusion(FakePipeline(ds), ds, split="val", folds=3, shrinks=(1.0,), progress=False)
    assert "semantic_shape_fit" not in plain and not any(r["rule"] == "semantic_shape" for r in plain["results"])
    report = fit_fusion(SemanticPipeline(ds), ds, split="val", folds=3, shrinks=(1.0,), progress=False)
    n_rows = sum(r.n_boxes + 4 for r in ds.records if r.split == "val")
    assert {p["n"] for p in report["semantic_shape_fit"]["logistic"].values()} == {n_rows}
    rows = [r for r in report["results"] if r["rule"] == "semantic_shape"]
    assert len(rows) == 1 and "cross-fitted" in rows[0]["description"] and rows[0]["accuracy"] is not None


def test_semantic_shape_rule_scores_an_image_without_objects():
    coef = {c: {"coef": [0.5, 0.5, 0.0, 0.0, 0.0, 1.0], "intercept": 0.0} for c in TWO}
    rule = FusionRule.from_config({"rule": "semantic_shape", "logistic": coef}, TWO)
    assert fuse_scores(np.zeros(0), np.zeros((0, 2)), rule, TWO, np.zeros((0, 2)), np.zeros((0, 2))).shape == (0, 2)
