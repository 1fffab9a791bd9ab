"""Cell outlines from instance label planes: real shapes (more than 4 vertices), inside their boxes."""
from __future__ import annotations

import numpy as np

from cytocore.outlines import label_outline, mask_outline, ring_area


def _disc_labels():
    labels = np.zeros((60, 80), np.uint32)
    yy, xx = np.mgrid[:60, :80]
    labels[(yy - 30) ** 2 + (xx - 20) ** 2 <= 10 ** 2] = 1
    labels[(yy - 12) ** 2 / 25 + (xx - 60) ** 2 / 100 <= 1] = 2  # an ellipse
    labels[50:54, 70:80] = 3  # touches the image edge
    return labels


def test_outlines_are_polygons_inside_their_boxes_with_about_the_right_area():
    labels = _disc_labels()
    for label_id in (1, 2, 3):
        ys, xs = np.nonzero(labels == label_id)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        ring = label_outline(labels, label_id, box)
        assert np.array_equal(ring[0], ring[-1])  # closed
        assert len(np.unique(ring, axis=0)) > 4 or label_id == 3  # a rectangle object may stay a (cut) rectangle
        assert (ring[:, 0] >= box[0]).all() and (ring[:, 0] <= box[2]).all()
        assert (ring[:, 1] >= box[1]).all() and (ring[:, 1] <= box[3]).all()
        assert abs(ring_area(ring) - len(xs)) < 0.12 * len(xs)
    disc = label_outline(labels, 1, (10, 20, 31, 41))
    assert 6 < len(disc) < 40  # simplified: far fewer vertices than the raw contour (~80)


def test_outline_is_clipped_to_a_shrunk_report_box():
    labels = _disc_labels()
    ring = label_outline(labels, 1, (10, 20, 31, 41), report_box=(14, 24, 27, 37))
    assert ring[:, 0].min() >= 14 and ring[:, 0].max() <= 27 and ring[:, 1].min() >= 24 and ring[:, 1].max() <= 37


def test_absent_label_and_empty_mask_give_none():
    assert mask_outline(np.zeros((5, 5), bool)) is None
    assert label_outline(_disc_labels(), 9, (0, 0, 10, 10)) is None
