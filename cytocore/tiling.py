"""Tile-grid geometry for sliding-window inference over images of any size.

A fully convolutional network can only see a bounded window at a time on a CPU, and its output is
least reliable near the window's edge (zero padding inside the network). So an image is covered by
overlapping tiles, and the per-tile outputs are blended with a weight that is high in a tile's
centre and low towards its edges, which removes seams.

Vocabulary used throughout (one axis; the two axes are independent):

* **tile** — what the network sees (``tile`` pixels; a multiple of the network's divisor).
* **context** — a ring of ``context`` pixels on each side of the tile whose outputs are thrown away:
  they only give the pixels inside the ring their neighbourhood. With ``context=0`` this is exactly
  MONAI's ``SlidingWindowInferer``.
* **core** — the rest, ``tile - 2*context`` pixels: the part of each tile's output that is blended.
  Cores overlap by ``overlap`` (a fraction of the core, or whole pixels when ≥ 1) and together cover
  every image pixel.
* The image is padded (reflect) by ``context`` on every side, and up to one core at the end when it
  is smaller than a core, so tile ``i`` reads padded pixels ``[start_i, start_i + tile)`` and writes
  image pixels ``[start_i, start_i + core)``: tile starts in padded coordinates *are* core starts
  in image coordinates.

Blending (as MONAI's ``blend_mode="gaussian"``): each core's output is multiplied by a Gaussian
importance map with ``sigma = sigma_scale × core size`` per axis and peak 1, and the blended value
is ``Σ w_t · p_t / Σ w_t`` over the tiles ``t`` covering the pixel (where one tile covers a pixel, that
is its own output). Weights are never exactly zero at a core's edges or corners, so the sum never
vanishes and float underflow cannot make it: MONAI clamps the 2-D map at a floor; here each axis'
profile is clamped at ``min_weight`` instead, so the map stays separable and never falls below
``min_weight²``. (With a 2-D floor, in the rows near the image's top edge — covered by one row of
tiles whose row weight is tiny — every tile's corner pixels get the floor weight and outweigh its
good centre pixels; separable weights keep the row factor common to all tiles, so it cancels.)
Because every tile's weights are identical, the blend is a smooth partition of unity: no seams, and
a network whose receptive field fits in ``context`` gives the same output tiled as on the whole
(padded) image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np

Pair = Union[int, Sequence[int]]


def _pair(value: Pair, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, not {value!r}")
    return values  # type: ignore[return-value]


def overlap_pixels(core: int, overlap: float) -> int:
    """Overlap between neighbouring cores in pixels: a fraction of the core if < 1, else pixels."""
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, not {overlap}")
    px = int(round(core * overlap)) if overlap < 1 else int(overlap)
    if px >= core:
        raise ValueError(f"overlap of {px} px leaves no stride for a core of {core} px")
    return px


@dataclass(frozen=True)
class AxisTiling:
    """Tiling of one axis of length ``length``; see the module docstring for the vocabulary."""

    length: int
    tile: int
    context: int
    starts: np.ndarray  # core starts in image coordinates == tile starts in padded coordinates

    @property
    def core(self) -> int:
        return self.tile - 2 * self.context

    @property
    def pad_before(self) -> int:
        return self.context

    @property
    def pad_after(self) -> int:
        return self.context + max(0, self.core - self.length)

    @property
    def padded_length(self) -> int:
        return self.length + self.pad_before + self.pad_after

    def __len__(self) -> int:
        return len(self.starts)


def axis_tiling(length: int, tile: int, overlap: float = 0.25, context: int = 0) -> AxisTiling:
    """Core starts spread evenly (as nnU-Net does) so neighbouring overlaps are all about equal.

    The number of tiles is the least that keeps every step ≤ ``core - overlap``; the first core
    starts at 0 and the last ends exactly at the image edge (or past it, into padding, when the
    image is smaller than one core).
    """
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}")
    if context < 0 or tile - 2 * context < 1:
        raise ValueError(f"tile {tile} leaves no core with context {context} on each side")
    core = tile - 2 * context
    stride = core - overlap_pixels(core, overlap)
    if length <= core:
        starts = np.zeros(1, np.int64)
    else:
        n = int(np.ceil((length - core) / stride)) + 1
        starts = np.round(np.linspace(0, length - core, n)).astype(np.int64)
    return AxisTiling(length=int(length), tile=int(tile), context=int(context), starts=starts)


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering an image in raster order (row of tiles by row of tiles)."""

    rows: AxisTiling
    cols: AxisTiling

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.length, self.cols.length

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.rows.tile, self.cols.tile

    @property
    def core_shape(self) -> tuple[int, int]:
        return self.rows.core, self.cols.core

    @property
    def context(self) -> tuple[int, int]:
        return self.rows.context, self.cols.context

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.rows.padded_length, self.cols.padded_length

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(y, x)`` tile starts in padded coordinates (= core starts in image coordinates)."""
        for y in self.rows.starts:
            for x in self.cols.starts:
                yield int(y), int(x)


def tile_grid(shape: Sequence[int], tile: Pair, overlap: float = 0.25, context: Pair = 0) -> TileGrid:
    """The tile grid for an image of ``shape`` (height, width, ...)."""
    th, tw = _pair(tile, "tile")
    ch, cw = _pair(context, "context")
    return TileGrid(axis_tiling(int(shape[0]), th, overlap, ch), axis_tiling(int(shape[1]), tw, overlap, cw))


def reflect_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """Map any integer indices into ``[0, n)`` as ``np.pad(mode="reflect")`` does (``d c b | a b c d | c b a``).

    Works for pads longer than the axis (reflection repeats), so a 1×1 image pads to a full tile.
    Gathering rows with these indices pads a strip of a huge image without padding the whole image.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if n < 1:
        raise ValueError("cannot reflect into an empty axis")
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def gaussian_importance_map(shape: Pair, sigma_scale: float = 0.125, min_weight: float = 1e-3) -> np.ndarray:
    """Blending weights for one core: separable Gaussian, peak 1, each axis clamped at ``min_weight``.

    ``sigma = sigma_scale × size`` per axis (MONAI's convention; 0.125 puts the edge at 4 sigma).
    """
    h, w = _pair(shape, "shape")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, not {sigma_scale}")

    def profile(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-0.5 * (x / (sigma_scale * n)) ** 2)
        return np.maximum(g / g.max(), min_weight)

    return np.outer(profile(h), profile(w)).astype(np.float32)


def box_window(box: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer ``(y0, y1, x0, x1)`` of the pixels a box touches, clipped to the image."""
    h, w = shape
    x0 = int(np.clip(np.floor(box[0]), 0, w))
    y0 = int(np.clip(np.floor(box[1]), 0, h))
    x1 = int(np.clip(np.ceil(box[2]), 0, w))
    y1 = int(np.clip(np.ceil(box[3]), 0, h))
    return y0, y1, x0, x1
