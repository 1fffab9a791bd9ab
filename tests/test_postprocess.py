"""Masks → instances → boxes: threshold, holes, small objects, watershed split, blocks, classes."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from cytocore.errors import CytoFuseError
from segmentation.postprocess import (
    DEFAULT_POSTPROCESS,
    INSTANCE_COLUMNS,
    find_class_instances,
    find_instances,
    label_mask,
    postprocess_config,
)


def disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_watershed_splits_two_touching_discs():
    shape = (100, 130)
    mask = disc(shape, 50, 45, 16) | disc(shape, 50, 72, 16)  # overlapping: one connected blob
    from scipy import ndimage as ndi

    assert ndi.label(mask)[1] == 1
    for markers in ("peak_local_max", "h_maxima"):
        inst = find_instances(mask.astype(np.float32), {"markers": markers})
        assert len(inst) == 2, markers
        left, right = inst.sort_values("x0").to_dict("records")
        assert left["x0"] == 29 and right["x1"] == 89  # outer edges of the two discs
        assert left["x1"] <= right["x0"] + 1  # split near the neck at x ≈ 58
        assert abs(left["x1"] - 58) <= 2


def test_single_disc_stays_one_box_with_exact_box():
    prob = np.zeros((80, 90), np.float32)
    prob[disc(prob.shape, 40, 30, 15)] = 0.8
    prob[40, 30] = 0.95
    inst = find_instances(prob)
    assert list(inst.columns) == INSTANCE_COLUMNS
    assert len(inst) == 1
    row = inst.iloc[0]
    assert (row.x0, row.y0, row.x1, row.y1) == (15, 25, 46, 56)  # exclusive ends
    assert row.area == disc(prob.shape, 40, 30, 15).sum()
    assert row.seg_max == pytest.approx(0.95)
    assert 0.8 < row.seg_mean < 0.81
    assert row.label_id == 1


def test_threshold_and_one_pixel_box_convention():
    prob = np.zeros((20, 20), np.float32)
    prob[7, 5] = 0.6
    prob[3, 3] = 0.4
    inst = find_instances(prob, {"min_area": 1})
    assert len(inst) == 1
    assert tuple(inst.iloc[0][["x0", "y0", "x1", "y1"]]) == (5, 7, 6, 8)
    assert len(find_instances(prob, {"min_area": 1, "threshold": 0.7})) == 0


def test_small_objects_removed():
    mask = disc((60, 60), 20, 20, 10) | disc((60, 60), 50, 50, 2)  # 13-pixel speck
    inst = find_instances(mask.astype(np.float32), {"min_area": 30})
    assert len(inst) == 1 and inst.iloc[0].area > 300
    assert len(find_instances(mask.astype(np.float32), {"min_area": 5})) == 2


def test_holes_filled_up_to_max_hole_area():
    shape = (100, 100)
    small_hole = disc(shape, 30, 30, 15) & ~disc(shape, 30, 30, 3)  # hole of 29 px
    big_hole = disc(shape, 70, 70, 25) & ~disc(shape, 70, 70, 12)  # hole of ~450 px (a ring)
    labels = label_mask(small_hole | big_hole, {"max_hole_area": 200, "split": "none"})
    assert labels[30, 30] > 0, "small hole must be filled"
    assert labels[70, 70] == 0, "large enclosed background must stay background"
    labels_all = label_mask(small_hole | big_hole, {"max_hole_area": None, "split": "none"})
    assert labels_all[70, 70] > 0
    # background touching the image edge is never a hole, however small
    edge_gap = np.zeros((40, 40), bool)
    edge_gap[5:35, 0:20] = True
    edge_gap[15:20, 0:3] = False  # a notch open to the left edge
    assert label_mask(edge_gap, {"split": "none"})[17, 1] == 0


def test_empty_map_gives_empty_table_with_columns():
    for prob in (np.zeros((50, 70), np.float32), np.zeros((1, 1), np.uint8), np.zeros((3000, 10), np.float32)):
        inst = find_instances(prob, {"block_size": 512})
        assert inst.empty and list(inst.columns) == INSTANCE_COLUMNS


def _synthetic_cells(shape, n, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    prob = np.zeros(shape, np.float32)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(4, 11)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        prob = np.maximum(prob, np.clip(1.2 - d / r * 0.6, 0, 1).astype(np.float32))
        if rng.random() < 0.3:  # a touching neighbour
            cx2 = cx + 1.6 * r
            d2 = np.sqrt((yy - cy) ** 2 + (xx - cx2) ** 2)
            prob = np.maximum(prob, np.clip(1.2 - d2 / r * 0.6, 0, 1).astype(np.float32))
    return prob


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_blockwise_equals_whole_image(dtype, caplog):
    prob = _synthetic_cells((300, 420), 120, seed=3)
    if dtype == np.uint8:
        prob = np.clip(prob * 255 + 0.5, 0, 255).astype(np.uint8)
    whole = find_instances(prob, {"block_size": 10_000, "min_distance": 4})
    with caplog.at_level(logging.WARNING, logger="cytofuse"):
        blocks = find_instances(prob, {"block_size": 64, "block_margin": 30, "min_distance": 4})
    assert len(whole) > 80
    assert not caplog.records, "a margin larger than every cell must not warn"
    boxes = ["x0", "y0", "x1", "y1"]
    assert not blocks.duplicated(boxes).any(), "an object at a seam was reported twice"
    assert len(blocks) == len(whole)
    np.testing.assert_array_equal(blocks[boxes + ["area", "label_id"]].to_numpy(), whole[boxes + ["area", "label_id"]].to_numpy())
    np.testing.assert_allclose(blocks[["seg_mean", "seg_max"]].to_numpy(), whole[["seg_mean", "seg_max"]].to_numpy(), rtol=1e-6)


def test_disc_boxes_block_by_block_equal_the_whole_image(caplog):
    """A disc's centre is a plateau of equal depths; it must not depend on the window the plateau is
    read in (the first deepest pixel did: 28 of 116 boxes a pixel apart), nor warn with a wide margin."""
    prob = _synthetic_cells((300, 420), 120, seed=3)
    cfg = {"min_distance": 4, "box_shape": "disc"}
    whole = find_instances(prob, {**cfg, "block_size": 10_000})
    with caplog.at_level(logging.WARNING, logger="cytofuse"):
        blocks = find_instances(prob, {**cfg, "block_size": 64, "block_margin": 30})
    assert not caplog.records
    boxes = ["x0", "y0", "x1", "y1", "area"]
    np.testing.assert_array_equal(blocks[boxes].to_numpy(), whole[boxes].to_numpy())


def test_a_blob_of_two_equal_discs_is_boxed_as_one_of_them():
    """Two equal cells left as one object tie for the greatest depth at both centres: the box is one
    whole disc (the first in row-major order), not a disc centred between them."""
    yy, xx = np.mgrid[:60, :100]
    left = (yy - 30) ** 2 + (xx - 35) ** 2 < 225
    right = (yy - 30) ** 2 + (xx - 61) ** 2 < 225
    inst = find_instances((left | right).astype(np.float32), {"split": "none", "min_area": 10, "box_shape": "disc"})
    assert len(inst) == 1
    ys, xs = np.nonzero(left)
    assert tuple(int(v) for v in inst[["x0", "y0", "x1", "y1"]].iloc[0]) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_blockwise_warns_when_margin_too_small(caplog):
    prob = disc((200, 200), 100, 100, 40).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="cytofuse"):
        find_instances(prob, {"block_size": 64, "block_margin": 8})
    assert any("block_margin" in r.getMessage() for r in caplog.records)


def _class_maps():
    shape = (120, 160)
    maps = np.zeros((3, *shape), np.float32)
    maps[0] = 1.0
    a = disc(shape, 40, 40, 15)
    b = disc(shape, 80, 110, 18)
    maps[:, a] = np.array([0.1, 0.7, 0.2], np.float32)[:, None]
    maps[:, b] = np.array([0.2, 0.1, 0.7], np.float32)[:, None]
    return maps


@pytest.mark.parametrize("mode", ["per_class", "foreground"])
def test_multiclass_decoding_gives_right_classes(mode):
    inst, probs = find_class_instances(_class_maps(), ["SCC", "AC"], {"multiclass": mode})
    assert list(probs.columns) == ["SCC", "AC"]
    assert len(inst) == 2 and len(probs) == 2
    by_x = inst.assign(**probs).sort_values("x0").reset_index(drop=True)
    assert list(by_x["class_name"]) == ["SCC", "AC"]
    np.testing.assert_allclose(by_x[["SCC", "AC"]].to_numpy(), [[0.7, 0.2], [0.1, 0.7]], atol=1e-6)
    np.testing.assert_allclose(by_x["seg_mean"], [0.9, 0.8], atol=1e-6)  # 1 - p_background


def test_multiclass_per_class_splits_a_blob_of_two_classes():
    shape = (60, 100)
    maps = np.zeros((3, *shape), np.float32)
    maps[0] = 1
    left = np.zeros(shape, bool)
    left[20:40, 20:50] = True
    right = np.zeros(shape, bool)
    right[20:40, 50:80] = True
    maps[:, left] = np.array([0.0, 0.9, 0.1], np.float32)[:, None]
    maps[:, right] = np.array([0.0, 0.2, 0.8], np.float32)[:, None]
    cfg = {"split": "none"}
    per_class, _ = find_class_instances(maps, ["a", "b", "c"][1:], {**cfg, "multiclass": "per_class"})
    assert sorted(per_class["class_name"]) == ["b", "c"]
    merged, probs = find_class_instances(maps, ["b", "c"], {**cfg, "multiclass": "foreground"})
    assert len(merged) == 1 and merged.iloc[0].x1 - merged.iloc[0].x0 == 60
    np.testing.assert_allclose(probs.iloc[0].to_numpy(), [0.55, 0.45], atol=1e-6)


def test_multiclass_empty_and_generic_names():
    maps = np.stack([np.ones((30, 30)), np.zeros((30, 30)), np.zeros((30, 30))]).astype(np.float32)
    inst, probs = find_class_instances(maps)
    assert inst.empty and list(probs.columns) == ["class_1", "class_2"]
    # names given with the background first are accepted too
    _, probs = find_class_instances(_class_maps(), ["background", "SCC", "AC"])
    assert list(probs.columns) == ["SCC", "AC"]


def test_config_errors():
    assert postprocess_config(None) == DEFAULT_POSTPROCESS
    with pytest.raises(CytoFuseError, match="threshhold"):
        postprocess_config({"threshhold": 0.4})
    with pytest.raises(CytoFuseError, match="markers"):
        postprocess_config({"markers": "random"})


# ------------------------------------------------------------------------------ several hypotheses

def _two_touching_and_one_apart():
    shape = (100, 200)
    mask = disc(shape, 50, 45, 16) | disc(shape, 50, 72, 16) | disc(shape, 50, 150, 16)
    return mask.astype(np.float32)


def test_hypotheses_add_the_merged_reading_of_a_cluster_as_an_extra_box():
    prob = _two_touching_and_one_apart()
    labels = np.zeros(prob.shape, np.int32)
    main = find_instances(prob, {"markers": "peak_local_max", "min_distance": 7})
    both = find_instances(prob, {"markers": "peak_local_max", "min_distance": 7,
                                 "hypotheses": [{"split": "none"}]}, labels_out=labels)
    assert len(main) == 3
    # the main reading comes first, unchanged, and is the only one in the label plane
    assert both.iloc[:3].reset_index(drop=True).equals(main)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # the unsplit reading adds the pair's box only: the lone disc's box is already listed
    assert len(both) == 4
    extra = both.iloc[3]
    assert extra.label_id == 0
    assert (extra.x0, extra.x1) == (29, 89) and extra.area == (prob[:, :100] > 0).sum()


def test_hypotheses_in_blocks_and_for_class_maps():
    prob = _two_touching_and_one_apart()
    cfg = {"markers": "peak_local_max", "min_distance": 7, "hypotheses": [{"split": "none"}, {"min_distance": 7}]}
    whole = find_instances(prob, cfg)
    blocks = find_instances(prob, {**cfg, "block_size": 64, "block_margin": 48})
    assert len(whole) == 4  # the second hypothesis repeats the main reading: nothing added
    pd_cols = ["x0", "y0", "x1", "y1", "label_id"]
    assert sorted(map(tuple, whole[pd_cols].to_numpy())) == sorted(map(tuple, blocks[pd_cols].to_numpy()))
    maps = np.stack([1 - prob, prob * 0.7, prob * 0.3]).astype(np.float32)
    inst, probs = find_class_instances(maps, ["a", "b"], {"markers": "peak_local_max", "min_distance": 7,
                                                          "hypotheses": [{"split": "none"}]})
    assert len(inst) == len(probs) == 4 and list(inst.label_id) == [1, 2, 3, 0]
    np.testing.assert_allclose(probs.to_numpy(), [[0.7, 0.3]] * 4, atol=1e-6)


def test_a_per_class_hypothesis_adds_the_class_pure_cells_of_a_foreground_reading():
    # a platelet (class a) touching a red cell (class b): the whole foreground, unsplit, is one object;
    # the per-class reading of the same maps, offered as a hypothesis, adds each cell's own box
    shape = (100, 200)
    a, b = disc(shape, 50, 45, 16), disc(shape, 50, 72, 16)
    b &= ~a
    maps = np.stack([1.0 - 0.9 * (a | b), 0.9 * a, 0.9 * b]).astype(np.float32)
    cfg = {"multiclass": "foreground", "split": "none"}
    merged, _ = find_class_instances(maps, ["a", "b"], cfg)
    assert len(merged) == 1
    inst, probs = find_class_instances(maps, ["a", "b"], {**cfg, "hypotheses": [{"multiclass": "per_class"}]})
    assert len(inst) == len(probs) == 3 and list(inst.label_id) == [1, 0, 0]
    assert list(inst.class_name[1:]) == ["a", "b"]
    assert (inst.x0[1], inst.x1[1]) == (29, 62) and inst.x1[2] == 89  # each cell's own extent
    np.testing.assert_allclose(probs.iloc[1:].to_numpy(), [[0.9, 0.0], [0.0, 0.9]], atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"min_distance": 20}, "must be a list"),
    ([{}], r"hypotheses\[0\] must be a mapping"),
    ([{"min_distance": 20}, {"block_size": 64}], r"hypotheses\[1\] sets block_size"),
    ([{"markers": "random"}], "markers must be one of"),
])
def test_hypotheses_config_errors(bad, match):
    with pytest.raises(CytoFuseError, match=match):
        postprocess_config({"hypotheses": bad})


def test_disc_boxes_give_each_overlapping_round_cell_its_whole_disc():
    """Two overlapping discs: the watershed hands the overlap to one, whose neighbour's region box is a
    crescent's; ``box_shape: disc`` boxes each whole disc, and a lone disc keeps its own box."""
    yy, xx = np.mgrid[:100, :140]
    left = (yy - 50) ** 2 + (xx - 40) ** 2 < 400
    right = (yy - 50) ** 2 + (xx - 70) ** 2 < 400
    lone = (yy - 50) ** 2 + (xx - 115) ** 2 < 225
    prob = (left | right | lone).astype(np.float32)
    truth = [tuple(int(v) for v in (np.nonzero(m.any(0))[0][0], np.nonzero(m.any(1))[0][0],
                                    np.nonzero(m.any(0))[0][-1] + 1, np.nonzero(m.any(1))[0][-1] + 1))
             for m in (left, right, lone)]
    cfg = {"min_distance": 10, "min_area": 10}
    region = {tuple(b) for b in find_instances(prob, cfg)[["x0", "y0", "x1", "y1"]].to_numpy()}
    disc = {tuple(b) for b in find_instances(prob, {**cfg, "box_shape": "disc"})[["x0", "y0", "x1", "y1"]].to_numpy()}
    assert disc == set(truth)
    assert truth[2] in region and not {truth[0], truth[1]} <= region  # the region boxes cut the overlap
    with_hyp = find_instances(prob, {**cfg, "hypotheses": [{"box_shape": "disc"}]})
    assert set(truth) <= {tuple(b) for b in with_hyp[["x0", "y0", "x1", "y1"]].to_numpy()}
    assert (with_hyp["label_id"].to_numpy() == 0).sum() == len(with_hyp) - 3  # the discs are extra candidates


def test_disc_boxes_of_a_per_class_reading_and_a_bad_box_shape():
    """Per class, two overlapping cells of one class get their whole discs; a cell of another class
    touching them is its own class's object, boxed alone."""
    yy, xx = np.mgrid[:80, :140]
    a1 = (yy - 40) ** 2 + (xx - 35) ** 2 < 400
    a2 = (yy - 40) ** 2 + (xx - 65) ** 2 < 400
    b = ((yy - 40) ** 2 + (xx - 95) ** 2 < 100) & ~a2
    maps = np.zeros((3, 80, 140), np.float32)
    maps[0] = 1.0
    for channel, m in ((1, a1 | a2), (2, b)):
        maps[channel][m], maps[0][m] = 0.9, 0.1
    inst, _ = find_class_instances(maps, ["A", "B"], {"min_distance": 10, "min_area": 10, "box_shape": "disc"})
    got = sorted((c, tuple(int(v) for v in box)) for c, box in zip(inst["class_name"], inst[["x0", "y0", "x1", "y1"]].to_numpy()))
    assert got == [("A", (16, 21, 55, 60)), ("A", (46, 21, 85, 60)), ("B", (86, 31, 105, 50))]
    with pytest.raises(CytoFuseError, match="box_shape"):
        postprocess_config({"box_shape": "circle"})


def test_hypotheses_that_cannot_differ_from_the_main_reading_are_not_run(monkeypatch):
    """On a binary map ``multiclass`` means nothing: ``{multiclass: per_class}`` (and a repeat of an earlier
    hypothesis) would be the main reading again, so only distinct readings are run."""
    import segmentation.postprocess as pp

    cfg = postprocess_config({"multiclass": "foreground", "hypotheses": [
        {"multiclass": "per_class"}, {"min_distance": 20}, {"min_distance": 20, "multiclass": "per_class"}]})
    assert [h["min_distance"] for h in pp.distinct_readings(cfg, ignored=("multiclass",))] == [20]
    assert len(pp.distinct_readings(cfg)) == 3  # K+1 maps read them all
    runs = []
    real = pp._blockwise
    monkeypatch.setattr(pp, "_blockwise", lambda *a, **k: runs.append(1) or real(*a, **k))
    prob = np.zeros((40, 40), np.float32)
    prob[5:15, 5:15] = 1.0
    table = find_instances(prob, cfg)
    assert len(runs) == 2 and len(table) == 1  # the main reading and the 20 px one


def test_a_later_option_at_its_old_value_leaves_the_settings_record_unchanged():
    """Finished runs stay resumable: ``box_shape: region`` (what every run before the option did) is not
    in the record a fingerprint is made of; ``disc`` is."""
    from segmentation.postprocess import identity_settings
    from segmentation.predict import SegSettings

    old = {k: v for k, v in postprocess_config().items() if k != "box_shape"}
    assert SegSettings({}, postprocess_config()).to_dict()["postprocess"] == old
    assert identity_settings(postprocess_config({"box_shape": "disc"}))["box_shape"] == "disc"
