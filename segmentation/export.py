"""Export a segmentation checkpoint's U-Net to ONNX, and load it back as an ONNX Runtime :class:`Segmenter`.

Every ``model:`` variant the configs offer exports (batch/group/no normalisation, transposed-conv or
bilinear upsampling, any number of output channels), with dynamic batch, height and width:

* MindSpore 2.10 cannot export ``GroupNorm``: the export copy uses an equivalent built from exportable
  ops (reshape ``(N, C, H, W)`` to ``(N, G, C/G*H, W)``, mean and variance over the last two axes,
  reshape back, per-channel affine). Its reshape shapes are written for the trace size; they are
  rewritten to ``[0, G|C, -1, 0]`` (copy N and W, infer the rest) so any batch and size runs.
* nor bilinear resizing (``ResizeBilinearV2``): the export copy traces a nearest-neighbour resize in
  its place, and that ONNX ``Resize`` node is rewritten to ``mode=linear``,
  ``coordinate_transformation_mode=half_pixel`` with ``scales=[1, 1, 2, 2]`` -- exactly MindSpore's
  ``interpolate(mode="bilinear", align_corners=False)`` to the skip tensor's (twice as large) size.

The substitutes never touch the trained network: it stays the reference the export is checked
against (``cytocore.onnx_backend.export_verified``), so a substitute that computed anything else
would be refused, not written.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from cytocore import onnx_backend as ox
from cytocore.errors import CheckpointError

from .segmenter import STAGE, Segmenter, segmenter_from_meta, segmenter_settings

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


def _export_cells() -> tuple[type, type]:
    """The export-friendly GroupNorm and bilinear ``Up`` cells (defined on first use: MindSpore is heavy)."""
    import mindspore as ms
    import mindspore.nn as nn
    import mindspore.ops as ops

    from .unet import Up

    class ExportGroupNorm(nn.Cell):
        """``nn.GroupNorm`` from exportable ops; its gamma and beta are copied in as constants."""

        def __init__(self, norm: Any) -> None:
            super().__init__()
            self.groups = int(norm.num_groups)
            self.eps = float(norm.eps)
            self.gamma = ms.Tensor(norm.gamma.asnumpy())
            self.beta = ms.Tensor(norm.beta.asnumpy())

        def construct(self, x):
            n, c, h, w = x.shape
            y = x.reshape(n, self.groups, -1, w)
            mean = y.mean(axis=(2, 3), keep_dims=True)
            centred = y - mean
            var = (centred * centred).mean(axis=(2, 3), keep_dims=True)
            y = (centred / ops.sqrt(var + self.eps)).reshape(n, c, h, w)
            return y * self.gamma.reshape(1, c, 1, 1) + self.beta.reshape(1, c, 1, 1)

    class ExportUp(Up):
        """``Up`` with a nearest resize traced where the bilinear one is (rewritten in the graph later)."""

        def construct(self, x, skip):
            if self.bilinear:
                x = ops.ResizeNearestNeighbor((skip.shape[2], skip.shape[3]))(x)
            x = self.up(x)
            return self.block(ops.concat((x, skip), 1))

    return ExportGroupNorm, ExportUp


def export_copy(network: Any) -> tuple[Any, list[str]]:
    """Swap non-exportable parts of ``network`` (a fresh copy: it is changed in place) for equivalents.

    Returns the network and what was substituted (``group_norm``, ``bilinear``).
    """
    import mindspore.nn as nn

    from .unet import Up

    group_norm_cls, up_cls = _export_cells()
    swapped: set[str] = set()
    for _, parent in list(network.cells_and_names()):
        if isinstance(parent, Up) and parent.bilinear:
            parent.__class__ = up_cls
            swapped.add("bilinear")
        for name, child in list(parent.name_cells().items()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, group_norm_cls(child))
                swapped.add("group_norm")
    return network, sorted(swapped)


def _constant_arrays(model: Any) -> dict[str, tuple[Any, Any]]:
    """Output name -> (holder, numpy value) of every Constant node and initializer."""
    from onnx import numpy_helper

    found: dict[str, tuple[Any, Any]] = {}
    for init in model.graph.initializer:
        found[init.name] = (init, numpy_helper.to_array(init))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = (attr.t, numpy_helper.to_array(attr.t))
    return found


def _replace_tensor(holder: Any, values: np.ndarray) -> None:
    from onnx import numpy_helper

    name = holder.name
    holder.CopyFrom(numpy_helper.from_array(values, name))


def fix_group_norm_reshapes(batch: int):
    """Graph fix: the GroupNorm substitute's reshapes ``[N, k, m, W]`` -> ``[0, k, -1, 0]``."""

    def fix(model: Any) -> None:
        constants = _constant_arrays(model)
        for node in model.graph.node:
            if node.op_type != "Reshape" or node.input[1] not in constants:
                continue
            holder, shape = constants[node.input[1]]
            if shape.ndim == 1 and len(shape) == 4 and int(shape[0]) == batch:
                _replace_tensor(holder, np.array([0, int(shape[1]), -1, 0], np.int64))

    return fix


def fix_bilinear_resizes(model: Any) -> None:
    """Graph fix: every traced nearest ``Resize`` -> bilinear (half-pixel), scale 2 on H and W."""
    import onnx
    from onnx import numpy_helper

    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        del node.attribute[:]
        node.attribute.extend([
            onnx.helper.make_attribute("mode", "linear"),
            onnx.helper.make_attribute("coordinate_transformation_mode", "half_pixel"),
        ])
        scales_name, roi_name = node.name + "_cytofuse_scales", node.name + "_cytofuse_roi"
        model.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), scales_name))
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), roi_name))
        inputs = [node.input[0], roi_name, scales_name]  # X, roi (unused, required before opset 13), scales
        del node.input[:]
        node.input.extend(inputs)


def export_network(network: Any, export_net: Any, swapped: list[str], out_path: PathLike, metadata: dict,
                   multiple: int, in_channels: int = 3, tolerance: float = ox.DEFAULT_TOLERANCE) -> ox.ExportReport:
    """Export ``export_net`` (see :func:`export_copy`) and check it against ``network`` (same weights)."""
    m = max(1, int(multiple))
    batch = 2
    example = ox.fixed_batch((batch, in_channels, 4 * m, 6 * m), seed=1)
    check = ox.fixed_batch((3, in_channels, 6 * m, 4 * m))
    fixes = []
    if "group_norm" in swapped:
        fixes.append(fix_group_norm_reshapes(batch))
    if "bilinear" in swapped:
        fixes.append(fix_bilinear_resizes)
    import mindspore as ms

    def reference(x: np.ndarray) -> Any:
        return network(ms.Tensor(x))

    return ox.export_verified(export_net, reference, example, check, out_path, metadata, fixes=fixes,
                              dynamic_axes=DYNAMIC_AXES, tolerance=tolerance)


def export_segmenter(checkpoint: PathLike, out: Optional[PathLike] = None, tolerance: float = ox.DEFAULT_TOLERANCE,
                     digest: Optional[str] = None) -> ox.ExportReport:
    """``cytofuse export`` for a segmentation checkpoint: verified ``<checkpoint>.onnx`` (or ``out``)."""
    from cytocore import runtime

    checkpoint = Path(checkpoint)
    runtime.setup(seed=None)
    params, meta = runtime.load_checkpoint(checkpoint)
    network, model_cfg = segmenter_from_meta(meta, checkpoint)
    export_net, _ = segmenter_from_meta(meta, checkpoint)
    runtime.load_into(network, params, checkpoint, strict=True)
    runtime.load_into(export_net, params, checkpoint, strict=True)
    network.set_train(False)
    export_net.set_train(False)
    export_net, swapped = export_copy(export_net)
    digest = digest or ox.sha256_file(checkpoint)
    settings = segmenter_settings(meta, model_cfg, network, checkpoint)
    predict = ((meta.get("config") or {}).get("predict") or {}) if isinstance(meta.get("config"), dict) else {}
    extra = {"scale": settings["scale"], "tile": predict.get("tile", 256), "mode": settings["mode"],
             "out_channels": settings["out_channels"], "input_multiple": settings["multiple"],
             "threshold": settings["threshold"], "substituted": swapped}
    metadata = ox.model_metadata(STAGE, checkpoint, digest, meta, extra)
    out = Path(out) if out is not None else ox.model_path_for(checkpoint, digest)
    return export_network(network, export_net, swapped, out, metadata, settings["multiple"],
                          int(model_cfg.get("in_channels", 3)), tolerance)


def ensure_model(checkpoint: PathLike) -> Path:
    """The ONNX model of ``checkpoint``: an existing one that matches it, else a fresh export."""
    return ox.ensure_model(checkpoint, STAGE, lambda ckpt, out, digest: export_segmenter(ckpt, out, digest=digest))


def load_onnx_segmenter(checkpoint: PathLike, threads: Optional[int] = None, model: Optional[PathLike] = None) -> Segmenter:
    """A :class:`Segmenter` whose network is an ONNX Runtime session of the checkpoint's exported model.

    ``model`` None: the matching model beside the checkpoint (or in the cache), exported first when
    missing or stale. An explicit ``model`` must match the checkpoint, else :class:`ModelMismatchError`.
    MindSpore is only imported when an export is needed.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    path = Path(model) if model is not None else ensure_model(checkpoint)
    meta = ox.check_model(path, STAGE, checkpoint)
    network = ox.OnnxNetwork(path, threads=threads)
    ckpt_meta = meta.get("checkpoint_meta") or {}
    network_multiple = int(meta.get("input_multiple") or 1)
    settings = segmenter_settings(ckpt_meta, ckpt_meta.get("model") or {}, None, checkpoint, network_multiple)
    return Segmenter(network=network, meta=ckpt_meta, path=checkpoint, **settings)
