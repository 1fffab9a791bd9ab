"""Segmentation losses: BCE + soft Dice (binary) and cross-entropy + soft Dice (per-class maps).

Cells cover a few percent of a cytology image, so a pixel loss alone learns "all background";
the soft Dice term scores the overlap of the cell region directly and is insensitive to that
imbalance, while the pixel loss keeps gradients well-behaved early on. Dice is computed over the
whole batch (not per patch) so patches without any cell do not produce a 0/0 term.

The instance head (extra output channels after the semantic ones) is trained by
:class:`WithInstanceHead`: binary cross-entropy against its soft [0, 1] target (StarDist trains its
object probability the same way), added to the semantic loss with weight ``loss.instance_weight``.

All are ``nn.Cell``s that run inside the train loop's compiled step: MindSpore ops only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as ops
import numpy as np

from cytocore.errors import CytoFuseError


class BCEDiceLoss(nn.Cell):
    """``bce_weight * BCE(logits, target) + dice_weight * (1 - softDice)`` for ``(N, 1, H, W)`` float targets."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0, pos_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.pos_weight = ms.Tensor(np.array([pos_weight], np.float32))
        self.weight = ms.Tensor(np.array([1.0], np.float32))

    def construct(self, logits, target):
        bce = ops.binary_cross_entropy_with_logits(logits, target, self.weight, self.pos_weight)
        prob = ops.sigmoid(logits)
        inter = ops.sum(prob * target)
        denom = ops.sum(prob) + ops.sum(target)
        dice = (2.0 * inter + self.smooth) / (denom + self.smooth)
        return self.bce_weight * bce + self.dice_weight * (1.0 - dice)


class CEDiceLoss(nn.Cell):
    """Cross-entropy + mean soft Dice over the foreground classes, for ``(N, H, W)`` int32 class maps.

    ``class_weights`` (length C, background first) rescale the cross-entropy per target class, for
    rare classes that the patch sampler's oversampling alone does not rescue.
    """

    def __init__(
        self,
        num_channels: int,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        class_weights: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError("CEDiceLoss needs at least 2 channels (background + one class)")
        w = np.ones(num_channels, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
        if w.shape != (num_channels,):
            raise ValueError(f"class_weights needs {num_channels} values (background first), got {len(w)}")
        self.num_channels = num_channels
        self.class_weights = ms.Tensor(w.reshape(1, num_channels, 1, 1))
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        self.on = ms.Tensor(1.0, ms.float32)
        self.off = ms.Tensor(0.0, ms.float32)

    def construct(self, logits, target):
        onehot = ops.one_hot(target, self.num_channels, self.on, self.off, -1)  # N,H,W,C
        onehot = ops.transpose(onehot, (0, 3, 1, 2))
        logp = ops.log_softmax(logits, 1)
        weighted = onehot * self.class_weights
        ce = -ops.sum(weighted * logp) / ops.sum(weighted)
        prob = ops.exp(logp)
        inter = ops.sum(prob * onehot, (0, 2, 3))
        denom = ops.sum(prob, (0, 2, 3)) + ops.sum(onehot, (0, 2, 3))
        dice = (2.0 * inter + self.smooth) / (denom + self.smooth)
        return self.ce_weight * ce + self.dice_weight * (1.0 - ops.mean(dice[1:]))


class WithInstanceHead(nn.Cell):
    """Semantic loss on the first ``semantic`` channels + ``weight`` × BCE of the instance head channels.

    Targets are ``(N, 1 + H, P, P)`` float32: channel 0 is the semantic target (0/1, or the class
    index for ``classes`` mode, cast back to int32 here), the rest the head targets in [0, 1].
    """

    def __init__(self, semantic_loss: nn.Cell, semantic: int, classes: bool, weight: float = 1.0) -> None:
        super().__init__()
        self.semantic_loss = semantic_loss
        self.semantic = int(semantic)
        self.classes = bool(classes)
        self.weight = float(weight)
        self.one = ms.Tensor(np.array([1.0], np.float32))

    def construct(self, logits, target):
        sem_logits = logits[:, : self.semantic]
        head_logits = logits[:, self.semantic :]
        if self.classes:
            sem = self.semantic_loss(sem_logits, ops.cast(target[:, 0], ms.int32))
        else:
            sem = self.semantic_loss(sem_logits, target[:, :1])
        head = ops.binary_cross_entropy_with_logits(head_logits, target[:, 1:], self.one, self.one)
        return sem + self.weight * head


def make_loss(mode: str, out_channels: int, loss_cfg: dict, class_weights: Optional[Sequence[float]] = None,
              instance_channels: int = 0) -> nn.Cell:
    """The loss for a ``binary`` (1 channel) or ``classes`` (K+1 channels) model from the ``loss:`` block,
    wrapped by :class:`WithInstanceHead` when the model has instance channels."""
    base = _semantic_loss(mode, out_channels, loss_cfg, class_weights)
    if instance_channels:
        return WithInstanceHead(base, out_channels, mode == "classes", float((loss_cfg or {}).get("instance_weight", 1.0)))
    return base


def _semantic_loss(mode: str, out_channels: int, loss_cfg: dict, class_weights: Optional[Sequence[float]]) -> nn.Cell:
    cfg = dict(loss_cfg or {})
    try:
        if mode == "binary":
            return BCEDiceLoss(
                bce_weight=cfg.get("pixel_weight", 1.0), dice_weight=cfg.get("dice_weight", 1.0),
                smooth=cfg.get("smooth", 1.0), pos_weight=cfg.get("pos_weight", 1.0),
            )
        if mode == "classes":
            return CEDiceLoss(
                out_channels, ce_weight=cfg.get("pixel_weight", 1.0), dice_weight=cfg.get("dice_weight", 1.0),
                smooth=cfg.get("smooth", 1.0), class_weights=class_weights,
            )
    except ValueError as exc:
        raise CytoFuseError(f"loss: {exc}") from None
    raise CytoFuseError(f"targets.mode must be binary or classes, got {mode!r}")


def class_weights_from_counts(pixel_counts: np.ndarray, power: float = 0.5, clip: tuple[float, float] = (0.1, 10.0)) -> list[float]:
    """Median-frequency balancing, softened by ``power``: classes rarer than the median weigh more.

    Classes with no pixel at all get weight 1 (they cannot contribute to the loss anyway).
    """
    counts = np.asarray(pixel_counts, np.float64)
    present = counts > 0
    if not present.any():
        return [1.0] * len(counts)
    freq = counts / counts.sum()
    median = np.median(freq[present])
    w = np.ones_like(freq)
    w[present] = (median / freq[present]) ** power
    return [float(v) for v in np.clip(w, *clip)]
