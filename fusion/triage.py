"""A calibrated image-level malignancy score: does this image hold any cancer cell at all?

The highest detection score alone is a poor triage score: one benign look-alike the classifier is
sure about makes a healthy image look malignant. An image with cancer usually shows it in several
cells, so the score here is a small logistic regression on three image features of the fused
detections — the highest class score, the mean of the ``k`` highest, and how many detections are
confident — fitted by ``cytofuse fuse fit`` on the validation images only (image has an annotated
cell → 1). Its output is a probability, so a threshold means the same on every data set it was
fitted for; without a fitted model the highest detection score is used, as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .rules import fit_logistic, logit, sigmoid

TRIAGE_FEATURES: tuple[str, ...] = ("logit_top_score", "logit_mean_top_k", "log1p_n_confident")


def triage_features(scores: np.ndarray, k: int = 5, confident: float = 0.5) -> np.ndarray:
    """``(3,)`` image features from its detections' ``(N, K)`` fused class scores (any N, also 0)."""
    s = np.asarray(scores, np.float64)
    best = s.max(axis=1) if s.ndim == 2 and s.size else np.zeros(0)
    top = -np.sort(-best)[: max(1, int(k))]
    top_score = float(top[0]) if len(top) else 0.0
    mean_top = float(top.mean()) if len(top) else 0.0
    return np.array([logit(top_score), logit(mean_top), np.log1p(float((best >= confident).sum()))])


@dataclass
class TriageModel:
    """Fitted coefficients over :data:`TRIAGE_FEATURES` (stored as ``triage`` in ``fusion.json``)."""

    coef: Sequence[float]
    intercept: float
    k: int = 5
    confident: float = 0.5

    def score(self, scores: np.ndarray) -> float:
        """Probability that the image holds cancer, from its detections' fused class scores."""
        x = triage_features(scores, self.k, self.confident)
        return float(sigmoid(x @ np.asarray(self.coef, np.float64) + float(self.intercept)))

    def to_dict(self) -> dict:
        return {"features": list(TRIAGE_FEATURES), "coef": [float(c) for c in self.coef], "intercept": float(self.intercept),
                "k": int(self.k), "confident": float(self.confident)}

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Optional["TriageModel"]:
        if not d:
            return None
        coef = list(d.get("coef") or [])
        if len(coef) != len(TRIAGE_FEATURES):
            raise ValueError(f"triage model needs {len(TRIAGE_FEATURES)} coefficients ({', '.join(TRIAGE_FEATURES)}), got {len(coef)}")
        return cls(coef=[float(c) for c in coef], intercept=float(d.get("intercept", 0.0)), k=int(d.get("k", 5)),
                   confident=float(d.get("confident", 0.5)))


def fit_triage(image_scores: Sequence[np.ndarray], has_cancer: Sequence[bool], k: int = 5, confident: float = 0.5,
               l2: float = 1e-2) -> Optional[TriageModel]:
    """Fit on validation images (each its ``(N, K)`` fused detection scores); None when every image is
    of one kind (nothing to calibrate against)."""
    y = np.asarray(has_cancer, bool)
    if y.all() or not y.any():
        return None
    x = np.stack([triage_features(s, k, confident) for s in image_scores])
    coef, intercept = fit_logistic(x, y.astype(np.float64), l2=l2)
    return TriageModel(coef.tolist(), intercept, k, confident)


__all__ = ["TRIAGE_FEATURES", "TriageModel", "triage_features", "fit_triage"]
