"""Validation metrics of the crop classifier: per-class ROC AUC, average precision, balanced accuracy.

sklearn is not a dependency and the classification stage must not import ``experiments``, so the
few formulas needed are written here. They follow sklearn's definitions (AUC with ties counted as
one half, AP as the step-wise sum over distinct thresholds) so the numbers compare with published
ones. A metric that is undefined (a class with no positive or no negative crop in validation) is
NaN, never 0 or 1, and means over classes skip it, so a rare class missing from a small validation
split does not masquerade as a perfect or a useless score.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (midranks: a tie counts one half).

    NaN when only one class is present.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over distinct thresholds of (recall step) × precision. NaN without positives."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, np.float64).reshape(-1)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: a threshold admits a whole tie group at once.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(steps * precision))


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean of sensitivity and specificity of binary predictions; with one class present, its recall."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    p = np.asarray(predicted).reshape(-1).astype(bool)
    recalls = [float(np.mean(p[y])) if y.any() else None, float(np.mean(~p[~y])) if (~y).any() else None]
    defined = [r for r in recalls if r is not None]
    return float(np.mean(defined)) if defined else float("nan")


def multiclass_balanced_accuracy(true_index: np.ndarray, predicted_index: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall of arg-max predictions over the classes present (softmax head)."""
    t = np.asarray(true_index).reshape(-1)
    p = np.asarray(predicted_index).reshape(-1)
    recalls = [float(np.mean(p[t == k] == k)) for k in range(num_classes) if np.any(t == k)]
    return float(np.mean(recalls)) if recalls else float("nan")


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    head: str = "sigmoid",
    threshold: float = 0.5,
    prefix: str = "",
) -> dict[str, float]:
    """Per-class and summary metrics of ``(N, K)`` probabilities against ``(N, K)`` multi-hot labels.

    Keys: ``auc_<class>``, ``ap_<class>``, ``bacc_<class>`` (at ``threshold``), ``mean_auc``,
    ``mean_ap``, ``mean_bacc``; ``cancer_auc`` (is the crop any class at all, scored by the highest
    class probability) when the set holds all-zero negatives; with the softmax head also
    ``accuracy`` and ``balanced_accuracy`` of the arg-max class over the labelled crops.
    """
    y = np.asarray(labels, np.float32)
    p = np.asarray(probs, np.float32)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(class_names):
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must both be (N, {len(class_names)})")
    out: dict[str, float] = {}
    aucs, aps, baccs = [], [], []
    for k, name in enumerate(class_names):
        yk, pk = y[:, k] > 0.5, p[:, k]
        aucs.append(roc_auc(yk, pk))
        aps.append(average_precision(yk, pk))
        baccs.append(balanced_accuracy(yk, pk >= threshold) if yk.any() else float("nan"))
        out[f"auc_{name}"], out[f"ap_{name}"], out[f"bacc_{name}"] = aucs[-1], aps[-1], baccs[-1]
    out["mean_auc"], out["mean_ap"], out["mean_bacc"] = nanmean(aucs), nanmean(aps), nanmean(baccs)
    is_cancer = y.max(axis=1) > 0.5 if len(y) else np.zeros(0, bool)
    if len(y) and not is_cancer.all():
        out["cancer_auc"] = roc_auc(is_cancer, p.max(axis=1))
    if head == "softmax" and is_cancer.any():
        t, q = y[is_cancer].argmax(axis=1), p[is_cancer].argmax(axis=1)
        out["accuracy"] = float(np.mean(t == q))
        out["balanced_accuracy"] = multiclass_balanced_accuracy(t, q, len(class_names))
    return {f"{prefix}{k}": v for k, v in out.items()}


def format_metrics(metrics: dict[str, float], class_names: Optional[Sequence[str]] = None, prefix: str = "") -> str:
    """A small per-class table (AUC, AP, balanced accuracy) followed by the summary values, for logs."""
    names = list(class_names or [k[len(prefix) + 4:] for k in metrics if k.startswith(f"{prefix}auc_")])
    width = max([5] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  {'AUC':>6}  {'AP':>6}  {'BAcc':>6}"]
    for n in names:
        vals = [metrics.get(f"{prefix}{m}_{n}", float("nan")) for m in ("auc", "ap", "bacc")]
        lines.append(f"{n:<{width}}  " + "  ".join(f"{v:6.3f}" for v in vals))
    for key in ("mean_auc", "mean_ap", "mean_bacc", "cancer_auc", "accuracy", "balanced_accuracy"):
        if f"{prefix}{key}" in metrics:
            lines.append(f"{key}: {metrics[prefix + key]:.4f}")
    return "\n".join(lines)
