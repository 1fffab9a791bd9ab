"""The specimen-level rule (a cell's scores + its image's evidence) and the image-level triage model:
both fitted on validation rows only."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from fusion.rules import FusionRule, fit_logistic_rule, fit_specimen_rule, fuse_scores, image_evidence
from fusion.triage import TriageModel, fit_triage
from tests.test_fusion_fit import FakePipeline, _dataset

TWO = ["SCC", "AC"]


def _specimen(rng, kind: int, n_clear: int = 4, n_ambiguous: int = 3):
    """One image of one tumour type: clear cells of ``kind`` and ambiguous ones (0.5/0.5) of the same type."""
    clear = np.full((n_clear, 2), 0.1)
    clear[:, kind] = rng.uniform(0.8, 0.95, n_clear)
    ambiguous = np.full((n_ambiguous, 2), 0.5)
    cls = np.concatenate([clear, ambiguous])
    seg = rng.uniform(0.7, 0.9, len(cls))
    targets = np.zeros_like(cls)
    targets[:, kind] = 1
    return seg, cls, targets


def test_image_evidence_is_the_mean_of_the_top_k_joint_scores():
    seg = np.array([1.0, 0.5, 1.0])
    cls = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.6]])
    np.testing.assert_allclose(image_evidence(seg, cls, k=2), [(0.9 + 0.4) / 2, (0.6 + 0.1) / 2])
    assert image_evidence(np.zeros(0), np.zeros((0, 2))).tolist() == [0.0, 0.0]


def test_specimen_rule_resolves_an_ambiguous_cell_by_its_image():
    rng = np.random.default_rng(0)
    images = [_specimen(rng, i % 2) for i in range(20)]
    rule = fit_specimen_rule(images, TWO, k=3)
    seg, cls, _ = _specimen(np.random.default_rng(1), kind=0)
    fused = fuse_scores(seg, cls, rule, TWO)
    ambiguous = fused[-3:]
    assert (ambiguous[:, 0] > ambiguous[:, 1] + 0.2).all()  # pulled towards the image's SCC
    # The cell-only logistic rule cannot tell: the ambiguous cell's own scores are the same for both.
    stacked = [np.concatenate(x) for x in zip(*images)]
    plain = fuse_scores(seg, cls, fit_logistic_rule(*stacked, TWO), TWO)
    assert np.abs(plain[-3:, 0] - plain[-3:, 1]).max() < 0.15
    # It round-trips through fusion.json's block.
    again = FusionRule.from_config(rule.to_dict() | {"logistic": rule.logistic}, TWO)
    np.testing.assert_allclose(fuse_scores(seg, cls, again, TWO), fused)


def test_fit_fusion_fits_specimen_and_triage_on_validation_rows_only(tmp_path):
    from experiments.fuse_fit import fit_fusion

    ds = _dataset(tmp_path, n=12)
    # Three training images (never to be read) and two healthy validation images.
    for i in range(3):
        ds.records[i] = replace(ds.records[i], split="train")
    for i in (3, 4):
        ds.records[i] = replace(ds.records[i], boxes=np.zeros((0, 4), np.float32), labels=np.zeros((0, 4), np.uint8))
    fake = FakePipeline(ds)
    report = fit_fusion(fake, ds, split="val", folds=3, shrinks=(1.0,), progress=False)
    val = [r for r in ds.records if r.split == "val"]
    assert fake.calls == len(val)  # the training images were never run through the networks
    n_val_rows = sum(r.n_boxes + 4 for r in val)  # each image: its cells + 4 debris candidates
    assert {p["n"] for p in report["specimen_fit"]["logistic"].values()} == {n_val_rows}
    assert any(r["rule"] == "specimen" for r in report["results"])
    tri = report["triage_fit"]
    assert tri["n_images"] == len(val) and tri["n_cancer"] == len(val) - 2
    assert report["triage"] is not None and 0.0 <= tri["roc_auc_cross_fitted"] <= 1.0


def test_triage_model_is_calibrated_and_prefers_several_confident_cells():
    rng = np.random.default_rng(0)
    healthy = [np.array([[rng.uniform(0.5, 0.9), 0.1]]) for _ in range(15)]  # one benign look-alike each
    cancer = [np.column_stack([rng.uniform(0.6, 0.9, 5), np.full(5, 0.1)]) for _ in range(15)]
    model = fit_triage(healthy + cancer, [False] * 15 + [True] * 15)
    lone, many = np.array([[0.85, 0.1]]), np.column_stack([np.full(5, 0.7), np.full(5, 0.1)])
    assert model.score(many) > 0.5 > model.score(lone)  # highest score alone would rank them the other way
    assert TriageModel.from_dict(model.to_dict()).score(many) == model.score(many)
    assert fit_triage(cancer, [True] * 15) is None
