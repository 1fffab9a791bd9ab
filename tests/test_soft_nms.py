"""Soft-NMS: a second reading of a cell (a lobe beside the whole) drops down the ranking, class by class,
and ``fuse fit`` turns it on only when it raises the validation figure."""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from cytocore.errors import CytoFuseError
from cytocore.records import Dataset, ImageRecord
from fusion.nms import soft_decay
from fusion.pipeline import Candidates, DetectSettings, apply_fusion_file, detections_from_candidates, load_fusion_config
from fusion.rules import FusionRule
from tests.test_fusion_fit import FakePipeline

WHOLE = [0.0, 0.0, 40.0, 40.0]
LOBE = [0.0, 0.0, 20.0, 20.0]  # inside WHOLE: IoU 0.25, containment 1
FAR = [60.0, 60.0, 100.0, 100.0]


def test_a_lobe_loses_the_class_its_whole_cell_holds_and_keeps_the_others():
    boxes = np.array([WHOLE, LOBE, FAR])
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.5, 0.2]])
    out = soft_decay(boxes, scores, sigma=0.5, overlap="containment")
    assert out[0, 0] == 0.9 and out[2, 0] == 0.5  # the best box and the far one keep their scores
    assert out[1, 0] == pytest.approx(0.8 * np.exp(-2.0))  # fully contained: exp(-1 / 0.5)
    assert out[1, 0] < out[2, 0]  # now below the other cell, where hard NMS left it above
    assert out[1, 1] == 0.7  # class 1: the lobe is the best box there, the whole cell pays instead
    assert out[0, 1] == pytest.approx(0.1 * np.exp(-2.0))
    assert scores[1, 0] == 0.8  # the input is not changed
    # by IoU the lobe overlaps its whole cell only by its share of the area
    assert soft_decay(boxes, scores, 0.5, "iou")[1, 0] == pytest.approx(0.8 * np.exp(-(0.25 ** 2) / 0.5))


def test_soft_decay_refuses_settings_it_cannot_use():
    with pytest.raises(ValueError, match="sigma"):
        soft_decay(np.array([WHOLE]), np.array([[0.5]]), sigma=0)
    with pytest.raises(ValueError, match="overlap"):
        soft_decay(np.array([WHOLE]), np.array([[0.5]]), sigma=0.5, overlap="area")


def _candidates() -> Candidates:
    boxes = np.array([WHOLE, LOBE, FAR])
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.5, 0.2, 0.0]])  # SCC, AC, NSCLC
    return Candidates(np.zeros((0, 0), np.float32), boxes, np.ones(3), np.full(3, 100.0), probs)


def test_detections_keep_every_row_and_parents_stay_above_their_children():
    names = ["SCC", "AC", "NSCLC"]
    rule = FusionRule(name="classifier", hierarchy={"NSCLC": ["SCC", "AC"]})
    cfg = load_fusion_config({"score_floor": 0.0, "nms": {"containment": None, "soft": {"sigma": 0.5, "overlap": "containment"}}})
    settings = DetectSettings.from_config(cfg, names)
    soft = detections_from_candidates("a", _candidates(), 128, 128, names, rule, settings)
    hard = detections_from_candidates("a", _candidates(), 128, 128, names, rule, settings.with_choices(soft={}))
    assert len(soft.boxes) == len(hard.boxes) == 3
    lobe = int(np.flatnonzero((soft.boxes == LOBE).all(axis=1))[0])
    assert soft.scores[lobe, 0] < hard.scores[lobe, 0]
    assert (soft.scores[:, 2] >= soft.scores[:, :2].max(axis=1) - 1e-12).all()


@pytest.mark.parametrize("block, words", [
    ({"sigma": 0}, "nms.soft.sigma"), ({"sigma": "wide"}, "nms.soft.sigma"), ({"sigma": 0.5, "overlap": "area"}, "nms.soft.overlap"),
    ({"sgma": 0.5}, "unknown key(s) sgma"), (0.5, "expected {sigma"),
])
def test_a_bad_soft_nms_setting_is_one_clear_line(block, words):
    with pytest.raises(CytoFuseError) as err:
        DetectSettings.from_config(load_fusion_config({"nms": {"soft": block}}), ["A"])
    assert words in str(err.value) and "\n" not in str(err.value)


def test_fusion_json_soft_nms_replaces_the_config_setting(tmp_path):
    cfg = load_fusion_config({"nms": {"soft": {"sigma": 0.3, "overlap": "iou"}}})
    path = tmp_path / "fusion.json"
    for fitted in ({"sigma": 1.0, "overlap": "containment"}, None):
        path.write_text(json.dumps({"fusion": {"rule": "geometric"}, "box_shrink": 1.0, "soft_nms": fitted}))
        out = apply_fusion_file(cfg, path)
        assert out["nms"]["soft"] == fitted and out["nms"]["iou"] == cfg["nms"]["iou"]
    path.write_text(json.dumps({"fusion": {"rule": "geometric"}}))  # a fit from before soft-NMS: the config's own
    assert apply_fusion_file(cfg, path)["nms"]["soft"] == {"sigma": 0.3, "overlap": "iou"}


NAMES = ["A", "B"]


class TwoClassPipeline(FakePipeline):
    """Classes A and B with hand-made candidates per record (``candidates`` in each subclass);
    FakePipeline supplies the checkpoints and identity."""

    def __init__(self, dataset: Dataset, config: Optional[dict] = None, seed: int = 1):
        self.class_names = list(NAMES)
        self.config = load_fusion_config({"score_floor": 0.0, **(config or {})})
        self.rule = FusionRule.from_config(self.config["fusion"], NAMES)
        self.settings = DetectSettings.from_config(self.config, NAMES)
        self._records = {int(r.path.stem.split("_")[1]): r for r in dataset}
        self._rng = np.random.default_rng(seed)


class LobePipeline(TwoClassPipeline):
    """Each cell is found whole and as a lobe (its left third: IoU 1/3, so no AP50 hit) that the
    classifier scores nearly as high; hard NMS at IoU 0.5 keeps both."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, {"nms": {"containment": None}})

    def candidates(self, image: np.ndarray) -> Candidates:
        rec = self._records[int(image[0, 0, 0])]
        n = rec.n_boxes
        whole = self._rng.uniform(0.5, 0.95, n)
        lobes = rec.boxes.astype(float).copy()
        lobes[:, 2] = lobes[:, 0] + (lobes[:, 2] - lobes[:, 0]) / 3
        labels = rec.labels.reshape(n, 2).astype(float)
        probs = np.concatenate([labels * whole[:, None], labels * (whole * 0.95)[:, None]])
        return Candidates(np.zeros((0, 0), np.float32), np.concatenate([rec.boxes.astype(float), lobes]),
                          np.ones(2 * n), np.full(2 * n, 100.0), probs)


def _dataset(tmp_path, n: int = 8) -> Dataset:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = tmp_path / f"im_{i}.png"
        Image.fromarray(np.full((100, 120, 3), i, np.uint8)).save(path)
        x = np.arange(3) * 38.0 + 4
        boxes = np.stack([x, np.full(3, 20.0), x + 30, np.full(3, 50.0)], axis=1)
        labels = np.eye(2, dtype=np.uint8)[rng.integers(0, 2, 3)]
        records.append(ImageRecord(f"im_{i}", path, 120, 100, boxes=boxes, labels=labels, split="val"))
    return Dataset(records, list(NAMES), root=tmp_path, format="challenge")


def test_fuse_fit_turns_soft_nms_on_when_it_ranks_the_lobes_down(tmp_path):
    from experiments.fuse_fit import fit_fusion, format_report

    ds = _dataset(tmp_path)
    report = fit_fusion(LobePipeline(ds), ds, split="val", folds=2, shrinks=(1.0,), progress=False, metric="ap50",
                        soft_sigmas=(0.5,))
    tried = {None if r["soft_nms"] is None else r["soft_nms"]["overlap"]: r["ap50"] for r in report["soft_nms_results"]}
    assert set(tried) == {None, "iou", "containment"}
    assert tried["containment"] > tried[None] + 0.1  # lobes no longer outrank other images' whole cells
    chosen = report["soft_nms"]
    assert chosen is not None and chosen["sigma"] == 0.5 and tried[chosen["overlap"]] == max(tried.values())
    assert report["validation_ap50"] == pytest.approx(max(tried.values()))
    assert f"soft-NMS {chosen['overlap']} sigma 0.5" in format_report(report)
    off = fit_fusion(LobePipeline(ds), ds, split="val", folds=2, shrinks=(1.0,), progress=False, metric="ap50", soft_sigmas=())
    assert off["soft_nms"] is None and [r["soft_nms"] for r in off["soft_nms_results"]] == [None]
