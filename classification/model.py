"""The crop classifier network: a mindcv backbone (EfficientNet-B0 by default) with one logit per class.

The network is mindcv's model itself, not wrapped in another cell, so its parameter names are
mindcv's (``features.0.weight`` ... ``mlp_head.weight``) and a user's downloaded mindcv ImageNet
checkpoint loads into it by name. The head type lives outside the network: ``sigmoid`` (one
independent probability per class, trained with binary cross-entropy on multi-hot labels — the
challenge's SCC and AC boxes are NSCLC too) or ``softmax`` (classes that exclude each other, as in
LC25000 or BCCD). Both heads produce the same logits; only the loss and the probabilities differ.

Two mindcv 0.3.0 quirks are handled here: ``create_model("efficientnet_b0", drop_rate=...)`` fails
(EfficientNet hard-codes its dropout and calls its drop-path rate ``drop_path_prob``), and only the
EfficientNet-B family takes width/depth multipliers. Dropout before the classifier is therefore set
after construction, uniformly for every supported model.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from cytocore.errors import CytoFuseError

log = logging.getLogger("cytofuse")

HEADS = ("sigmoid", "softmax")

#: (width, depth) multipliers of mindcv's EfficientNet-B family, from mindcv.models.efficientnet.
EFFICIENTNET_B_SCALING = {
    "efficientnet_b0": (1.0, 1.0), "efficientnet_b1": (1.0, 1.1), "efficientnet_b2": (1.1, 1.2),
    "efficientnet_b3": (1.2, 1.4), "efficientnet_b4": (1.4, 1.8), "efficientnet_b5": (1.6, 2.2),
    "efficientnet_b6": (1.8, 2.6), "efficientnet_b7": (2.0, 3.1),
}

#: Families whose classifier runs on the last feature map of ``net.features`` (Grad-CAM needs the split).
CAM_FAMILIES = ("EfficientNet", "MobileNetV3", "MobileNetV2", "MnasNet")

#: Smaller mindcv models for a 2-core CPU (train crops/s from experiments/benchmarks/cls_speed.py).
SMALL_MODELS = ("mobilenet_v3_small_100", "mobilenet_v3_small_075", "mobilenet_v2_050_96", "mnasnet_050")


@dataclass
class ModelConfig:
    """The ``model:`` block of the config; stored in every checkpoint so it can be rebuilt."""

    name: str = "efficientnet_b0"
    head: str = "sigmoid"  # sigmoid (multi-label, BCE) | softmax (one class per crop)
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.1  # stochastic depth (EfficientNet only)
    width_mult: float = 1.0  # EfficientNet-B only: channels × this (0.5 builds a much smaller network)
    depth_mult: float = 1.0  # EfficientNet-B only: blocks per stage × this

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise CytoFuseError(f"model.head must be one of {', '.join(HEADS)}, not {self.head!r}")
        if not 0 <= self.drop_rate < 1 or not 0 <= self.drop_path_rate < 1:
            raise CytoFuseError("model.drop_rate and model.drop_path_rate must be in [0, 1)")
        if self.width_mult <= 0 or self.depth_mult <= 0:
            raise CytoFuseError("model.width_mult and model.depth_mult must be positive")
        scaled = (self.width_mult, self.depth_mult) != (1.0, 1.0)
        if scaled and self.name not in EFFICIENTNET_B_SCALING:
            raise CytoFuseError(f"model.width_mult/depth_mult apply to efficientnet_b0..b7 only, not {self.name!r}")

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ModelConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CytoFuseError(f"unknown model option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def build_network(cfg: ModelConfig, num_classes: int) -> Any:
    """Create the mindcv network (random weights; call ``runtime.setup(seed=...)`` first)."""
    import mindcv.models as mcv

    if num_classes < 1:
        raise CytoFuseError("the classifier needs at least one class")
    if not mcv.is_model(cfg.name):
        raise CytoFuseError(
            f"unknown mindcv model {cfg.name!r}; e.g. efficientnet_b0 (default) or, smaller and faster on "
            f"a CPU, {', '.join(SMALL_MODELS)}"
        )
    if cfg.name in EFFICIENTNET_B_SCALING:
        from mindcv.models.efficientnet import EfficientNet

        width, depth = EFFICIENTNET_B_SCALING[cfg.name]
        net = EfficientNet(
            arch=cfg.name, dropout_rate=cfg.drop_rate, width_mult=width * cfg.width_mult,
            depth_mult=depth * cfg.depth_mult, num_classes=num_classes, drop_path_prob=cfg.drop_path_rate,
        )
    elif cfg.name.startswith("efficientnet"):
        net = mcv.create_model(cfg.name, num_classes=num_classes, pretrained=False, drop_path_prob=cfg.drop_path_rate)
    else:
        if cfg.drop_path_rate > 0:
            log.info("model %s has no stochastic depth; model.drop_path_rate is ignored", cfg.name)
        net = mcv.create_model(cfg.name, num_classes=num_classes, pretrained=False)
    set_classifier_dropout(net, cfg.drop_rate)
    return net


def set_classifier_dropout(net: Any, rate: float) -> int:
    """Replace the dropout cells before the classifier (all but those inside DropPath) by ones of ``rate``.

    A rate of 0 puts an identity there, so training is deterministic (the resume test relies on it).
    Returns the number of cells replaced.
    """
    import mindspore.nn as nn
    from mindcv.models.layers.compatibility import Dropout
    from mindcv.models.layers.drop_path import DropPath

    replaced = 0
    for _, parent in list(net.cells_and_names()):
        if isinstance(parent, DropPath):  # stochastic depth draws its mask with a dropout: not ours to change
            continue
        for child_name, child in list(parent.name_cells().items()):
            if not isinstance(child, nn.Dropout):
                continue
            new = Dropout(p=rate) if rate > 0 else nn.Identity()
            if isinstance(parent, nn.SequentialCell):
                parent[list(parent.name_cells()).index(child_name)] = new
            else:
                setattr(parent, child_name, new)
            replaced += 1
    return replaced


def count_parameters(net: Any) -> int:
    return int(sum(int(np.prod(p.shape)) for p in net.get_parameters()))


# ------------------------------------------------------------------------------------------ losses


def make_loss(head: str, pos_weight: Optional[Sequence[float]] = None, label_smoothing: float = 0.0) -> Any:
    """The training loss cell of a head (runs inside the compiled train step).

    ``label_smoothing`` e moves targets towards uniform: ``(1-e)·y + e/K`` for the softmax head,
    ``(1-e)·y + e/2`` for the sigmoid head; on a few hundred training tiles it keeps the network
    from becoming over-confident on what it has memorised.
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise CytoFuseError(f"loss.label_smoothing must be in [0, 1), not {label_smoothing}")
    bce, softmax_ce = _loss_cells()
    if head == "softmax":
        return softmax_ce(float(label_smoothing))
    return bce(pos_weight, float(label_smoothing))


@functools.lru_cache(maxsize=None)
def _loss_cells() -> tuple[type, type]:
    """The loss cell classes, defined on first use: MindSpore is imported only after ``runtime.setup``."""
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops

    class MultiLabelBCE(nn.Cell):
        """Mean binary cross-entropy over classes and crops; ``pos_weight`` up-weights rare positives."""

        def __init__(self, pos_weight: Optional[Sequence[float]] = None, smoothing: float = 0.0) -> None:
            super().__init__()
            self.use_pos_weight = pos_weight is not None
            self.pos_weight = ms.Tensor(np.asarray(pos_weight if pos_weight is not None else [1.0], np.float32))
            self.smoothing = float(smoothing)

        def construct(self, logits, labels):
            ones = ops.ones_like(logits)
            labels = labels * (1.0 - self.smoothing) + 0.5 * self.smoothing
            if self.use_pos_weight:
                return ops.binary_cross_entropy_with_logits(logits, labels, ones, self.pos_weight * ones)
            return ops.binary_cross_entropy_with_logits(logits, labels, ones, ones)

    class SoftmaxCrossEntropy(nn.Cell):
        """Cross-entropy against one-hot (or soft) label rows, optionally smoothed towards uniform."""

        def __init__(self, smoothing: float = 0.0) -> None:
            super().__init__()
            self.smoothing = float(smoothing)

        def construct(self, logits, labels):
            k = logits.shape[1]
            labels = labels * (1.0 - self.smoothing) + self.smoothing / k
            return -(labels * ops.log_softmax(logits, 1)).sum(1).mean()

    return MultiLabelBCE, SoftmaxCrossEntropy


def probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    """Logits → class probabilities (independent sigmoids, or a softmax over classes)."""
    z = np.asarray(logits, np.float64)
    if head == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # overflow-free sigmoid


# ------------------------------------------------------------------------------ Grad-CAM split


def cam_split(net: Any, stride: Optional[int] = None) -> tuple[tuple, Callable[[Any], Any], int]:
    """Split the network at a feature map: ``(cells before it, map → logits, its stride)``.

    ``stride`` None is the last feature map (stride 32: 3×3 cells on a 96-pixel crop); 16 or 8 use
    an earlier, finer map, which localises better for pseudo-masks at some cost in class specificity.
    The cells are returned as a tuple, never re-parented into a new cell, which would rename the
    network's parameters.
    """
    family = type(net).__name__
    if family not in CAM_FAMILIES or not hasattr(net, "features"):
        raise CytoFuseError(f"Grad-CAM supports the mindcv families {', '.join(CAM_FAMILIES)}, not {family}")
    cells = tuple(net.features[i] for i in range(len(net.features)))
    info = list(getattr(net, "feature_info", []))
    split, reduction = len(cells), max([f["reduction"] for f in info] or [32])
    if stride is not None:
        fitting = [f for f in info if f["reduction"] <= stride]
        if not fitting:
            raise CytoFuseError(f"no feature map with stride <= {stride} in {family}")
        split = int(fitting[-1]["name"].rsplit(".", 1)[1]) + 1
        reduction = int(fitting[-1]["reduction"])
    prefix, suffix = cells[:split], cells[split:]

    if family == "EfficientNet":
        def classify(fm):
            return net.mlp_head(net.avgpool(fm))
    else:
        def classify(fm):
            return net.forward_head(fm)

    def head_from_map(fm):
        for cell in suffix:
            fm = cell(fm)
        return classify(fm)

    return prefix, head_from_map, reduction
