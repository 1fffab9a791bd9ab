"""What prediction needs to know about a segmentation model, whatever form it is given in.

A :class:`~segmentation.segmenter.Segmenter` (either backend), a MindSpore ``Cell`` or a NumPy
callable all become one :class:`ModelInfo`: the network function (NCHW float32 → NCHW logits), its
scale, input multiple, class names, validated threshold and instance-head channels. Kept apart from
:mod:`segmentation.predict` (which uses it) so :mod:`segmentation.segmenter` can use it too without
the two importing each other.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from cytocore.errors import CytoFuseError

NetworkFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class ModelInfo:
    """What prediction needs to know about a model, whatever form it was given in."""

    fn: NetworkFn
    scale: float = 1.0
    multiple: Optional[int] = None  # tile sides must be multiples of this (None: unknown)
    class_names: Optional[list[str]] = None
    threshold: Optional[float] = None  # the checkpoint's validated foreground threshold
    meta: Optional[dict] = None
    instance_channels: int = 0  # trailing output channels that are the instance head (sigmoid)


def _mindspore_cell_fn(cell: Any) -> NetworkFn:
    import mindspore as ms

    cell.set_train(False)

    def run(batch: np.ndarray) -> np.ndarray:
        out = cell(ms.Tensor(batch))
        if isinstance(out, (tuple, list)):  # deep supervision heads: the first is the full-resolution one
            out = out[0]
        return out.asnumpy()

    return run


def _is_mindspore_cell(obj: Any) -> bool:
    ms = sys.modules.get("mindspore")
    return ms is not None and isinstance(obj, ms.nn.Cell)


def _multiple_of(network: Any, meta: Optional[dict]) -> Optional[int]:
    """The U-Net's input-size multiple, from the network itself or its checkpoint metadata."""
    multiple = getattr(network, "multiple", None)
    if isinstance(multiple, (int, np.integer)) and multiple > 1:
        return int(multiple)
    meta = meta if isinstance(meta, dict) else {}
    model_meta = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    depth = meta.get("depth") or model_meta.get("depth")
    return 2 ** (int(depth) - 1) if depth else None


def instance_channels_of(network: Any, meta: Optional[dict] = None) -> int:
    """How many trailing output channels are the instance head: the network's attribute, else the
    checkpoint's model block (older checkpoints have none: 0)."""
    n = getattr(network, "instance_channels", None)
    if isinstance(n, (int, np.integer)):
        return int(n)
    model_meta = (meta or {}).get("model") if isinstance(meta, dict) else None
    return int((model_meta or {}).get("instance_channels") or 0) if isinstance(model_meta, dict) else 0


def model_info(model: Any) -> ModelInfo:
    """Accept a Segmenter, a MindSpore Cell, or a NumPy callable (NCHW float32 → NCHW logits)."""
    if hasattr(model, "network") and not callable(getattr(model, "construct", None)):
        network = model.network
        meta = getattr(model, "meta", None)
        names = getattr(model, "class_names", None)
        threshold = getattr(model, "threshold", None)
        return ModelInfo(
            fn=model_info(network).fn,
            scale=float(getattr(model, "scale", 1.0) or 1.0),
            multiple=_multiple_of(model, None) or _multiple_of(network, meta),
            class_names=list(names) if names is not None else None,
            threshold=float(threshold) if threshold is not None else None,
            meta=meta if isinstance(meta, dict) else None,
            instance_channels=instance_channels_of(network, meta if isinstance(meta, dict) else None),
        )
    if _is_mindspore_cell(model):
        return ModelInfo(fn=_mindspore_cell_fn(model), multiple=_multiple_of(model, None),
                         instance_channels=instance_channels_of(model))
    if callable(model):
        return ModelInfo(fn=lambda batch: np.asarray(model(batch), dtype=np.float32))
    raise CytoFuseError(f"cannot predict with a {type(model).__name__}: give a Segmenter, a MindSpore Cell or a callable")
