"""Load a trained segmentation checkpoint as a ready-to-use :class:`~segmentation.segmenter.Segmenter`,
run by MindSpore or by ONNX Runtime (:mod:`segmentation.export`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .segmenter import Segmenter, segmenter_from_meta, segmenter_settings

PathLike = Union[str, Path]


def load_segmenter(path: PathLike, mode: str = "graph", threads: Optional[int] = None, backend: str = "mindspore") -> Segmenter:
    """Read a segmentation checkpoint into a :class:`Segmenter` (network in eval mode).

    ``backend``: ``mindspore`` runs the checkpoint's network; ``onnxruntime`` its exported ONNX model
    (beside the checkpoint, exported first when missing or stale: ``segmentation.export``); ``auto``
    picks ONNX Runtime when installed. Raises :class:`CheckpointError` (one line naming the file) when
    the file is missing, is not a MindSpore checkpoint, is another stage's checkpoint, or its weights
    do not fit its model.
    """
    from cytocore import runtime
    from cytocore.onnx_backend import resolve_backend

    if resolve_backend(backend) == "onnxruntime":
        from .export import load_onnx_segmenter

        return load_onnx_segmenter(path, threads=threads)
    path = Path(path)
    runtime.setup(seed=None, threads=threads, mode=mode)
    params, meta = runtime.load_checkpoint(path)
    network, model_cfg = segmenter_from_meta(meta, path)
    runtime.load_into(network, params, path, strict=True)
    network.set_train(False)
    return Segmenter(network=network, meta=meta, path=path, **segmenter_settings(meta, model_cfg, network, path))
