"""The kinds of the top-ranked boxes: each kind from a box built to be it, read only down to N."""
import numpy as np
import pytest

from cytocore.false_positives import KINDS, box_kinds
from cytocore.ranking_ceiling import Truth

# image 0: class-0 cells A, C (20 px), D, E, F, G, H and a class-1 cell B; image 1 has no cell
CELLS = np.array([
    [0, 0, 10, 10],     # A  class 0
    [20, 0, 30, 10],    # B  class 1
    [40, 0, 60, 20],    # C  class 0
    [70, 0, 80, 10],    # D  class 0
    [90, 0, 100, 10],   # E  class 0
    [110, 0, 120, 10],  # F  class 0
    [130, 0, 140, 10],  # G  class 0
    [150, 0, 160, 10],  # H  class 0
], float)
LABELS = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0]])
TRUTH = Truth(np.zeros(len(CELLS), int), CELLS, LABELS)

BOXES = np.array([
    [0, 0, 10, 10],     # A exactly: hit
    [1, 0, 11, 10],     # A again (IoU 0.82): duplicate
    [20, 0, 30, 10],    # B, a class-1 cell: other class
    [40, 0, 50, 10],    # a quarter of C (IoU 0.25, all of it inside C): piece
    [65, -5, 85, 15],   # D with a margin (IoU 0.25, all of D inside it): loose
    [95, 0, 105, 10],   # half of E (IoU 0.33): partial
    [0, 0, 10, 10],     # image 1, where nobody annotated a cell: no cell
    [110, 0, 120, 10],  # F exactly, but 8th for class 0 of its 7 cells: not read
], float)
IMAGES = np.array([0, 0, 0, 0, 0, 0, 1, 0])
SCORES = np.stack([np.linspace(0.95, 0.6, len(BOXES)), np.where(np.arange(len(BOXES)) == 2, 0.9, 0.0)], axis=1)


def test_each_kind_of_box_is_told_apart_down_to_the_number_of_cells():
    kinds = box_kinds(IMAGES, BOXES, SCORES, TRUTH, ["c0", "c1"], hit="iou")
    assert list(kinds["c0"]) == list(KINDS)
    assert kinds["c0"] == {"hit": 1, "duplicate": 1, "other_class": 1, "piece": 1, "loose": 1, "partial": 1, "no_cell": 1}
    assert kinds["c1"] == {**dict.fromkeys(KINDS, 0), "hit": 1}  # one cell: only its top box is read


def test_with_the_challenges_iop_hit_test_a_piece_is_a_hit():
    kinds = box_kinds(IMAGES, BOXES, SCORES, TRUTH, ["c0", "c1"], hit="iop")
    assert kinds["c0"]["hit"] == 2 and kinds["c0"]["piece"] == 0
    assert kinds["c0"]["loose"] == 1 and kinds["c0"]["duplicate"] == 1  # IoP 0.25 with D; A's copy is inside A


def test_a_hit_takes_the_free_cell_it_overlaps_most():
    """Two overlapping cells: the first box hits both (IoU 0.90 and 0.74) and takes the first, so the second
    box, which hits only the first cell, is a duplicate (a hit had the first box taken the other cell)."""
    cells = np.array([[0, 0, 10, 10], [2, 0, 12, 10]], float)
    truth = Truth(np.zeros(2, int), cells, np.ones((2, 1), int))
    boxes = np.array([[0.5, 0, 10.5, 10], [-3, 0, 7, 10]], float)
    kinds = box_kinds(np.zeros(2, int), boxes, np.array([[0.9], [0.8]]), truth, ["c"], hit="iou")
    assert kinds["c"]["hit"] == 1 and kinds["c"]["duplicate"] == 1


def test_no_boxes_and_no_cells_count_nothing():
    empty = Truth(np.zeros(0, int), np.zeros((0, 4)), np.zeros((0, 1), int))
    assert box_kinds(np.zeros(0, int), np.zeros((0, 4)), np.zeros((0, 1)), empty, ["c"]) == {"c": dict.fromkeys(KINDS, 0)}
    assert box_kinds(np.zeros(0, int), np.zeros((0, 4)), np.zeros((0, 1)), TRUTH, ["c0", "c1"])["c0"] == dict.fromkeys(KINDS, 0)


def test_an_unknown_hit_test_is_refused():
    with pytest.raises(ValueError, match="hit test"):
        box_kinds(IMAGES, BOXES, SCORES, TRUTH, ["c0", "c1"], hit="dice")
