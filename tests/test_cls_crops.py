"""Crop geometry: windows, padding at image borders, tiny boxes, jitter and negatives."""
from __future__ import annotations

import numpy as np
import pytest

from classification.crops import (
    CropConfig,
    JitterConfig,
    NegativeConfig,
    background_colour,
    cut_window,
    extract_crops,
    jitter_boxes,
    overlap_fractions,
    sample_negative_boxes,
    square_windows,
)


def _ramp(h: int = 40, w: int = 60) -> np.ndarray:
    """An image whose pixel (y, x) is (x, y, 7): every crop pixel says where it came from."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w)[None, :]
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = 7
    return img


def test_square_window_centres_the_box_and_adds_the_margin():
    win = square_windows(np.array([[10, 20, 30, 30]]), margin=0.25)[0]
    # longer side 20 → 20 × 1.5 = 30 pixels, centred on (20, 25)
    assert win[2] - win[0] == 30 and win[3] - win[1] == 30
    assert (win[0] + win[2]) / 2 == pytest.approx(20, abs=0.5)
    assert (win[1] + win[3]) / 2 == pytest.approx(25, abs=0.5)


def test_crop_inside_the_image_is_the_exact_pixels_when_no_resize():
    img = _ramp()
    cfg = CropConfig(size=20, margin=0.0)
    crop = extract_crops(img, np.array([[5, 8, 25, 28]], np.float32), cfg)[0]
    np.testing.assert_array_equal(crop, img[8:28, 5:25])


def test_margin_enlarges_the_window_with_context():
    img = _ramp(100, 100)
    no_margin = extract_crops(img, np.array([[40, 40, 60, 60]]), CropConfig(size=20, margin=0.0))[0]
    margin = extract_crops(img, np.array([[40, 40, 60, 60]]), CropConfig(size=40, margin=0.5))[0]
    assert no_margin[0, 0, 0] == 40 and no_margin[-1, -1, 0] == 59
    assert margin[0, 0, 0] == 30 and margin[-1, -1, 0] == 69  # 10 px of context each side


@pytest.mark.parametrize("box", [[0, 0, 10, 10], [50, 30, 60, 40], [-5, 12, 6, 24], [55, 35, 70, 50]])
def test_box_touching_or_crossing_the_border_is_padded_with_the_background_colour(box):
    img = _ramp()
    fill = np.array([200, 100, 50], np.uint8)
    cfg = CropConfig(size=24, margin=0.5, padding="constant", fill=[200, 100, 50])
    crop = extract_crops(img, np.array([box], np.float32), cfg)[0]
    assert crop.shape == (24, 24, 3)
    win = square_windows(np.array([box]), 0.5, cfg.min_side)[0]
    ys, xs = np.mgrid[win[1]:win[3], win[0]:win[2]]
    outside = (xs < 0) | (ys < 0) | (xs >= img.shape[1]) | (ys >= img.shape[0])
    assert outside.any(), "the test box should push the window over the border"
    # Sample at native resolution: the window side is 24 only for 16-pixel boxes, so compare cut_window directly.
    patch = cut_window(img, win, "constant", fill)
    assert np.all(patch[outside] == fill)
    np.testing.assert_array_equal(patch[~outside][:, 0], xs[~outside])  # inside pixels keep their place
    np.testing.assert_array_equal(patch[~outside][:, 1], ys[~outside])


def test_reflect_padding_mirrors_the_image_at_the_border():
    img = _ramp()
    win = (-3, 0, 5, 8)
    patch = cut_window(img, win, "reflect", np.zeros(3, np.uint8))
    # columns -3, -2, -1 mirror columns 3, 2, 1 (reflection without repeating the edge)
    np.testing.assert_array_equal(patch[0, :4, 0], [3, 2, 1, 0])


def test_auto_fill_is_the_image_background():
    img = np.full((50, 50, 3), (230, 220, 240), np.uint8)
    img[20:30, 20:30] = (90, 40, 120)
    np.testing.assert_array_equal(background_colour(img), [230, 220, 240])
    crop = extract_crops(img, np.array([[0, 0, 6, 6]]), CropConfig(size=16, margin=0.5))[0]
    np.testing.assert_array_equal(crop[0, 0], [230, 220, 240])


def test_tiny_and_degenerate_boxes_still_give_a_full_crop():
    img = _ramp()
    cfg = CropConfig(size=32, margin=0.25, min_side=8)
    crops = extract_crops(img, np.array([[10, 10, 11, 11], [20, 20, 20, 20]], np.float32), cfg)
    assert crops.shape == (2, 32, 32, 3)
    win = square_windows(np.array([[20, 20, 20, 20]]), 0.25, 8)[0]
    assert win[2] - win[0] == 8


def test_box_entirely_outside_gives_a_fill_crop_not_an_error():
    img = _ramp()
    crop = extract_crops(img, np.array([[200, 200, 220, 220]]), CropConfig(size=16, padding="reflect", fill=[1, 2, 3]))[0]
    assert np.all(crop == [1, 2, 3])


def test_no_boxes_gives_an_empty_batch():
    assert extract_crops(_ramp(), np.zeros((0, 4)), CropConfig(size=16)).shape == (0, 16, 16, 3)


def test_crop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="padding"):
        CropConfig(padding="wrap")
    with pytest.raises(ValueError, match="unknown crop option"):
        CropConfig.from_dict({"sise": 64})


def test_jitter_moves_and_rescales_within_limits():
    rng = np.random.default_rng(0)
    box = np.array([[100, 100, 140, 120]], np.float32)
    cfg = JitterConfig(shift=0.1, scale=0.2, aspect=0.0)
    out = jitter_boxes(np.repeat(box, 500, axis=0), rng, cfg)
    cx = (out[:, 0] + out[:, 2]) / 2
    w = out[:, 2] - out[:, 0]
    assert np.all(np.abs(cx - 120) <= 0.1 * 40 + 1e-4)
    assert np.all((w >= 40 / 1.2 - 1e-3) & (w <= 40 * 1.2 + 1e-3))
    assert w.std() > 1 and cx.std() > 1  # it actually jitters


def test_overlap_fractions_catch_containment_both_ways():
    big = np.array([[0, 0, 100, 100]], np.float32)
    small = np.array([[10, 10, 20, 20], [200, 200, 210, 210]], np.float32)
    np.testing.assert_allclose(overlap_fractions(small, big)[:, 0], [1.0, 0.0])
    np.testing.assert_allclose(overlap_fractions(big, small)[0], [1.0, 0.0])


def test_negatives_are_sampled_away_from_cancer_boxes():
    rng = np.random.default_rng(1)
    gt = np.array([[20, 20, 60, 60], [100, 30, 140, 70], [40, 100, 90, 150]], np.float32)
    points = np.array([[40, 40], [120, 50], [160, 160], [10, 150]], np.float32)  # two on cancer cells
    cfg = NegativeConfig(max_overlap=0.05, on_objects=0.7)
    neg = sample_negative_boxes(rng, 200, 200, gt, 200, np.array([20.0, 30.0]), cfg, points)
    assert len(neg) > 50
    assert np.all(overlap_fractions(neg, gt) <= 0.05 + 1e-6)
    assert np.all((neg[:, :2] >= 0) & (neg[:, 2:] <= 200))
    sides = np.maximum(neg[:, 2] - neg[:, 0], neg[:, 3] - neg[:, 1])
    assert sides.min() >= 20 * 0.5 * 0.7 and sides.max() <= 30 * 2.0 * 1.4  # cell-like sizes


def test_negatives_in_a_fully_boxed_image_come_back_empty():
    rng = np.random.default_rng(0)
    neg = sample_negative_boxes(rng, 50, 50, np.array([[0, 0, 50, 50]], np.float32), 5, np.array([10.0]), NegativeConfig())
    assert len(neg) == 0
