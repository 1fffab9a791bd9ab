"""The single-stage baseline: class maps → boxes with mean-softmax class probabilities, the NSCLC
marginal, its config, and its folder run writing the same files as the fused pipeline."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytocore.errors import CheckpointError, CytoFuseError
from experiments.baseline import (
    candidates_from_segmentation,
    detections_from_class_candidates,
    label_marginals,
    load_baseline_config,
    single_label_names,
)
from fusion.pipeline import DetectSettings
from segmentation.postprocess import find_class_instances
from segmentation.predict import SegmentationResult

#: No watershed split, tiny objects allowed: the test is about the class decoding, not about splitting.
POST = {"split": "none", "min_area": 4, "threshold": 0.5}
CHALLENGE = ["SCC", "AC", "SCLC", "NSCLC"]
HIERARCHY = {"NSCLC": ["SCC", "AC"]}


def _maps(shape, background, regions):
    """(K+1, H, W) softmax maps: ``background`` probabilities everywhere, then each region's vector."""
    k1 = len(background)
    maps = np.empty((k1, *shape), np.float32)
    maps[:] = np.asarray(background, np.float32)[:, None, None]
    for (ys, xs), probs in regions:
        maps[:, ys, xs] = np.asarray(probs, np.float32)[:, None, None]
    assert np.allclose(maps.sum(axis=0), 1.0)
    return maps


def _decode(maps, names, hierarchy=None, settings=None):
    instances, class_probs = find_class_instances(maps, names, POST)
    result = SegmentationResult(1.0 - maps[0], instances, class_probs, maps)
    cand = candidates_from_segmentation(result, names, hierarchy or {})
    h, w = maps.shape[1:]
    settings = settings or DetectSettings(floors=np.zeros(len(names)), iou=0.5, containment=0.8, max_detections=None)
    return cand, detections_from_class_candidates("img", cand, w, h, names, hierarchy or {}, settings).to_frame()


def test_class_maps_become_boxes_with_mean_softmax():
    # Object 1 (class A): rows 5..14, cols 5..14; its left half is surer of A than its right half.
    # Object 2 (class B): rows 18..25, cols 25..36.
    maps = _maps(
        (30, 40), [0.9, 0.05, 0.05],
        [((slice(5, 15), slice(5, 10)), [0.1, 0.8, 0.1]),
         ((slice(5, 15), slice(10, 15)), [0.1, 0.6, 0.3]),
         ((slice(18, 26), slice(25, 37)), [0.2, 0.1, 0.7])],
    )
    cand, det = _decode(maps, ["A", "B"])
    det = det.sort_values("x0").reset_index(drop=True)
    assert len(det) == 2
    assert det[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[5, 5, 15, 15], [25, 18, 37, 26]]
    assert det["label"].tolist() == ["A", "B"]
    assert det.loc[0, "p_A"] == pytest.approx(0.7) and det.loc[0, "p_B"] == pytest.approx(0.2)
    assert det.loc[1, "p_A"] == pytest.approx(0.1) and det.loc[1, "p_B"] == pytest.approx(0.7)
    # Seg score = mean of 1 - p_background; normalised boxes in [0, 1] as the challenge wants.
    assert det.loc[0, "seg_score"] == pytest.approx(0.9) and det.loc[1, "seg_score"] == pytest.approx(0.8)
    assert det.loc[1, "xmax"] == pytest.approx(37 / 40) and det.loc[1, "ymax"] == pytest.approx(26 / 30)
    # The saliency handed to the writers is 1 - p_background.
    assert np.allclose(cand.probability, 1.0 - maps[0])


def test_background_only_gives_no_detection():
    maps = _maps((20, 20), [0.7, 0.2, 0.1], [])
    cand, det = _decode(maps, ["A", "B"])
    assert len(cand) == 0 and len(det) == 0


def test_score_floor_drops_unsure_objects():
    maps = _maps((30, 30), [0.9, 0.05, 0.05],
                 [((slice(2, 10), slice(2, 10)), [0.3, 0.6, 0.1]), ((slice(15, 25), slice(15, 25)), [0.4, 0.35, 0.25])])
    settings = DetectSettings(floors=np.array([0.5, 0.5]), iou=0.5, containment=None, max_detections=None)
    _, det = _decode(maps, ["A", "B"], settings=settings)
    assert det[["x0", "y0", "x1", "y1"]].to_numpy().tolist() == [[2, 2, 10, 10]]


def test_nsclc_gets_its_subtypes_mass_but_the_label_stays_specific():
    # An SCC cell: background .1, SCC .7, AC .05, SCLC .05, NSCLC-NOS .1 → P(NSCLC) = .1 + .7 + .05.
    maps = _maps((24, 24), [0.96, 0.01, 0.01, 0.01, 0.01],
                 [((slice(4, 14), slice(4, 14)), [0.1, 0.7, 0.05, 0.05, 0.1])])
    _, det = _decode(maps, CHALLENGE, HIERARCHY)
    assert len(det) == 1
    row = det.iloc[0]
    assert row["p_SCC"] == pytest.approx(0.7) and row["p_SCLC"] == pytest.approx(0.05)
    assert row["p_NSCLC"] == pytest.approx(0.85)
    assert row["label"] == "SCC"


def test_label_marginals_and_inverse():
    probs = np.array([[0.6, 0.1, 0.2, 0.05], [0.0, 0.0, 0.9, 0.1], [0.5, 0.4, 0.0, 0.1]])
    out = label_marginals(probs, CHALLENGE, HIERARCHY)
    assert out[:, 3].tolist() == pytest.approx([0.75, 0.1, 1.0])  # the last one is clipped from 1.0
    assert np.array_equal(out[:, :3], probs[:, :3])
    assert single_label_names(out, CHALLENGE, HIERARCHY).tolist() == ["SCC", "SCLC", "SCC"]
    # Without a hierarchy nothing changes (data sets whose classes are not nested).
    assert np.array_equal(label_marginals(probs, CHALLENGE, {}), probs)


def test_baseline_config_is_the_k_plus_1_unet():
    cfg = load_baseline_config()
    assert cfg["targets"]["mode"] == "classes" and cfg["model"]["out_channels"] is None
    with pytest.raises(CytoFuseError, match="targets.mode: classes"):
        load_baseline_config(overrides={"targets": {"mode": "binary"}})


# ------------------------------------------------------------------------------ folder run (untrained tiny U-Net)


def _checkpoint(folder, mode: str, seed: int = 0):
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=seed, threads=2)
    channels = len(CHALLENGE) + 1 if mode == "classes" else 1
    model_cfg = resolve_model_config({"name": "unet_tiny", "out_channels": channels})
    meta = {"stage": "segmentation", "model": model_cfg, "class_names": CHALLENGE, "mode": mode, "scale": 1.0,
            "input_multiple": 4, "threshold": 0.5, "config": {}}
    return runtime.save_checkpoint(folder / f"{mode}_{seed}.ckpt", [create_unet(**model_cfg)], meta)


def test_binary_checkpoint_is_refused(tmp_path):
    from experiments.baseline import BaselinePipeline

    with pytest.raises(CheckpointError, match="K\\+1-class"):
        BaselinePipeline(_checkpoint(tmp_path, "binary"))


def test_folder_run_writes_the_fused_pipelines_files_and_resumes(tmp_path):
    from cytocore.records import Dataset, ImageRecord
    from cytocore.writers import read_predictions_csv
    from experiments.baseline import run_baseline_folder
    from experiments.evaluate import evaluate

    ckpt = _checkpoint(tmp_path, "classes")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate([(40, 56), (36, 36)]):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"im{i}.png")
        records.append(ImageRecord(f"im{i}", images / f"im{i}.png", w, h, np.array([[2, 2, 20, 20]]), np.array([[1, 0, 0, 1]])))
    # A low threshold and no floor so the untrained network yields objects to write.
    cfg = {"segmentation": {"predict": {"tile": 32, "context": 4, "batch_size": 2},
                            "postprocess": {"threshold": 0.05, "min_area": 2}},
           "score_floor": 0.0, "runtime": {"threads": 2}}
    out = tmp_path / "out"
    summary = run_baseline_folder(ckpt, images, out, cfg, progress=False)
    assert summary["n_done"] == 2 and summary["system"] == "single-stage"
    for name in ("predictions.csv", "detections.csv", "images.csv", "run.json", "detections.geojson", "detections.coco.json"):
        assert (out / name).is_file(), name
    for i in range(2):
        assert (out / "saliency" / f"im{i}.png").is_file() and (out / "overlays" / f"im{i}.png").is_file()
        sal = np.asarray(Image.open(out / "saliency" / f"im{i}.png"))
        assert sal.shape == (records[i].height, records[i].width)
    table = pd.read_csv(out / "images.csv")
    det = pd.read_csv(out / "detections.csv")
    assert list(table["image_id"]) == ["im0", "im1"]
    assert len(det) > 0
    # images.csv's malignancy is the highest class score of the image's detections.
    best = det.groupby("image_id")[[f"p_{c}" for c in CHALLENGE]].max().max(axis=1)
    for image_id, value in best.items():
        assert table.set_index("image_id").loc[image_id, "malignancy"] == pytest.approx(value, abs=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert "cls" not in run["checkpoints"] and run["fusion"]["description"].startswith("single-stage")
    # The evaluator reads the baseline's files exactly as it reads the fused pipeline's.
    ds = Dataset(records, CHALLENGE)
    metrics = evaluate(ds, read_predictions_csv(out / "predictions.csv", CHALLENGE))
    assert set(metrics["froc"]) == set(CHALLENGE)
    # A second run skips the finished images.
    again = run_baseline_folder(ckpt, images, out, cfg, progress=False)
    assert again["n_skipped_already_done"] == 2 and again["n_processed_now"] == 0
    # Another checkpoint into the same folder redoes every image instead of reusing the old model's.
    first_map = (out / "saliency" / "im0.png").read_bytes()
    other = run_baseline_folder(_checkpoint(tmp_path, "classes", seed=1), images, out, cfg, progress=False)
    assert other["n_skipped_already_done"] == 0 and other["n_processed_now"] == 2
    assert (out / "saliency" / "im0.png").read_bytes() != first_map
