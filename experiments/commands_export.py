"""``cytofuse export``: a checkpoint of either stage to a verified ONNX model (for ``--backend onnxruntime``).

The stage is read from the checkpoint's metadata; the model is written beside the checkpoint
(``<checkpoint>.onnx``) unless ``--out`` says otherwise, and only after ONNX Runtime reproduced
MindSpore's outputs on a fixed random batch (``cytocore.onnx_backend``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a segmentation or classification checkpoint to ONNX (verified against MindSpore)")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="best.ckpt of `cytofuse seg train` or `cytofuse cls train`")
    p.add_argument("--out", default=None, metavar="MODEL.onnx", help="where to write the model (default: <checkpoint>.onnx)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="refuse the model if |ONNX - MindSpore| > tolerance x max(1, max |MindSpore|) (default 1e-3)")
    p.set_defaults(handler=_export)


def export_checkpoint(checkpoint: Any, out: Optional[Any] = None, tolerance: Optional[float] = None):
    """Export either stage's checkpoint; returns the :class:`cytocore.onnx_backend.ExportReport`."""
    from cytocore import onnx_backend as ox
    from cytocore import runtime
    from cytocore.errors import CheckpointError

    checkpoint = Path(checkpoint)
    _, meta = runtime.load_checkpoint(checkpoint)
    stage = meta.get("stage")
    tol = ox.DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    if stage == "segmentation":
        from segmentation.export import export_segmenter

        return export_segmenter(checkpoint, out, tolerance=tol)
    if stage == "classification":
        from classification.export import export_classifier

        return export_classifier(checkpoint, out, tolerance=tol)
    found = f"stage {stage!r}" if stage else "no CytoFuse metadata"
    raise CheckpointError(f"{checkpoint}: cannot export a checkpoint with {found} (expected a seg or cls training checkpoint)")


def _export(args: argparse.Namespace) -> int:
    report = export_checkpoint(args.checkpoint, args.out, args.tolerance)
    print(report.message())
    return 0
