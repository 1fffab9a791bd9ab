"""Validation metrics for segmentation: Dice, IoU and the adapted Rand error of cell instances.

Dice and IoU are pooled over all validation pixels (sums of intersections and sizes over images),
because healthy images have no cell pixels and a per-image Dice on them is 0/0. A per-image mean
over images that have cells is reported too. The adapted Rand error (SNEMI3D, via scikit-image)
compares connected-component label maps, so it also sees touching cells that merge into one blob,
which Dice does not; background pixels of the ground truth are ignored, as the SNEMI3D definition
does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from skimage.measure import label as connected_components
from skimage.metrics import adapted_rand_error


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean maps; both empty counts as a perfect match (1, 1)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    inter = int(np.count_nonzero(p & t))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return 1.0, 1.0
    union = total - inter
    return 2.0 * inter / total, inter / union


def instance_labels(binary: np.ndarray) -> np.ndarray:
    """Connected components (8-connectivity) of a boolean map as an int label map, 0 = background."""
    return connected_components(np.asarray(binary, bool), connectivity=2)


def rand_error(target_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Adapted Rand error (0 = perfect) of two label maps; NaN when the target has no object."""
    t = np.asarray(target_labels)
    if not np.any(t):
        return float("nan")
    are, _, _ = adapted_rand_error(t.astype(np.int64), np.asarray(pred_labels).astype(np.int64))
    return float(are)


@dataclass
class SegScores:
    """Accumulates predictions and targets image by image; :meth:`summary` gives the metrics.

    ``num_classes`` is 0 for binary maps (0/1), else the number of foreground classes of a class-index
    map (0 = background, k + 1 = class k). ``with_rand`` adds the adapted Rand error of foreground
    components (cost grows with cell count; cheap at validation sizes).
    """

    num_classes: int = 0
    class_names: Optional[Sequence[str]] = None
    with_rand: bool = True
    _inter: np.ndarray = field(init=False)
    _pred: np.ndarray = field(init=False)
    _true: np.ndarray = field(init=False)
    _fg: np.ndarray = field(init=False)
    _image_dice: list = field(init=False, default_factory=list)
    _rand: list = field(init=False, default_factory=list)
    images: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n = max(1, self.num_classes)
        self._inter = np.zeros(n, np.int64)
        self._pred = np.zeros(n, np.int64)
        self._true = np.zeros(n, np.int64)
        self._fg = np.zeros(3, np.int64)  # foreground (any class) intersection, predicted, true

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        """One image: ``pred`` and ``target`` are same-shape binary or class-index maps."""
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
        if self.num_classes:
            pairs = [(pred == k, target == k) for k in range(1, self.num_classes + 1)]
        else:
            pairs = [(pred > 0, target > 0)]
        for i, (p, t) in enumerate(pairs):
            self._inter[i] += np.count_nonzero(p & t)
            self._pred[i] += np.count_nonzero(p)
            self._true[i] += np.count_nonzero(t)
        fg_pred, fg_true = pred > 0, target > 0
        self._fg += (np.count_nonzero(fg_pred & fg_true), np.count_nonzero(fg_pred), np.count_nonzero(fg_true))
        if fg_true.any():
            self._image_dice.append(dice_iou(fg_pred, fg_true)[0])
            if self.with_rand:
                self._rand.append(rand_error(instance_labels(fg_true), instance_labels(fg_pred)))
        self.images += 1

    def class_dice(self) -> np.ndarray:
        """Pooled Dice per class (NaN for a class absent from both prediction and target)."""
        total = self._pred + self._true
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, 2.0 * self._inter / np.maximum(total, 1), np.nan)

    def summary(self, prefix: str = "val_") -> dict[str, float]:
        """``dice`` (pooled; for class maps the mean over classes with ground truth), ``iou``,
        ``dice_image`` (mean over images with cells), ``rand_error`` and, for class maps, ``fg_dice``
        and ``dice_<class>``."""
        inter, pred, true = self._inter, self._pred, self._true
        union = pred + true - inter
        out: dict[str, float] = {}
        if self.num_classes:
            dice = self.class_dice()
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
            present = true > 0
            out["dice"] = float(np.mean(dice[present])) if present.any() else float("nan")
            out["iou"] = float(np.mean(iou[present])) if present.any() else float("nan")
            names = list(self.class_names or [str(k) for k in range(self.num_classes)])
            fg_total = int(self._fg[1] + self._fg[2])
            out["fg_dice"] = 2.0 * self._fg[0] / fg_total if fg_total else 1.0
            for name, value in zip(names, dice):
                out[f"dice_{name}"] = float(value)
        else:
            total = int(pred[0] + true[0])
            out["dice"] = 2.0 * inter[0] / total if total else 1.0
            out["iou"] = inter[0] / union[0] if union[0] else 1.0
        out["dice_image"] = float(np.mean(self._image_dice)) if self._image_dice else float("nan")
        if self.with_rand:
            values = [v for v in self._rand if np.isfinite(v)]
            out["rand_error"] = float(np.mean(values)) if values else float("nan")
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

