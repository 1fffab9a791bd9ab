"""NMS (including duplicates across a tile seam), score floor and cap, and box shrink geometry."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.geometry import clip_boxes, normalise_boxes, shrink_boxes
from fusion.nms import class_floors, nms, pairwise_overlaps, select_detections


def test_overlaps_by_hand():
    iou, contain = pairwise_overlaps([0, 0, 10, 10], [[5, 0, 15, 10], [2, 2, 4, 4], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [50 / 150, 4 / 100, 0.0])
    np.testing.assert_allclose(contain, [0.5, 1.0, 0.0])


def test_nms_keeps_best_of_duplicates_and_separate_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]])
    scores = np.array([0.5, 0.9, 0.3, 0.5])
    keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [1, 2]


def test_nms_across_a_tile_seam():
    # A 64 px cell straddles the seam at x = 128 between two tiles. The left tile's overlap sees it
    # whole; the right tile sees it cut at its own left edge x = 128 (half the cell, half the box).
    whole = [96, 40, 160, 104]
    cut = [128, 40, 160, 104]
    other_cell = [170, 40, 220, 90]  # a neighbour just right of the cut copy: must survive
    boxes = np.array([cut, whole, other_cell], float)
    scores = np.array([0.8, 0.7, 0.6])
    iou, _ = pairwise_overlaps(whole, [cut])
    assert iou[0] == pytest.approx(0.5)  # IoU alone (> 0.5) does not remove the cut copy
    assert nms(boxes, scores, iou_threshold=0.5).tolist() == [0, 1, 2]
    # containment does: the two halves collapse to one box, the neighbour stays
    keep = nms(boxes, scores, iou_threshold=0.5, containment_threshold=0.8)
    assert keep.tolist() == [0, 2]
    # half-overlapping duplicates from either side of the seam (each sees 3/4 of the cell)
    left, right = [96, 40, 144, 104], [112, 40, 160, 104]
    assert len(nms([left, right], [0.6, 0.61], iou_threshold=0.3)) == 1


def test_floor_is_per_class_and_any_class_passes():
    boxes = np.array([[0, 0, 5, 5], [10, 10, 15, 15], [20, 20, 25, 25]], float)
    scores = np.array([[0.05, 0.3], [0.2, 0.05], [0.1, 0.1]])
    floors = class_floors({"A": 0.15, "B": 0.25}, ["A", "B"])
    np.testing.assert_allclose(floors, [0.15, 0.25])
    keep = select_detections(boxes, scores, floors)
    assert sorted(keep.tolist()) == [0, 1]  # row 2 passes neither floor
    assert select_detections(boxes, scores, class_floors(0.0, ["A", "B"])).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown class"):
        class_floors({"C": 0.1}, ["A", "B"])


def test_cap_keeps_the_best_after_nms():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (50, 2))
    boxes = np.concatenate([xy, xy + 10], axis=1)[np.argsort(xy[:, 0])]
    boxes[:, 0] = np.arange(50) * 20.0  # no overlaps
    boxes[:, 2] = boxes[:, 0] + 10
    scores = rng.uniform(0, 1, (50, 3))
    keep = select_detections(boxes, scores, np.zeros(3), max_detections=7)
    best = scores.max(axis=1)
    assert keep.tolist() == np.argsort(-best)[:7].tolist()
    assert len(select_detections(boxes, scores, np.zeros(3), max_detections=None)) == 50
    assert select_detections(np.zeros((0, 4)), np.zeros((0, 3)), np.zeros(3)).tolist() == []


def test_shrink_about_the_centre():
    out = shrink_boxes([[10, 20, 30, 60]], 0.9)
    np.testing.assert_allclose(out, [[11, 22, 29, 58]])  # w 20 -> 18, h 40 -> 36, centre (20, 40) kept
    np.testing.assert_allclose(shrink_boxes([[0, 0, 4, 4]], 1.0), [[0, 0, 4, 4]])
    np.testing.assert_allclose(shrink_boxes([[0, 0, 4, 4]], 1.5), [[-1, -1, 5, 5]])
    with pytest.raises(ValueError, match="box_shrink"):
        shrink_boxes([[0, 0, 1, 1]], 0.0)


def test_shrink_raises_iop_of_a_slightly_loose_box():
    from cytocore.froc import iop_matrix

    gt = np.array([[100, 100, 120, 120]], float)
    loose = np.array([[95, 95, 125, 126]], float)  # centred on the cell, a few px too big
    before = iop_matrix(loose, gt)[0, 0]
    after = iop_matrix(shrink_boxes(loose, 0.7), gt)[0, 0]
    assert before < 0.5 < after


def test_clip_and_normalise():
    np.testing.assert_allclose(clip_boxes([[-3, -1, 105, 50]], 100, 40), [[0, 0, 100, 40]])
    np.testing.assert_allclose(normalise_boxes([[10, 5, 50, 20]], 100, 40), [[0.1, 0.125, 0.5, 0.5]])
