"""Segmentation validation metrics: Dice/IoU, pooled and per image, and the adapted Rand error."""
from __future__ import annotations

import math

import numpy as np
import pytest

from segmentation.metrics import SegScores, dice_iou, instance_labels, rand_error


def test_dice_iou_known_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 px
    b[1:3] = True  # 8 px, 4 shared
    d, i = dice_iou(a, b)
    assert d == pytest.approx(0.5) and i == pytest.approx(4 / 12)
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)
    assert dice_iou(a, np.zeros_like(a)) == (0.0, 0.0)


def test_binary_scores_pool_pixels_over_images():
    s = SegScores(with_rand=False)
    t1 = np.zeros((10, 10), np.uint8)
    t1[:5] = 1  # 50 px
    p1 = np.zeros((10, 10), bool)
    p1[:4] = True  # 40 px, all inside
    s.add(p1, t1)
    s.add(np.zeros((10, 10), bool), np.zeros((10, 10), np.uint8))  # a healthy image, predicted clean
    t3 = np.zeros((10, 10), np.uint8)
    t3[0, :2] = 1  # 2 px, missed
    s.add(np.zeros((10, 10), bool), t3)
    out = s.summary()
    assert out["val_dice"] == pytest.approx(2 * 40 / (40 + 52))
    assert out["val_iou"] == pytest.approx(40 / 52)
    assert out["val_dice_image"] == pytest.approx((2 * 40 / 90 + 0.0) / 2)  # healthy image excluded
    assert s.images == 3


def test_rand_error_sees_merged_and_split_cells():
    t = np.zeros((20, 20), bool)
    t[2:8, 2:8] = True
    t[2:8, 10:16] = True
    truth = instance_labels(t)
    assert truth.max() == 2
    assert rand_error(truth, truth) == pytest.approx(0.0)
    merged = t.copy()
    merged[4:6, 8:10] = True  # a bridge: two cells become one component
    assert rand_error(truth, instance_labels(merged)) > 0.2
    assert dice_iou(merged, t)[0] > 0.95  # while Dice barely notices
    assert math.isnan(rand_error(np.zeros((5, 5), int), np.ones((5, 5), int)))


def test_rand_error_is_averaged_over_images_with_cells():
    s = SegScores()
    t = np.zeros((10, 10), np.uint8)
    t[2:5, 2:5] = 1
    s.add(t > 0, t)
    s.add(np.ones((10, 10), bool), np.zeros((10, 10), np.uint8))  # no cell: no Rand term (NaN skipped)
    out = s.summary("")
    assert out["rand_error"] == pytest.approx(0.0)
    assert out["dice"] == pytest.approx(2 * 9 / (9 + 100 + 9))  # the false positives of image 2 count


def test_class_map_scores():
    t = np.zeros((10, 10), np.uint8)
    t[:5, :5] = 1
    t[5:, 5:] = 2
    p = t.copy()
    p[5:, 5:] = 1  # class 2 cells predicted as class 1: foreground right, class wrong
    s = SegScores(num_classes=3, class_names=["a", "b", "c"], with_rand=False)
    s.add(p, t)
    out = s.summary()
    assert out["val_fg_dice"] == pytest.approx(1.0)
    assert out["val_dice_a"] == pytest.approx(2 * 25 / (50 + 25))
    assert out["val_dice_b"] == pytest.approx(0.0)
    assert math.isnan(out["val_dice_c"])  # absent from both: not part of the mean
    assert out["val_dice"] == pytest.approx((2 * 25 / 75 + 0.0) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        s.add(p[:5], t)
