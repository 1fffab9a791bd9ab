"""What the top-ranked boxes that miss are: unboxed cells, pieces, loose boxes, duplicates, wrong class.

The ranking ceiling (:mod:`cytocore.ranking_ceiling`) says how much a perfect classifier would gain;
this says what it would have to push down. For each class the ``N`` highest-scored boxes are read,
``N`` being the number of annotated cells of that class (a perfect system has every one of them
there, so the share of hits is its precision at full recall, the R-precision of retrieval). Each box
is matched greedily in score order, as the metrics match, with the metric's own hit test (IoU > 0.5
for AP50, IoP > 0.5 for the challenge's FROC), and a box that is no hit gets the first kind that fits:

- ``duplicate``: it hits a cell of the class that a higher box already took;
- ``other_class``: it hits an annotated cell of another class only;
- ``piece``: most of the box (> 0.7) lies inside one annotated cell, a fragment of it;
- ``loose``: it holds most (> 0.7) of an annotated cell, with neighbours or background around it;
- ``partial``: it overlaps an annotated cell (IoU > 0.1), none of the above;
- ``no_cell``: it touches no annotated cell: background, debris, or a cell nobody annotated.

On BCCD most ``no_cell`` red-cell boxes sit on red cells the annotators did not box: that part of the
gap is the annotation's, not the detector's, and this table is where it shows.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .froc import iop_matrix, iou_from_overlaps, score_order
from .ranking_ceiling import HIT_TESTS, Truth

KINDS = ("hit", "duplicate", "other_class", "piece", "loose", "partial", "no_cell")
HIT_THRESHOLD = 0.5
INSIDE = 0.7  # share of the box inside a cell (piece) or of the cell inside the box (loose)
TOUCH_IOU = 0.1


def box_kinds(pred_image: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray, truth: Truth,
              class_names: Sequence[str], hit: str = "iou") -> dict[str, dict[str, int]]:
    """``{class: {kind: count}}`` over each class's ``N`` highest-scored boxes (``N`` = its annotated cells).

    A class without annotated cells reads no boxes (all counts 0).
    """
    if hit not in HIT_TESTS:
        raise ValueError(f"hit test must be one of {', '.join(HIT_TESTS)}, not {hit!r}")
    boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(pred_scores, np.float64).reshape(len(boxes), len(class_names))
    images = np.asarray(pred_image).reshape(-1)
    gt_boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
    gt_images = np.asarray(truth.image).reshape(-1)
    labels = np.asarray(truth.labels).reshape(len(gt_boxes), len(class_names)).astype(bool)
    overlaps = _overlaps(images, boxes, gt_images, gt_boxes)
    out = {}
    for k, name in enumerate(class_names):
        counts = dict.fromkeys(KINDS, 0)
        taken = np.zeros(len(gt_boxes), bool)
        for p in score_order(scores[:, k])[:min(int(labels[:, k].sum()), len(boxes))]:
            o = overlaps[images[p]]
            row = int(np.searchsorted(o.rows, p))
            hits = (o.iou if hit == "iou" else o.iop)[row] > HIT_THRESHOLD
            kind = _kind(o.iop[row], o.cover[row], o.iou[row], hits, labels[o.cells, k], taken[o.cells])
            if kind == "hit":  # the free cell it overlaps most, as the metrics match
                free = np.flatnonzero(hits & labels[o.cells, k] & ~taken[o.cells])
                taken[o.cells[free[np.argmax(o.iou[row][free])]]] = True
            counts[kind] += 1
        out[name] = counts
    return out


class _ImageOverlaps(NamedTuple):
    """One image's boxes (their global ``rows``, ascending) against its annotated ``cells``, any class."""

    rows: np.ndarray
    cells: np.ndarray
    iop: np.ndarray    # (rows, cells) intersection over the box
    cover: np.ndarray  # (rows, cells) intersection over the cell
    iou: np.ndarray


def _overlaps(images: np.ndarray, boxes: np.ndarray, gt_images: np.ndarray, gt_boxes: np.ndarray) -> dict:
    out = {}
    for image in np.unique(images):
        rows = np.flatnonzero(images == image)
        cells = np.flatnonzero(gt_images == image)
        iop = iop_matrix(boxes[rows], gt_boxes[cells])
        cover = iop_matrix(gt_boxes[cells], boxes[rows]).T
        out[image] = _ImageOverlaps(rows, cells, iop, cover, iou_from_overlaps(iop, cover))
    return out


def _kind(iop: np.ndarray, cover: np.ndarray, iou: np.ndarray, hits: np.ndarray, of_class: np.ndarray,
          taken: np.ndarray) -> str:
    """The first kind in :data:`KINDS` that fits one box, given its overlaps with its image's cells."""
    if (hits & of_class & ~taken).any():
        return "hit"
    if (hits & of_class).any():
        return "duplicate"
    if hits.any():
        return "other_class"
    if (iop > INSIDE).any():
        return "piece"
    if (cover > INSIDE).any():
        return "loose"
    if (iou > TOUCH_IOU).any():
        return "partial"
    return "no_cell"


__all__ = ["KINDS", "box_kinds"]
