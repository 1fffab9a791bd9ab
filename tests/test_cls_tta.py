"""Test-time flips and label smoothing of the crop classifier."""
from __future__ import annotations

import numpy as np
import pytest

from classification.classifier import tta_views


def test_tta_views_are_the_mirrors_and_rotations():
    crops = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    assert len(tta_views(crops, "none")) == 1
    flips = tta_views(crops, "flips")
    assert len(flips) == 4
    np.testing.assert_array_equal(flips[0], crops)
    np.testing.assert_array_equal(flips[1][:, :, 0], crops[:, :, 2])  # horizontal mirror
    np.testing.assert_array_equal(flips[2][:, 0], crops[:, 2])        # vertical mirror
    dihedral = tta_views(crops, "dihedral")
    keys = {v.tobytes() for v in dihedral}
    assert len(dihedral) == 8 and len(keys) == 8  # all eight symmetries of the square, none twice
    assert np.rot90(crops, 1, axes=(1, 2)).tobytes() in keys


def test_label_smoothing_raises_the_loss_of_a_confident_right_answer():
    from cytocore import runtime

    runtime.setup(seed=0)
    import mindspore as ms

    from classification.model import make_loss

    logits = ms.Tensor(np.array([[8.0, -8.0, -8.0]], np.float32))
    labels = ms.Tensor(np.array([[1.0, 0.0, 0.0]], np.float32))
    plain = float(make_loss("softmax")(logits, labels).asnumpy())
    smooth = float(make_loss("softmax", label_smoothing=0.1)(logits, labels).asnumpy())
    assert plain < 1e-3 and smooth > 0.5
    with pytest.raises(Exception, match="label_smoothing"):
        make_loss("softmax", label_smoothing=1.5)


def test_zoomed_tile_windows_stay_inside_and_prediction_keeps_the_pixel_scale():
    from classification.crops import CropConfig, tile_crop, zoom_boxes

    rng = np.random.default_rng(0)
    tiles = np.array([[0, 0, 224, 224]] * 50, np.float32)
    windows = zoom_boxes(tiles, 0.5, rng)
    np.testing.assert_allclose(windows[:, 2] - windows[:, 0], 112, atol=1e-3)
    assert (windows[:, :2] >= 0).all() and (windows[:, 2:] <= 224 + 1e-3).all()
    assert len({tuple(w) for w in windows.round(1).tolist()}) > 40  # random places
    assert tile_crop(CropConfig(size=64), 0.5).size == 128
    assert tile_crop(CropConfig(size=64), 1.0).size == 64
