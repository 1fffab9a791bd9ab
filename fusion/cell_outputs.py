"""Per-cell outputs of a detection run: outlines for GeoJSON/COCO, and overlays of slides.

* :func:`detection_outlines` — each reported detection's outline polygon (level-0 px), traced on the
  segmentation's instance label plane (``label_id`` links a detection to its cell). Without a label
  plane the cell is the largest connected part of the thresholded probability inside its box.
* :func:`overlay_view` — what the overlay is drawn from: the image itself, or for a slide (never
  decoded whole) its thumbnail with the map and boxes brought to the thumbnail's scale.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from cytocore.outlines import label_outline, mask_outline


def _object_box(row: Any, shrink: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The box the cell was segmented in: the reported box grown back by ``1 / shrink`` (and 1 px of slack)."""
    cx, cy = (row.x0 + row.x1) / 2.0, (row.y0 + row.y1) / 2.0
    grow = 1.0 / shrink if shrink > 0 else 1.0
    hw, hh = (row.x1 - row.x0) * grow / 2.0 + 1, (row.y1 - row.y0) * grow / 2.0 + 1
    return (max(0, int(np.floor(cx - hw))), max(0, int(np.floor(cy - hh))),
            min(width, int(np.ceil(cx + hw))), min(height, int(np.ceil(cy + hh))))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def detection_outlines(
    detections: pd.DataFrame,
    width: int,
    height: int,
    labels: Optional[np.ndarray] = None,
    probability: Optional[np.ndarray] = None,
    threshold: float = 0.5,
    shrink: float = 1.0,
    tolerance: float = 1.0,
    class_shrink: Optional[Mapping[str, float]] = None,
) -> list[Optional[np.ndarray]]:
    """Closed x, y outline rings (level-0 px, inside each reported box), aligned with ``detections``' rows.

    ``shrink`` (and ``class_shrink``, by each row's ``label``) is the factor the reported boxes were
    scaled by, undone to find the cell's own extent."""
    rings: list[Optional[np.ndarray]] = []
    has_ids = labels is not None and "label_id" in detections.columns
    by_class = dict(class_shrink or {})
    for row in detections.itertuples(index=False):
        report = (row.x0, row.y0, row.x1, row.y1)
        box = _object_box(row, by_class.get(str(getattr(row, "label", "")), shrink), width, height)
        ring = None
        if has_ids and np.isfinite(row.label_id) and row.label_id > 0:
            ring = label_outline(labels, int(row.label_id), box, report_box=report, tolerance=tolerance)
        elif probability is not None:
            x0, y0, x1, y1 = box
            crop = np.asarray(probability[y0:y1, x0:x1])
            level = threshold * 255.0 if crop.dtype == np.uint8 else threshold
            mask = crop >= level
            if mask.any():
                ring = mask_outline(_largest_component(mask), tolerance)
                if ring is not None:
                    ring = ring + np.array([x0, y0], np.float64)
                    ring[:, 0] = np.clip(ring[:, 0], report[0], report[2])
                    ring[:, 1] = np.clip(ring[:, 1], report[1], report[3])
        rings.append(ring)
    return rings


def overlay_view(image: Any, probability: np.ndarray, detections: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """``(pixels, probability, detections)`` to draw: a slide's thumbnail and everything scaled to it."""
    thumb = getattr(image, "thumbnail", None)
    if thumb is None:
        array = getattr(image, "array", image)
        return np.asarray(array), probability, detections
    from PIL import Image

    th, tw = thumb.shape[:2]
    height, width = image.shape[:2]
    plane = np.asarray(probability)
    small = Image.fromarray(plane if plane.dtype == np.uint8 else np.clip(plane * 255.0 + 0.5, 0, 255).astype(np.uint8))
    prob = np.asarray(small.resize((tw, th), Image.BILINEAR))
    scaled = detections.copy()
    for col, f in (("x0", tw / width), ("x1", tw / width), ("y0", th / height), ("y1", th / height)):
        if col in scaled:
            scaled[col] = scaled[col].astype(np.float64) * f
    return thumb, prob, scaled
