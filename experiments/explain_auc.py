"""Explainability score: pixel ROC AUC of the saliency map against the cell mask.

The organisers compute ``sklearn.metrics.roc_auc_score(mask > 0, saliency)`` per image. sklearn is
not a dependency, so the AUC is computed here as the Mann-Whitney statistic with ties counted as
one half — the exact value sklearn's trapezoidal ROC area gives, ties included. Saliency PNGs are
8-bit, so a 256-bin histogram per mask value is an exact and O(pixels) way to get it, with no sort
of millions of pixels; integer arithmetic keeps it exact even when pooled over a whole data set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
from scipy.stats import rankdata

LEVELS = 256


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of any real scores (ties → 1/2), as sklearn's ``roc_auc_score`` for binary labels.

    Raises ``ValueError`` when only one class is present, as sklearn does.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC is undefined when only one class is present")
    ranks = rankdata(s, method="average")  # midranks: a tie between a positive and a negative counts 1/2
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def level_histograms(mask: np.ndarray, saliency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positive, negative)`` pixel counts at each of the 256 saliency levels (positive = mask > 0)."""
    mask = np.asarray(mask)
    saliency = np.asarray(saliency)
    if mask.shape != saliency.shape:
        raise ValueError(f"mask {mask.shape} and saliency {saliency.shape} differ in shape")
    if saliency.dtype != np.uint8:
        raise ValueError(f"saliency must be uint8, not {saliency.dtype}")
    s = saliency.reshape(-1)
    pos = mask.reshape(-1) > 0
    # One bincount over (label, level) pairs instead of two passes with boolean indexing.
    both = np.bincount(s.astype(np.int64) + LEVELS * pos, minlength=2 * LEVELS)
    return both[LEVELS:].astype(np.int64), both[:LEVELS].astype(np.int64)


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Exact AUC from per-level counts: P(s_pos > s_neg) + ½ P(s_pos = s_neg).

    Computed in Python integers: pooled over many large images the pair count passes 2**63.
    """
    pos_l = [int(v) for v in np.asarray(pos).reshape(-1)]
    neg_l = [int(v) for v in np.asarray(neg).reshape(-1)]
    n_pos, n_neg = sum(pos_l), sum(neg_l)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC is undefined when only one class is present")
    twice_u = 0
    neg_below = 0
    for p, q in zip(pos_l, neg_l):
        twice_u += p * (2 * neg_below + q)
        neg_below += q
    return twice_u / (2 * n_pos * n_neg)


def roc_auc_uint8(mask: np.ndarray, saliency: np.ndarray) -> float:
    """AUC of an 8-bit saliency map against ``mask > 0`` via histograms (exact, linear time)."""
    return auc_from_histograms(*level_histograms(mask, saliency))


@dataclass
class ExplainResult:
    """The explainability score and which images fed it."""

    auc: Optional[float]
    mode: str  # "per_image" or "pooled"
    n_used: int = 0  # images whose pixels entered the score
    per_image: dict[str, float] = field(default_factory=dict)  # AUC of each image with both mask values
    single_valued: list[str] = field(default_factory=list)  # images whose mask has one value only

    def to_dict(self) -> dict:
        return {
            "auc": self.auc,
            "mode": self.mode,
            "n_images_used": self.n_used,
            "n_single_valued_mask": len(self.single_valued),
            "single_valued_mask": list(self.single_valued),
            "per_image": dict(self.per_image),
        }


def explainability_auc(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], pooled: bool = False) -> ExplainResult:
    """Mean per-image AUC of ``(image_id, mask, saliency)`` triples, or one AUC over all their pixels.

    Per image (the official score), an image whose mask has a single value has no AUC and is
    skipped. Pooled, every pixel counts, those images' too: a healthy image's saliency hot spots
    are false alarms that the pooled score is there to see. Either way an image with no usable
    pixel pair makes the score ``None``.
    """
    # Pixel counts per level fit int64 for any data set; only their products need Python ints.
    pos_total = np.zeros(LEVELS, np.int64)
    neg_total = np.zeros(LEVELS, np.int64)
    per_image: dict[str, float] = {}
    single: list[str] = []
    n_used = 0
    for image_id, mask, saliency in pairs:
        pos, neg = level_histograms(mask, saliency)
        if pos.sum() == 0 or neg.sum() == 0:
            single.append(image_id)
        else:
            per_image[image_id] = auc_from_histograms(pos, neg)
        if pooled or image_id in per_image:
            pos_total += pos
            neg_total += neg
            n_used += 1
    mode = "pooled" if pooled else "per_image"
    if pooled:
        if pos_total.sum() == 0 or neg_total.sum() == 0:
            return ExplainResult(None, mode, n_used, per_image, single)
        return ExplainResult(auc_from_histograms(pos_total, neg_total), mode, n_used, per_image, single)
    if not per_image:
        return ExplainResult(None, mode, 0, per_image, single)
    return ExplainResult(float(np.mean(list(per_image.values()))), mode, n_used, per_image, single)
