"""QuPath GeoJSON keys, the COCO json through pycocotools, and overlay rendering."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytocore.writers import detections_frame
from fusion.writers import class_colours, coco_dict, render_overlay, write_coco, write_geojson

NAMES = ["SCC", "AC", "SCLC", "NSCLC"]


def _detections() -> tuple[pd.DataFrame, pd.DataFrame]:
    boxes = np.array([[10, 12, 40, 50], [60, 20, 90, 44.5], [5, 5, 25, 30]], float)
    probs = np.array([[0.9, 0.1, 0.05, 0.9], [0.2, 0.7, 0.1, 0.7], [0.05, 0.1, 0.8, 0.1]])
    ids = ["img_a", "img_a", "img_b"]
    sizes = {"img_a": (128, 96), "img_b": (64, 64)}
    det = detections_frame(ids, boxes, probs, NAMES, sizes, seg_scores=np.array([0.95, np.nan, 0.6]))
    images = pd.DataFrame({"image_id": ["img_a", "img_b", "img_c"], "width": [128, 64, 50], "height": [96, 64, 40]})
    return det, images


def test_geojson_has_the_keys_qupath_reads(tmp_path):
    det, _ = _detections()
    path = tmp_path / "d.geojson"
    write_geojson(path, det, NAMES)
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: a missing seg score is null
    data = json.loads(text)
    assert data["type"] == "FeatureCollection"
    assert len(data["features"]) == 3
    for feat, (_, row) in zip(data["features"], det.iterrows()):
        assert feat["type"] == "Feature"
        geom = feat["geometry"]
        assert geom["type"] == "Polygon"
        ring = geom["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed ring
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert (min(xs), min(ys), max(xs), max(ys)) == (row.x0, row.y0, row.x1, row.y1)  # level-0 pixels
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == row.label
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
        assert set(f"p_{c}" for c in NAMES) <= set(props["measurements"])
        assert {"seg_score", "area"} <= set(props["measurements"])
        assert props["image_id"] == row.image_id
    assert data["features"][1]["properties"]["measurements"]["seg_score"] is None
    # deterministic ids: writing again gives the same features
    write_geojson(tmp_path / "again.geojson", det, NAMES)
    assert json.loads((tmp_path / "again.geojson").read_text()) == data


def test_coco_json_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    det, images = _detections()
    path = tmp_path / "d.coco.json"
    write_coco(path, images, det, NAMES, floors=[0.1] * 4)
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == NAMES
    assert len(coco.getImgIds()) == 3  # the image without detections is listed too
    # one annotation per (detection, class) at or above the floor
    assert len(coco.getAnnIds()) == int((det[[f"p_{c}" for c in NAMES]].to_numpy() >= 0.1).sum())
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1], catIds=[1]))[0]
    assert ann["bbox"] == [10.0, 12.0, 30.0, 38.0] and ann["score"] == pytest.approx(0.9)
    results = coco.loadRes(json.loads(path.read_text())["annotations"])  # valid results list
    assert len(results.getAnnIds()) == len(coco.getAnnIds())


def test_coco_rejects_detections_of_unknown_images():
    det, images = _detections()
    with pytest.raises(ValueError, match="img_b"):
        coco_dict(images[images.image_id != "img_b"], det, NAMES)


def test_overlay_draws_boxes_and_heat_only_where_asked():
    det, _ = _detections()
    a = det[det.image_id == "img_a"]
    image = np.full((96, 128, 3), 240, np.uint8)
    prob = np.zeros((96, 128), np.float32)
    prob[60:90, 100:120] = 1.0
    out = render_overlay(image, prob, a, NAMES, min_score=0.3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[0:3, 0:3] == 240).all()  # background untouched by heat and boxes
    assert not (out[70, 110] == 240).all()  # heat map tints the probable region
    scc = np.array(class_colours(NAMES)["SCC"])
    assert (np.abs(out[30, 10].astype(int) - scc) <= 2).all()  # left edge of the SCC box in its colour
    hidden = render_overlay(image, None, a, NAMES, min_score=0.95)
    assert (hidden == 240).all()  # nothing scores 0.95: nothing drawn, no heat map
    small = render_overlay(np.zeros((400, 1000, 3), np.uint8), None, a, NAMES, max_side=500)
    assert small.shape == (200, 500, 3)


def test_colours_are_distinct_for_unknown_classes():
    colours = class_colours(["SCC", "epithelial", "lymphocyte", "macrophage"])
    assert colours["SCC"] == (230, 25, 75)
    assert len(set(colours.values())) == 4


def test_overlay_accepts_uint8_maps_as_stored_for_huge_images():
    det, _ = _detections()
    image = np.full((96, 128, 3), 240, np.uint8)
    prob = np.zeros((96, 128), np.float32)
    prob[20:60, 30:90] = 0.8
    as_float = render_overlay(image, prob, det.iloc[:0], NAMES)
    as_uint8 = render_overlay(image, np.round(prob * 255).astype(np.uint8), det.iloc[:0], NAMES)
    assert np.abs(as_float.astype(int) - as_uint8.astype(int)).max() <= 2
    small_f = render_overlay(image, prob, det.iloc[:0], NAMES, max_side=64)
    small_u = render_overlay(image, np.round(prob * 255).astype(np.uint8), det.iloc[:0], NAMES, max_side=64)
    assert small_f.shape == (48, 64, 3) and np.abs(small_f.astype(int) - small_u.astype(int)).max() <= 3
