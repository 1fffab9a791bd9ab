"""ONNX export and the ONNX Runtime inference backend, shared by both stages.

Why: MindSpore's CPU kernels are the bottleneck of inference on a small machine; the same network
exported to ONNX and run by ONNX Runtime is 2-3x faster with outputs equal to ~1e-6. Training stays
in MindSpore; only inference (and, optionally, validation) runs the exported model.

What this module does, stage-independently:

* :func:`export_verified` -- ``mindspore.export(..., file_format="ONNX")``, then the graph repairs
  MindSpore 2.10's exporter needs (a ``ConvTranspose`` ``output_shape`` attribute ONNX Runtime rejects,
  plus any stage-specific rewrite), dynamic batch/height/width axes where the graph allows them, the
  metadata that ties the model to its checkpoint, and a numerical check: a fixed random batch goes
  through MindSpore and ONNX Runtime and the model is written (atomically) only if the outputs agree
  within :data:`DEFAULT_TOLERANCE`.
* :class:`OnnxNetwork` -- an ONNX Runtime session as a NumPy callable (NCHW float32 in, logits out),
  which is what ``segmentation.predict`` and the classifier accept as a network.
* :func:`model_path_for` / :func:`check_model` -- where the model of a checkpoint lives (beside it,
  ``<checkpoint>.onnx``, or in a cache folder when that folder is read-only) and whether a model
  belongs to a checkpoint (its sha256, stage and input normalisation, recorded in ``metadata_props``).
* :func:`resolve_backend` -- ``auto`` means ONNX Runtime when it is installed, else MindSpore.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_path
from .errors import CheckpointError, CytoFuseError
from .hashing import fingerprint, sha256_file
from .preprocess import MEAN, STD

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

BACKENDS = ("auto", "onnxruntime", "mindspore")
#: Outputs may differ by at most this times max(1, max |MindSpore output|) (float32 kernels differ ~1e-6).
DEFAULT_TOLERANCE = 1e-3
#: Bumped when the export (graph rewrites, metadata) changes, so older models are re-exported.
FORMAT_VERSION = "1"
META_PREFIX = "cytofuse."
CACHE_ENV = "CYTOFUSE_CACHE"


class ExportError(CytoFuseError):
    """A network cannot be exported, or its export does not reproduce MindSpore's outputs."""


class ModelMismatchError(CheckpointError):
    """An ONNX model does not belong to the checkpoint (or stage, or input normalisation) it is used for."""


# ------------------------------------------------------------------------------------------ backend


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: Optional[str]) -> str:
    """``auto``/None -> ``onnxruntime`` when importable, else ``mindspore``; an explicit choice is checked."""
    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise CytoFuseError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name == "auto":
        return "onnxruntime" if onnxruntime_available() else "mindspore"
    if name == "onnxruntime" and not onnxruntime_available():
        raise CytoFuseError("--backend onnxruntime: onnxruntime is not installed (pip install onnxruntime), or use --backend mindspore")
    return name


def add_backend_argument(parser: Any) -> None:
    """``--backend auto|onnxruntime|mindspore`` for the inference commands."""
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="inference engine: onnxruntime runs the checkpoint's exported ONNX model (exported "
                             "beside it first when missing or stale), mindspore the checkpoint itself; auto "
                             "(default) = onnxruntime when installed")


# ----------------------------------------------------------------------------------------- hashing


def config_hash(config: Any) -> str:
    """A short, order-independent hash of a (training) config, to tell models of two configs apart."""
    return fingerprint(config or {})


def normalisation() -> dict:
    """The input the networks expect, recorded in every model: RGB uint8 -> (x - mean) / std, NCHW float32."""
    return {"layout": "NCHW", "dtype": "float32", "channels": "RGB", "from": "uint8 0..255",
            "mean": [round(float(v), 6) for v in MEAN], "std": [round(float(v), 6) for v in STD]}


# ------------------------------------------------------------------------------------ model location


def default_model_path(checkpoint: PathLike) -> Path:
    """``<checkpoint>.onnx`` beside the checkpoint (``best.ckpt`` -> ``best.ckpt.onnx``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".onnx")


def cache_dir() -> Path:
    """Where models of checkpoints in read-only folders go: ``$CYTOFUSE_CACHE`` or ``~/.cache/cytofuse/onnx``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cytofuse" / "onnx"


def cached_model_path(checkpoint: PathLike, digest: str) -> Path:
    return cache_dir() / f"{Path(checkpoint).stem}-{digest[:16]}.onnx"


def model_path_for(checkpoint: PathLike, digest: str) -> Path:
    """Where the model of ``checkpoint`` is (or will be) written: beside it if that folder is writable."""
    beside = default_model_path(checkpoint)
    folder = beside.parent
    if os.access(folder, os.W_OK) and (not beside.exists() or os.access(beside, os.W_OK)):
        return beside
    return cached_model_path(checkpoint, digest)


def candidate_paths(checkpoint: PathLike, digest: str) -> list[Path]:
    """Where an existing model of ``checkpoint`` may be: beside it, then the cache."""
    return [default_model_path(checkpoint), cached_model_path(checkpoint, digest)]


def ensure_model(checkpoint: PathLike, stage: str, exporter: Callable[[Path, Path, str], Any]) -> Path:
    """The ONNX model of ``checkpoint``: an existing one whose metadata matches it, else ``exporter``'s.

    ``exporter(checkpoint, out_path, sha256)`` writes a verified model. A stale or foreign model at the
    usual place is replaced (it is a derived file; the checkpoint is the source of truth).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: checkpoint not found")
    digest = sha256_file(checkpoint)
    for path in candidate_paths(checkpoint, digest):
        if not path.is_file():
            continue
        try:
            reason = mismatch_reason(read_metadata(path), stage, digest)
        except CheckpointError as exc:
            reason = str(exc)
        if reason is None:
            return path
        log.info("%s: %s; exporting the checkpoint again", path, reason)
    target = model_path_for(checkpoint, digest)
    log.info("exporting %s to ONNX: %s", checkpoint, target)
    report = exporter(checkpoint, target, digest)
    log.info("%s", report.message() if hasattr(report, "message") else report)
    return target


# --------------------------------------------------------------------------------------- metadata


def model_metadata(stage: str, checkpoint: PathLike, digest: str, checkpoint_meta: dict, extra: Optional[dict] = None) -> dict:
    """The ``metadata_props`` of an exported model (string values; JSON where structured)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "checkpoint": str(Path(checkpoint).name),
        "checkpoint_sha256": digest,
        "config_sha256": config_hash(checkpoint_meta.get("config")),
        "class_names": checkpoint_meta.get("class_names") or [],
        "input": normalisation(),
        "checkpoint_meta": checkpoint_meta,
        **(extra or {}),
    }
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}


def decode_metadata(props: dict) -> dict:
    """``metadata_props`` (or ORT's ``custom_metadata_map``) back to Python values, prefix removed."""
    out: dict = {}
    for key, value in props.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX):]
        try:
            out[name] = json.loads(value)
        except (TypeError, ValueError):
            out[name] = value
    return out


def mismatch_reason(meta: dict, stage: str, digest: Optional[str]) -> Optional[str]:
    """Why a model's metadata does not fit ``stage``/checkpoint ``digest`` (None when it fits)."""
    if not meta:
        return "it has no CytoFuse metadata (not written by `cytofuse export`)"
    if str(meta.get("format_version")) != FORMAT_VERSION:
        return f"it was written by another export format (version {meta.get('format_version')}, current {FORMAT_VERSION})"
    if meta.get("stage") != stage:
        return f"it is a {meta.get('stage')} model, not a {stage} one"
    if digest is not None and meta.get("checkpoint_sha256") != digest:
        got = str(meta.get("checkpoint_sha256"))[:12]
        return f"it was exported from another checkpoint (sha256 {got}... != {digest[:12]}...)"
    if meta.get("input") != normalisation():
        return "it expects another input normalisation than this version of CytoFuse uses"
    return None


def check_model(path: PathLike, stage: str, checkpoint: Optional[PathLike] = None, digest: Optional[str] = None) -> dict:
    """Metadata of the model at ``path``; :class:`ModelMismatchError` (one line) if it does not fit."""
    path = Path(path)
    if digest is None and checkpoint is not None:
        digest = sha256_file(checkpoint)
    meta = read_metadata(path)
    reason = mismatch_reason(meta, stage, digest)
    if reason:
        target = f" {checkpoint}" if checkpoint is not None else ""
        raise ModelMismatchError(f"{path}: refusing to use this ONNX model for the {stage} checkpoint{target}: {reason}; "
                                 f"re-export it with `cytofuse export --checkpoint {checkpoint or 'CKPT'}`")
    return meta


def read_metadata(path: PathLike) -> dict:
    """The CytoFuse metadata of an ONNX file, read with ONNX Runtime (no ``onnx`` package needed)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found")
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
        raise CheckpointError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    return decode_metadata(dict(session.get_modelmeta().custom_metadata_map))


# ---------------------------------------------------------------------------------- the session


class OnnxNetwork:
    """An ONNX Runtime session as a NumPy network: float32 NCHW batch -> first output (logits).

    ``threads`` intra-op threads (default: the cores this process may use); one session per model.
    A model exported with a fixed batch size gets padded/split batches, so any batch size works.
    """

    def __init__(self, path: Union[PathLike, bytes], threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        from .runtime import default_threads

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or default_threads())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = path if isinstance(path, bytes) else str(path)
        self.path = None if isinstance(path, bytes) else Path(path)
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"{self.path or '<model>'}: ONNX Runtime cannot load the model ({_first_line(exc)})") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        self.metadata = decode_metadata(dict(self.session.get_modelmeta().custom_metadata_map))

    def run_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of the model for ``batch``."""
        x = np.ascontiguousarray(batch, np.float32)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self.session.run(self.output_names, {self.input_name: x})
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(x), self.fixed_batch):
            chunk = x[start:start + self.fixed_batch]
            n = len(chunk)
            if n < self.fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - n,) + chunk.shape[1:], np.float32)])
            parts.append([o[:n] for o in self.session.run(self.output_names, {self.input_name: chunk})])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.output_names))]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run_all(batch)[0]


# ------------------------------------------------------------------------------------------ export


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float
    tolerance: float
    allowed: float
    check_shape: tuple
    dynamic_axes: dict
    outputs: int

    def message(self) -> str:
        axes = ", ".join(f"{k}={v}" for k, v in self.dynamic_axes.items()) or "none (fixed input shape)"
        return (f"wrote {self.path}: ONNX Runtime matches MindSpore on a random batch {self.check_shape} "
                f"(max |diff| {self.max_abs_diff:.2e} <= {self.allowed:.2e}); dynamic axes: {axes}")


GraphFix = Callable[[Any], None]


def drop_conv_transpose_output_shape(model: Any) -> None:
    """MindSpore writes ``ConvTranspose`` with an ``output_shape`` ONNX Runtime rejects; without it the
    shape follows from strides and pads (and can change with the input size)."""
    for node in model.graph.node:
        if node.op_type == "ConvTranspose":
            kept = [a for a in node.attribute if a.name != "output_shape"]
            del node.attribute[:]
            node.attribute.extend(kept)


def set_dynamic_axes(model: Any, axes: dict) -> None:
    """Name input/output dimensions (``{0: "batch", 2: "height", 3: "width"}``) so any size runs."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for index, name in axes.items():
            if index < len(dims):
                dims[index].dim_param = name
    del model.graph.value_info[:]  # intermediate shapes recorded for the export size no longer hold


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _mindspore_onnx(cell: Any, example: np.ndarray) -> Any:
    """``mindspore.export`` of ``cell`` for an input like ``example``, loaded as an ONNX ModelProto."""
    import mindspore as ms
    import onnx

    with tempfile.TemporaryDirectory(prefix="cytofuse-export-") as tmp:
        base = os.path.join(tmp, "model")
        try:
            ms.export(cell, ms.Tensor(np.ascontiguousarray(example, np.float32)), file_name=base, file_format="ONNX")
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ExportError(f"MindSpore cannot export this network to ONNX ({_first_line(exc)})") from None
        return onnx.load(base + ".onnx")


def _outputs(value: Any) -> list[np.ndarray]:
    if isinstance(value, (tuple, list)):
        return [np.asarray(v.asnumpy() if hasattr(v, "asnumpy") else v, np.float32) for v in value]
    return [np.asarray(value.asnumpy() if hasattr(value, "asnumpy") else value, np.float32)]


def compare_outputs(reference: Sequence[np.ndarray], got: Sequence[np.ndarray], tolerance: float) -> tuple[float, float]:
    """``(max |diff|, allowed)``; raises :class:`ExportError` on a shape or count mismatch."""
    if len(reference) != len(got):
        raise ExportError(f"the ONNX model has {len(got)} output(s), MindSpore's network {len(reference)}")
    worst, scale = 0.0, 1.0
    for ref, out in zip(reference, got):
        if ref.shape != out.shape:
            raise ExportError(f"ONNX Runtime output shape {out.shape} != MindSpore's {ref.shape}")
        if ref.size:
            worst = max(worst, float(np.max(np.abs(ref.astype(np.float64) - out))))
            scale = max(scale, float(np.max(np.abs(ref))))
    return worst, tolerance * scale


def export_verified(
    export_cell: Any,
    reference: Callable[[np.ndarray], Any],
    example: np.ndarray,
    check: np.ndarray,
    out_path: PathLike,
    metadata: dict,
    fixes: Iterable[GraphFix] = (),
    dynamic_axes: Optional[dict] = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export ``export_cell`` (traced on ``example``), verify it against ``reference`` on ``check``, write it.

    ``export_cell`` may be an export-friendly copy of the network (same weights, exportable ops);
    ``reference`` is the network as trained, so the check covers any substitution. ``check`` should
    differ from ``example`` in the dynamic axes, which proves they really are dynamic. Nothing is
    written unless every output agrees within ``tolerance`` x max(1, max |reference output|).
    """
    import onnx

    model = _mindspore_onnx(export_cell, example)
    drop_conv_transpose_output_shape(model)
    for fix in fixes:
        fix(model)
    axes = dict(dynamic_axes or {})
    if axes:
        set_dynamic_axes(model, axes)
    verification = {"tolerance": tolerance, "rule": "max|onnx - mindspore| <= tolerance * max(1, max|mindspore|)",
                    "check_shape": list(check.shape), "dynamic_axes": {str(k): v for k, v in axes.items()}}
    metadata = dict(metadata)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise ExportError(f"the exported graph is not valid ONNX ({_first_line(exc)})") from None
    session = OnnxNetwork(model.SerializeToString(), threads=None)
    got = session.run_all(check)
    worst, allowed = compare_outputs(_outputs(reference(check)), got, tolerance)
    if not worst <= allowed:  # also refuses NaN
        raise ExportError(f"ONNX Runtime's outputs differ from MindSpore's by {worst:.3g} (> {allowed:.3g} allowed) "
                          f"on a random batch {tuple(check.shape)}; the model was not written")
    verification["max_abs_diff"] = worst
    metadata[META_PREFIX + "verification"] = json.dumps(verification)
    metadata[META_PREFIX + "exporter"] = json.dumps(_versions())
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return ExportReport(out_path, worst, tolerance, allowed, tuple(check.shape), axes, len(got))


def _versions() -> dict:
    import mindspore as ms
    import onnx
    import onnxruntime as ort

    return {"mindspore": ms.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def fixed_batch(shape: Sequence[int], seed: int = 20240) -> np.ndarray:
    """The fixed random batch an export is checked on (normalised inputs are roughly N(0, 1))."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)
