"""Duplicate removal and detection selection: score floor, class-agnostic NMS, a cap per image.

Duplicates come from two places: watershed splits that leave a cell in two overlapping pieces, and
tiles whose overlaps see one cell twice (once whole, once cut at the tile edge). The cut copy can
have IoU ≤ 0.5 with the whole one while lying almost entirely inside it, which is why NMS can also
suppress by *containment* (intersection over the smaller box), not only by IoU.

NMS is class-agnostic: a cell is one object whatever its classes (the labels are multi-hot), so two
boxes on one cell must collapse to one row carrying all of its class scores.

What hard NMS leaves can still rank a cell twice: when post-processing offers several readings of one
cell (a whole white cell and a lobe of it, IoU 0.2-0.5 with the whole), both survive, and a lobe the
classifier likes sits above other images' whole cells in the ranking that AP and FROC read.
:func:`soft_decay` (Gaussian soft-NMS, Bodla et al. 2017) lowers, class by class, each box's score by
how much it overlaps a better box of that class, so such a box drops down the ranking instead of being
dropped; ``cytofuse fuse fit`` chooses whether to use it, and how strongly, on validation images.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .geometry import as_boxes, box_areas


def pairwise_overlaps(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(IoU, containment)`` of one box with each of ``others``; containment = ∩ / smaller area."""
    b = np.asarray(box, np.float64).reshape(4)
    o = as_boxes(others)
    iw = np.clip(np.minimum(b[2], o[:, 2]) - np.maximum(b[0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(b[3], o[:, 3]) - np.maximum(b[1], o[:, 1]), 0, None)
    inter = iw * ih
    area_b = max((b[2] - b[0]) * (b[3] - b[1]), 0.0)
    area_o = box_areas(o)
    union = area_b + area_o - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    smaller = np.minimum(area_b, area_o)
    contain = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
    return iou, contain


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float = 0.5,
    containment_threshold: Optional[float] = None,
) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes, highest score first.

    A box is suppressed by a higher-scoring kept box when their IoU is above ``iou_threshold``, or,
    when ``containment_threshold`` is set, when the intersection covers more than that fraction of
    the smaller of the two. Ties in score keep the earlier box (stable order).
    """
    b = as_boxes(boxes)
    s = np.asarray(scores, np.float64).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if not len(rest):
            break
        iou, contain = pairwise_overlaps(b[i], b[rest])
        suppress = iou > iou_threshold
        if containment_threshold is not None:
            suppress |= contain > containment_threshold
        order = rest[~suppress]
    return np.asarray(keep, np.int64)


#: How :func:`soft_decay` measures overlap: IoU, or intersection over the smaller box (a lobe inside
#: its whole cell overlaps it fully by containment but only by its share of the area by IoU).
SOFT_OVERLAPS: tuple[str, ...] = ("iou", "containment")


def soft_decay(boxes: np.ndarray, scores: np.ndarray, sigma: float, overlap: str = "iou") -> np.ndarray:
    """Gaussian soft-NMS, per class: ``(N, K)`` scores, each class's column decayed on its own.

    In each column, boxes are visited best first (by the decayed score so far); every box after the
    one visited keeps ``exp(-o² / sigma)`` of its score, ``o`` its overlap with the visited box. Per
    class, because a red cell that overlaps a white one should not lose its red-cell score, and the
    white one's piece should lose its white-cell score. Returns a new array; no row is removed.
    """
    if float(sigma) <= 0:
        raise ValueError(f"soft-NMS sigma must be positive, got {sigma}")
    if overlap not in SOFT_OVERLAPS:
        raise ValueError(f"soft-NMS overlap must be one of {', '.join(SOFT_OVERLAPS)}, got {overlap!r}")
    b = as_boxes(boxes)
    out = np.array(scores, np.float64, copy=True).reshape(len(b), -1)
    for c in range(out.shape[1]):
        column = out[:, c]
        rest = np.arange(len(b))
        while len(rest) > 1:
            top = int(np.argmax(column[rest]))
            i = rest[top]
            rest = np.delete(rest, top)
            iou, contain = pairwise_overlaps(b[i], b[rest])
            o = iou if overlap == "iou" else contain
            column[rest] *= np.exp(-(o ** 2) / float(sigma))
    return out


def class_floors(floor: Union[float, Mapping[str, float], None], class_names: Sequence[str]) -> np.ndarray:
    """A floor per class from one number or a ``{class: floor}`` mapping (missing classes: 0)."""
    if floor is None:
        return np.zeros(len(class_names))
    if isinstance(floor, Mapping):
        unknown = set(floor) - set(class_names)
        if unknown:
            raise ValueError(f"score_floor names unknown class(es) {', '.join(sorted(unknown))}; classes: {', '.join(class_names)}")
        return np.array([float(floor.get(c, 0.0)) for c in class_names])
    return np.full(len(class_names), float(floor))


def select_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    floors: np.ndarray,
    iou_threshold: float = 0.5,
    containment_threshold: Optional[float] = None,
    max_detections: Optional[int] = None,
) -> np.ndarray:
    """Indices of the detections to report, best first: floor, then NMS, then the cap.

    ``scores`` is ``(N, K)`` fused class scores. A detection passes the floor when at least one class
    score reaches that class's floor (its other scores are still reported: the metric needs every
    ``p_c``). NMS ranks by the best class score; the cap keeps the ``max_detections`` best.
    """
    b = as_boxes(boxes)
    floors = np.asarray(floors, np.float64).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(len(b), len(floors))
    if s.shape[1] != len(floors):
        raise ValueError(f"scores have {s.shape[1]} classes but {len(floors)} floors were given")
    passing = np.flatnonzero((s >= floors[None, :]).any(axis=1)) if len(b) else np.zeros(0, np.int64)
    best = s.max(axis=1) if s.shape[1] else np.zeros(len(b))
    kept = passing[nms(b[passing], best[passing], iou_threshold, containment_threshold)]
    if max_detections is not None and max_detections >= 0:
        kept = kept[: int(max_detections)]
    return kept
