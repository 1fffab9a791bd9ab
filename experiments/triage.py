"""Image-level triage: does an image contain cancer at all?

One third of the challenge's images are healthy. A screening user first wants the slides that need a
pathologist's eyes, so each system's per-image malignancy score (the highest fused detection score)
is judged as a classifier of healthy vs cancer images: ROC AUC, and the sensitivity reached while
keeping 95% of healthy images correctly cleared.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .explain_auc import roc_auc


def sensitivity_at_specificity(labels: np.ndarray, scores: np.ndarray, specificity: float = 0.95) -> Optional[float]:
    """Highest sensitivity over thresholds whose specificity is at least ``specificity``.

    A threshold t calls an image cancer when score >= t; the healthy images above t are the false
    alarms. Returns None when either class is missing.
    """
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    if y.all() or not y.any():
        return None
    best = 0.0
    for t in np.unique(np.concatenate([s, [np.inf]])):
        called = s >= t
        spec = float((~called & ~y).sum() / (~y).sum())
        if spec >= specificity:
            best = max(best, float((called & y).sum() / y.sum()))
    return best


def triage_metrics(truth: Mapping[str, bool], scores: Mapping[str, float], specificity: float = 0.95) -> dict:
    """AUC and sensitivity at ``specificity`` for image-level cancer calls.

    ``truth`` maps every evaluated image id to True when it holds at least one cancer box; an image
    missing from ``scores`` (no detections) scores 0.
    """
    ids = sorted(truth)
    y = np.array([bool(truth[i]) for i in ids])
    s = np.array([float(scores.get(i, 0.0)) for i in ids])
    auc = roc_auc(y, s) if 0 < y.sum() < len(y) else None
    return {
        "n_images": len(ids),
        "n_cancer": int(y.sum()),
        "n_healthy": int((~y).sum()),
        "roc_auc": auc,
        f"sensitivity_at_{int(round(specificity * 100))}_specificity": sensitivity_at_specificity(y, s, specificity),
    }
