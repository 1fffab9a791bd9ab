"""Export a classification checkpoint's network to ONNX, and load it back as an ONNX Runtime :class:`Classifier`.

mindcv's EfficientNet blocks (``MBConv``, ``FusedMBConv``) add their shortcut in place
(``result += x``), which MindSpore 2.10 traces as ``InplaceAddExt`` and cannot export. The export copy
of the network swaps those blocks' class for a subclass whose ``construct`` adds out of place
(``result + x``); in eval mode the block's DropPath is the identity, so both compute the same, and
the exported model is checked against the unmodified network before it is written. Batch, height and
width are dynamic (the network ends in a global average pool), so whole-tile crops of another size
(``Classifier.tile_crop``) run too; the check batch uses another size than the trace.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from cytocore import onnx_backend as ox
from cytocore.errors import CheckpointError

from .model import build_network
from .classifier import STAGE, Classifier, read_classifier_meta

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


def _out_of_place_blocks() -> dict[type, type]:
    """mindcv block class -> the same block with an out-of-place residual add."""
    from mindcv.models.efficientnet import FusedMBConv, MBConv

    class OutOfPlaceAdd:
        """Both block kinds share mindcv's ``result += x`` construct; this one adds out of place."""

        def construct(self, x):
            result = self.block(x)
            if self.shortcut:
                result = result + x
            return result

    return {block: type(f"Export{block.__name__}", (OutOfPlaceAdd, block), {}) for block in (MBConv, FusedMBConv)}


def export_copy(network: Any) -> tuple[Any, list[str]]:
    """Swap in-place residual blocks of ``network`` (a fresh, eval-mode copy) for out-of-place ones."""
    swaps = _out_of_place_blocks()
    count = 0
    for _, cell in list(network.cells_and_names()):
        replacement = swaps.get(type(cell))
        if replacement is not None:
            cell.__class__ = replacement
            count += 1
    return network, (["out_of_place_residual_add"] if count else [])


def export_classifier(checkpoint: PathLike, out: Optional[PathLike] = None, tolerance: float = ox.DEFAULT_TOLERANCE,
                      digest: Optional[str] = None) -> ox.ExportReport:
    """``cytofuse export`` for a classification checkpoint: verified ``<checkpoint>.onnx`` (or ``out``)."""
    import mindspore as ms

    from cytocore import runtime

    checkpoint = Path(checkpoint)
    params, meta = runtime.load_checkpoint(checkpoint)
    names, model, crop = read_classifier_meta(meta, checkpoint)
    runtime.setup(seed=None)
    network = build_network(model, len(names))
    export_net = build_network(model, len(names))
    for net in (network, export_net):
        runtime.load_into(net, params, checkpoint, strict=True)
        net.set_train(False)
    export_net, swapped = export_copy(export_net)
    digest = digest or ox.sha256_file(checkpoint)
    extra = {"head": model.head, "crop": crop.to_dict(), "crop_size": crop.size, "model_name": model.name,
             "substituted": swapped}
    metadata = ox.model_metadata(STAGE, checkpoint, digest, meta, extra)
    out = Path(out) if out is not None else ox.model_path_for(checkpoint, digest)
    example = ox.fixed_batch((2, 3, crop.size, crop.size), seed=1)
    check = ox.fixed_batch((3, 3, crop.size + 32, crop.size + 32))
    return ox.export_verified(export_net, lambda x: network(ms.Tensor(x)), example, check, out, metadata,
                              dynamic_axes=DYNAMIC_AXES, tolerance=tolerance)


def ensure_model(checkpoint: PathLike) -> Path:
    """The ONNX model of ``checkpoint``: an existing one that matches it, else a fresh export."""
    return ox.ensure_model(checkpoint, STAGE, lambda ckpt, out, digest: export_classifier(ckpt, out, digest=digest))


def load_onnx_classifier(checkpoint: PathLike, threads: Optional[int] = None, model: Optional[PathLike] = None) -> Classifier:
    """A :class:`Classifier` whose network is an ONNX Runtime session of the checkpoint's exported model.

    ``model`` None: the matching model beside the checkpoint (or in the cache), exported first when
    missing or stale; an explicit ``model`` must match the checkpoint, else :class:`ModelMismatchError`.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    path = Path(model) if model is not None else ensure_model(checkpoint)
    meta = ox.check_model(path, STAGE, checkpoint)
    ckpt_meta = meta.get("checkpoint_meta") or {}
    names, model_cfg, crop = read_classifier_meta(ckpt_meta, checkpoint)
    return Classifier(ox.OnnxNetwork(path, threads=threads), names, model_cfg.head, crop, model_cfg, ckpt_meta, checkpoint)

