"""What a classification checkpoint records, and a trained classifier ready for inference.

A classification checkpoint carries everything needed to use it without the training config at
hand: the architecture, the class names in output order, the head (sigmoid or softmax) and the crop
geometry. A crop made with another margin or size is a different input, so prediction always uses
the checkpoint's crop settings, never the caller's. :class:`Classifier` runs either backend's
network (a MindSpore cell or an ONNX Runtime session); both loaders build on this module
(:mod:`classification.model_io`, :mod:`classification.export`), which is why it imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from cytocore.errors import CheckpointError, CytoFuseError
from cytocore.preprocess import to_network_input

from .crops import CropConfig, tile_crop
from .model import ModelConfig, probabilities

PathLike = Union[str, Path]
STAGE = "classification"
#: Test-time augmentation: a cell has no up or down, so its mirror images are equally valid views.
TTA_MODES = ("none", "flips", "dihedral")


def tta_views(crops: np.ndarray, mode: str) -> list[np.ndarray]:
    """The crops as the network sees them under test-time augmentation (the identity first).

    ``flips``: identity, horizontal and vertical mirror, both (4 views); ``dihedral`` adds the four
    transposed views (8: all rotations by 90° with and without a mirror). Square crops only.
    """
    views = [crops]
    if mode in ("flips", "dihedral"):
        views += [crops[:, :, ::-1], crops[:, ::-1, :], crops[:, ::-1, ::-1]]
    if mode == "dihedral":
        views += [v.transpose(0, 2, 1, 3) for v in list(views)]
    return [np.ascontiguousarray(v) for v in views]


def checkpoint_meta(model: ModelConfig, class_names: list[str], crop: CropConfig, config: Optional[dict] = None) -> dict:
    """The metadata stored in every classification checkpoint."""
    return {
        "stage": STAGE,
        "model": model.to_dict(),
        "class_names": list(class_names),
        "head": model.head,
        "crop": crop.to_dict(),
        "config": config or {},
    }


@dataclass
class Classifier:
    """A trained crop classifier ready for inference (network in eval mode)."""

    network: Any
    class_names: list[str]
    head: str
    crop: CropConfig
    model: ModelConfig
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None
    tta: Optional[str] = None  # none | flips | dihedral; None: the checkpoint's ``inference.tta`` setting

    def __post_init__(self) -> None:
        if self.tta is None:
            self.tta = str(((self.meta.get("config") or {}).get("inference") or {}).get("tta", "none"))
        if self.tta not in TTA_MODES:
            raise CytoFuseError(f"inference.tta must be one of {', '.join(TTA_MODES)}, not {self.tta!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def tile_crop(self) -> CropConfig:
        """Crop geometry of a whole tile (folder-per-class data): larger when training zoomed in."""
        zoom = float(((self.meta.get("config") or {}).get("sampling") or {}).get("tile_zoom", 1.0))
        return tile_crop(self.crop, zoom)

    def logits(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(N, K)`` float32 logits of uint8 crops ``(N, S, S, 3)`` at the checkpoint's crop size.

        Every batch is padded to ``batch_size`` so the compiled graph is built once, not once per
        distinct remainder.
        """
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) crops, got shape {crops.shape}")
        out = np.zeros((len(crops), self.num_classes), np.float32)
        if len(crops) == 0:
            return out
        run = self._runner()
        batch_size = max(1, int(batch_size))
        pad = self._is_mindspore()  # a compiled graph per batch shape; ONNX Runtime takes any batch
        for start in range(0, len(crops), batch_size):
            chunk = to_network_input(crops[start:start + batch_size])
            n = len(chunk)
            if pad and n < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
            out[start:start + n] = run(chunk)[:n]
        return out

    def _is_mindspore(self) -> bool:
        return hasattr(self.network, "construct")

    def _runner(self):
        """NumPy batch -> NumPy logits, for a MindSpore cell or a NumPy callable (ONNX Runtime)."""
        if not self._is_mindspore():
            return lambda chunk: np.asarray(self.network(chunk), np.float32)
        import mindspore as ms

        self.network.set_train(False)
        return lambda chunk: self.network(ms.Tensor(chunk)).asnumpy()

    def predict_crops(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(N, K)`` float32 class probabilities of uint8 crops, averaged over the test-time flips."""
        crops = np.asarray(crops)
        views = tta_views(crops, self.tta) if len(crops) else [crops]
        return np.mean([probabilities(self.logits(v, batch_size), self.head) for v in views], axis=0).astype(np.float32)


def _meta_error(path: PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: classification checkpoint metadata is incomplete ({what})")


def read_classifier_meta(meta: dict, path: PathLike) -> tuple[list[str], ModelConfig, CropConfig]:
    """Class names, model and crop settings of a checkpoint's metadata; errors name ``path``."""
    stage = meta.get("stage")
    if stage != STAGE:
        found = f"a {stage} checkpoint" if stage else "a checkpoint without CytoFuse metadata"
        raise CheckpointError(f"{path}: not a classification checkpoint ({found}); pass the best.ckpt of a `cytofuse cls train` run")
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _meta_error(path, "class_names")
    try:
        model = ModelConfig.from_dict(meta.get("model"))
        crop = CropConfig.from_dict(meta.get("crop"))
    except (CytoFuseError, ValueError, TypeError) as exc:
        raise _meta_error(path, str(exc)) from None
    return list(names), model, crop
