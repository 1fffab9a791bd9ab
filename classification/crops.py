"""Crop geometry: square crops with context around boxes, box jitter, and negative (no-cancer) boxes.

The classifier sees one cell with some surroundings: a square window centred on the box, its side
the box's longer side plus a context margin, resized to a fixed size. Square windows keep the cell's
aspect ratio (a stretched nucleus would look like a different cell type). Where the window leaves
the image it is padded, by default with the image's background colour (a pale Pap background, so a
cell at the border looks like a cell next to empty glass, not next to a black frame), or by
reflection. Training uses the ground-truth boxes jittered in position and size, because at
inference the boxes come from the U-Net's components, which are never exactly the annotator's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import cv2
import numpy as np

Fill = Union[str, Sequence[float]]


@dataclass
class CropConfig:
    """How a box becomes a crop (the ``crop:`` block of the config; stored in every checkpoint)."""

    size: int = 96  # output side in pixels
    margin: float = 0.25  # context added on each side, as a fraction of the box's longer side
    padding: str = "constant"  # constant | reflect: how a window beyond the image border is filled
    fill: Fill = "auto"  # constant padding colour: "auto" (the image's background) or [r, g, b]
    min_side: int = 8  # windows are at least this many pixels wide, so tiny boxes still crop

    def __post_init__(self) -> None:
        if int(self.size) < 8:
            raise ValueError(f"crop.size must be at least 8 pixels, not {self.size}")
        if self.margin < 0:
            raise ValueError(f"crop.margin must be >= 0, not {self.margin}")
        if self.padding not in ("constant", "reflect"):
            raise ValueError(f"crop.padding must be 'constant' or 'reflect', not {self.padding!r}")
        if not (self.fill == "auto" or (not isinstance(self.fill, str) and len(self.fill) == 3)):
            raise ValueError(f"crop.fill must be 'auto' or [r, g, b], not {self.fill!r}")
        self.size = int(self.size)
        self.min_side = max(1, int(self.min_side))

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "CropConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown crop option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_dict(self) -> dict:
        out = asdict(self)
        if not isinstance(out["fill"], str):
            out["fill"] = [float(v) for v in out["fill"]]
        return out


def background_colour(image: np.ndarray) -> np.ndarray:
    """The per-channel median colour: on a cytology slide most pixels are background."""
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 65536)))
    sample = image[::step, ::step].reshape(-1, image.shape[-1])
    return np.median(sample, axis=0).astype(np.uint8)


def square_windows(boxes: np.ndarray, margin: float, min_side: int = 1) -> np.ndarray:
    """Integer square windows ``(N, 4)`` xyxy (exclusive end) centred on each box, with context.

    Side = round(longer box side × (1 + 2 × margin)), at least ``min_side``; the window may extend
    beyond the image (the crop pads it).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    longer = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    side = np.maximum(np.round(longer * (1 + 2 * margin)), min_side).astype(np.int64)
    x0 = np.floor(cx - side / 2 + 0.5).astype(np.int64)
    y0 = np.floor(cy - side / 2 + 0.5).astype(np.int64)
    return np.stack([x0, y0, x0 + side, y0 + side], axis=1)


def _fill_value(image: np.ndarray, fill: Fill, bg: Optional[np.ndarray]) -> np.ndarray:
    if isinstance(fill, str):
        return bg if bg is not None else background_colour(image)
    return np.clip(np.asarray(fill, np.float64), 0, 255).astype(np.uint8)


def cut_window(image: np.ndarray, window: Sequence[int], padding: str, fill: np.ndarray) -> np.ndarray:
    """The pixels of an integer window, padded where it leaves the image."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in window)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ix1 <= ix0 or iy1 <= iy0:  # entirely outside the image: nothing to reflect
        return np.broadcast_to(fill, (y1 - y0, x1 - x0, image.shape[2])).copy()
    inner = image[iy0:iy1, ix0:ix1]
    pads = ((iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1), (0, 0))
    if not any(p for p in pads[0] + pads[1]):
        return inner
    if padding == "reflect":
        return np.pad(inner, pads, mode="reflect")
    out = np.empty((y1 - y0, x1 - x0, image.shape[2]), image.dtype)
    out[...] = fill
    out[iy0 - y0:iy0 - y0 + inner.shape[0], ix0 - x0:ix0 - x0 + inner.shape[1]] = inner
    return out


def resize_square(patch: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``² with area averaging when shrinking (no aliasing) and bilinear when growing."""
    if patch.shape[0] == size and patch.shape[1] == size:
        return np.ascontiguousarray(patch)
    shrink = patch.shape[0] > size
    return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def extract_crops(
    image: np.ndarray,
    boxes: np.ndarray,
    cfg: CropConfig,
    background: Optional[np.ndarray] = None,
    margin: Optional[float] = None,
) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 crops of ``boxes`` (pixel xyxy) from an RGB uint8 image.

    ``background`` is the image's padding colour when already known (it is cached per image during
    training); ``margin`` overrides ``cfg.margin`` (whole-tile crops use 0).
    """
    if not getattr(image, "lazy_rgb", False):  # a whole slide is cut window by window, never read whole
        image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    windows = square_windows(boxes, cfg.margin if margin is None else margin, cfg.min_side)
    out = np.empty((len(windows), cfg.size, cfg.size, 3), np.uint8)
    if len(windows) == 0:
        return out
    fill = _fill_value(image, cfg.fill, background)
    for i, win in enumerate(windows):
        out[i] = resize_square(cut_window(image, win, cfg.padding, fill), cfg.size)
    return out


def whole_image_box(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.array([[0, 0, w, h]], np.float32)


# ------------------------------------------------------------------------------------------ jitter


@dataclass
class JitterConfig:
    """Box jitter so training crops look like the U-Net's proposals, not the annotator's boxes."""

    shift: float = 0.1  # centre moves up to this fraction of the box side (uniform, per axis)
    scale: float = 0.15  # side multiplied by a factor in [1/(1+scale), 1+scale] (log-uniform)
    aspect: float = 0.1  # width/height changed by up to this fraction (log-uniform)


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, cfg: JitterConfig) -> np.ndarray:
    """Randomly shifted and rescaled copies of ``boxes`` (pixel xyxy; may leave the image)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(b)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    cx = cx + rng.uniform(-cfg.shift, cfg.shift, n) * w
    cy = cy + rng.uniform(-cfg.shift, cfg.shift, n) * h
    s = np.exp(rng.uniform(-np.log1p(cfg.scale), np.log1p(cfg.scale), n))
    a = np.exp(rng.uniform(-np.log1p(cfg.aspect), np.log1p(cfg.aspect), n) / 2)
    w, h = w * s * a, h * s / a
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


def zoom_boxes(boxes: np.ndarray, zoom: float, rng: np.random.Generator) -> np.ndarray:
    """Random sub-windows covering ``zoom`` of each box's width and height, placed inside the box.

    For whole-tile data sets (a tile's label holds anywhere in it): training on zoomed windows at a
    small crop size sees the tissue at a finer scale for the same compute, and prediction then
    shows the whole tile at ``crop size / zoom`` pixels, i.e. at the same scale (see ``tile_crop``).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if zoom >= 1.0:
        return b.astype(np.float32)
    w, h = (b[:, 2] - b[:, 0]) * zoom, (b[:, 3] - b[:, 1]) * zoom
    x0 = b[:, 0] + rng.uniform(0, 1, len(b)) * (b[:, 2] - b[:, 0] - w)
    y0 = b[:, 1] + rng.uniform(0, 1, len(b)) * (b[:, 3] - b[:, 1] - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.float32)


def tile_crop(crop: CropConfig, zoom: float) -> CropConfig:
    """The crop geometry of a whole tile at prediction when training used windows of ``zoom``: the
    same pixel scale, so ``size / zoom`` pixels (the network pools globally, so any size fits)."""
    if zoom >= 1.0:
        return crop
    return CropConfig(**{**crop.to_dict(), "size": int(round(crop.size / zoom))})


# --------------------------------------------------------------------------------------- negatives


def overlap_fractions(candidates: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``(M, N)`` largest of intersection/area(candidate) and intersection/area(box).

    Taking the larger of the two means a negative may neither cover part of a cancer cell nor sit
    inside a big cancer cell's box; IoU alone would allow both.
    """
    c = np.asarray(candidates, np.float64).reshape(-1, 4)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(c) == 0 or len(b) == 0:
        return np.zeros((len(c), len(b)))
    iw = np.clip(np.minimum(c[:, None, 2], b[None, :, 2]) - np.maximum(c[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(c[:, None, 3], b[None, :, 3]) - np.maximum(c[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_c = np.maximum((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]), 1e-9)
    area_b = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-9)
    return np.maximum(inter / area_c[:, None], inter / area_b[None, :])


def object_points(image: np.ndarray, background: np.ndarray, step: int = 4, min_distance: float = 40.0) -> np.ndarray:
    """``(P, 2)`` x, y of stained pixels (far from the background colour), on a ``step`` grid.

    Negatives centred on these are benign cells, debris and cell clumps — what a segmentation
    network proposes by mistake — rather than empty glass only.
    """
    small = image[::step, ::step].astype(np.int16)
    distance = np.abs(small - background.astype(np.int16)[None, None, :]).sum(axis=2)
    ys, xs = np.nonzero(distance > min_distance)
    return np.stack([xs * step + step / 2, ys * step + step / 2], axis=1).astype(np.float32)


@dataclass
class NegativeConfig:
    """Crops labelled all-zero: background and benign cells, away from every annotated box."""

    ratio: float = 0.25  # fraction of each training batch (and of validation crops)
    max_overlap: float = 0.05  # largest overlap fraction with any annotated box
    on_objects: float = 0.5  # fraction centred on stained objects rather than anywhere
    side_range: Sequence[float] = (0.5, 2.0)  # sides drawn from annotated box sides × this range
    default_side: float = 32.0  # side in pixels when the data set has no boxes to learn sizes from


def sample_negative_boxes(
    rng: np.random.Generator,
    width: int,
    height: int,
    avoid: np.ndarray,
    n: int,
    sides: np.ndarray,
    cfg: NegativeConfig,
    points: Optional[np.ndarray] = None,
    tries: int = 8,
) -> np.ndarray:
    """Up to ``n`` boxes ``(M, 4)`` inside the image whose overlap with every ``avoid`` box is small.

    Sides are drawn from ``sides`` (typical cell sizes) scaled within ``cfg.side_range``; centres on
    ``points`` (stained pixels) for a fraction ``cfg.on_objects``, uniform otherwise. Fewer than
    ``n`` come back when the image is crowded with annotated cells.
    """
    if n <= 0:
        return np.zeros((0, 4), np.float32)
    sides = np.asarray(sides, np.float64).reshape(-1)
    if sides.size == 0:
        sides = np.array([cfg.default_side])
    m = n * tries
    lo, hi = cfg.side_range
    side = rng.choice(sides, m) * np.exp(rng.uniform(np.log(lo), np.log(hi), m))
    side = np.clip(side, 4.0, max(4.0, min(width, height)))
    aspect = np.exp(rng.uniform(-0.3, 0.3, m))
    bw, bh = np.minimum(side * aspect, width), np.minimum(side / aspect, height)
    cx = rng.uniform(bw / 2, width - bw / 2)
    cy = rng.uniform(bh / 2, height - bh / 2)
    if points is not None and len(points) and cfg.on_objects > 0:
        on = rng.random(m) < cfg.on_objects
        pick = points[rng.integers(0, len(points), m)]
        cx = np.where(on, np.clip(pick[:, 0], bw / 2, width - bw / 2), cx)
        cy = np.where(on, np.clip(pick[:, 1], bh / 2, height - bh / 2), cy)
    cand = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    ok = np.ones(m, bool) if len(avoid) == 0 else overlap_fractions(cand, avoid).max(axis=1) <= cfg.max_overlap
    return cand[ok][:n].astype(np.float32)


def box_sides(boxes: np.ndarray) -> np.ndarray:
    """Longer sides of boxes (what negative sampling draws cell-like sizes from)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])


__all__ = [
    "CropConfig", "JitterConfig", "NegativeConfig", "background_colour", "square_windows", "cut_window",
    "resize_square", "extract_crops", "whole_image_box", "jitter_boxes", "zoom_boxes", "tile_crop", "overlap_fractions", "object_points",
    "sample_negative_boxes", "box_sides",
]
