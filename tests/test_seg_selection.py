"""Checkpoint and post-processing values chosen by the challenge's FROC on the validation split (issue 11)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import draw

from cytocore.records import ImageRecord
from tests.conftest import row_of_cells
from segmentation.selection import FrocTuner, ValImage, marker_spacings, tune_grid


def _bridged_pair():
    """Two cells joined by a bridge of probability 0.45: merged at threshold 0.35, apart at 0.5."""
    prob = np.zeros((40, 60), np.float32)
    for cx in (15, 40):
        rr, cc = draw.disk((20, cx), 8, shape=prob.shape)
        prob[rr, cc] = 0.9
    prob[18:23, 22:34] = 0.45
    boxes = np.array([[7, 12, 24, 29], [32, 12, 49, 29]], np.float64)
    return ValImage(prob, None, boxes)


def test_tuner_picks_the_threshold_that_separates_cells_and_keeps_it():
    image = _bridged_pair()
    tuner = FrocTuner({"threshold": 0.35, "min_area": 5, "split": "none"}, {"threshold": [0.35, 0.5]}, has_head=False)
    assert tuner.froc([image], {**tuner.current}) < 0.6  # one box over both cells matches neither
    metrics = tuner.metrics([image])
    assert metrics["val_froc"] == 1.0 and metrics["tuned_threshold"] == 0.5 and metrics["tuned_min_area"] == 5
    assert tuner.current["threshold"] == 0.5  # the next epoch starts from there


def _peanut():
    """One cell shaped like a peanut (two overlapping discs, one ground-truth box): markers 4 px apart
    cut it in two halves, each inside the box (IoP 1) but covering about half of it (IoU < 0.5)."""
    prob = np.zeros((60, 90), np.float32)
    for cx in (30, 58):
        rr, cc = draw.disk((30, cx), 16, shape=prob.shape)
        prob[rr, cc] = 0.9
    return ValImage(prob, None, np.array([[14, 14, 75, 47]], np.float64))


def test_ap50_search_keeps_a_cell_whole_where_the_iop_froc_is_indifferent_to_halves():
    image = _peanut()
    post = {"min_area": 5, "markers": "peak_local_max", "min_distance": 4, "smooth_sigma": 0}
    iop = FrocTuner(post, {"min_distance": [4, 40]}, has_head=False)
    assert iop.metrics([image])["val_froc"] == 1.0 and iop.current["min_distance"] == 4  # halves hit too: a tie
    iou = FrocTuner(post, {"min_distance": [4, 40]}, has_head=False, metric="ap50")
    assert iou.froc([image], {**iou.current}) < 0.5  # two half-boxes: no IoU match
    metrics = iou.metrics([image])
    assert metrics["val_ap50"] == pytest.approx(1.0) and "val_froc" not in metrics and iou.current["min_distance"] == 40


def test_tune_grid_includes_the_configured_values():
    post = {"threshold": 0.5, "marker_threshold": 0.4, "min_area": 30, "min_distance": 7}
    grid = tune_grid({"threshold": [0.3, 0.6], "marker_threshold": [0.5], "min_area_factor": [0.5, 2]}, post, True)
    assert grid["threshold"] == [0.3, 0.5, 0.6] and grid["marker_threshold"] == [0.4, 0.5]
    assert grid["min_area"] == [15, 30, 60] and grid["min_distance"] == []
    assert tune_grid({"marker_threshold": [0.5]}, post, has_head=False)["marker_threshold"] == []


def test_best_checkpoint_follows_validation_froc_and_carries_its_tuned_values(tmp_path):
    from cytocore import runtime
    from cytocore.trainloop import train
    from segmentation.model_io import load_segmenter
    from segmentation.predict import resolve_settings
    from segmentation.train import build_task, load_seg_config
    from tests.test_seg_train import TINY, _write_dataset

    ds = _write_dataset(tmp_path / "data")
    cfg = load_seg_config(overrides=TINY + ["train.epochs=3", "postprocess.min_area=4", "train.validate_from=0"])
    assert cfg["train"]["monitor"] == "val_froc"
    setup = build_task(cfg, ds, progress=False)
    real = setup.task.validate
    calls: list = []

    def validate(network):  # the real metrics, with val_froc scripted so the best epoch is known
        out = real(network)
        assert 0.0 <= out["val_froc"] <= 1.0 and "tuned_threshold" in out and "val_dice" in out
        calls.append(out)
        return {**out, "val_froc": [0.2, 0.9, 0.5][len(calls) - 1], "tuned_threshold": 0.3 + 0.1 * len(calls)}

    setup.task.validate = validate
    result = train(setup.task, setup.loop, tmp_path / "run")
    assert [round(r["val_froc"], 3) for r in result.history] == [0.2, 0.9, 0.5]
    params, meta = runtime.load_checkpoint(result.best_checkpoint)
    assert meta["epoch"] == 2 and meta["metrics"]["val_froc"] == 0.9
    seg = load_segmenter(result.best_checkpoint)
    post = resolve_settings(seg).postprocess
    assert abs(post["threshold"] - 0.5) < 1e-9  # the value tuned at epoch 2, not the config's or the last epoch's
    post = resolve_settings(seg, {"postprocess": {"threshold": 0.42}}).postprocess
    assert post["threshold"] == 0.42  # an explicit option still wins


def _blurred_head_pair():
    """Two touching cells whose head map is blurred: its cores above 0.5 join, its two peaks stay apart."""
    yy, xx = np.mgrid[0:40, 0:60]
    head = np.zeros((40, 60), np.float32)
    for cx in (22, 38):
        head = np.maximum(head, np.clip(1.0 - np.hypot(yy - 20, xx - cx) / 14.0, 0, 1) * 0.8)
    prob = (head > 0.05).astype(np.float32) * 0.9
    boxes = np.array([[10, 8, 31, 33], [29, 8, 50, 33]], np.float64)
    return ValImage(prob, head, boxes)


def test_tuner_chooses_head_peaks_over_cores_when_the_head_is_blurred_and_the_checkpoint_keeps_it():
    from segmentation.predict import tuned_postprocess

    image = _blurred_head_pair()
    post = {"threshold": 0.5, "min_area": 5, "marker_threshold": 0.3, "min_distance": 5}
    tuner = FrocTuner(post, {"markers": ["head_core", "head_peaks"]}, has_head=True)
    assert tuner.current["markers"] == "head_core"  # "auto" with a head
    assert tuner.froc([image], tuner.current) < 0.6  # the cores merge: one box over both cells
    metrics = tuner.metrics([image])
    assert metrics["val_froc"] == 1.0
    assert tuned_postprocess({"metrics": metrics})["markers"] == "head_peaks"
    assert tune_grid({"markers": ["head_peaks"]}, post, has_head=False)["markers"] == []


def test_the_monitor_must_be_the_metric_the_search_maximises():
    from cytocore.errors import CytoFuseError
    from segmentation.train import check_config, load_seg_config

    cfg = load_seg_config(None, ["validation.box_metric=ap50"])
    with pytest.raises(CytoFuseError, match="monitor val_ap50"):
        check_config(cfg)
    check_config(load_seg_config(None, ["validation.box_metric=ap50", "train.monitor=val_ap50"]))
    with pytest.raises(CytoFuseError, match="box_metric must be one of froc, ap50"):
        check_config(load_seg_config(None, ["validation.box_metric=iou"]))


def test_validation_subset_covers_every_class_and_healthy_images():
    from types import SimpleNamespace

    from segmentation.train import covering_subset

    def rec(i, rows):
        labels = np.array(rows, np.uint8).reshape(-1, 3)
        return SimpleNamespace(image_id=f"im{i:02d}", n_boxes=len(labels), labels=labels)

    # the first four by id hold only class 0: a subset of four must still show classes 1, 2 and a healthy image
    records = [rec(i, [[1, 0, 0]]) for i in range(4)] + [rec(4, [[0, 1, 0]]), rec(5, [[0, 0, 1]]), rec(6, [])]
    chosen = covering_subset(records, 4)
    assert [r.image_id for r in chosen] == ["im00", "im04", "im05", "im06"]
    assert covering_subset(records, 10) == sorted(records, key=lambda r: r.image_id)


def test_the_chosen_checkpoint_is_re_tuned_on_every_validation_image(tmp_path):
    from cytocore import runtime
    from cytocore.trainloop import train
    from segmentation.train import build_task, load_seg_config, retune_best_checkpoint
    from tests.test_seg_train import TINY, _write_dataset

    ds = _write_dataset(tmp_path / "data", n=8)  # 6 train, 2 val
    cfg = load_seg_config(overrides=TINY + ["validation.max_images=1", "postprocess.min_area=4"])
    setup = build_task(cfg, ds, progress=False)
    assert len(setup.val_samples) == 1 and len(setup.all_val_records) == 2
    result = train(setup.task, setup.loop, tmp_path / "run")
    metrics = retune_best_checkpoint(setup, result.best_checkpoint)
    assert metrics is not None
    _, meta = runtime.load_checkpoint(result.best_checkpoint)
    saved = meta["metrics"]
    assert saved["tuned_on_images"] == 2.0  # the epochs saw one image; the final search both
    assert saved["val_froc_all"] >= saved["val_froc_all_epoch_values"]
    assert all(saved[k] == metrics[k] for k in metrics if k.startswith("tuned_"))
    assert retune_best_checkpoint(setup, result.best_checkpoint) is None  # done once, not again on resume


def test_auto_marker_spacings_follow_the_training_cells():
    """Spacings of ~0.2 and ~0.35 cell sizes: the synthetic cells' tuned [4, 7] px, and blood cells'
    [17, 30] where 4-7 px cut each red cell into pieces; a list is kept, no boxes fall back to [4, 7]."""
    assert marker_spacings("auto", row_of_cells(20.0)) == [4, 7]
    assert marker_spacings("auto", row_of_cells(86.0)) == [17, 30]
    assert marker_spacings("auto", row_of_cells(2.0)) == [1]     # never below one pixel, no repeats
    assert marker_spacings("auto", [ImageRecord("h", Path("h.png"), 50, 50)]) == [4, 7]
    assert marker_spacings([14, 28], row_of_cells(86.0)) == [14, 28] and marker_spacings(None, row_of_cells(20.0)) == []
