"""QuPath-side outputs: GeoJSON with cell outlines and µm² areas, uint32 label images without input metadata."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytocore.outlines import label_outline
from fusion.label_images import read_label_image, write_label_image
from fusion.writers import write_geojson

NAMES = ["SCC", "AC"]


def _labels_and_detections():
    labels = np.zeros((64, 96), np.uint32)
    yy, xx = np.mgrid[:64, :96]
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 81] = 1
    labels[(yy - 40) ** 2 / 36 + (xx - 70) ** 2 / 144 <= 1] = 2
    rows = []
    for k in (1, 2):
        ys, xs = np.nonzero(labels == k)
        rows.append({"image_id": "im", "x0": xs.min(), "y0": ys.min(), "x1": xs.max() + 1.0, "y1": ys.max() + 1.0,
                     "p_SCC": 0.8 / k, "p_AC": 0.1 * k, "seg_score": 0.9, "area": 0.0, "object_area": float(len(xs)),
                     "label": "SCC" if k == 1 else "AC"})
    return labels, pd.DataFrame(rows)


def test_geojson_holds_outline_polygons_inside_their_boxes(tmp_path):
    labels, det = _labels_and_detections()
    outlines = [label_outline(labels, k, det.loc[k - 1, ["x0", "y0", "x1", "y1"]].to_numpy()) for k in (1, 2)]
    write_geojson(tmp_path / "im.geojson", det, NAMES, outlines=outlines, mpp=0.25)
    data = json.loads((tmp_path / "im.geojson").read_text())
    assert len(data["features"]) == 2
    for feature, row in zip(data["features"], det.itertuples()):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert feature["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
        assert len(np.unique(ring, axis=0)) > 4
        assert (ring[:, 0] >= row.x0).all() and (ring[:, 0] <= row.x1).all()
        assert (ring[:, 1] >= row.y0).all() and (ring[:, 1] <= row.y1).all()
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == row.label
        m = props["measurements"]
        assert m["score"] == pytest.approx(max(row.p_SCC, row.p_AC))
        assert m["Area µm^2"] == pytest.approx(row.object_area * 0.0625)


def test_geojson_without_outlines_or_mpp_keeps_boxes_and_pixel_areas(tmp_path):
    _, det = _labels_and_detections()
    write_geojson(tmp_path / "b.geojson", det, NAMES)
    feature = json.loads((tmp_path / "b.geojson").read_text())["features"][0]
    assert len(feature["geometry"]["coordinates"][0]) == 5
    assert "Area µm^2" not in feature["properties"]["measurements"]


def test_label_image_is_uint32_tiled_and_carries_no_input_metadata(tmp_path):
    import tifffile

    labels = np.zeros((700, 1030), np.int64)
    labels[5:40, 1000:1030] = 3
    labels[600:700, 0:20] = 70000  # beyond uint16
    write_label_image(tmp_path / "labels" / "im.tif", labels)
    back = read_label_image(tmp_path / "labels" / "im.tif")
    assert back.dtype == np.uint32 and back.shape == labels.shape and (back == labels).all()
    with tifffile.TiffFile(tmp_path / "labels" / "im.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled
        names = {t.name for t in page.tags}
    assert not names & {"ImageDescription", "Software", "DateTime", "Artist", "HostComputer", "Make", "Model"}


def test_label_image_refuses_non_integer_planes(tmp_path):
    with pytest.raises(ValueError, match="integers"):
        write_label_image(tmp_path / "x.tif", np.zeros((4, 4), np.float32))


def test_qupath_script_reads_the_per_image_geojson_folder():
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "fusion" / "qupath" / "import_cytofuse_geojson.groovy").read_text()
    assert "stem + '.geojson'" in script and "addObjects(objects)" in script


def test_detection_outlines_from_label_ids_or_from_the_probability_map():
    from fusion.cell_outputs import detection_outlines

    labels, det = _labels_and_detections()
    det["label_id"] = [1.0, 2.0]
    by_label = detection_outlines(det, 96, 64, labels=labels)
    prob = (labels > 0).astype(np.float32) * 0.9
    by_map = detection_outlines(det.drop(columns="label_id"), 96, 64, probability=prob, threshold=0.5)
    for a, b, row in zip(by_label, by_map, det.itertuples()):
        assert len(np.unique(a, axis=0)) > 4 and np.allclose(a, b)
        assert a[:, 0].min() >= row.x0 and a[:, 0].max() <= row.x1
