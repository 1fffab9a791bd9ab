"""Instance heads: targets from masks / boxes, head-seeded watershed, label planes, ceiling (issue 11)."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import draw

from segmentation.ceiling import perfect_classes
from segmentation.instance_targets import (
    centre_gaussians,
    instance_labels,
    is_instance_mask,
    normalised_distance,
)
from segmentation.postprocess import find_instances
from segmentation.predict import resize_plane


def discs(shape, centres, radius):
    """Instance labels of discs (later discs do not overwrite earlier ones) and their pixel boxes."""
    labels = np.zeros(shape, np.int32)
    boxes = []
    for i, (cy, cx) in enumerate(centres, start=1):
        rr, cc = draw.disk((cy, cx), radius, shape=shape)
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = i
        ys, xs = np.nonzero(labels == i)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return labels, np.asarray(boxes, np.float32)


def one_box_per_cell(table, boxes, min_iou=0.6):
    """Every ground-truth box is matched by exactly one found box with IoU >= min_iou, and nothing else is found."""
    found = table[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    assert len(found) == len(boxes), f"{len(found)} boxes for {len(boxes)} cells"
    ix = np.minimum(found[:, None, 2], boxes[None, :, 2]) - np.maximum(found[:, None, 0], boxes[None, :, 0])
    iy = np.minimum(found[:, None, 3], boxes[None, :, 3]) - np.maximum(found[:, None, 1], boxes[None, :, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = inter / (area(found)[:, None] + area(boxes)[None, :] - inter)
    assert (iou.max(axis=0) >= min_iou).all(), iou.max(axis=0)
    assert len(set(iou.argmax(axis=0).tolist())) == len(boxes)


CLUSTER = [(40, 40), (40, 58), (56, 49), (24, 49), (56, 31), (24, 31), (40, 22)]  # a ball of touching cells
CHAIN = [(30, 12 + 7 * i) for i in range(9)]  # single file of small moulded cells (overlapping by ~2 px)


@pytest.mark.parametrize("centres,radius", [(CLUSTER, 10), (CHAIN, 4.6)], ids=["cluster", "chain"])
def test_touching_cells_come_out_one_box_each_from_union_mask_and_boxes(centres, radius):
    labels, boxes = discs((80, 90), centres, radius)
    union = labels > 0
    inst = instance_labels(union.shape, boxes, mask=(union * 255).astype(np.uint8))
    head = normalised_distance(inst)
    prob = union.astype(np.float32)
    table = find_instances(prob, {"min_area": 5}, head)
    one_box_per_cell(table, boxes)
    # without the head the mask's own distance transform merges at least part of them
    assert len(find_instances(prob, {"min_area": 5, "min_distance": 7})) < len(boxes)


def test_boxes_alone_overlapping_ellipses_are_split_between_their_boxes():
    boxes = np.array([[10, 10, 40, 40], [32, 12, 62, 42], [20, 34, 50, 64]], np.float32)  # overlapping cells
    inst = instance_labels((80, 80), boxes)
    assert set(np.unique(inst)) == {0, 1, 2, 3}
    # a pixel shared by two ellipses goes to the box whose centre is nearer (size-normalised)
    assert inst[26, 36] == 2 and inst[25, 35] == 1
    head = normalised_distance(inst)
    table = find_instances((inst > 0).astype(np.float32), {"min_area": 5}, head)
    one_box_per_cell(table, boxes, min_iou=0.7)


def test_instance_masks_are_used_as_they_are_and_boxes_without_pixels_get_their_ellipse():
    labels, boxes = discs((60, 60), [(20, 20), (20, 35)], 8)
    assert is_instance_mask(labels.astype(np.uint8)) and not is_instance_mask((labels > 0).astype(np.uint8) * 255)
    np.testing.assert_array_equal(instance_labels(labels.shape, boxes, mask=labels.astype(np.uint8)), labels)
    extra = np.vstack([boxes, [[40, 40, 52, 52]]])  # a boxed cell the union mask does not show
    inst = instance_labels(labels.shape, extra, mask=((labels > 0) * 255).astype(np.uint8))
    assert (inst == 3).sum() > 50 and inst[46, 46] == 3


def test_normalised_distance_peaks_at_one_per_cell_and_is_zero_where_cells_touch():
    labels, _ = discs((40, 60), [(20, 15), (20, 31)], 9)
    d = normalised_distance(labels)
    for i in (1, 2):
        assert d[labels == i].max() == pytest.approx(1.0)
    touching = (labels == 1) & np.roll(labels == 2, -1, axis=1)
    assert touching.any() and d[touching].max() <= 0.2
    g = centre_gaussians(labels)
    assert g.max() == pytest.approx(1.0, abs=0.05) and g[labels == 0].min() >= 0


def test_label_plane_matches_the_table_and_is_seam_free_in_blocks():
    rng = np.random.default_rng(0)
    centres = [(int(y), int(x)) for y, x in rng.integers(12, 188, size=(40, 2))]
    labels, boxes = discs((200, 200), centres, 9)
    head = normalised_distance(instance_labels(labels.shape, boxes, mask=((labels > 0) * 255).astype(np.uint8)))
    prob = (labels > 0).astype(np.float32)
    whole_plane = np.zeros(prob.shape, np.int32)
    whole = find_instances(prob, {"min_area": 5, "block_size": 10_000}, head, whole_plane)
    block_plane = np.zeros(prob.shape, np.int64)
    blocks = find_instances(prob, {"min_area": 5, "block_size": 64, "block_margin": 30}, head, block_plane)
    cols = ["x0", "y0", "x1", "y1", "area", "label_id"]
    np.testing.assert_array_equal(blocks[cols].to_numpy(), whole[cols].to_numpy())
    np.testing.assert_array_equal(block_plane, whole_plane)
    for row in whole.itertuples():
        ys, xs = np.nonzero(whole_plane == row.label_id)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, len(xs)) == (row.x0, row.y0, row.x1, row.y1, row.area)


def test_perfect_classes_and_resize_plane():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float64)
    labels = np.array([[1, 0], [0, 1]])
    out = perfect_classes(np.array([[1, 1, 9, 9], [50, 50, 60, 60]], np.float64), gt, labels, 2)
    np.testing.assert_array_equal(out, [[1, 0], [0, 0]])
    plane = np.zeros((10, 20), np.float32)
    assert resize_plane(plane, (40, 20)).shape == (20, 40)


def test_ceiling_of_perfect_targets_on_generated_images(tmp_path):
    from cytosynth.scene import generate
    from segmentation.ceiling import run_ceiling
    from segmentation.train import load_seg_config

    data = generate(tmp_path / "synth", n_images=4, seed=3, size=384)
    cfg = load_seg_config()
    result = run_ceiling(cfg, data=data, progress=False)
    assert sum(result["n_gt"].values()) > 10
    assert result["accuracy"] >= 0.97, result["froc"]
    assert result["detection_froc"] >= 0.97
    assert set(result) >= {"froc", "accuracy", "ap50", "n_images", "n_gt", "n_predictions"}


def test_ceiling_resolves_scale_auto_on_the_training_split(monkeypatch):
    """The ceiling of val must be measured at the scale the U-Net trains at, which ``seg train``
    resolves on the train split's boxes, not at one resolved on the (here smaller) val cells."""
    import segmentation.ceiling as ceiling_module
    import segmentation.train as train_module
    from cytocore.records import Dataset
    from segmentation.train import load_seg_config

    from tests.conftest import cell_row

    ds = Dataset([cell_row(100.0, name="t", split="train"), cell_row(12.0, name="v", split="val")], ["cell"])
    monkeypatch.setattr(train_module, "load_split_dataset", lambda cfg, fmt=None: ds)
    seen = {}
    monkeypatch.setattr(ceiling_module, "ceiling", lambda records, names, cfg, *a: seen.update(
        scale=cfg["data"]["scale"], ids=[r.image_id for r in records]) or {})
    cfg = load_seg_config()
    assert cfg["data"]["scale"] == "auto"
    ceiling_module.run_ceiling(cfg, data="d", split="val", progress=False)
    assert seen == {"scale": 0.25, "ids": ["v"]}   # the train cells' 0.25, not val's 0.75
    ceiling_module.run_ceiling({**cfg, "data": {**cfg["data"], "scale": 0.5}}, data="d", split="val", progress=False)
    assert seen["scale"] == 0.5


def test_seg_ceiling_cli_writes_json(tmp_path, capsys):
    import json

    from cytosynth.scene import generate
    from experiments.cli import run

    data = generate(tmp_path / "synth", n_images=3, seed=1, size=256)
    out = tmp_path / "ceiling.json"
    code = run(["seg", "ceiling", "--data", str(data), "--out", str(out), "--no-progress", "--set", "data.scale=0.75"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["scale"] == 0.75 and result["accuracy"] is not None
    assert "ceiling accuracy" in capsys.readouterr().out


def test_segment_image_uses_the_head_channel_and_returns_the_label_plane():
    from scipy.special import logit

    from segmentation.network import ModelInfo
    from segmentation.predict import segment_image

    labels, boxes = discs((96, 96), CLUSTER, 10)
    head = normalised_distance(instance_labels(labels.shape, boxes, mask=((labels > 0) * 255).astype(np.uint8)))
    fg = labels > 0
    image = np.where(fg[..., None], 60, 230).astype(np.uint8).repeat(3, axis=2)
    planes = np.stack([np.where(fg, 0.95, 0.05), np.clip(head, 0.02, 0.98)]).astype(np.float32)

    def net(batch):  # "predicts" the known maps: the tiles are the whole (padded) image here
        out = np.zeros((batch.shape[0], 2, *batch.shape[2:]), np.float32)
        out[:, :, :96, :96] = logit(planes)
        return out

    info = ModelInfo(fn=net, instance_channels=1)
    result = segment_image(image, info, {"tile": 128, "context": 0, "overlap": 0}, {"min_area": 5})
    assert result.instance_maps.shape == (1, 96, 96)
    one_box_per_cell(result.instances, boxes)
    assert set(np.unique(result.labels)) == {0, *result.instances["label_id"].tolist()}
    assert segment_image(image, info, {"tile": 128, "context": 0, "overlap": 0}, labels_out=False).labels is None


@pytest.mark.slow
def test_ceiling_on_real_data_at_the_shipped_configs_scale():
    from cytocore.config import read_yaml
    from segmentation.ceiling import run_ceiling
    from segmentation.train import load_seg_config
    from tests.conftest import REPO, shared_dataset

    monusac = run_ceiling(load_seg_config(REPO / "experiments/configs/seg_monusac.yaml"), data=shared_dataset("monusac"),
                          progress=False)
    assert monusac["scale"] == 0.75 and monusac["accuracy"] >= 0.97
    bccd_seg = read_yaml(REPO / "experiments/configs/bccd.yaml")["seg"]
    cfg = load_seg_config(overrides=[f"data.scale={bccd_seg['data']['scale']}",
                                     f"postprocess.min_area={bccd_seg['postprocess']['min_area']}"])
    bccd = run_ceiling(cfg, data=shared_dataset("bccd"), fmt="voc", progress=False)
    assert all(v >= 0.97 for v in bccd["ap50"].values()), bccd["ap50"]
