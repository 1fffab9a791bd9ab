"""``cytofuse fuse fit``'s library: candidate labelling, rule selection by FROC, shrink choice, fusion.json.

A stand-in pipeline returns hand-made candidates (no network), so the test checks the selection
logic itself: a data set where only the classifier knows the class and only the segmenter knows
real cells from debris must pick a rule that uses both.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cytocore.records import Dataset, ImageRecord
from fusion.pipeline import Candidates, DetectSettings, load_fusion_config
from fusion.rules import FusionRule

NAMES = ["SCC", "AC", "SCLC", "NSCLC"]


class FakePipeline:
    """Candidates = every GT box (class known to the classifier) + debris boxes the classifier likes."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.class_names = list(NAMES)
        self.config = load_fusion_config({"score_floor": 0.0})
        self.rule = FusionRule.from_config(self.config["fusion"], NAMES)
        self.settings = DetectSettings.from_config(self.config, NAMES)
        self._by_size = {(r.height, r.width, int(r.path.stem.split("_")[1])): r for r in dataset}
        self._rng = np.random.default_rng(seed)
        self.calls = 0

    def candidates(self, image: np.ndarray) -> Candidates:
        self.calls += 1
        rec = self._by_size[(image.shape[0], image.shape[1], int(image[0, 0, 0]))]
        rng = self._rng
        n, k = rec.n_boxes, len(NAMES)
        labels = rec.labels.reshape(n, k).astype(float)
        # Real cells: seg fairly high, classifier right about the class.
        seg_true = rng.uniform(0.55, 0.95, n)
        cls_true = np.clip(labels * rng.uniform(0.5, 0.9, (n, k)) + (1 - labels) * rng.uniform(0.0, 0.4, (n, k)), 0, 1)
        # Debris: low seg, but the classifier is fooled into a high class score.
        m = 4
        xy = rng.uniform(0, 1, (m, 2)) * [rec.width - 12, rec.height - 12]
        debris = np.concatenate([xy, xy + 10], axis=1)
        debris[:, 1] = rec.height - 11  # bottom strip, away from the cells
        debris[:, 3] = rec.height - 1
        seg_false = rng.uniform(0.05, 0.45, m)
        cls_false = rng.uniform(0.6, 1.0, (m, k))
        boxes = np.concatenate([rec.boxes.astype(float), debris])
        return Candidates(np.zeros((0, 0), np.float32), boxes, np.concatenate([seg_true, seg_false]),
                          np.full(n + m, 50.0), np.concatenate([cls_true, cls_false]))

    def checkpoint_info(self) -> dict:
        return {"seg": {"path": "seg.ckpt", "sha256": "0" * 64}, "cls": {"path": "cls.ckpt", "sha256": "1" * 64}}

    @property
    def source(self) -> "FakePipeline":  # what a Pipeline's candidates come from: here, itself
        return self

    def identity(self) -> dict:
        return {"checkpoints": self.checkpoint_info(), "settings": {"fake": True}}


def _dataset(tmp_path, n=9) -> Dataset:
    rng = np.random.default_rng(0)
    records = []
    (tmp_path / "images").mkdir()
    for i in range(n):
        w, h = 120, 100
        path = tmp_path / "images" / f"im_{i}.png"
        Image.fromarray(np.full((h, w, 3), i, np.uint8)).save(path)  # pixel value = index, to find the record
        nb = 3
        x = np.arange(nb) * 35.0 + 5
        boxes = np.stack([x, np.full(nb, 10.0), x + 25, np.full(nb, 40.0)], axis=1)
        cls = rng.integers(0, 3, nb)
        labels = np.zeros((nb, 4), np.uint8)
        labels[np.arange(nb), cls] = 1
        labels[:, 3] = np.isin(cls, [0, 1])  # SCC/AC are NSCLC too
        records.append(ImageRecord(f"im_{i}", path, w, h, boxes=boxes, labels=labels, split="val"))
    return Dataset(records, list(NAMES), root=tmp_path, format="challenge")


def test_candidate_targets_use_the_metric_hit_test():
    from experiments.fuse_fit import candidate_targets

    rec = ImageRecord("a", "a.png", 100, 100, boxes=[[10, 10, 30, 30], [50, 50, 70, 70]], labels=[[1, 0], [0, 1]])
    cand = np.array([[12, 12, 28, 28], [0, 0, 30, 30], [55, 55, 90, 90], [80, 0, 90, 10]], float)
    t = candidate_targets(cand, rec, 2)
    # inside box 1 → class 0; big box IoP 400/900 < 0.5 → miss; half inside box 2 → IoP 225/1225 miss; far → miss
    assert t.tolist() == [[1, 0], [0, 0], [0, 0], [0, 0]]
    assert candidate_targets(cand, ImageRecord("h", "h.png", 100, 100), 2).sum() == 0
    # Judged by AP50 a hit needs IoU > 0.5: the box inside cell 1 (IoU 256/400) still is one, a sliver is not.
    sliver = np.array([[12, 12, 28, 28], [10, 10, 30, 18]], float)
    assert candidate_targets(sliver, rec, 2).tolist() == [[1, 0], [1, 0]]
    assert candidate_targets(sliver, rec, 2, metric="ap50").tolist() == [[1, 0], [0, 0]]


def test_fit_fusion_can_maximise_ap50(tmp_path):
    from experiments.fuse_fit import fit_fusion, format_report

    ds = _dataset(tmp_path)
    report = fit_fusion(FakePipeline(ds), ds, split="val", folds=3, shrinks=(0.5, 1.0), progress=False, metric="ap50")
    assert report["metric"] == "ap50" and "AP50" in report["selected_by"]
    best = max(r["ap50"] for r in report["results"])
    assert next(r for r in report["results"] if r["description"] == report["selected"])["ap50"] == best
    # Halved boxes lose every IoU > 0.5 hit, so AP50 keeps the segmented extent.
    shrunk = {r["box_shrink"]: r["ap50"] for r in report["shrink_results"]}
    assert shrunk[1.0] > shrunk[0.5] and report["box_shrink"] == 1.0
    assert report["validation_ap50"] == shrunk[1.0] and "chosen by ap50:" in format_report(report)
    with pytest.raises(ValueError, match="metric"):
        fit_fusion(FakePipeline(ds), ds, split="val", progress=False, metric="map")


def test_fit_fusion_picks_a_rule_using_both_stages(tmp_path):
    from experiments.fuse_fit import fit_fusion, format_report

    ds = _dataset(tmp_path)
    fake = FakePipeline(ds)
    report = fit_fusion(fake, ds, split="val", folds=3, l2=1e-2, shrinks=(0.8, 1.0), progress=False)
    assert fake.calls == len(ds)  # each image through the networks once
    by_name = {r["description"]: r for r in report["results"]}
    assert {"classifier", "product", "seg_share", "geometric(w=0.5)", "arithmetic(w=0.25)"} <= set(by_name)
    assert any(d.startswith("logistic") for d in by_name)
    # the classifier alone ranks fooled debris first; rules using the seg score must beat it
    assert by_name["product"]["accuracy"] > by_name["classifier"]["accuracy"]
    best = max(r["accuracy"] for r in report["results"])
    assert report["fusion"]["rule"] in {r["rule"] for r in report["results"] if r["accuracy"] == best}
    assert by_name[report["selected"]]["accuracy"] == best
    assert report["fusion"]["hierarchy"] == {"NSCLC": ["SCC", "AC"]}
    assert [s["box_shrink"] for s in report["shrink_results"]] == [0.8, 1.0]
    assert report["box_shrink"] in (0.8, 1.0)
    assert report["n_positive_candidates"]["NSCLC"] > 0
    # the file works as --fusion input
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps(report))
    cfg = load_fusion_config(None, (), path)
    assert FusionRule.from_config(cfg["fusion"], NAMES).name == report["fusion"]["rule"]
    assert cfg["box_shrink"] == report["box_shrink"]
    assert "chosen by accuracy:" in format_report(report) and report["metric"] == "accuracy"


def test_logistic_parameters_from_fit_are_usable(tmp_path):
    from experiments.fuse_fit import fit_fusion

    ds = _dataset(tmp_path)
    report = fit_fusion(FakePipeline(ds), ds, split="val", folds=2, shrinks=(1.0,), progress=False)
    logistic = next(r for r in report["results"] if r["rule"] == "logistic")
    assert logistic["accuracy"] is not None
    if report["fusion"]["rule"] == "logistic":
        rule = FusionRule.from_config(report["fusion"], NAMES)
        assert set(rule.logistic) == set(NAMES)


def test_missing_split_is_a_clear_error(tmp_path):
    from cytocore.errors import DataError
    from experiments.fuse_fit import fit_fusion

    ds = _dataset(tmp_path, n=2)
    with pytest.raises(DataError, match="no split 'validation'"):
        fit_fusion(FakePipeline(ds), ds, split="validation", progress=False)


def test_fuse_fit_command_registers_and_parses():
    import argparse

    from experiments.fuse_fit import register

    parser = argparse.ArgumentParser(prog="cytofuse")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fuse", "fit", "--seg", "s.ckpt", "--cls", "c.ckpt", "--data", "d", "--out", "f.json",
                              "--shrink", "0.8,0.9", "--folds", "4"])
    assert args.handler.__name__ == "_fit" and args.split == "val" and args.folds == 4 and args.shrink == "0.8,0.9"
    assert args.metric == "accuracy"
    assert parser.parse_args(["fuse", "fit", "--seg", "s", "--cls", "c", "--data", "d", "--out", "f",
                              "--metric", "ap50"]).metric == "ap50"
    with pytest.raises(SystemExit):
        parser.parse_args(["fuse", "fit", "--seg", "s", "--cls", "c", "--data", "d", "--out", "f", "--metric", "map"])


def test_cross_fitted_folds_share_one_scale_per_class():
    from experiments.fuse_fit import same_scale_folds
    from fusion.rules import fit_logistic_rule

    rng = np.random.default_rng(0)
    seg, cls = rng.uniform(0.1, 0.9, 40), rng.uniform(0.1, 0.9, (40, 2))
    both = (cls > 0.5).astype(np.uint8)
    only_first = both.copy()
    only_first[:, 1] = 0  # this fold saw no positive of the second class: it cannot fit it
    folds = {0: fit_logistic_rule(seg, cls, both, ["A", "B"]), 1: fit_logistic_rule(seg, cls, only_first, ["A", "B"])}
    assert folds[0].logistic["B"]["fitted"] and not folds[1].logistic["B"]["fitted"]
    same = same_scale_folds(folds)
    assert same[0].logistic["B"]["coef"] == same[1].logistic["B"]["coef"] == folds[1].logistic["B"]["coef"]
    assert same[0].logistic["A"] == folds[0].logistic["A"]  # fitted everywhere: untouched
    assert same_scale_folds({0: folds[0]}) == {0: folds[0]}
    # A class fitted on too few positives in some fold is no more on the others' scale than an unfitted one.
    weak = same_scale_folds(folds, weak={"A"})
    assert not weak[0].logistic["A"]["fitted"] and weak[0].logistic["A"]["coef"] == [0.5, 0.5, 0.0]


def test_rules_are_compared_on_the_classes_cross_fitting_can_judge():
    from experiments.fuse_fit import judged_classes, selection_score

    targets = {"a": np.array([[1, 0], [1, 0]]), "b": np.array([[1, 1], [1, 0]]), "c": np.array([[1, 0]])}
    fold = {"a": 0, "b": 1, "c": 2}
    # class 0: every fold trains on >= 2 positives; class 1 sits in one image only
    assert judged_classes(targets, fold, 3, ["X", "Y"], min_positives=2) == ["X"]
    result = {"accuracy": 0.5, "froc": {"X": 0.2, "Y": 0.8}, "ap50": 0.4, "ap50_per_class": {"X": 0.3, "Y": 0.5}}
    assert selection_score(result, "accuracy", ["X"]) == 0.2 and selection_score(result, "ap50", ["X"]) == 0.3
    assert selection_score(result, "accuracy", []) == 0.5


def test_folds_spread_each_class_s_images():
    from experiments.fuse_fit import fold_of

    def rec(i, classes):
        labels = np.zeros((1, 3), np.uint8)
        labels[0, classes] = 1
        return ImageRecord(f"i{i}", f"i{i}.png", 50, 50, boxes=[[1, 1, 9, 9]], labels=labels)

    # Two images each hold a rare class; the rest only the common one; one healthy image.
    records = [rec(0, [1]), rec(1, [1]), rec(2, [2]), rec(3, [2])] + [rec(i, [0]) for i in range(4, 9)]
    records.append(ImageRecord("h", "h.png", 50, 50))
    for seed in range(5):
        fold = fold_of(records, 3, seed=seed)
        assert fold["i0"] != fold["i1"] and fold["i2"] != fold["i3"]
        assert sorted(np.bincount(list(fold.values()), minlength=3)) == [3, 3, 4]
