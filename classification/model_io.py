"""Classifier checkpoints: what a checkpoint records, loading one for inference, and initial weights.

A classification checkpoint carries everything needed to use it without the training config at
hand: the architecture, the class names in output order, the head (sigmoid or softmax) and the crop
geometry. A crop made with another margin or size is a different input, so prediction always uses
the checkpoint's crop settings, never the caller's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from cytocore import runtime
from cytocore.errors import CheckpointError, CytoFuseError
from cytocore.preprocess import to_network_input

from .crops import CropConfig, tile_crop
from .model import ModelConfig, build_network, probabilities

log = logging.getLogger("cytofuse")

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


def load_classifier(path: PathLike, backend: str = "mindspore", threads: Optional[int] = None) -> Classifier:
    """Load a classification checkpoint written by ``cytofuse cls train``.

    ``backend``: ``mindspore`` runs the checkpoint's network; ``onnxruntime`` its exported ONNX model
    (beside the checkpoint, exported first when missing or stale: ``classification.export``); ``auto``
    picks ONNX Runtime when installed. Raises :class:`CheckpointError` naming the file when it is
    missing, unreadable, from another stage, or its weights do not fit the architecture its metadata
    names. MindSpore is set up without re-seeding (the weights come from the file, and a library call
    should not reset the caller's random state).
    """
    from cytocore.onnx_backend import resolve_backend

    if resolve_backend(backend) == "onnxruntime":
        from .export import load_onnx_classifier

        return load_onnx_classifier(path, threads=threads)
    path = Path(path)
    params, meta = runtime.load_checkpoint(path)
    names, model, crop = read_classifier_meta(meta, path)
    runtime.setup(seed=None, threads=threads)
    network = build_network(model, len(names))
    runtime.load_into(network, params, path, strict=True)
    network.set_train(False)
    return Classifier(network, names, model.head, crop, model, meta, path)


# ---------------------------------------------------------------------------- initial weights


@dataclass
class InitReport:
    """What an ``--init-checkpoint`` contributed to a new network."""

    path: Path
    loaded: list[str]
    shape_mismatch: list[str]  # "name (checkpoint shape) != (model shape)"
    missing: list[str]  # model parameters the checkpoint lacks
    unused: list[str]  # checkpoint tensors the model has no parameter for (e.g. optimiser state)

    @property
    def total(self) -> int:
        return len(self.loaded) + len(self.shape_mismatch) + len(self.missing)

    def message(self) -> str:
        parts = [f"init checkpoint {self.path}: loaded {len(self.loaded)} of {self.total} parameter tensors"]
        if self.shape_mismatch:
            parts.append(f"skipped {len(self.shape_mismatch)} with another shape: {', '.join(self.shape_mismatch[:6])}"
                         + (" ..." if len(self.shape_mismatch) > 6 else ""))
        if self.missing:
            parts.append(f"{len(self.missing)} not in the checkpoint (kept random): {', '.join(self.missing[:6])}"
                         + (" ..." if len(self.missing) > 6 else ""))
        if self.unused:
            parts.append(f"{len(self.unused)} checkpoint tensors unused")
        return "; ".join(parts)


def load_initial_weights(network: Any, path: PathLike) -> InitReport:
    """Load every tensor of ``path`` whose name and shape match a parameter of ``network``.

    Meant for ImageNet weights a user downloaded (mindcv's ``efficientnet_b0-*.ckpt``) or a
    classifier trained on other classes: the backbone loads, a classifier head of another shape is
    skipped and stays random, and the report says exactly which. A checkpoint of which nothing fits
    is an error rather than a silent from-scratch run.
    """
    import mindspore as ms

    path = Path(path)
    params, _ = runtime.load_checkpoint(path)
    own = {p.name: p for p in network.get_parameters()}
    loaded, mismatch, missing = [], [], []
    for name, p in own.items():
        if name not in params:
            missing.append(name)
        elif tuple(params[name].shape) != tuple(p.shape):
            mismatch.append(f"{name} {tuple(params[name].shape)} != {tuple(p.shape)}")
        else:
            loaded.append(name)
    unused = [n for n in params if n not in own]
    if not loaded:
        example = ", ".join(list(params)[:3]) or "no tensors"
        raise CheckpointError(f"{path}: no tensor fits this model (checkpoint holds e.g. {example}; the model "
                              f"expects e.g. {', '.join(list(own)[:3])})")
    ms.load_param_into_net(network, {n: params[n] for n in loaded}, strict_load=False)
    report = InitReport(path, loaded, mismatch, missing, unused)
    log.info(report.message())
    return report
