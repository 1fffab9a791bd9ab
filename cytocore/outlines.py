"""Cell outlines as polygons, from an instance label plane: what QuPath and COCO ``segm`` tools draw.

The segmentation stage knows each cell's pixels (its instance label); a box throws the shape away.
An outline is traced on the object's mask with scikit-image's marching squares
(:func:`skimage.measure.find_contours`) and simplified with Douglas-Peucker
(:func:`skimage.measure.approximate_polygon`), so a round cell becomes a dozen or two vertices
instead of hundreds.

Coordinates are pixel *edges* (the convention of the boxes: a one-pixel object at column 5, row 7
has the box ``(5, 7, 6, 8)``): the contour at level 0.5 between a pixel centre inside and one outside
lies on their shared edge, so every vertex is inside the object's box. Vertices are finally clipped
to the box the detection reports (which may be shrunk), so the polygon never leaves it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: Fewer distinct vertices than this is not an outline (a box has 4): simplification is relaxed.
MIN_VERTICES = 5


def mask_outline(mask: np.ndarray, tolerance: float = 1.0) -> Optional[np.ndarray]:
    """The simplified outer outline of the largest part of a binary mask, as a closed ``(N, 2)`` x, y ring.

    Coordinates are in the mask's own pixel-edge frame (0..width, 0..height). Returns None for an
    empty mask. If simplification leaves fewer than :data:`MIN_VERTICES` distinct vertices (a tiny
    or square object), the tolerance is lowered until it does not, down to the raw contour.
    """
    from skimage import measure

    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    padded = np.pad(mask, 1).astype(np.float32)  # closes contours that touch the crop's edge
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return None
    ring = max(contours, key=_ring_area)  # outer boundary of the biggest part (holes are smaller)
    ring = ring[:, ::-1] - 0.5  # (row, col) of the padded array -> x, y pixel edges of the mask
    best = ring
    for tol in (tolerance, tolerance / 2, tolerance / 4, 0.0):
        simple = measure.approximate_polygon(ring, tolerance=tol) if tol > 0 else ring
        best = simple
        if _distinct(simple) >= MIN_VERTICES:
            break
    if not np.array_equal(best[0], best[-1]):
        best = np.vstack([best, best[:1]])
    return best.astype(np.float64)


def _distinct(ring: np.ndarray) -> int:
    return len(np.unique(np.round(np.asarray(ring), 6), axis=0))


def _ring_area(ring: np.ndarray) -> float:
    y, x = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def label_outline(
    labels: np.ndarray,
    label_id: int,
    object_box: Sequence[float],
    report_box: Optional[Sequence[float]] = None,
    tolerance: float = 1.0,
) -> Optional[np.ndarray]:
    """Outline of instance ``label_id`` of a label plane, in the plane's pixel-edge coordinates.

    ``object_box`` is the instance's own pixel box ``x0, y0, x1, y1`` (exclusive ends) so only that
    crop of the plane is read (the plane may be a memmap of a whole slide). The result is clipped to
    ``report_box`` (default: ``object_box``). None when the label is absent from its box.
    """
    x0, y0, x1, y1 = (int(round(v)) for v in object_box)
    h, w = labels.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return None
    crop = np.asarray(labels[y0:y1, x0:x1]) == label_id
    ring = mask_outline(crop, tolerance)
    if ring is None:
        return None
    ring = ring + np.array([x0, y0], np.float64)
    bx0, by0, bx1, by1 = (float(v) for v in (report_box if report_box is not None else (x0, y0, x1, y1)))
    ring[:, 0] = np.clip(ring[:, 0], bx0, bx1)
    ring[:, 1] = np.clip(ring[:, 1], by0, by1)
    return ring


def ring_area(ring: np.ndarray) -> float:
    """Area enclosed by an ``(N, 2)`` x, y ring (shoelace formula), in squared coordinate units."""
    ring = np.asarray(ring, np.float64)
    return _ring_area(ring[:, ::-1])
