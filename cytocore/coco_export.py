"""A data set's annotations as a COCO ground-truth file: what COCO tools score predictions against.

``cytofuse data coco DIR --out gt.json`` writes any data set CytoFuse reads (challenge CSV, VOC,
COCO) as one COCO JSON, so ``cytofuse infer ... --coco-gt gt.json`` results can be evaluated with
pycocotools' ``COCOeval`` like any detector's. The challenge is multi-label; COCO is one category
per annotation, so a box with two classes becomes two annotations (the COCO reader merges them back).

Ids: images 1..N in the data set's order, ``file_name`` the image's file name (what ``--coco-gt``
matches on); categories 1..K in the data set's class order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .atomic import write_json
from .records import Dataset

PathLike = Union[str, Path]


def dataset_coco(ds: Dataset) -> dict:
    """COCO ground-truth dict of a data set (use ``ds.subset(split)`` for one split)."""
    recs = list(ds.records)
    images, annotations = [], []
    for k, rec in enumerate(recs):
        image_id = k + 1
        images.append({"id": image_id, "file_name": Path(rec.path).name, "width": int(rec.width), "height": int(rec.height)})
        for box, hot in zip(np.asarray(rec.boxes, np.float64), np.asarray(rec.labels)):
            x0, y0, x1, y1 = (float(v) for v in box)
            w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
            for c in np.flatnonzero(hot):
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(c) + 1,
                    "bbox": [round(x0, 3), round(y0, 3), round(w, 3), round(h, 3)],
                    # the box as a polygon (what pycocotools' loadRes does for box results), so
                    # iouType="segm" runs too; the data layer keeps boxes, not cell outlines
                    "segmentation": [[round(v, 3) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]],
                    "area": round(w * h, 3),
                    "iscrowd": 0,
                })
    categories = [{"id": c + 1, "name": str(name), "supercategory": "cell"} for c, name in enumerate(ds.class_names)]
    return {
        "info": {"description": "CytoFuse data set export"},
        "licenses": [],
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }


def write_dataset_coco(ds: Dataset, path: PathLike) -> dict:
    """Write :func:`dataset_coco` atomically; returns the dict."""
    data = dataset_coco(ds)
    write_json(path, data)
    return data
