"""Fused detections → the output files → the official evaluator, without any network.

Candidates equal to the ground truth must score FROC 1.0 for every class after going through
fusion, the writers and ``cytofuse evaluate``'s reader; and the detection table must keep what the
pipeline promises (floor, shrink, chosen label, malignancy).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytocore.detections import Candidates
from cytocore.records import Dataset, ImageRecord
from cytocore.runfolder import ImageSource
from cytocore.writers import read_predictions_csv
from fusion.outputs import DetectionRunWriter
from fusion.pipeline import DetectSettings, ImageResult, choose_labels, detections_from_candidates, load_fusion_config
from fusion.rules import FusionRule, resolve_hierarchy

NAMES = ["SCC", "AC", "SCLC", "NSCLC"]


def _dataset(tmp_path) -> Dataset:
    records = [
        ImageRecord("a", tmp_path / "a.png", 120, 80,
                    boxes=[[10, 10, 30, 34], [50, 20, 70, 40], [80, 50, 110, 75]],
                    labels=[[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0]]),
        ImageRecord("b", tmp_path / "b.png", 64, 96, boxes=[[5, 40, 25, 70]], labels=[[1, 0, 0, 1]]),
        ImageRecord("healthy", tmp_path / "healthy.png", 50, 50),
    ]
    return Dataset(records, list(NAMES), root=tmp_path, format="challenge")


def _perfect_candidates(record: ImageRecord) -> Candidates:
    n = record.n_boxes
    labels = record.labels.reshape(n, len(NAMES)).astype(float)
    return Candidates(
        probability=np.zeros((record.height, record.width), np.float32),
        boxes=record.boxes.astype(float),
        seg_scores=np.full(n, 0.9),
        object_area=np.full(n, 100.0),
        cls_probs=0.05 + 0.9 * labels,
    )


def test_ground_truth_candidates_score_froc_one(tmp_path):
    from experiments.evaluate import evaluate

    ds = _dataset(tmp_path / "data")
    cfg = load_fusion_config({"box_shrink": 0.9, "fusion": {"rule": "geometric", "weight": 0.5}})
    rule = FusionRule.from_config(cfg["fusion"], NAMES)
    settings = DetectSettings.from_config(cfg, NAMES)
    out = tmp_path / "out"
    writer = DetectionRunWriter(out, NAMES, cfg, settings.floors)
    records = {}
    for rec in ds:
        cand = _perfect_candidates(rec)
        det = detections_from_candidates(rec.image_id, cand, rec.width, rec.height, NAMES, rule, settings)
        assert len(det) == rec.n_boxes
        result = ImageResult(rec.image_id, rec.width, rec.height, cand.probability, det, NAMES, {"segment": 0.1})
        image = np.full((rec.height, rec.width, 3), 200, np.uint8)
        records[rec.image_id] = writer.write_image(ImageSource(rec.image_id, Path(f"{rec.image_id}.png")), image, result)
    table = writer.write_combined(records)
    assert len(table) == 4

    preds = read_predictions_csv(out / "predictions.csv", NAMES)
    metrics = evaluate(ds, preds, saliency_dir=None)
    assert metrics["froc"] == {c: pytest.approx(1.0) for c in NAMES}
    assert metrics["accuracy"] == pytest.approx(1.0)

    # the other outputs agree with the table
    det = pd.read_csv(out / "detections.csv")
    assert {"x0", "y0", "x1", "y1", "seg_score", "area", "label", "object_area"} <= set(det.columns)
    a0 = det[det.image_id == "a"].sort_values("x0").iloc[0]
    assert (a0.x0, a0.y0, a0.x1, a0.y1) == pytest.approx((11, 11.2, 29, 32.8))  # 0.9 shrink about the centre
    assert a0.label == "SCC"  # NSCLC ties with SCC by the hierarchy; the sub-type is reported
    images = pd.read_csv(out / "images.csv")
    assert images.image_id.tolist() == ["a", "b", "healthy"]
    assert images.n_detections.tolist() == [3, 1, 0]
    assert images.malignancy.tolist() == pytest.approx([np.sqrt(0.9 * 0.95)] * 2 + [0.0])
    geo = json.loads((out / "detections.geojson").read_text())
    assert len(geo["features"]) == 4
    assert json.loads((out / "geojson" / "healthy.geojson").read_text())["features"] == []
    coco = json.loads((out / "detections.coco.json").read_text())
    assert [i["image_id"] for i in coco["images"]] == ["a", "b", "healthy"]
    for rec in ds:
        assert (out / "saliency" / f"{rec.image_id}.png").is_file()
        assert (out / "overlays" / f"{rec.image_id}.png").is_file()


def test_floor_and_cap_reach_the_table():
    n = 20
    x = np.arange(n) * 30.0
    cand = Candidates(np.zeros((40, 700), np.float32), np.stack([x, x * 0, x + 20, x * 0 + 20], 1),
                      np.linspace(0.05, 0.95, n), np.full(n, 50.0), np.full((n, 2), 0.5))
    names = ["p", "q"]
    rule = FusionRule("product")
    settings = DetectSettings(floors=np.array([0.2, 0.2]), max_detections=5)
    det = detections_from_candidates("i", cand, 700, 40, names, rule, settings).to_frame()
    assert len(det) == 5
    assert det.p_p.min() >= 0.2 and det.p_p.is_monotonic_decreasing
    assert det.seg_score.tolist() == pytest.approx(np.linspace(0.05, 0.95, n)[::-1][:5].tolist())


def test_choose_labels_prefers_the_subtype_on_a_tie():
    h = resolve_hierarchy("auto", NAMES)
    scores = np.array([[0.8, 0.1, 0.0, 0.8], [0.1, 0.2, 0.0, 0.9], [0.1, 0.1, 0.7, 0.1]])
    assert choose_labels(scores, NAMES, h).tolist() == ["SCC", "NSCLC", "SCLC"]


def test_config_layers_and_fusion_file(tmp_path):
    fusion_json = tmp_path / "fusion.json"
    params = {c: {"coef": [1.0, 1.0, 0.0], "intercept": 0.0} for c in NAMES}
    fusion_json.write_text(json.dumps({"fusion": {"rule": "logistic", "weight": 0.5, "hierarchy": "auto",
                                                  "logistic": params}, "box_shrink": 0.85}))
    cfg = load_fusion_config({"score_floor": {"SCC": 0.1}}, ["nms.iou=0.3"], fusion_json)
    assert cfg["fusion"]["rule"] == "logistic" and cfg["box_shrink"] == 0.85
    assert cfg["nms"]["iou"] == 0.3 and cfg["nms"]["containment"] == 0.8
    assert FusionRule.from_config(cfg["fusion"], NAMES).name == "logistic"
    assert cfg["fusion_source"] == str(fusion_json)
    # an explicit --set wins over the fitted file (how the file's shrink is measured against none)
    assert load_fusion_config(None, ["box_shrink=1.0"], fusion_json)["box_shrink"] == 1.0
    from cytocore.errors import CytoFuseError

    with pytest.raises(CytoFuseError, match="unknown option"):
        load_fusion_config({"nms": {"iuo": 0.3}})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CytoFuseError, match="fuse fit"):
        load_fusion_config(None, (), tmp_path / "bad.json")
