"""COCO interoperability: a data set's COCO export, the results list, ``--coco-gt`` id mapping, COCOeval."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cytocore.errors import DataError
from fusion.coco_results import coco_results, ids_from_ground_truth, own_ids, write_coco_results


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cytocore.readers import load_dataset
    from cytosynth.scene import generate

    root = generate(tmp_path_factory.mktemp("synth") / "s", n_images=4, seed=3, size=160)
    return load_dataset(root)


def _detections_from_truth(ds, jitter: float = 1.5) -> pd.DataFrame:
    """Ground-truth boxes moved by up to ``jitter`` px, with the true classes scored high and others low."""
    rng = np.random.default_rng(0)
    rows = []
    for rec in ds:
        for box, hot in zip(rec.boxes, rec.labels):
            b = box + rng.uniform(-jitter, jitter, 4)
            rows.append({"image_id": rec.image_id, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3],
                         **{f"p_{c}": (0.9 if h else 0.05) for c, h in zip(ds.class_names, hot)}})
    return pd.DataFrame(rows)


def test_results_against_the_data_sets_own_coco_export_load_and_evaluate(synth, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cytocore.coco_export import write_dataset_coco

    gt_path = tmp_path / "gt.json"
    gt_data = write_dataset_coco(synth, gt_path)
    assert len(gt_data["images"]) == len(synth)
    # the user's own file numbers images and categories differently: ids must follow it, by name
    for img in gt_data["images"]:
        img["id"] += 100
    for ann in gt_data["annotations"]:
        ann["image_id"] += 100
        ann["category_id"] = 10 * ann["category_id"]
    gt_data["categories"] = [{**c, "id": 10 * c["id"]} for c in gt_data["categories"]][::-1]
    gt_path.write_text(json.dumps(gt_data))

    det = _detections_from_truth(synth)
    files = {r.image_id: r.path.name for r in synth}
    ids = ids_from_ground_truth(gt_path, files, synth.class_names)
    assert set(ids.images.values()) == {i["id"] for i in gt_data["images"]}
    results = coco_results(det, synth.class_names, ids, floors=[0.5] * synth.num_classes)
    assert len(results) == len(gt_data["annotations"])
    write_coco_results(tmp_path / "coco_results.json", results)

    gt = COCO(str(gt_path))
    dt = gt.loadRes(str(tmp_path / "coco_results.json"))  # the file as written, as a user would
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] > 0.95  # near-true boxes: AP50 close to 1


def test_outlines_become_segmentations_that_cocoeval_reads(synth, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cytocore.coco_export import write_dataset_coco

    gt_path = tmp_path / "gt.json"
    write_dataset_coco(synth, gt_path)
    det = _detections_from_truth(synth, jitter=0.0)
    rings = [np.array([[r.x0, r.y0], [r.x1, r.y0], [r.x1, r.y1], [(r.x0 + r.x1) / 2, r.y1 + 0.0], [r.x0, r.y1], [r.x0, r.y0]])
             for r in det.itertuples()]
    ids = ids_from_ground_truth(gt_path, {r.image_id: r.path.name for r in synth}, synth.class_names)
    results = coco_results(det, synth.class_names, ids, floors=[0.5] * synth.num_classes, outlines=rings)
    assert all(len(r["segmentation"][0]) == 12 for r in results)
    gt = COCO(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(results), iouType="segm")
    ev.evaluate()
    ev.accumulate()
    assert ev.eval["precision"].size


def test_unmatched_images_and_classes_are_left_out_with_a_warning(tmp_path, caplog):
    gt = {"images": [{"id": 7, "file_name": "sub/a.png", "width": 10, "height": 10},
                     {"id": 9, "file_name": "b.jpg", "width": 10, "height": 10}],
          "categories": [{"id": 3, "name": "scc"}], "annotations": []}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ids = ids_from_ground_truth(path, {"a": "a.png", "b": "b.png", "c": "c.png"}, ["SCC", "AC"])
    assert ids.images == {"a": 7, "b": 9}  # b matched by stem (b.jpg in the file, b.png read)
    assert ids.categories == {"SCC": 3} and ids.unmatched_classes == ["AC"] and ids.unmatched_images == ["c"]
    assert "left out" in caplog.text
    det = pd.DataFrame([{"image_id": "c", "x0": 0, "y0": 0, "x1": 2, "y1": 2, "p_SCC": 0.9, "p_AC": 0.9},
                        {"image_id": "a", "x0": 1, "y0": 1, "x1": 3, "y1": 4, "p_SCC": 0.8, "p_AC": 0.9}])
    assert coco_results(det, ["SCC", "AC"], ids) == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 1.0, 2.0, 3.0], "score": 0.8}]


def test_a_ground_truth_of_other_images_is_one_line_error(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "categories": [{"id": 1, "name": "SCC"}]}))
    with pytest.raises(DataError, match="gt.json: none of the 1 image file names"):
        ids_from_ground_truth(path, {"a": "a.png"}, ["SCC"])
    with pytest.raises(DataError, match="none of the classes"):
        ids_from_ground_truth(path, {"x": "x.png"}, ["AC"])


def test_own_ids_number_in_order():
    ids = own_ids(["b", "a"], ["SCC", "AC"])
    assert ids.images == {"b": 1, "a": 2} and ids.categories == {"SCC": 1, "AC": 2}


def test_cli_data_coco(synth, tmp_path, capsys):
    from experiments.cli import run

    assert run(["data", "coco", str(synth.root), "--out", str(tmp_path / "gt.json")]) == 0
    data = json.loads((tmp_path / "gt.json").read_text())
    assert len(data["images"]) == len(synth) and "wrote" in capsys.readouterr().out
