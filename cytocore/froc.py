"""The challenge's official detection metric: FROC per class with IoP > 0.5 and the ignore rule.

It lives in ``cytocore`` because the segmentation stage chooses its checkpoint and post-processing
thresholds by it on the validation split, and a stage may not import ``experiments``.

The definition (ARCHITECTURE.md, "The official metric") is greedy matching at each threshold.
Re-matching from scratch at every distinct score would be quadratic; it is not needed, because at a
threshold ``t`` the greedy pass visits the predictions with ``score >= t`` in descending order and a
prediction's outcome depends only on the predictions before it. The outcomes of one pass over *all*
predictions, sorted once, are therefore valid for every threshold: the counts at ``t`` are the
cumulative counts up to the last prediction scoring ``>= t``. Equal scores always enter together
(``>=``), and are matched in input order (stable sort), so the result is deterministic.

The ignore rule ("IoP > 0.5 with an already matched box → neither TP nor FP, no fallback to the
second-best box") also makes matching separable per ground-truth box: the first prediction (in
sorted order) whose best box is a given box takes it, the later ones are ignored. That is what
:func:`match_predictions` computes, without a Python loop over predictions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

#: False positives per image at which recall is averaged.
FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: A prediction hits a ground-truth box when IoP = area(P ∩ T) / area(P) is strictly above this.
IOP_THRESHOLD = 0.5

TP, IGNORED, FP = 1, 0, -1

Thresholds = Union[str, Sequence[float]]


def iop_matrix(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """``(P, G)`` intersection over *prediction* area; a prediction with no area overlaps nothing.

    IoP, not IoU, because the organisers score a box drawn inside a cell as a hit: the cell is
    found even if the box is tight.
    """
    p = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    ix = np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0])
    iy = np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area = np.clip(p[:, 2] - p[:, 0], 0, None) * np.clip(p[:, 3] - p[:, 1], 0, None)
    out = np.zeros_like(inter)
    np.divide(inter, area[:, None], out=out, where=area[:, None] > 0)
    return out


def iou_matrix(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """``(P, G)`` intersection over union: the hit test of detection AP (pycocotools at IoU 0.5)."""
    return iou_from_overlaps(iop_matrix(pred_boxes, gt_boxes), iop_matrix(gt_boxes, pred_boxes).T)


def iou_from_overlaps(iop: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """IoU from the intersection over each prediction's area and over each cell's area (``(P, G)``
    both), for callers that hold those already: ``1 / IoU = 1 / IoP + 1 / coverage - 1``."""
    overlap = (iop > 0) & (cover > 0)
    out = np.zeros_like(iop)
    np.divide(iop * cover, iop + cover - iop * cover, out=out, where=overlap)
    return out


def score_order(scores: np.ndarray) -> np.ndarray:
    """Descending score order, ties kept in input order (the matching order of the metric)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def match_predictions(
    pred_image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    iop_threshold: float = IOP_THRESHOLD,
) -> np.ndarray:
    """Outcome (``TP``, ``IGNORED`` or ``FP``) of each prediction of one class, in input order.

    ``pred_image`` / ``gt_image`` are image keys (any hashable numpy dtype) saying which image each
    box belongs to. The best box of a prediction is the first one with the highest IoP among the
    ground-truth boxes of its image.
    """
    pred_image = np.asarray(pred_image)
    gt_image = np.asarray(gt_image)
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    n = len(pred_boxes)
    best_gt = np.full(n, -1, np.int64)  # global index of the best box, -1 when IoP <= threshold
    if n and len(gt_boxes):
        gt_index_by_image: dict = {}
        for j, key in enumerate(gt_image.tolist()):
            gt_index_by_image.setdefault(key, []).append(j)
        pred_keys = pred_image.tolist()
        pred_index_by_image: dict = {}
        for i, key in enumerate(pred_keys):
            if key in gt_index_by_image:
                pred_index_by_image.setdefault(key, []).append(i)
        for key, p_idx in pred_index_by_image.items():
            g_idx = np.asarray(gt_index_by_image[key])
            p_idx = np.asarray(p_idx)
            iop = iop_matrix(pred_boxes[p_idx], gt_boxes[g_idx])
            best = iop.argmax(axis=1)
            hit = iop[np.arange(len(p_idx)), best] > iop_threshold
            best_gt[p_idx[hit]] = g_idx[best[hit]]
    outcome = np.full(n, FP, np.int8)
    order = score_order(pred_scores)
    hits = order[best_gt[order] >= 0]  # hitting predictions in matching order
    outcome[hits] = IGNORED
    _, first = np.unique(best_gt[hits], return_index=True)  # first visitor of each box takes it
    outcome[hits[first]] = TP
    return outcome


@dataclass
class FrocResult:
    """FROC of one class: the score, the curve it was read from, and the recall at each FP rate."""

    froc: float
    fp_per_image: np.ndarray  # curve x after keeping the highest recall per x, (0, ...) first
    recall: np.ndarray  # curve y
    thresholds: np.ndarray  # lowest threshold reaching each curve point (nan for the prepended origin)
    recall_at: dict[float, float] = field(default_factory=dict)
    n_gt: int = 0
    n_predictions: int = 0
    n_images: int = 0

    def to_dict(self) -> dict:
        return {
            "froc": self.froc,
            "recall_at": {f"{k:g}": v for k, v in self.recall_at.items()},
            "fp_per_image": self.fp_per_image.tolist(),
            "recall": self.recall.tolist(),
            "thresholds": [None if np.isnan(t) else float(t) for t in self.thresholds],
            "n_gt": self.n_gt,
            "n_predictions": self.n_predictions,
        }


def operating_points(
    sorted_scores: np.ndarray, sorted_outcomes: np.ndarray, thresholds: Thresholds = "distinct"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, TP count, FP count)`` at each threshold, from outcomes in descending score order.

    ``"distinct"`` uses every distinct score; a sequence uses those values (a threshold above every
    score gives the point with no prediction kept).
    """
    scores = np.asarray(sorted_scores, np.float64)
    outcomes = np.asarray(sorted_outcomes)
    cum_tp = np.concatenate([[0], np.cumsum(outcomes == TP)])
    cum_fp = np.concatenate([[0], np.cumsum(outcomes == FP)])
    if isinstance(thresholds, str):
        if thresholds != "distinct":
            raise ValueError(f"thresholds must be 'distinct' or a list of numbers, not {thresholds!r}")
        # Last position of each run of equal scores: the whole run enters at that score.
        last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if len(scores) else np.zeros(0, int)
        t = scores[last]
        kept = last + 1
    else:
        t = np.asarray(sorted(set(float(x) for x in thresholds), reverse=True), np.float64)
        # scores are descending; count those >= t via the ascending negated array.
        kept = np.searchsorted(-scores, -t, side="right")
    return t, cum_tp[kept], cum_fp[kept]


def froc_from_counts(
    tp: np.ndarray, fp: np.ndarray, thresholds: np.ndarray, n_gt: int, n_images: int,
    fp_rates: Sequence[float] = FP_RATES,
) -> FrocResult:
    """Build the curve from the counts at each threshold and average its recall at ``fp_rates``.

    The origin (0, 0) is prepended, then only the highest recall is kept for each FP/N value — so a
    threshold that finds a TP before any FP lifts the curve's start from (0, 0) to (0, recall).
    Between points the recall is linear in FP/N; beyond the last point the last recall holds.
    """
    if n_gt <= 0:
        raise ValueError("FROC needs at least one ground-truth box")
    if n_images <= 0:
        raise ValueError("FROC needs at least one image")
    fp_all = np.concatenate([[0], np.asarray(fp, np.int64)])
    tp_all = np.concatenate([[0], np.asarray(tp, np.int64)])
    t_all = np.concatenate([[np.nan], np.asarray(thresholds, np.float64)])
    # Highest recall per FP count; on equal recall keep the highest threshold reaching it.
    order = np.lexsort((np.nan_to_num(-t_all, nan=-np.inf), -tp_all, fp_all))
    fp_sorted = fp_all[order]
    first = np.append(True, fp_sorted[1:] != fp_sorted[:-1])
    pick = order[first]
    x = fp_all[pick] / n_images
    y = tp_all[pick] / n_gt
    rates = np.asarray(fp_rates, np.float64)
    at = np.interp(rates, x, y)  # right of the last point np.interp holds the last value
    return FrocResult(
        froc=float(at.mean()),
        fp_per_image=x,
        recall=y,
        thresholds=t_all[pick],
        recall_at={float(r): float(v) for r, v in zip(rates, at)},
        n_gt=int(n_gt),
        n_images=int(n_images),
    )


def class_froc(
    pred_image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    n_images: int,
    thresholds: Thresholds = "distinct",
    fp_rates: Sequence[float] = FP_RATES,
) -> FrocResult:
    """FROC of one class over ``n_images`` images (images without predictions or boxes included)."""
    scores = np.asarray(pred_scores, np.float64).reshape(-1)
    if np.isnan(scores).any():
        raise ValueError("prediction scores contain NaN")
    outcome = match_predictions(pred_image, pred_boxes, scores, gt_image, gt_boxes)
    order = score_order(scores)
    t, tp, fp = operating_points(scores[order], outcome[order], thresholds)
    result = froc_from_counts(tp, fp, t, len(np.asarray(gt_boxes).reshape(-1, 4)), n_images, fp_rates)
    result.n_predictions = int(len(scores))
    return result


# ------------------------------------------------------------------------------------ whole data sets


def stack_ground_truth(records: Sequence, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of all ``records`` (``ImageRecord``) stacked: image index per box, pixel xyxy, ``(G, k)`` labels."""
    image = np.concatenate([np.full(r.n_boxes, i, np.int64) for i, r in enumerate(records)] + [np.zeros(0, np.int64)])
    boxes = np.concatenate([r.boxes.astype(np.float64).reshape(-1, 4) for r in records] + [np.zeros((0, 4))])
    labels = np.concatenate(
        [r.labels.reshape(r.n_boxes, -1) if r.n_boxes else np.zeros((0, k), np.uint8) for r in records]
        + [np.zeros((0, k), np.uint8)]
    )
    if labels.shape[1] != k:
        raise ValueError(f"label rows have {labels.shape[1]} classes but the data set names {k}")
    return image, boxes, labels


@dataclass
class ClassFrocs:
    """FROC of every class over one set of images, and the accuracy (their mean over classes with GT)."""

    froc: dict  # class name -> FROC, None for a class without ground truth
    curves: dict  # class name -> FrocResult.to_dict()
    n_gt: dict  # class name -> number of ground-truth boxes
    accuracy: Optional[float]
    skipped: list  # classes without ground truth (not in the accuracy)


def per_class_froc(
    pred_image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    class_names: Sequence[str],
    n_images: int,
    thresholds: Thresholds = "distinct",
) -> ClassFrocs:
    """FROC per class (``pred_scores`` is ``(P, K)``, ``gt_labels`` ``(G, K)`` multi-hot) and the accuracy."""
    pred_scores = np.asarray(pred_scores, np.float64).reshape(len(np.asarray(pred_boxes).reshape(-1, 4)), len(class_names))
    gt_labels = np.asarray(gt_labels).reshape(-1, len(class_names))
    froc: dict = {}
    curves: dict = {}
    n_gt: dict = {}
    skipped: list = []
    for c, name in enumerate(class_names):
        has = gt_labels[:, c].astype(bool)
        n_gt[name] = int(has.sum())
        if not has.any():
            froc[name] = None
            skipped.append(name)
            continue
        res = class_froc(pred_image, pred_boxes, pred_scores[:, c], gt_image[has], gt_boxes[has], n_images, thresholds)
        froc[name] = res.froc
        curves[name] = res.to_dict()
    scored = [v for v in froc.values() if v is not None]
    return ClassFrocs(froc, curves, n_gt, float(np.mean(scored)) if scored else None, skipped)
