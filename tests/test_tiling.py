"""Tile-grid geometry: full coverage, bounds, padding of tiny images, blending weights."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cytocore.tiling import axis_tiling, gaussian_importance_map, overlap_pixels, reflect_indices, tile_grid


def _check_axis(length: int, tile: int, overlap: float, context: int) -> None:
    ax = axis_tiling(length, tile, overlap, context)
    core = tile - 2 * context
    assert ax.core == core
    covered = np.zeros(length, bool)
    for s in ax.starts:
        # the tile lies inside the padded axis, its core inside the (end-padded) image
        assert 0 <= s and s + tile <= ax.padded_length
        covered[s : s + core] = True
    assert covered.all(), f"length {length}: pixels not covered by any core"
    assert np.all(np.diff(ax.starts) > 0), "starts must increase"
    if len(ax.starts) > 1:
        # consecutive cores overlap by at least the requested overlap (never leave a gap)
        assert np.all(np.diff(ax.starts) <= core - overlap_pixels(core, overlap))
        assert ax.starts[-1] + core == length, "the last core must end at the image edge"
    assert ax.padded_length == max(length, core) + 2 * context


@pytest.mark.parametrize("tile,overlap,context", [(64, 0.25, 0), (64, 0.5, 8), (32, 0.0, 4), (16, 3, 1), (8, 0.25, 0)])
def test_axis_cover_many_lengths(tile, overlap, context):
    for length in list(range(1, 300)) + [1023, 1024, 1025, 4097]:
        _check_axis(length, tile, overlap, context)


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 20_000),
    tile=st.integers(2, 512),
    overlap=st.floats(0.0, 0.9),
    context=st.integers(0, 64),
)
def test_axis_cover_random(length, tile, overlap, context):
    if tile - 2 * context < 1:
        with pytest.raises(ValueError):
            axis_tiling(length, tile, overlap, context)
        return
    core = tile - 2 * context
    if round(core * overlap) >= core:  # no stride left: a clear error, not a grid
        with pytest.raises(ValueError):
            axis_tiling(length, tile, overlap, context)
        return
    _check_axis(length, tile, overlap, context)


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (64, 64), (65, 129), (1000, 777)])
def test_grid_positions_in_bounds(shape):
    grid = tile_grid(shape, 64, 0.25, 8)
    ph, pw = grid.padded_shape
    cover = np.zeros(shape, int)
    positions = list(grid.positions())
    assert len(positions) == len(grid)
    for y, x in positions:
        assert 0 <= y and y + 64 <= ph and 0 <= x and x + 64 <= pw
        cover[y : y + 48, x : x + 48] += 1
    assert cover.min() >= 1


def test_tiny_image_single_tile_padded():
    grid = tile_grid((1, 1), 32, 0.25, 4)
    assert len(grid) == 1
    assert grid.padded_shape == (32, 32)


def test_bad_geometry_raises():
    with pytest.raises(ValueError):
        axis_tiling(0, 32)
    with pytest.raises(ValueError):
        axis_tiling(100, 16, 0.25, 8)  # no core left
    with pytest.raises(ValueError):
        axis_tiling(100, 16, 16)  # overlap as large as the core


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_reflect_indices_match_numpy_pad(n):
    values = np.arange(n) * 10
    pad = 25
    expected = np.pad(values, pad, mode="reflect")
    got = values[reflect_indices(np.arange(-pad, n + pad), n)]
    np.testing.assert_array_equal(got, expected)


def test_gaussian_importance_map():
    w = gaussian_importance_map((48, 64), sigma_scale=0.125, min_weight=1e-3)
    assert w.shape == (48, 64) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-3)
    assert w.min() >= 0.999e-6, "weights must never be zero at tile edges (min_weight² at corners)"
    # separable: every row is a multiple of every other (so a common row factor cancels in blending)
    np.testing.assert_allclose(w / w[:, :1], np.broadcast_to(w[:1] / w[0, 0], w.shape), rtol=1e-5)
    # symmetric, peaked in the centre, decreasing towards the edges
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
    assert w[24, 32] > w[24, 16] > w[24, 0]
    # sigma = sigma_scale x size: one sigma from the centre the weight is exp(-1/2)
    wide = gaussian_importance_map((1, 801), sigma_scale=0.125, min_weight=0)
    sigma = 0.125 * 801
    assert wide[0, 400 + 100] == pytest.approx(np.exp(-0.5 * (100 / sigma) ** 2), rel=1e-5)
    with pytest.raises(ValueError):
        gaussian_importance_map(8, sigma_scale=0)
