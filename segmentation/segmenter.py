"""What a segmentation checkpoint describes: the :class:`Segmenter` both backends' loaders build.

A checkpoint written by ``cytofuse seg train`` carries its own description in its metadata
(``stage``, the full ``model`` block, ``mode``, ``class_names``, ``scale``, the training config), so
prediction needs nothing but the file: the network is rebuilt from that block, not from whatever the
current defaults are. The MindSpore loader (:mod:`segmentation.model_io`) and the ONNX Runtime one
(:mod:`segmentation.export`) both build on this module, which is why it imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from cytocore.errors import CheckpointError, CytoFuseError

from .network import instance_channels_of, model_info

PathLike = Union[str, Path]
STAGE = "segmentation"


@dataclass
class Segmenter:
    """A U-Net in eval mode plus what its checkpoint says about it.

    ``scale``: resize images by this before the network (and the output back after it);
    ``out_channels``: 1 for the binary cancer-cell map, K+1 for per-class maps (``mode`` "classes");
    ``multiple``: input sides must be multiples of it.
    """

    network: Any
    meta: dict
    scale: float
    out_channels: int
    class_names: list[str]
    mode: str = "binary"
    multiple: int = 1
    path: Optional[Path] = None
    threshold: float = 0.5

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 (normalised by ``to_network_input``) → NCHW logits as NumPy (either backend)."""
        n, _, h, w = batch.shape
        if h % self.multiple or w % self.multiple:
            raise CytoFuseError(f"input tiles are {h}x{w} but this U-Net needs multiples of {self.multiple}")
        return model_info(self.network).fn(np.ascontiguousarray(batch, np.float32))

    @property
    def instance_channels(self) -> int:
        """Trailing output channels that are the instance head (0 for models without one); from the
        network, or the checkpoint's model block when the network is an ONNX Runtime session."""
        return instance_channels_of(self.network, self.meta)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Sigmoid (binary) or softmax over channels (classes) of :meth:`logits`; the instance-head
        channels (after them) by sigmoid."""
        logits = self.logits(batch)
        sem, head = logits[:, : self.out_channels], logits[:, self.out_channels:]
        if self.out_channels == 1:
            sem = 1.0 / (1.0 + np.exp(-sem))
        else:
            e = np.exp(sem - sem.max(axis=1, keepdims=True))
            sem = e / e.sum(axis=1, keepdims=True)
        return np.concatenate([sem, 1.0 / (1.0 + np.exp(-head))], axis=1) if head.shape[1] else sem


def segmenter_from_meta(meta: dict, path: PathLike = "<checkpoint>") -> tuple[Any, dict]:
    """Build the (untrained) network a checkpoint's metadata describes; errors name ``path``."""
    from .unet import create_unet

    if not isinstance(meta, dict) or meta.get("stage") != STAGE:
        got = meta.get("stage") if isinstance(meta, dict) and meta.get("stage") else "no stage recorded"
        raise CheckpointError(f"{path}: not a segmentation checkpoint ({got}); train one with `cytofuse seg train`")
    model_cfg = meta.get("model")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{path}: segmentation checkpoint without a model description")
    try:
        network = create_unet(**model_cfg)
    except (CytoFuseError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild its U-Net ({exc})") from None
    return network, model_cfg


def segmenter_settings(meta: dict, model_cfg: dict, network: Any, path: PathLike, multiple: Optional[int] = None) -> dict:
    """The :class:`Segmenter` fields a checkpoint's metadata sets (shared by both backends)."""
    out_channels = int(model_cfg.get("out_channels", 1))
    class_names = [str(c) for c in meta.get("class_names") or []]
    seg_mode = meta.get("mode", "binary" if out_channels == 1 else "classes")
    if seg_mode == "classes" and out_channels != len(class_names) + 1:
        raise CheckpointError(
            f"{path}: {out_channels} output channels but {len(class_names)} class names (expected K+1 channels)"
        )
    return {
        "scale": float(meta.get("scale") or 1.0),
        "out_channels": out_channels,
        "class_names": class_names,
        "mode": seg_mode,
        "multiple": int(multiple if multiple is not None else getattr(network, "multiple", 1)),
        "threshold": float(meta.get("threshold", 0.5)),
    }
