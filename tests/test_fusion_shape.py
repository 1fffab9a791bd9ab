"""The shape fusion rule: a cell's scores plus its size against its image's median object and its
border contact, fitted on validation candidates only."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.geometry import cell_geometry
from fusion.rules import FusionRule, fit_image_rule, fit_logistic_rule, fuse_scores
from tests.test_fusion_fit import FakePipeline, _dataset

TWO = ["SCC", "AC"]


def test_cell_geometry_measures_size_against_the_image_median_and_the_border():
    boxes = np.array([[10, 10, 30, 30], [40, 40, 60, 60], [0, 50, 20, 70], [70, 70, 100, 80], [50, 5, 55, 10]], float)
    area = np.array([400.0, 400.0, 400.0, 0.0, 25.0])  # 0 = unknown: the box's area (300) is used
    g = cell_geometry(boxes, area, width=100, height=90)
    np.testing.assert_allclose(g[:, 0], np.log(np.array([400, 400, 400, 300, 25]) / 400.0))
    assert g[:, 1].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]  # left edge; right edge (x1 = width)
    assert cell_geometry(np.zeros((0, 4)), np.zeros(0), 10, 10).shape == (0, 2)
    with pytest.raises(ValueError, match="object areas"):
        cell_geometry(boxes, area[:2], 100, 90)


def _image(rng, n_cells: int = 12, n_slivers: int = 6, n_cut: int = 4, size: int = 200):
    """Cells and look-alikes the networks score the same: slivers (a tenth of a cell's area) and cells
    cut by the border are the negatives; only their geometry tells them apart."""
    n = n_cells + n_slivers + n_cut
    cls = np.column_stack([rng.uniform(0.6, 0.95, n), rng.uniform(0.0, 0.3, n)])
    seg = rng.uniform(0.6, 0.95, n)
    xy = rng.uniform(20, size - 40, (n, 2))
    side = np.concatenate([np.full(n_cells, 20.0), np.full(n_slivers, 6.0), np.full(n_cut, 20.0)])
    boxes = np.column_stack([xy, xy + side[:, None]])
    boxes[n_cells + n_slivers:, 0] = 0.0  # cut by the left border
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    targets = np.zeros((n, 2))
    targets[:n_cells, 0] = 1
    return seg, cls, cell_geometry(boxes, area, size, size), targets


def test_shape_rule_ranks_slivers_and_cut_cells_below_whole_cells():
    rng = np.random.default_rng(0)
    rule = fit_image_rule("shape", [_image(rng) for _ in range(15)], TWO)
    assert rule.name == "shape" and rule.logistic["SCC"]["fitted"] and len(rule.logistic["SCC"]["coef"]) == 5
    seg, cls, geometry, targets = _image(np.random.default_rng(1))
    fused = fuse_scores(seg, cls, rule, TWO, geometry)
    positives, negatives = fused[targets[:, 0] == 1, 0], fused[targets[:, 0] == 0, 0]
    assert positives.min() > negatives.max()
    # Without the geometry the logistic rule cannot separate them: same scores on both sides.
    plain = fuse_scores(seg, cls, fit_logistic_rule(seg, cls, targets, TWO), TWO)
    assert plain[targets[:, 0] == 1, 0].min() < plain[targets[:, 0] == 0, 0].max()
    # It round-trips through fusion.json's block, and refuses to run without geometry.
    again = FusionRule.from_config(rule.to_dict() | {"logistic": rule.logistic}, TWO)
    np.testing.assert_allclose(fuse_scores(seg, cls, again, TWO, geometry), fused)
    with pytest.raises(ValueError, match="geometry"):
        fuse_scores(seg, cls, rule, TWO)
    with pytest.raises(ValueError, match="need 5 coefficients"):
        FusionRule.from_config({"rule": "shape", "logistic": {c: {"coef": [1, 1, 0], "intercept": 0} for c in TWO}}, TWO)


def test_fit_fusion_cross_fits_the_shape_rule_on_validation_rows_only(tmp_path):
    from experiments.fuse_fit import fit_fusion

    ds = _dataset(tmp_path, n=12)
    fake = FakePipeline(ds)
    report = fit_fusion(fake, ds, split="val", folds=3, shrinks=(1.0,), progress=False)
    val = [r for r in ds.records if r.split == "val"]
    n_val_rows = sum(r.n_boxes + 4 for r in val)  # each image: its cells + 4 debris candidates
    assert {p["n"] for p in report["shape_fit"]["logistic"].values()} == {n_val_rows}
    assert {p["n"] for p in report["specimen_shape_fit"]["logistic"].values()} == {n_val_rows}
    assert {p["n"] for p in report["specimen_shape_rank_fit"]["logistic"].values()} == {n_val_rows}
    for name in ("shape", "specimen_shape", "specimen_shape_rank"):
        rows = [r for r in report["results"] if r["rule"] == name]
        assert len(rows) == 1 and "cross-fitted" in rows[0]["description"] and rows[0]["accuracy"] is not None


def test_specimen_shape_rule_reads_both_the_image_evidence_and_the_geometry():
    rng = np.random.default_rng(0)
    rule = fit_image_rule("specimen_shape", [_image(rng) for _ in range(15)], TWO, k=3)
    assert len(rule.logistic["SCC"]["coef"]) == 7 and rule.to_dict()["specimen_k"] == 3
    seg, cls, geometry, targets = _image(np.random.default_rng(1))
    fused = fuse_scores(seg, cls, rule, TWO, geometry)
    assert fused[targets[:, 0] == 1, 0].min() > fused[targets[:, 0] == 0, 0].max()
    with pytest.raises(ValueError, match="geometry"):
        fuse_scores(seg, cls, rule, TWO)
