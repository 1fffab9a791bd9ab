"""Each class's own box factor: shrink_boxes per box, the config and fusion.json setting, and
``fuse fit`` choosing it on val where a class's annotators box with a margin."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cytocore.errors import CytoFuseError
from fusion.geometry import shrink_boxes
from fusion.pipeline import (Candidates, DetectSettings, apply_fusion_file, detections_from_candidates,
                             load_fusion_config)
from fusion.rules import FusionRule
from tests.test_soft_nms import NAMES, TwoClassPipeline, _dataset


def test_shrink_boxes_takes_one_factor_per_box():
    boxes = np.array([[0, 0, 10, 20], [10, 10, 20, 20]], float)
    out = shrink_boxes(boxes, np.array([0.5, 1.2]))
    assert out.tolist() == [[2.5, 5.0, 7.5, 15.0], [9.0, 9.0, 21.0, 21.0]]
    assert shrink_boxes(boxes, 0.5).tolist()[0] == [2.5, 5.0, 7.5, 15.0]
    with pytest.raises(ValueError, match="3 box_shrink factors for 2 boxes"):
        shrink_boxes(boxes, np.ones(3))
    with pytest.raises(ValueError, match=r"\(0, 2\]"):
        shrink_boxes(boxes, np.array([1.0, 2.5]))


def test_detections_take_the_factor_of_their_reported_class():
    cfg = load_fusion_config({"score_floor": 0.0, "box_shrink": 0.9, "box_shrink_by_class": {"A": 1.2}})
    settings = DetectSettings.from_config(cfg, NAMES)
    assert settings.class_shrink == {"A": 1.2}
    cand = Candidates(np.zeros((0, 0), np.float32), np.array([[10, 10, 30, 30], [60, 60, 80, 80]], float),
                      np.ones(2), np.full(2, 400.0), np.array([[0.9, 0.1], [0.1, 0.9]]))
    det = detections_from_candidates("a", cand, 100, 100, NAMES, FusionRule.from_config(cfg["fusion"], NAMES), settings)
    assert det.labels.tolist() == ["A", "B"]
    assert det.boxes.tolist() == [[8.0, 8.0, 32.0, 32.0], [61.0, 61.0, 79.0, 79.0]]  # A grown 1.2, B shrunk 0.9


@pytest.mark.parametrize("block, words", [
    ({"C": 1.1}, "unknown class 'C'"), ({"A": 0}, "box_shrink_by_class.A"), ({"A": "wide"}, "box_shrink_by_class.A"),
    ([1.1], "expected {class: factor}"),
])
def test_a_bad_class_factor_is_one_clear_line(block, words):
    with pytest.raises(CytoFuseError, match=words.replace("{", r"\{")) as err:
        DetectSettings.from_config(load_fusion_config({"box_shrink_by_class": block}), NAMES)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [0, 2.5, "wide"])
def test_a_bad_box_shrink_is_one_clear_line(value):
    with pytest.raises(CytoFuseError, match=r"config box_shrink: must be in \(0, 2\]"):
        DetectSettings.from_config(load_fusion_config({"box_shrink": value}), NAMES)


def test_fusion_json_sets_the_class_factors(tmp_path):
    cfg = load_fusion_config({"box_shrink_by_class": {"B": 0.8}})
    path = tmp_path / "fusion.json"
    path.write_text(json.dumps({"fusion": {"rule": "geometric"}, "box_shrink": 1.0, "box_shrink_by_class": {"A": 1.1}}))
    assert apply_fusion_file(cfg, path)["box_shrink_by_class"] == {"A": 1.1}  # fitted: the config's own replaced
    path.write_text(json.dumps({"fusion": {"rule": "geometric"}, "box_shrink": 1.0}))  # an older fit: one factor
    assert apply_fusion_file(cfg, path)["box_shrink_by_class"] == {}


class MarginPipeline(TwoClassPipeline):
    """Cells found exactly, but class A's annotators drew each box 1.5 times the cell's width and height
    (IoU 0.44: no AP50 hit at the segmented extent)."""

    def candidates(self, image: np.ndarray) -> Candidates:
        rec = self._records[int(image[0, 0, 0])]
        n = rec.n_boxes
        labels = rec.labels.reshape(n, 2).astype(float)
        cells = rec.boxes.astype(float).copy()
        a = labels[:, 0] > 0
        cells[a] = shrink_boxes(cells[a], 1 / 1.5)
        probs = labels * self._rng.uniform(0.5, 0.95, (n, 1)) + (1 - labels) * 0.05
        return Candidates(np.zeros((0, 0), np.float32), cells, np.ones(n), np.full(n, 100.0), probs)


def test_fuse_fit_grows_the_boxes_of_a_class_boxed_with_a_margin(tmp_path):
    from experiments.fuse_fit import fit_fusion, format_report

    ds = _dataset(tmp_path)
    report = fit_fusion(MarginPipeline(ds), ds, split="val", folds=2, shrinks=(0.9, 1.0), progress=False, metric="ap50",
                        soft_sigmas=(), class_scales=(0.9, 1.05, 1.1, 1.2))
    assert report["box_shrink"] == 1.0 and report["shrink_results"][1]["ap50_per_class"]["A"] < 0.01
    assert set(report["box_shrink_by_class"]) == {"A"} and 1.1 <= report["box_shrink_by_class"]["A"] <= 1.2  # AP50 A: 0 -> 1
    assert report["validation_ap50"] == pytest.approx(1.0)  # B, found exactly, keeps the global factor
    assert {r["class"] for r in report["class_shrink_results"]} == {"A", "B"}
    assert "A 1.1" in format_report(report)
    plain = fit_fusion(MarginPipeline(ds), ds, split="val", folds=2, shrinks=(1.0,), progress=False, metric="ap50",
                       soft_sigmas=(), class_scales=())
    assert plain["box_shrink_by_class"] == {} and plain["validation_ap50"] < 0.6


def test_a_class_factor_must_gain_enough_to_be_kept():
    """Seven tries a class find small gains by chance: below the margin a class keeps the global factor."""
    from experiments.fuse_fit import fit_class_shrinks

    gains = {("A", 1.1): 0.003, ("B", 1.1): 0.006, ("B", 1.2): 0.004}

    def measured(trial) -> dict:
        score = 0.8 + sum(gains.get((c, f), 0.0) for c, f in trial.class_shrink.items())
        return {"selection_score": score, "accuracy": score, "ap50": score}

    start = DetectSettings.from_config(load_fusion_config({}), NAMES)
    settings, tried, final = fit_class_shrinks(start, measured(start), NAMES, (1.1, 1.2), measured)
    assert settings.class_shrink == {"B": 1.1} and final["selection_score"] == pytest.approx(0.806)
    assert [(r["class"], r["factor"]) for r in tried] == [("A", 1.1), ("A", 1.2), ("B", 1.1), ("B", 1.2)]
    assert fit_class_shrinks(start, measured(start), NAMES, (1.1,), measured, min_gain=0.001)[0].class_shrink == {"A": 1.1, "B": 1.1}
