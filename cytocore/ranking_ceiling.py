"""What a system's own boxes would score if they were ranked perfectly: which stage holds the error.

A two-stage system loses in two places: the boxes (a cell no box hits, neighbours merged into one
box, boxes looser than the annotator's) and the ranking (the classifier and the fusion scoring a
false positive above a hit). The metric cannot tell them apart; this does. Every box is scored again
with the truth: for each class, a box that hits a ground-truth cell of that class (the metric's own
hit test: IoP > 0.5 for the challenge's FROC, IoU > 0.5 for AP50) moves above every box that does
not, and within each group the system's own order is kept. The metric of those scores is what a
perfect classifier could reach with these boxes; the gap to the real figure is the ranking's, and
the gap from the ceiling to 1 is the boxes'. Duplicates are judged by the metric's own rule (the
FROC ignores a second hit on one cell, AP50 counts it as a false positive).

On MoNuSAC's validation tiles, for example, the boxes of a U-Net trained for 6 minutes reach a
class-agnostic FROC of 0.89 ranked perfectly and 0.10 ranked by its own score: the boxes are not the
limit there, the ranking is.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .froc import iop_matrix, iou_matrix

HIT_TESTS = {"iop": iop_matrix, "iou": iou_matrix}


class Truth(NamedTuple):
    """The annotations stacked over images (:func:`cytocore.froc.stack_ground_truth`)."""

    image: np.ndarray  # (G,) image index of each cell
    boxes: np.ndarray  # (G, 4) pixel xyxy
    labels: np.ndarray  # (G, K) multi-hot


def oracle_scores(pred_image: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray, truth: Truth,
                  hit: str = "iop", threshold: float = 0.5) -> np.ndarray:
    """``(P, K)`` scores that rank, per class, every box hitting a cell of that class first.

    A hit gets ``2 + own score``, a miss its own score clipped to [0, 1], so the system's order
    survives inside both groups (ties broken as the metric breaks them).
    """
    if hit not in HIT_TESTS:
        raise ValueError(f"hit test must be one of {', '.join(HIT_TESTS)}, not {hit!r}")
    boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(pred_scores, np.float64)
    # (P, K) as given: with no boxes at all, -1 could not tell how many classes there are
    own = np.clip(scores.reshape(len(boxes), scores.shape[-1] if scores.ndim == 2 else -1), 0.0, 1.0)
    gt_boxes = np.asarray(truth.boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(truth.labels).reshape(len(gt_boxes), own.shape[1]).astype(bool)
    pred_image, gt_image = np.asarray(pred_image).reshape(-1), np.asarray(truth.image).reshape(-1)
    hits = np.zeros(own.shape, bool)
    for image in np.intersect1d(pred_image, gt_image):
        rows, cells = np.flatnonzero(pred_image == image), np.flatnonzero(gt_image == image)
        overlaps = HIT_TESTS[hit](boxes[rows], gt_boxes[cells]) > threshold  # (rows, cells)
        hits[rows] = (overlaps[:, :, None] & labels[cells][None, :, :]).any(axis=1)
    return own + 2.0 * hits


def ceiling_metrics(pred_image: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray, truth: Truth,
                    class_names: Sequence[str], image_sizes: Sequence[tuple[int, int]]) -> dict:
    """Accuracy (mean FROC at IoP > 0.5) and AP50 per class of the perfectly ranked boxes."""
    from .coco_ap import ap50_per_class
    from .froc import per_class_froc

    n_images = len(image_sizes)
    by_iop = oracle_scores(pred_image, pred_boxes, pred_scores, truth, "iop")
    frocs = per_class_froc(pred_image, pred_boxes, by_iop, *truth, class_names, n_images)
    by_iou = oracle_scores(pred_image, pred_boxes, pred_scores, truth, "iou")
    ap50 = ap50_per_class(list(image_sizes), *truth, pred_image, pred_boxes, by_iou, list(class_names))
    return {"accuracy": frocs.accuracy, "froc": frocs.froc, "ap50": ap50}


__all__ = ["HIT_TESTS", "Truth", "oracle_scores", "ceiling_metrics"]
