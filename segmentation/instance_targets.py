"""Instance labels and the instance head's target, from whatever a data set annotates.

Why an instance head at all: a foreground mask cannot tell touching cells apart, and under the
challenge's IoP > 0.5 rule a box around a cluster of four cells matches none of them (a miss plus
a false positive each). Adenocarcinoma comes in balls and small-cell carcinoma in chains, so the
U-Net gets extra 1×1 output channels that say *where each cell's centre is*; post-processing grows
one instance from each centre (:mod:`segmentation.postprocess`).

**Which head (``distance``, the default, chosen by measurement).** StarDist's object probability: for
every pixel of a cell, its distance to the nearest pixel outside *that* cell (other cells count as
outside, so the map drops to 0 on the line where two cells touch), divided by the cell's largest
distance, so every cell peaks at 1 whatever its size. Thresholding it at ~0.5 leaves one compact core
per cell, far from the touching lines, which survives the blur a trained network adds. The
alternative kept for comparison, ``centre``, is a Gaussian at each box centre with sigma a quarter of
the box side. Through the real post-processing (``cytofuse seg ceiling`` with the heads' perfect
targets blurred by a Gaussian like a trained network's output), on the synthetic validation split
at scale 0.75: distance 0.99 / 0.99 / 0.98 at blur 0 / 1.5 / 3 px, centre 0.99 / 0.97 / 0.92 (the
instance-head section of docs/results-history.md); the distance head also needs no box size, so it
works for mask-only data.

**Instance labels** (:func:`instance_labels`) from:

- an *instance* mask (a label image with more than one nonzero value): used as it is;
- a *union* mask plus boxes: each mask pixel belongs to the box that holds it with the nearest
  size-normalised centre (``((x-cx)/(w/2))² + ((y-cy)/(h/2))²``, i.e. the box whose inscribed
  ellipse it is deepest inside); mask pixels in no box stay unlabelled; a box that got no pixel
  gets its ellipse;
- boxes alone: the union of the boxes' ellipses (or refined shapes), split by the same rule,
  which cuts two overlapping ellipses along the line where they are equally deep.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from cytocore.tiling import box_window

HEAD_KINDS = ("distance", "centre")
#: Head targets are stored as uint8 (0..255) in the patch sampler: memory of a mask, not of a float map.
TARGET_LEVELS = 255


def _box_depth(box: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Squared size-normalised distance of each pixel centre in the window to the box centre."""
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    rx, ry = max((box[2] - box[0]) / 2.0, 0.5), max((box[3] - box[1]) / 2.0, 0.5)
    yy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / ry
    xx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx
    return yy[:, None] ** 2 + xx[None, :] ** 2


def is_instance_mask(mask: Optional[np.ndarray]) -> bool:
    """A label image (several distinct nonzero values) rather than a binary union mask."""
    if mask is None:
        return False
    values = np.unique(mask)
    return int((values > 0).sum()) > 1


def instance_labels(shape: tuple[int, int], boxes: np.ndarray, region: Optional[np.ndarray] = None,
                    mask: Optional[np.ndarray] = None) -> np.ndarray:
    """``(H, W)`` int32 instance labels (0 = none; box ``i`` → label ``i + 1`` unless ``mask`` has labels).

    ``mask`` is the data set's mask (instance or union); ``region`` is the foreground to split when
    there is no mask (the union of the boxes' ellipses or refined shapes); with neither, ellipses.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if is_instance_mask(mask):
        return np.asarray(mask, np.int32)
    fg = (mask > 0) if mask is not None else region
    labels = np.zeros(shape, np.int32)
    depth = np.full(shape, np.inf, np.float32)
    for i, b in enumerate(boxes):
        y0, y1, x0, x1 = box_window(b, shape)
        if y1 <= y0 or x1 <= x0:
            continue
        d = _box_depth(b, y0, y1, x0, x1)
        inside = fg[y0:y1, x0:x1] if fg is not None else d <= 1.0
        better = inside & (d < depth[y0:y1, x0:x1])
        depth[y0:y1, x0:x1][better] = d[better]
        labels[y0:y1, x0:x1][better] = i + 1
    if fg is not None and len(boxes):  # boxes the foreground does not cover still get a cell: their ellipse
        present = np.zeros(len(boxes) + 1, bool)
        present[np.unique(labels)] = True
        for i in np.flatnonzero(~present[1:]):
            b = boxes[i]
            y0, y1, x0, x1 = box_window(b, shape)
            if y1 <= y0 or x1 <= x0:
                continue
            d = _box_depth(b, y0, y1, x0, x1)
            free = (d <= 1.0) & (labels[y0:y1, x0:x1] == 0)
            if not free.any():
                free = d <= d.min()
            labels[y0:y1, x0:x1][free] = i + 1
    return labels


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32: per instance, distance to the nearest pixel outside it / its maximum (StarDist)."""
    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, labels.shape[0])
        x0, x1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, labels.shape[1])
        own = labels[y0:y1, x0:x1] == i
        padded = np.pad(own, 1)  # the image edge is not "outside": pad with the cell itself there
        if y0 == 0:
            padded[0] = padded[1]
        if y1 == labels.shape[0]:
            padded[-1] = padded[-2]
        if x0 == 0:
            padded[:, 0] = padded[:, 1]
        if x1 == labels.shape[1]:
            padded[:, -1] = padded[:, -2]
        d = ndi.distance_transform_edt(padded)[1:-1, 1:-1]
        peak = float(d[own].max()) if own.any() else 0.0
        if peak > 0:
            out[y0:y1, x0:x1][own] = d[own] / peak
    return out


def centre_gaussians(labels: np.ndarray, sigma_fraction: float = 0.25) -> np.ndarray:
    """``(H, W)`` float32: the max over instances of a Gaussian at the centre of its box (peak 1)."""
    out = np.zeros(labels.shape, np.float32)
    for sl in ndi.find_objects(labels):
        if sl is None:
            continue
        hh, ww = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        cy, cx = (sl[0].start + sl[0].stop) / 2.0, (sl[1].start + sl[1].stop) / 2.0
        sy, sx = max(sigma_fraction * hh, 0.5), max(sigma_fraction * ww, 0.5)
        y0, y1 = max(int(cy - 3 * sy), 0), min(int(np.ceil(cy + 3 * sy)) + 1, labels.shape[0])
        x0, x1 = max(int(cx - 3 * sx), 0), min(int(np.ceil(cx + 3 * sx)) + 1, labels.shape[1])
        yy = (np.arange(y0, y1) + 0.5 - cy) / sy
        xx = (np.arange(x0, x1) + 0.5 - cx) / sx
        g = np.exp(-0.5 * (yy[:, None] ** 2 + xx[None, :] ** 2)).astype(np.float32)
        np.maximum(out[y0:y1, x0:x1], g, out=out[y0:y1, x0:x1])
    return out


def head_target(labels: np.ndarray, kind: str = "distance") -> np.ndarray:
    """The instance head's float32 target in [0, 1] for instance ``labels``."""
    if kind == "distance":
        return normalised_distance(labels)
    if kind == "centre":
        return centre_gaussians(labels)
    raise ValueError(f"instance head must be one of {', '.join(HEAD_KINDS)}, not {kind!r}")


def quantise(target: np.ndarray) -> np.ndarray:
    """A [0, 1] head target as uint8 0..255 (what training samples hold)."""
    return np.round(np.clip(target, 0.0, 1.0) * TARGET_LEVELS).astype(np.uint8)
