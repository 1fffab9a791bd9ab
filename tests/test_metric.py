"""The official FROC metric: the organisers' worked example, the ignore rule, and a brute-force check."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cytocore.froc import FP, FP_RATES, IGNORED, TP, class_froc, iop_matrix, match_predictions

# --- the organisers' worked example, built from geometry -------------------------------------------
# 3 images, 5 ground-truth boxes (all of one class).
EX_GT_IMAGE = np.array([0, 0, 1, 1, 2])
EX_GT_BOXES = np.array([
    [0, 0, 10, 10],  # GT1 (image 0)
    [100, 100, 110, 110],  # GT2 (image 0)
    [0, 0, 10, 10],  # GT3 (image 1), never found
    [50, 50, 60, 60],  # GT4 (image 1), never found
    [0, 0, 10, 10],  # GT5 (image 2), never found
], float)
EX_PRED_IMAGE = np.array([0, 1, 0, 0, 2])
EX_PRED_BOXES = np.array([
    [1, 1, 9, 9],  # A: inside GT1, IoP 1 → TP
    [200, 200, 210, 210],  # B: on nothing → FP
    [102, 100, 112, 110],  # C: IoP 0.8 with GT2 → TP
    [0, 0, 10, 12],  # D: IoP 100/120 with GT1, already taken → ignored
    [300, 300, 310, 310],  # E: on nothing → FP
], float)
EX_SCORES = np.array([0.99, 0.97, 0.81, 0.72, 0.58])


def example_froc(thresholds):
    return class_froc(EX_PRED_IMAGE, EX_PRED_BOXES, EX_SCORES, EX_GT_IMAGE, EX_GT_BOXES, 3, thresholds)


def test_worked_example_outcomes():
    out = match_predictions(EX_PRED_IMAGE, EX_PRED_BOXES, EX_SCORES, EX_GT_IMAGE, EX_GT_BOXES)
    assert out.tolist() == [TP, FP, TP, IGNORED, FP]


def test_worked_example_fixed_thresholds():
    res = example_froc([0.9, 0.7, 0.5])
    np.testing.assert_allclose(res.fp_per_image, [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(res.recall, [0, 0.4, 0.4])
    assert res.froc == pytest.approx(0.383333, abs=5e-7)
    assert res.froc == pytest.approx((0.3 + 5 * 0.4) / 6)


def test_worked_example_every_distinct_score():
    # At t = 0.99 only A is kept: (0 FP, 1 TP) lifts the start of the curve from (0, 0) to (0, 0.2).
    res = example_froc("distinct")
    np.testing.assert_allclose(res.fp_per_image, [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(res.recall, [0.2, 0.4, 0.4])
    assert res.froc == pytest.approx(0.391667, abs=5e-7)
    assert res.froc == pytest.approx((0.35 + 5 * 0.4) / 6)
    assert res.recall_at[0.25] == pytest.approx(0.35)
    assert res.thresholds[0] == pytest.approx(0.99)


def test_no_fallback_to_second_best_box():
    gt = np.array([[0, 0, 10, 10], [0, 2, 10, 10]], float)
    preds = np.array([[0, 0, 10, 10], [0, 1, 10, 10]], float)  # the second's best box is the first GT too
    out = match_predictions([0, 0], preds, [0.9, 0.8], [0, 0], gt)
    assert out.tolist() == [TP, IGNORED]
    res = class_froc([0, 0], preds, [0.9, 0.8], [0, 0], gt, 1)
    assert res.froc == pytest.approx(0.5)  # one of two boxes found, no FP at any threshold


def test_iop_is_over_prediction_area_and_must_exceed_half():
    gt = np.array([[0, 0, 10, 10]], float)
    preds = np.array([
        [0, 0, 20, 10],  # IoP exactly 0.5 → not a hit
        [0, 0, 19, 10],  # IoP 10/19 > 0.5
        [2, 2, 4, 4],  # tiny box inside: IoP 1 (IoU would be 0.04)
        [5, 5, 5, 9],  # no area: overlaps nothing
    ], float)
    np.testing.assert_allclose(iop_matrix(preds, gt)[:, 0], [0.5, 10 / 19, 1.0, 0.0])
    out = match_predictions([0, 0, 0, 0], preds, [0.9, 0.8, 0.7, 0.6], [0], gt)
    assert out.tolist() == [FP, TP, IGNORED, FP]


def test_equal_scores_enter_together_and_match_in_input_order():
    gt = np.array([[0, 0, 10, 10]], float)
    preds = np.array([[50, 50, 60, 60], [1, 1, 9, 9], [0, 0, 10, 10]], float)
    out = match_predictions([0, 0, 0], preds, [0.5, 0.5, 0.5], [0], gt)
    assert out.tolist() == [FP, TP, IGNORED]
    res = class_froc([0, 0, 0], preds, [0.5, 0.5, 0.5], [0], gt, 4, "distinct")
    # One threshold only: 1 FP over 4 images and recall 1 together; the curve is (0,0) → (1/4, 1).
    np.testing.assert_allclose(res.fp_per_image, [0, 0.25])
    np.testing.assert_allclose(res.recall, [0, 1])
    assert res.froc == pytest.approx(1.0)


def test_no_predictions_scores_zero():
    res = class_froc(np.zeros(0, int), np.zeros((0, 4)), np.zeros(0), [0], [[0, 0, 5, 5]], 2)
    assert res.froc == 0.0
    res = class_froc(np.zeros(0, int), np.zeros((0, 4)), np.zeros(0), [0], [[0, 0, 5, 5]], 2, [0.5])
    assert res.froc == 0.0


def test_recall_is_held_beyond_the_last_point():
    # One TP and nothing else: recall 1/2 at 0 FP, held at every FP rate.
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    res = class_froc([0], [[0, 0, 10, 10]], [0.3], [0, 0], gt, 5)
    assert res.froc == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in res.recall_at.values())


def test_predictions_on_images_without_boxes_are_false_positives():
    out = match_predictions([1], [[0, 0, 10, 10]], [0.9], [0], [[0, 0, 10, 10]])
    assert out.tolist() == [FP]


def test_threshold_above_every_score_gives_the_origin():
    res = class_froc([0], [[0, 0, 10, 10]], [0.3], [0], [[0, 0, 10, 10]], 1, [0.9])
    assert res.froc == 0.0


# --- brute force, written plainly from the definition ---------------------------------------------
def brute_force_froc(pred_image, pred_boxes, scores, gt_image, gt_boxes, n_images, thresholds):
    n_gt = len(gt_boxes)
    if thresholds == "distinct":
        thresholds = sorted(set(float(s) for s in scores), reverse=True)
    points = [(0, 0)]  # (FP count, TP count)
    for t in thresholds:
        kept = [i for i in range(len(scores)) if scores[i] >= t]
        kept.sort(key=lambda i: (-scores[i], i))
        matched = [False] * n_gt
        tp = fp = 0
        for i in kept:
            best, best_iop = None, -1.0
            for j in range(n_gt):
                if gt_image[j] != pred_image[i]:
                    continue
                p, g = pred_boxes[i], gt_boxes[j]
                w = min(p[2], g[2]) - max(p[0], g[0])
                h = min(p[3], g[3]) - max(p[1], g[1])
                inter = max(w, 0) * max(h, 0)
                area = max(p[2] - p[0], 0) * max(p[3] - p[1], 0)
                iop = inter / area if area > 0 else 0.0
                if iop > best_iop:
                    best, best_iop = j, iop
            if best is not None and best_iop > 0.5:
                if not matched[best]:
                    matched[best] = True
                    tp += 1
            else:
                fp += 1
        points.append((fp, tp))
    best_tp = {}
    for fp, tp in points:
        best_tp[fp] = max(best_tp.get(fp, 0), tp)
    xs = sorted(best_tp)
    curve = [(x / n_images, best_tp[x] / n_gt) for x in xs]
    total = 0.0
    for rate in FP_RATES:
        value = curve[-1][1]
        for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
            if x0 <= rate <= x1:
                value = y0 + (y1 - y0) * (rate - x0) / (x1 - x0)
                break
        total += value
    return total / len(FP_RATES)


coord = st.integers(0, 12)
box = st.tuples(coord, coord, st.integers(1, 8), st.integers(1, 8)).map(lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))


@st.composite
def scenes(draw):
    n_images = draw(st.integers(1, 4))
    gts = draw(st.lists(st.tuples(st.integers(0, n_images - 1), box), min_size=1, max_size=8))
    preds = draw(st.lists(
        st.tuples(st.integers(0, n_images - 1), box, st.sampled_from([0.1, 0.3, 0.5, 0.5, 0.7, 0.9, 1.0])),
        max_size=25,
    ))
    grid = draw(st.lists(st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.6, 0.9, 1.0, 1.1]), min_size=1, max_size=5))
    return n_images, gts, preds, grid


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_fast_matches_brute_force(scene):
    n_images, gts, preds, grid = scene
    gt_image = np.array([g[0] for g in gts])
    gt_boxes = np.array([g[1] for g in gts], float)
    pred_image = np.array([p[0] for p in preds], int)
    pred_boxes = np.array([p[1] for p in preds], float).reshape(-1, 4)
    scores = np.array([p[2] for p in preds], float)
    for mode in ("distinct", grid):
        fast = class_froc(pred_image, pred_boxes, scores, gt_image, gt_boxes, n_images, mode).froc
        slow = brute_force_froc(pred_image.tolist(), pred_boxes.tolist(), scores.tolist(), gt_image.tolist(),
                                gt_boxes.tolist(), n_images, mode)
        assert fast == pytest.approx(slow, abs=1e-12)
