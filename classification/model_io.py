"""Loading classifier checkpoints for inference (MindSpore or ONNX Runtime), and initial weights.

What a checkpoint records and the :class:`~classification.classifier.Classifier` it loads into live in
:mod:`classification.classifier`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from cytocore import runtime
from cytocore.errors import CheckpointError

from .classifier import Classifier, read_classifier_meta
from .model import build_network

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]


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
