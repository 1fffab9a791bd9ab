"""Per-class average precision at IoU 0.5 with pycocotools' COCOeval (a secondary metric).

Boxes are multi-label, COCO's are single-label: each class becomes its own category, a ground-truth
box is one annotation per class it carries, and a prediction is one detection per class with score
``p_class``. COCOeval evaluates categories independently, so this is exactly "AP of class c".
"""
from __future__ import annotations

import contextlib
import io
from typing import Optional, Sequence

import numpy as np

IOU = 0.5


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def ap50_per_class(
    images: Sequence[tuple[int, int]],
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    pred_image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Optional[float]]:
    """AP at IoU 0.5 per class (``None`` for a class without ground truth).

    ``images`` is ``(width, height)`` per image; ``gt_image`` / ``pred_image`` index into it. Boxes
    are pixel xyxy, ``gt_labels`` is ``(G, K)`` multi-hot and ``pred_scores`` ``(P, K)``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    k = len(class_names)
    gt_image = np.asarray(gt_image, np.int64).reshape(-1)
    pred_image = np.asarray(pred_image, np.int64).reshape(-1)
    gt_labels = np.asarray(gt_labels).reshape(len(gt_image), k)
    pred_scores = np.asarray(pred_scores, np.float64).reshape(len(pred_image), k)
    gt_xywh = _xywh(gt_boxes)
    pred_xywh = _xywh(pred_boxes)

    annotations = []
    for g, c in zip(*np.nonzero(gt_labels)):
        x, y, w, h = (float(v) for v in gt_xywh[g])
        annotations.append({
            "id": len(annotations) + 1, "image_id": int(gt_image[g]) + 1, "category_id": int(c) + 1,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
        })
    gt_dict = {
        "images": [{"id": i + 1, "width": int(w), "height": int(h)} for i, (w, h) in enumerate(images)],
        "categories": [{"id": c + 1, "name": str(name)} for c, name in enumerate(class_names)],
        "annotations": annotations,
    }
    has_gt = gt_labels.astype(bool).any(axis=0)
    result: dict[str, Optional[float]] = {name: None for name in class_names}
    if not has_gt.any():
        return result
    if len(pred_image) == 0:
        return {name: (0.0 if has_gt[c] else None) for c, name in enumerate(class_names)}

    # N×7 rows [image_id, x, y, w, h, score, category] for every (prediction, class) pair.
    rows = np.zeros((len(pred_image) * k, 7), np.float64)
    rows[:, 0] = np.repeat(pred_image + 1, k)
    rows[:, 1:5] = np.repeat(pred_xywh, k, axis=0)
    rows[:, 5] = pred_scores.reshape(-1)
    rows[:, 6] = np.tile(np.arange(1, k + 1), len(pred_image))
    per_image_max = int(np.bincount(pred_image).max())

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(rows)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.iouThrs = np.array([IOU])
        ev.params.maxDets = [max(100, per_image_max)]
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    cat_ids = list(ev.params.catIds)
    for c, name in enumerate(class_names):
        if not has_gt[c]:
            continue
        p = precision[0, :, cat_ids.index(c + 1), 0, 0]
        p = p[p > -1]
        result[name] = float(p.mean()) if p.size else 0.0
    return result
