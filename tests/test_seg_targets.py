"""U-Net targets from masks, ellipses, refined boxes and class-index maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytocore.errors import DataError
from cytocore.records import ImageRecord
from tests.conftest import row_of_cells
from segmentation.metrics import dice_iou
from segmentation.targets import (
    RefineOptions,
    binary_target,
    box_class,
    class_target,
    ellipse_in_box,
    make_target,
    refine_box,
    optical_density,
    rescale_image,
)


def _slide(h=80, w=80):
    """Pale glass with a little noise, like an empty region of a brushing."""
    rng = np.random.default_rng(0)
    return np.clip(235 + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r**2


def test_ellipse_is_inscribed_in_the_box():
    box = np.array([10, 20, 30, 60], np.float32)  # 20 wide, 40 high
    e = ellipse_in_box(box, (80, 80))
    ys, xs = np.nonzero(e)
    assert xs.min() >= 10 and xs.max() < 30 and ys.min() >= 20 and ys.max() < 60
    assert e.sum() == pytest.approx(np.pi * 10 * 20, rel=0.05)
    assert e[40, 20] and not e[20, 10] and not e[59, 29]


def test_tiny_and_clipped_boxes_keep_a_pixel_and_stay_inside():
    assert ellipse_in_box(np.array([5.2, 5.2, 5.6, 5.6]), (10, 10)).sum() == 1
    clipped = ellipse_in_box(np.array([-10, -10, 10, 10], np.float32), (8, 8))
    assert clipped.shape == (8, 8) and clipped[0, 0] and clipped.sum() > 30


def test_binary_target_kinds():
    image = _slide()
    boxes = np.array([[10, 10, 30, 30]], np.float32)
    mask = np.zeros((80, 80), np.uint8)
    mask[50:60, 50:60] = 255
    assert (binary_target(image, boxes, mask, "mask") == (mask > 0)).all()
    assert (binary_target(image, boxes, mask, "auto") == (mask > 0)).all()
    ell = binary_target(image, boxes, None, "auto")
    assert ell.dtype == np.uint8 and set(np.unique(ell)) == {0, 1}
    assert (ell.astype(bool) == ellipse_in_box(boxes[0], (80, 80))).all()
    with pytest.raises(DataError, match="img.png: targets.kind is 'mask' but this image has no mask"):
        binary_target(image, boxes, None, "mask", where="img.png")
    with pytest.raises(DataError, match="mask is 40x40 but the image is 80x80"):
        binary_target(image, boxes, np.zeros((40, 40), np.uint8), "mask")


def test_refined_target_follows_the_stained_cell():
    image = _slide()
    cell = _disc((80, 80), 30, 34, 9)  # an off-centre round cell in a loose box
    image[cell] = (110, 80, 150)
    box = np.array([18, 18, 48, 46], np.float32)
    refined = refine_box(optical_density(image), box)
    ellipse = ellipse_in_box(box, (80, 80))
    assert dice_iou(refined, cell)[1] > 0.8
    assert dice_iou(refined, cell)[1] > dice_iou(ellipse, cell)[1] + 0.2
    assert not refined[:, :18].any() and not refined[46:].any()  # never leaves the box


def test_refined_target_keeps_pale_cytoplasm_with_its_nucleus():
    image = _slide()
    cell = _disc((80, 80), 40, 40, 13)
    image[cell] = (205, 185, 215)  # pale cytoplasm
    image[_disc((80, 80), 38, 42, 8)] = (30, 20, 80)  # dark nucleus
    box = np.array([22, 22, 58, 58], np.float32)
    refined = refine_box(optical_density(image), box)
    # A 2-class Otsu threshold splits nucleus from the rest here (and then falls back to the
    # ellipse, IoU 0.53); the glass-vs-stain threshold keeps the whole cell.
    assert dice_iou(refined, cell)[1] > 0.9


def test_refined_target_falls_back_to_the_ellipse():
    box = np.array([20, 20, 50, 50], np.float32)
    flat = np.full((80, 80, 3), 200, np.uint8)  # no contrast at all
    assert (refine_box(optical_density(flat), box) == ellipse_in_box(box, (80, 80))).all()
    speck = _slide()
    speck[34:36, 34:36] = 60  # a dark speck, far less than min_fraction of the ellipse
    refined = refine_box(optical_density(speck), box, RefineOptions(min_fraction=0.3))
    assert (refined == ellipse_in_box(box, (80, 80))).all()
    t = binary_target(speck, box[None], None, "refined")
    assert (t.astype(bool) == ellipse_in_box(box, (80, 80))).all()


def test_box_class_rule_first_set_class_in_header_order():
    labels = np.array([[1, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
    assert box_class(labels).tolist() == [0, 3, 1, -1]


def test_class_map_smaller_box_wins_and_multi_hot_uses_first_class():
    image = _slide()
    boxes = np.array([[10, 10, 50, 50], [30, 30, 46, 46], [60, 60, 70, 70], [0, 60, 10, 70]], np.float32)
    labels = np.array([[0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]], np.uint8)
    m = class_target(image, boxes, labels, num_classes=4, kind="ellipse")
    assert m.dtype == np.uint8
    assert m[38, 38] == 1  # overlap: the smaller SCC+NSCLC box (class 0 -> 1) wins over the big AC box
    assert m[20, 30] == 2  # the big box's own area: AC (class 1 -> 2)
    assert m[65, 65] == 4  # NSCLC only
    assert m[65, 5] == 0  # a box without a class stays background
    # Same result whatever the row order: the rule depends on areas, not on file order.
    order = [1, 3, 0, 2]
    assert (class_target(image, boxes[order], labels[order], 4, kind="ellipse") == m).all()


def test_class_map_from_masks_uses_mask_inside_boxes():
    image = _slide()
    mask = np.zeros((80, 80), np.uint8)
    mask[12:20, 12:20] = 1  # inside box 0
    mask[70:75, 70:75] = 1  # a masked cell no box covers: background in class maps
    boxes = np.array([[10, 10, 25, 25], [40, 40, 60, 60]], np.float32)  # box 1 has no mask pixel
    labels = np.array([[0, 1], [1, 0]], np.uint8)
    m = class_target(image, boxes, labels, 2, mask=mask, kind="auto")
    assert (m[12:20, 12:20] == 2).all() and m[10:25, 10:25].sum() == 2 * 64
    assert m[72, 72] == 0
    assert (m == 1).sum() == ellipse_in_box(boxes[1], (80, 80)).sum()  # fallback: the ellipse


def _record(tmp_path, mask: bool, w=64, h=48):
    image = _slide(h, w)
    image[10:30, 20:40] = (90, 70, 140)
    path = tmp_path / "a.png"
    Image.fromarray(image).save(path)
    mask_path = None
    if mask:
        m = np.zeros((h, w), np.uint8)
        m[10:30, 20:40] = 255
        mask_path = tmp_path / "a_mask.png"
        Image.fromarray(m).save(mask_path)
    return ImageRecord("a", path, w, h, boxes=[[20, 10, 40, 30]], labels=[[0, 1]], mask_path=mask_path), image


def test_make_target_at_training_scale(tmp_path):
    rec, image = _record(tmp_path, mask=True)
    small = rescale_image(image, 0.5)
    assert small.shape == (24, 32, 3)
    t = make_target(rec, small, "binary", "auto")
    assert t.shape == (24, 32) and t[5:15, 10:20].all() and t.sum() == 100
    c = make_target(rec, small, "classes", "auto", num_classes=2)
    assert c.max() == 2 and (c == 2).sum() == 100
    e = make_target(rec, small, "binary", "ellipse")  # boxes are scaled with the image
    assert (e.astype(bool) == ellipse_in_box(np.array([10, 5, 20, 15]), (24, 32))).all()


def test_make_target_checks_mask_size_and_mode(tmp_path):
    rec, image = _record(tmp_path, mask=True)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(rec.mask_path)
    with pytest.raises(DataError, match="a_mask.png: mask is 10x10 but image 'a' is 64x48"):
        make_target(rec, image, "binary", "auto")
    rec2, image2 = _record(tmp_path, mask=False)
    with pytest.raises(DataError, match="targets.mode must be one of binary, classes"):
        make_target(rec2, image2, "boxes", "auto")


def test_scale_auto_follows_the_cells_of_the_training_images():
    """``data.scale: auto`` (the default) trains large blood cells at a quarter of their size and 12 px
    nuclei at 0.75, where one fixed scale suits only one of them; an image set without boxes keeps its size."""
    from segmentation.targets import data_scale

    assert data_scale("auto", row_of_cells(100.0)) == 0.25   # 8 / 100 px, rounded up to a multiple of 0.25
    assert data_scale("auto", row_of_cells(12.0)) == 0.75    # 8 / 12 = 0.67 -> 0.75
    assert data_scale("auto", row_of_cells(5.0)) == 1.0      # never upsampled
    assert data_scale("auto", [ImageRecord("h", Path("h.png"), 50, 50)]) == 1.0
    assert data_scale(0.35, row_of_cells(100.0)) == 0.35 and data_scale("0.5", []) == 0.5
