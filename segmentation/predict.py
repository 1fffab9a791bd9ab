"""Sliding-window prediction of the U-Net's probability map, and the whole segmentation stage per image.

The three entry points, from low to high level:

* :func:`predict_probability` — image → probability map(s), tile by tile (geometry and blending in
  :mod:`cytocore.tiling`), with optional flip test-time augmentation and the model's ``scale``.
* :func:`segment_image` — image → :class:`SegmentationResult` (probability map + instance boxes),
  one readable function in the spirit of StarDist's ``predict_instances_big``.
* :func:`predict_folder` — a folder of images → ``saliency/<id>.png`` and ``instances.csv``
  (``cytofuse seg predict``): :class:`SegmentationSource` run by the project's one folder runner
  (:mod:`cytocore.runfolder`), written by :mod:`segmentation.outputs`.

Settings are resolved once (:func:`resolve_settings` → :class:`SegSettings`) by whoever loads the
model, and passed down as they are.

Memory is bounded by the tile batch, not the image. Tiles are predicted in raster order and their
weighted outputs are summed into a *strip* buffer about one tile-row high across the width; as soon
as no later tile can touch a row, the row is normalised and flushed into the output plane (a NumPy
array or a caller's ``np.memmap``; uint8 or float16 to save memory). When the model works at another
``scale``, the input is resized strip by strip on the way in and the probability map strip by strip
on the way out (PIL bilinear with a source ``box``, which gives the same pixels as resizing the whole
image: float maps exactly, uint8 inputs within one grey level), so a 20000×20000 image never needs
a full-size float copy.

``network`` arguments may be a :class:`Segmenter` (from ``segmentation.model_io``), a MindSpore
``Cell``, or any callable mapping float32 NCHW batches (normalised by
:func:`cytocore.preprocess.to_network_input`) to NCHW logits.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image

from cytocore.config import merge
from cytocore.detections import Candidates, identity_fingerprint
from cytocore.errors import CytoFuseError, DataError
from cytocore.imageio import DEFAULT_MAX_PIXELS, probability_to_uint8
from cytocore.planes import plane as zeros_plane
from cytocore.planes import release
from cytocore.prefetch import prefetch
from cytocore.preprocess import to_network_input
from cytocore.tiling import TileGrid, gaussian_importance_map, reflect_indices, tile_grid

from .network import ModelInfo, NetworkFn, model_info
from .postprocess import find_class_instances, find_instances, identity_settings, postprocess_config

if TYPE_CHECKING:
    from cytocore.runfolder import RunReport

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

#: Prediction parameters and their defaults (the ``predict:`` block of a YAML config).
DEFAULT_PREDICT: dict = {
    "tile": 256,  # network input side (px, after scaling); a multiple of the U-Net's 2**(depth-1)
    "context": 16,  # px on each tile side whose output is discarded (they only give context)
    "overlap": 0.25,  # overlap of neighbouring tile cores: fraction of the core, or px if >= 1
    "batch_size": 8,  # tiles per network call: the memory/speed knob
    "pad_batch": "pow2",  # last batch of an image: pow2 (pad to a power of two) | full | none (see padded_batch_size)
    "sigma_scale": 0.125,  # Gaussian blending: sigma = sigma_scale x core size
    "tta": "none",  # none | flip (identity, h-flip, v-flip) | flip_all (also both flips)
    "scale": None,  # resize factor before the network; null = the model's own scale (1 if none)
    "activation": "auto",  # auto (1 channel: sigmoid, more: softmax) | sigmoid | softmax | none
    "dtype": "auto",  # probability plane dtype: float32 | float16 | uint8 | auto (see float_max_pixels)
    "float_max_pixels": 16_000_000,  # auto: float32 planes in memory up to this many pixels, uint8 disk planes above
    "prefetch": 0,  # tile batches prepared ahead on a background thread while the network runs (0: none)
    "progress": False,  # tqdm bar over tiles (predict_folder always shows one over images)
}

TTA_FLIPS: dict[str, list[tuple[int, ...]]] = {
    "none": [()],
    "flip": [(), (3,), (2,)],
    "flip_all": [(), (3,), (2,), (2, 3)],
}


def predict_config(cfg: Optional[dict] = None) -> dict:
    """Defaults overlaid with ``cfg``; unknown keys and bad values are one-line errors."""
    out = merge(DEFAULT_PREDICT, dict(cfg), "predict config") if cfg else copy.deepcopy(DEFAULT_PREDICT)
    if out["tta"] is True:
        out["tta"] = "flip"
    elif out["tta"] in (False, None):
        out["tta"] = "none"
    if out["tta"] not in TTA_FLIPS:
        raise CytoFuseError(f"predict config: tta must be one of {', '.join(TTA_FLIPS)}, not {out['tta']!r}")
    if out["activation"] not in ("auto", "sigmoid", "softmax", "none"):
        raise CytoFuseError(f"predict config: activation must be auto, sigmoid, softmax or none, not {out['activation']!r}")
    if out["dtype"] not in ("auto", "float32", "float16", "uint8"):
        raise CytoFuseError(f"predict config: dtype must be auto, float32, float16 or uint8, not {out['dtype']!r}")
    if int(out["batch_size"]) < 1:
        raise CytoFuseError("predict config: batch_size must be at least 1")
    if out["pad_batch"] not in ("pow2", "full", "none"):
        raise CytoFuseError(f"predict config: pad_batch must be pow2, full or none, not {out['pad_batch']!r}")
    if out["scale"] is not None and not float(out["scale"]) > 0:
        raise CytoFuseError(f"predict config: scale must be > 0, not {out['scale']!r}")
    return out


def _activate(logits: np.ndarray, activation: str, instance_channels: int = 0) -> np.ndarray:
    """Semantic channels by ``activation``; the trailing instance-head channels always by sigmoid."""
    from scipy.special import expit, softmax

    if instance_channels:
        k = logits.shape[1] - instance_channels
        head = expit(logits[:, k:]).astype(np.float32)
        return np.concatenate([_activate(logits[:, :k], activation), head], axis=1)
    if activation == "auto":
        activation = "sigmoid" if logits.shape[1] == 1 else "softmax"
    if activation == "sigmoid":
        return expit(logits).astype(np.float32)
    if activation == "softmax":
        return softmax(logits, axis=1).astype(np.float32)
    return logits.astype(np.float32, copy=False)


def _predict_batch(fn: NetworkFn, batch: np.ndarray, cfg: dict, instance_channels: int = 0) -> np.ndarray:
    """Probabilities for one batch of tiles, averaged over the flip TTA variants (nnU-Net style)."""
    flips = TTA_FLIPS[cfg["tta"]]
    total: Optional[np.ndarray] = None
    for axes in flips:
        x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
        logits = np.asarray(fn(x))
        if logits.ndim != 4 or logits.shape[0] != batch.shape[0] or logits.shape[2:] != batch.shape[2:]:
            raise CytoFuseError(
                f"the network returned shape {tuple(logits.shape)} for tiles of shape {tuple(batch.shape)}: "
                "it must keep batch, height and width (is predict.tile a multiple of the U-Net's 2**(depth-1)?)"
            )
        probs = _activate(logits, cfg["activation"], instance_channels)
        if axes:
            probs = np.flip(probs, axes)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips) if len(flips) > 1 else total


# ----------------------------------------------------------------------------------------- resizing

def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int]:
    """Image size after resizing by ``scale`` (at least one pixel)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float plane resized to ``size = (width, height)`` with PIL's bilinear filter (as prediction does)."""
    if (plane.shape[1], plane.shape[0]) == tuple(size):
        return np.asarray(plane, np.float32)
    img = Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
    return np.asarray(img.resize(tuple(size), Image.BILINEAR), np.float32)


def _support(src_len: int, dst_len: int) -> int:
    """Source rows a bilinear output row may read on each side (wider when shrinking), plus slack."""
    return int(math.ceil(max(src_len / dst_len, 1.0))) + 2


def _resize_rows(src_rows: np.ndarray, src_top: int, src_shape: tuple[int, int], dst_shape: tuple[int, int], a: int, b: int) -> np.ndarray:
    """Rows ``[a, b)`` of the bilinear resize of a ``src_shape`` image to ``dst_shape``.

    ``src_rows`` holds source rows ``[src_top, src_top + len)`` and must include the filter support
    (:func:`_support` rows beyond the box, or the image edge). ``src_rows`` is ``(n, W)`` float32,
    ``(n, W, 3)`` uint8 or ``(C, n, W)`` float32 (channels resized one by one).
    """
    fy = src_shape[0] / dst_shape[0]
    box = (0.0, a * fy - src_top, float(src_shape[1]), b * fy - src_top)
    size = (dst_shape[1], b - a)
    if src_rows.dtype == np.uint8:
        return np.asarray(Image.fromarray(src_rows).resize(size, Image.BILINEAR, box=box))
    if src_rows.ndim == 3:
        return np.stack([_resize_rows(c, src_top, src_shape, dst_shape, a, b) for c in src_rows])
    return np.asarray(Image.fromarray(np.ascontiguousarray(src_rows, np.float32), mode="F").resize(size, Image.BILINEAR, box=box))


class _ScaledImage:
    """Rows of the image as the network sees it (resized by ``scale``), computed strip by strip."""

    def __init__(self, image: np.ndarray, shape: tuple[int, int]) -> None:
        self.image = image
        self.shape = shape
        self.same = shape == image.shape[:2]

    def rows(self, a: int, b: int) -> np.ndarray:
        if self.same:
            return self.image[a:b]
        h = self.image.shape[0]
        fy, m = h / self.shape[0], _support(h, self.shape[0])
        c0, c1 = max(0, int(math.floor(a * fy)) - m), min(h, int(math.ceil(b * fy)) + m)
        return _resize_rows(np.ascontiguousarray(self.image[c0:c1]), c0, self.image.shape[:2], self.shape, a, b)


class _RowResampler:
    """Resize a map that arrives in row strips (network scale) back to the image size, strip by strip.

    Keeps only the source rows later output rows still need (the filter support), so memory is a
    few strips, not the map.
    """

    def __init__(self, src_shape: tuple[int, int], dst_shape: tuple[int, int]) -> None:
        self.src_shape, self.dst_shape = src_shape, dst_shape
        self.fy = src_shape[0] / dst_shape[0]
        self.margin = _support(src_shape[0], dst_shape[0])
        self.buf: Optional[np.ndarray] = None  # (C, n, W) source rows [top, top + n)
        self.top = 0
        self.next_row = 0

    def push(self, rows: np.ndarray, start: int) -> Optional[tuple[int, np.ndarray]]:
        """Add source rows ``[start, start + n)``; return ``(first_row, rows)`` now computable, if any."""
        self.buf = rows if self.buf is None else np.concatenate([self.buf, rows], axis=1)
        available = start + rows.shape[1]
        if available >= self.src_shape[0]:
            end = self.dst_shape[0]
        else:
            end = int(math.floor((available - self.margin) / self.fy))
            while end > 0 and math.ceil(end * self.fy) + self.margin > available:
                end -= 1
        if end <= self.next_row:
            return None
        first = self.next_row
        out = _resize_rows(self.buf, self.top, self.src_shape, self.dst_shape, first, end)
        self.next_row = end
        drop = max(0, int(math.floor(end * self.fy)) - self.margin - self.top)
        if drop:
            self.buf = self.buf[:, drop:].copy()
            self.top += drop
        return first, out


# ------------------------------------------------------------------------------------- tiled predict

class _StripBlender:
    """Weighted sums of tile outputs for the rows still being predicted (about one tile-row high)."""

    def __init__(self, channels: int, width: int, height: int) -> None:
        self.top = 0
        self.acc = np.zeros((channels, height, width), np.float32)
        self.wsum = np.zeros((height, width), np.float32)

    @staticmethod
    def height_for(grid: TileGrid, batch_size: int) -> int:
        """Rows the strip must hold: one core, plus the rows between tile rows a single batch spans."""
        starts, ncols = grid.rows.starts, len(grid.cols)
        span = min(len(starts), (batch_size - 1) // ncols + 2)  # tile rows one batch can touch
        extra = int(np.max(starts[span - 1 :] - starts[: len(starts) - span + 1])) if span > 1 else 0
        return grid.rows.core + extra

    def add(self, y: int, x: int, probs: np.ndarray, weight: np.ndarray) -> None:
        h, w = weight.shape
        r = y - self.top
        self.acc[:, r : r + h, x : x + w] += probs * weight
        self.wsum[r : r + h, x : x + w] += weight

    def flush(self, until: int) -> np.ndarray:
        """Blended rows ``[top, until)`` as ``(C, n, W)``; the buffer moves down past them."""
        n = until - self.top
        out = self.acc[:, :n] / self.wsum[:n]
        self.acc[:, :-n] = self.acc[:, n:]  # NumPy buffers overlapping copies itself
        self.acc[:, -n:] = 0
        self.wsum[:-n] = self.wsum[n:]
        self.wsum[-n:] = 0
        self.top = until
        return out


def _padded_strip(source: _ScaledImage, grid: TileGrid, y: int) -> np.ndarray:
    """Padded rows ``[y, y + tile)`` across the padded width, reflect-padded without padding the image."""
    h, w = grid.shape
    rows = reflect_indices(np.arange(y - grid.rows.context, y - grid.rows.context + grid.rows.tile), h)
    cols = reflect_indices(np.arange(-grid.cols.context, grid.cols.padded_length - grid.cols.context), w)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return source.rows(lo, hi)[np.ix_(rows - lo, cols)]


def _tile_batches(source: _ScaledImage, grid: TileGrid, batch_size: int) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """``(positions, uint8 tiles (B, th, tw, 3))`` in raster order; each strip is read once."""
    th, tw = grid.tile_shape
    positions: list[tuple[int, int]] = []
    tiles: list[np.ndarray] = []
    for y in grid.rows.starts:
        strip = _padded_strip(source, grid, int(y))
        for x in grid.cols.starts:
            positions.append((int(y), int(x)))
            tiles.append(strip[:, x : x + tw])
            if len(tiles) == batch_size:
                yield positions, np.stack(tiles)
                positions, tiles = [], []
    if tiles:
        yield positions, np.stack(tiles)


def _network_batches(source: _ScaledImage, grid: TileGrid, batch_size: int, pad_batch: str) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
    """``(positions, normalised float32 NCHW batch)``, padded as :func:`padded_batch_size` says.

    Everything before the network (reading and resizing strips, cutting and normalising tiles), so a
    background thread can prepare the next batch while the network runs (``predict.prefetch``).
    """
    for positions, tiles in _tile_batches(source, grid, batch_size):
        n = len(positions)
        batch = to_network_input(tiles)
        padded = padded_batch_size(n, batch_size, pad_batch)
        if padded > n:
            batch = np.concatenate([batch, np.zeros((padded - n,) + batch.shape[1:], np.float32)])
        yield positions, batch


def padded_batch_size(n: int, batch_size: int, pad_batch: str) -> int:
    """Tiles actually sent for a batch of ``n`` real tiles.

    A graph-mode MindSpore network compiles once per input shape (seconds on a CPU) and caches it,
    so the batch shapes a run uses should be few; padding every short batch to ``batch_size``
    ("full") wastes up to ``batch_size - 1`` tiles of compute per image, which on small images is
    most of the work. "pow2" pads to the next power of two (at most ``log2(batch_size) + 1`` shapes
    per run, never more than doubling the last batch); "none" sends what there is.
    """
    if pad_batch == "none" or n >= batch_size:
        return n
    if pad_batch == "full":
        return batch_size
    return min(batch_size, 1 << (n - 1).bit_length())


def _plane_dtype(cfg: dict, pixels: int) -> np.dtype:
    name = cfg["dtype"]
    if name == "auto":
        name = "float32" if pixels <= int(cfg["float_max_pixels"]) else "uint8"
    return np.dtype(name)


def _write_rows(plane: np.ndarray, a: int, values: np.ndarray) -> None:
    b = a + values.shape[-2]
    if plane.dtype == np.uint8:
        plane[..., a:b, :] = probability_to_uint8(values)
    else:
        plane[..., a:b, :] = values.astype(plane.dtype, copy=False)
    release(plane)  # a disk plane keeps the rows, not the memory


@dataclass
class ProbabilityMaps:
    """Prediction output at the image's size.

    ``saliency`` is the H×W foreground probability (the map saved as ``saliency/<id>.png``: the
    sigmoid output, or 1 − p_background for a K+1-class model); ``class_maps`` is ``(K+1, H, W)``
    softmax maps for a multi-class model, else None; ``instance_maps`` is ``(C, H, W)``, the
    instance head's sigmoid maps, else None. Planes are float32, float16 or uint8 (0..255).
    """

    saliency: np.ndarray
    class_maps: Optional[np.ndarray] = None
    instance_maps: Optional[np.ndarray] = None


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if getattr(image, "lazy_rgb", False):  # a whole slide (cytocore.slides.LazyRGB): read strip by strip
        return image
    arr = np.asarray(image)  # a memmap stays a view: nothing is read yet
    if arr.dtype != np.uint8:
        raise DataError(f"expected a uint8 image, got dtype {arr.dtype} (read it with cytocore.imageio.read_image)")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[..., :3]
    raise DataError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")


class _PlaneWriter:
    """Blended network-scale rows → the saliency (and class, and instance-head) planes at the image's size.

    Multi-class planes are allocated when the first batch shows how many channels there are.
    """

    def __init__(self, shape: tuple[int, int], net_shape: tuple[int, int], dtype: np.dtype,
                 out: Optional[np.ndarray], class_out: Optional[np.ndarray], instance_channels: int = 0,
                 instance_out: Optional[np.ndarray] = None, disk_min_pixels: Optional[int] = None) -> None:
        self.disk_min_pixels = disk_min_pixels
        if out is None:
            out = self._plane(shape, dtype)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        self.shape, self.dtype, self.out, self.class_out = shape, dtype, out, class_out
        self.heads = int(instance_channels)
        self.instance_out = instance_out
        if self.heads:
            want = (self.heads, *shape)
            if self.instance_out is None:
                self.instance_out = self._plane(want, dtype)
            elif self.instance_out.shape != want:
                raise ValueError(f"instance_out has shape {self.instance_out.shape}, expected {want}")
        self.resampler = None if net_shape == shape else _RowResampler(net_shape, shape)

    def _plane(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """A new output plane: in memory for ordinary images, a disk plane for huge ones."""
        return zeros_plane(shape, dtype, self.disk_min_pixels)

    def set_channels(self, channels: int) -> None:
        channels -= self.heads
        if channels == 1:
            return
        want = (channels, *self.shape)
        if self.class_out is None:
            self.class_out = self._plane(want, self.dtype)
        elif self.class_out.shape != want:
            raise ValueError(f"class_out has shape {self.class_out.shape}, expected {want}")

    def write(self, rows: np.ndarray, start: int) -> None:
        """``rows``: ``(C, n, W_net)`` blended probabilities of network rows ``[start, start + n)``."""
        semantic = rows[: rows.shape[0] - self.heads]
        saliency = semantic[:1] if semantic.shape[0] == 1 else 1.0 - semantic[:1]
        planes = [saliency] + ([semantic] if semantic.shape[0] > 1 else []) + ([rows[semantic.shape[0]:]] if self.heads else [])
        planes = np.concatenate(planes) if len(planes) > 1 else saliency
        if self.resampler is not None:
            pushed = self.resampler.push(planes, start)
            if pushed is None:
                return
            start, planes = pushed
        _write_rows(self.out, start, planes[0])
        k = planes.shape[0] - self.heads
        if k > 1:
            _write_rows(self.class_out, start, planes[1:k])
        if self.heads:
            _write_rows(self.instance_out, start, planes[k:])


def predict_probability(
    image: np.ndarray,
    model: Any,
    cfg: Optional[dict] = None,
    out: Optional[np.ndarray] = None,
    class_out: Optional[np.ndarray] = None,
    instance_out: Optional[np.ndarray] = None,
) -> ProbabilityMaps:
    """Sliding-window probability map(s) of an RGB uint8 image of any size.

    ``out`` (H×W), ``class_out`` ((K+1)×H×W, multi-class models only) and ``instance_out``
    (C×H×W, models with an instance head only) may be caller-supplied arrays or ``np.memmap``s of
    dtype float32, float16 or uint8; otherwise they are allocated with ``cfg["dtype"]``. Only a
    strip about one tile-row high is held in float32 meanwhile.
    """
    from tqdm.auto import tqdm

    cfg = predict_config(cfg)
    info = model if isinstance(model, ModelInfo) else model_info(model)
    image = _as_rgb(image)
    shape = (int(image.shape[0]), int(image.shape[1]))
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(f"cannot predict on an image of {shape[0]}x{shape[1]} pixels")
    net_shape = scaled_shape(shape, float(cfg["scale"]) if cfg["scale"] is not None else info.scale)
    tile, batch_size = int(cfg["tile"]), int(cfg["batch_size"])
    if info.multiple and tile % info.multiple:
        raise CytoFuseError(f"predict.tile = {tile} is not a multiple of {info.multiple}, which this U-Net needs")
    grid = tile_grid(net_shape, tile, float(cfg["overlap"]), int(cfg["context"]))
    weight = gaussian_importance_map(grid.core_shape, float(cfg["sigma_scale"]))
    (ch, cw), (my, mx) = grid.core_shape, grid.context
    writer = _PlaneWriter(shape, net_shape, _plane_dtype(cfg, shape[0] * shape[1]), out, class_out,
                          info.instance_channels, instance_out, disk_min_pixels=int(cfg["float_max_pixels"]))
    blender: Optional[_StripBlender] = None
    done = 0
    bar = tqdm(total=len(grid), desc="tiles", unit="tile", disable=not cfg["progress"], leave=False)
    batches = _network_batches(_ScaledImage(image, net_shape), grid, batch_size, cfg["pad_batch"])
    for positions, batch in prefetch(batches, depth=int(cfg["prefetch"])):
        n = len(positions)
        probs = _predict_batch(info.fn, batch, cfg, info.instance_channels)[:n]
        if blender is None:
            writer.set_channels(probs.shape[1])
            strip_width = max(net_shape[1], cw)
            blender = _StripBlender(probs.shape[1], strip_width, _StripBlender.height_for(grid, batch_size))
        for (y, x), p in zip(positions, probs):
            blender.add(y, x, p[:, my : my + ch, mx : mx + cw], weight)
        done += n
        bar.update(n)
        # rows above the next unfinished tile row's first core row are final: no later tile touches them
        finished = done // len(grid.cols)
        until = int(grid.rows.starts[finished]) if finished < len(grid.rows) else net_shape[0]
        if until > blender.top:
            start = blender.top
            writer.write(blender.flush(until)[:, :, : net_shape[1]], start)
    bar.close()
    return ProbabilityMaps(saliency=writer.out, class_maps=writer.class_out, instance_maps=writer.instance_out)


# ------------------------------------------------------------------------------------ one image, whole stage

@dataclass(frozen=True)
class SegSettings:
    """Resolved prediction and post-processing options: every key present, every value checked.

    Made once at the edge (:func:`resolve_settings`) and passed down as is, so the defaults, the
    checkpoint's own options and the user's are merged in one place.
    """

    predict: dict
    postprocess: dict

    def to_dict(self) -> dict:
        return {"predict": dict(self.predict), "postprocess": identity_settings(dict(self.postprocess))}


def resolve_settings(model: Any, user: Optional[Mapping[str, Any]] = None, where: str = "") -> SegSettings:
    """The settings a model predicts with: defaults ← its checkpoint ← ``user``.

    Precedence: module defaults ← the ``predict``/``postprocess`` sections of the checkpoint's
    training config ← the checkpoint's validated ``threshold`` (unless that config sets one) ← the
    post-processing values chosen on the validation split by FROC (:func:`tuned_postprocess`) ←
    ``user = {"predict": {...}, "postprocess": {...}}``. Unknown sections, keys or bad values are one
    :class:`CytoFuseError` line, prefixed with ``where`` (e.g. ``"config segmentation"``).
    """
    info = model if isinstance(model, ModelInfo) else model_info(model)
    user = dict(user or {})
    try:
        unknown = sorted(set(user) - {"predict", "postprocess"})
        if unknown:
            raise CytoFuseError(f"unknown option(s) {', '.join(unknown)} (known: predict, postprocess)")
        saved = (info.meta or {}).get("config") or {}
        saved = saved if isinstance(saved, dict) else {}
        post_saved = {"threshold": info.threshold} if info.threshold is not None else {}
        post_saved.update(saved.get("postprocess") or {})
        post_saved.update(tuned_postprocess(info.meta))
        predict = predict_config({**(saved.get("predict") or {}), **(user.get("predict") or {})})
        post = postprocess_config({**post_saved, **(user.get("postprocess") or {})})
    except CytoFuseError as exc:
        if not where:
            raise
        raise CytoFuseError(f"{where}: {exc}") from None
    return SegSettings(predict, post)


def tuned_postprocess(meta: Optional[dict]) -> dict:
    """Post-processing values chosen on the validation split (``tuned_<key>`` in the checkpoint's metrics)."""
    from .postprocess import TUNED_KEYS, decode_tuned

    metrics = (meta or {}).get("metrics") if isinstance(meta, dict) else None
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for key in TUNED_KEYS:
        value = metrics.get(f"tuned_{key}")
        if value is not None and np.isfinite(float(value)):
            out[key] = decode_tuned(key, float(value))
    return out


@dataclass
class SegmentationResult:
    """The segmentation stage's output for one image.

    ``probability``: H×W saliency plane (float32, or float16/uint8 0..255 for huge images).
    ``instances``: one row per cell, columns ``x0, y0, x1, y1`` (pixel box, exclusive ends),
    ``area``, ``seg_mean``, ``seg_max``, ``label_id`` (plus ``class_name`` for a multi-class model).
    ``class_probs``: multi-class models only — one column per class, rows aligned with
    ``instances``, the mean softmax of each class inside the instance; else None.
    ``class_maps``: the ``(K+1, H, W)`` softmax planes of a multi-class model, else None.
    ``instance_maps``: the ``(C, H, W)`` instance-head planes, else None.
    ``labels``: the H×W instance label plane (``label_id`` of each instance's pixels, 0 elsewhere;
    int32, or the caller's ``labels_out``), or None when not asked for.
    """

    probability: np.ndarray
    instances: pd.DataFrame
    class_probs: Optional[pd.DataFrame] = None
    class_maps: Optional[np.ndarray] = None
    instance_maps: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    def boxes(self) -> np.ndarray:
        """``(N, 4)`` pixel xyxy of the instances (``(0, 4)`` when there are none)."""
        return self.instances[["x0", "y0", "x1", "y1"]].to_numpy(np.float64).reshape(-1, 4)

    def scores(self, which: str = "mean") -> np.ndarray:
        """Each instance's segmentation score: the mean (or ``"max"``) probability inside it."""
        return self.instances["seg_max" if which == "max" else "seg_mean"].to_numpy(np.float64).reshape(-1)

    def areas(self) -> np.ndarray:
        return self.instances["area"].to_numpy(np.float64).reshape(-1)


def segment_image(
    image: np.ndarray,
    model: Any,
    predict_cfg: Optional[dict] = None,
    post_cfg: Optional[dict] = None,
    out: Optional[np.ndarray] = None,
    class_out: Optional[np.ndarray] = None,
    instance_out: Optional[np.ndarray] = None,
    labels_out: Union[None, bool, np.ndarray] = True,
    settings: Optional[SegSettings] = None,
) -> SegmentationResult:
    """Probability map, cell boxes and instance label plane for one RGB uint8 image of any size.

    Tiled prediction (:func:`predict_probability`), then post-processing block by block
    (:func:`segmentation.postprocess.find_instances`, or ``find_class_instances`` for K+1 maps),
    with the instance head's map splitting touching cells when the model has one.
    ``settings`` are used as given (resolved once by the caller); without them, ``predict_cfg`` and
    ``post_cfg`` are completed from the checkpoint and the defaults (:func:`resolve_settings`).
    ``out``/``class_out``/``instance_out`` may be ``np.memmap`` planes for images that do not fit in
    memory as float. ``labels_out``: ``True`` allocates an int32 label plane (images up to
    ``predict.float_max_pixels``; larger ones need a caller's memmap), ``False``/``None`` skips it, an
    H×W integer array (or memmap) of zeros receives it, written block by block.
    """
    info = model if isinstance(model, ModelInfo) else model_info(model)
    if settings is None:
        settings = resolve_settings(info, {"predict": predict_cfg or {}, "postprocess": post_cfg or {}})
    post = settings.postprocess
    maps = predict_probability(image, info, settings.predict, out=out, class_out=class_out, instance_out=instance_out)
    if labels_out is True:  # in memory up to the size that gets float planes; a disk plane beyond that
        labels_out = zeros_plane(maps.saliency.shape, np.int32, int(settings.predict["float_max_pixels"]))
    elif labels_out is False:
        labels_out = None
    if maps.class_maps is None:
        table = find_instances(maps.saliency, post, maps.instance_maps, labels_out)
        return SegmentationResult(maps.saliency, table, instance_maps=maps.instance_maps, labels=labels_out)
    instances, class_probs = find_class_instances(maps.class_maps, info.class_names, post, maps.instance_maps, labels_out)
    return SegmentationResult(maps.saliency, instances, class_probs, maps.class_maps, maps.instance_maps, labels_out)


def instance_rows(result: SegmentationResult) -> pd.DataFrame:
    """The rows written to ``instances/<id>.csv``: the instance table plus ``p_<class>`` columns."""
    table = result.instances.copy()
    if result.class_probs is not None:
        for name in result.class_probs.columns:
            table[f"p_{name}"] = result.class_probs[name].to_numpy()
    return table


# ------------------------------------------------------------------------------------------ a folder

def load_model(checkpoint_or_model: Any) -> Any:
    """A checkpoint path loaded as a :class:`~segmentation.segmenter.Segmenter`; anything else as given."""
    if isinstance(checkpoint_or_model, (str, Path)):
        from .model_io import load_segmenter

        return load_segmenter(checkpoint_or_model)
    return checkpoint_or_model


def model_identity(model: Any) -> dict:
    """``checkpoints.seg`` of a run's identity: path, sha256 and metadata of the model's checkpoint.

    A model not loaded from a file (a NumPy callable in tests) is named by its qualified name.
    """
    from cytocore.hashing import sha256_file

    path = getattr(model, "path", None)
    if path is not None and Path(path).is_file():
        meta = json.loads(json.dumps(getattr(model, "meta", None) or {}, default=str))
        return {"path": str(path), "sha256": sha256_file(path), "meta": meta}
    name = f"{getattr(model, '__module__', '?')}.{getattr(model, '__qualname__', type(model).__qualname__)}"
    return {"path": None, "sha256": name, "meta": {}}


class SegmentationSource:
    """The segmentation stage alone as a candidate source (``cytofuse seg predict``).

    Candidates are the instances with their segmentation scores; a multi-class U-Net's mean softmax
    per instance are the class probabilities (none for a binary one).
    """

    def __init__(self, model: Any, settings: SegSettings, seg_score: str = "mean") -> None:
        self.model = model
        self.info = model_info(model)
        self.settings = settings
        self.seg_score = seg_score
        multi = getattr(model, "mode", None) == "classes"
        self.class_names: list[str] = list(self.info.class_names or []) if multi else []
        self._identity: Optional[dict] = None

    @classmethod
    def load(cls, checkpoint_or_model: Any, user: Optional[Mapping[str, Any]] = None, where: str = "") -> "SegmentationSource":
        model = load_model(checkpoint_or_model)
        return cls(model, resolve_settings(model, user, where))

    def segment(self, image: np.ndarray) -> SegmentationResult:
        return segment_image(image, self.info, settings=self.settings)

    def candidates(self, image: np.ndarray, timings: Optional[dict[str, float]] = None) -> Candidates:
        t0 = time.perf_counter()
        seg = self.segment(image)
        if timings is not None:
            timings["segment"] = timings.get("segment", 0.0) + (time.perf_counter() - t0)
        if seg.class_probs is not None:
            probs = seg.class_probs.to_numpy(np.float64).reshape(len(seg.instances), -1)
        else:
            probs = np.zeros((len(seg.instances), 0))
        return Candidates(seg.probability, seg.boxes(), seg.scores(self.seg_score), seg.areas(), probs,
                          instances=instance_rows(seg), labels=seg.labels)

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {"system": "segmentation", "checkpoints": {"seg": model_identity(self.model)},
                              "settings": self.settings.to_dict()}
        return self._identity


def segment_folder(
    checkpoint_or_segmenter: Any,
    images_dir: PathLike,
    out_dir: PathLike,
    predict_cfg: Optional[dict] = None,
    post_cfg: Optional[dict] = None,
    progress: bool = True,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    shard: Optional[Any] = None,
) -> "RunReport":
    """Segment every image in ``images_dir`` into ``out_dir`` (layout: :mod:`segmentation.outputs`).

    Runs on :func:`cytocore.runfolder.run_images`: resumable with the fingerprint of the model and
    settings (another checkpoint redoes every image), unreadable images reported in one warning line
    and skipped, no stale file of a failed or redone image left. ``instances.csv`` is rebuilt from
    the per-image CSVs every run, so it is always complete; it is the report's ``combined`` table.
    With a ``shard`` (:class:`cytocore.shards.Shard`) only its share; the last share to finish writes
    ``instances.csv`` (``combined`` is None for the others).
    """
    from cytocore.runfolder import folder_sources
    from cytocore.shards import run_share

    from .outputs import SegmentationRunWriter

    source = SegmentationSource.load(checkpoint_or_segmenter, {"predict": predict_cfg or {}, "postprocess": post_cfg or {}})
    sources, duplicates = folder_sources(images_dir)
    writer = SegmentationRunWriter(Path(out_dir))
    run = run_share(
        sources, lambda image, src: source.candidates(image), writer, identity_fingerprint(source.identity()), shard,
        read=lambda src: src.read(max_pixels=max_pixels), failed=duplicates, progress=progress, desc="seg predict",
    )
    if run.combined is None:
        return run
    log.info(
        "seg predict: %d image(s) segmented, %d already done, %d skipped (unreadable or duplicate id); %d instances in %s",
        run.n_processed_now, run.n_skipped, len(run.failed), len(run.combined), Path(out_dir) / "instances.csv",
    )
    return run


def predict_folder(checkpoint_or_segmenter: Any, images_dir: PathLike, out_dir: PathLike, *args: Any,
                   **options: Any) -> pd.DataFrame:
    """:func:`segment_folder` (same arguments), returning the ``instances.csv`` table (``image_id``
    first, pixel coordinates) instead of the run report."""
    return segment_folder(checkpoint_or_segmenter, images_dir, out_dir, *args, **options).combined
