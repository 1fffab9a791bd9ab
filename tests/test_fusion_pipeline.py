"""The fused pipeline end to end on tiny untrained networks: outputs, resume, bad files, bad checkpoints.

Nothing is trained: a tiny U-Net and a tiny mindcv classifier are built with their stages'
factories and saved with the metadata their loaders expect. One pipeline (one graph compile) is
shared by the module's tests to keep them fast.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytocore.errors import CheckpointError

NAMES = ["SCC", "AC", "SCLC", "NSCLC"]
#: Small tiles and a low threshold so an untrained U-Net gives a few objects quickly.
CONFIG = {
    "segmentation": {"predict": {"tile": 64, "context": 8, "batch_size": 2},
                     "postprocess": {"threshold": 0.3, "min_area": 4}},
    "classification": {"batch_size": 8},
    "runtime": {"threads": 2, "seed": 0},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from classification.crops import CropConfig
    from classification.model import ModelConfig, build_network
    from classification.classifier import checkpoint_meta
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=0, threads=2)
    folder = tmp_path_factory.mktemp("ckpt")
    model_cfg = resolve_model_config({"name": "unet_tiny"})
    unet = create_unet(**model_cfg)
    seg_meta = {"stage": "segmentation", "model": model_cfg, "class_names": NAMES, "mode": "binary", "scale": 1.0,
                "input_multiple": 4, "threshold": 0.5, "config": {}}
    seg = runtime.save_checkpoint(folder / "seg.ckpt", [unet], seg_meta)
    runtime.setup(seed=1, threads=2)
    seg_other = runtime.save_checkpoint(folder / "seg_other.ckpt", [create_unet(**model_cfg)], seg_meta)
    classes_cfg = resolve_model_config({"name": "unet_tiny", "out_channels": len(NAMES) + 1})
    seg_classes = runtime.save_checkpoint(folder / "seg_classes.ckpt", [create_unet(**classes_cfg)],
                                          {**seg_meta, "model": classes_cfg, "mode": "classes"})
    model = ModelConfig(name="efficientnet_b0", width_mult=0.25, depth_mult=0.25, drop_rate=0.0, drop_path_rate=0.0)
    crop = CropConfig(size=32)
    net = build_network(model, len(NAMES))
    cls = runtime.save_checkpoint(folder / "cls.ckpt", [net], checkpoint_meta(model, NAMES, crop))
    other = build_network(model, 2)
    cls_other = runtime.save_checkpoint(folder / "cls_other.ckpt", [other], checkpoint_meta(model, ["benign", "malignant"], crop))
    return {"seg": seg, "seg_other": seg_other, "seg_classes": seg_classes, "cls": cls, "cls_other": cls_other}


@pytest.fixture(scope="module")
def pipeline(checkpoints):
    from fusion.pipeline import Pipeline

    return Pipeline(checkpoints["seg"], checkpoints["cls"], CONFIG, classes=NAMES)


def _cells(seed: int, size=(72, 96), count: int = 4, background: int = 225) -> np.ndarray:
    """A pale background with ``count`` dark round blobs."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), background, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(count):
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(4, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (90, 60, 140)
    return img


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_cells(0)).save(folder / "slide_a.png")
    Image.fromarray(_cells(1, (50, 130))).save(folder / "slide_b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_run_image_gives_map_and_table(pipeline):
    image = _cells(3)
    result = pipeline.run_image(image, "x")
    assert result.probability.shape == image.shape[:2]
    assert 0.0 <= float(result.probability.min()) <= float(result.probability.max()) <= 1.0
    det = result.detections.to_frame()
    assert list(det.columns[:9]) == ["image_id", "x0", "y0", "x1", "y1", "xmin", "ymin", "xmax", "ymax"]
    assert {f"p_{c}" for c in NAMES} | {"seg_score", "area", "label"} <= set(det.columns)
    if len(det):
        # the hierarchy holds in every row
        assert (det.p_NSCLC >= np.maximum(det.p_SCC, det.p_AC) - 1e-12).all()
        assert det.xmax.max() <= 1.0 and det.ymax.max() <= 1.0
    assert result.malignancy == (det[[f"p_{c}" for c in NAMES]].to_numpy().max() if len(det) else 0.0)


def test_folder_run_skips_a_corrupt_file_and_resumes_without_work(pipeline, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    summary = pipeline.run_folder(images, out, progress=False)
    assert summary["n_done"] == 2 and summary["n_failed"] == 1
    assert "broken.png" in summary["failed"][0]["image"] and "cannot read image" in summary["failed"][0]["error"]

    for name in ("predictions.csv", "detections.csv", "images.csv", "run.json", "detections.geojson", "detections.coco.json"):
        assert (out / name).is_file(), name
    for image_id, (w, h) in {"slide_a": (96, 72), "slide_b": (130, 50)}.items():
        with Image.open(out / "saliency" / f"{image_id}.png") as sal:
            assert sal.size == (w, h) and sal.mode == "L"
        assert (out / "overlays" / f"{image_id}.png").is_file()
        assert (out / "geojson" / f"{image_id}.geojson").is_file()
        assert (out / "parts" / f"{image_id}.csv").is_file()
    images_csv = pd.read_csv(out / "images.csv")
    assert images_csv.columns.tolist() == ["image_id", "width", "height", "n_detections", "malignancy", "seconds"]
    assert images_csv.image_id.tolist() == ["slide_a", "slide_b"]
    run = json.loads((out / "run.json").read_text())
    assert len(run["checkpoints"]["seg"]["sha256"]) == 64 and len(run["checkpoints"]["cls"]["sha256"]) == 64
    assert run["failed"][0]["image"].endswith("broken.png")
    assert set(run["timings"]) == {"slide_a", "slide_b"} and "segment" in run["timings"]["slide_a"]
    assert run["fusion"]["rule"] == "geometric" and "mindspore" in run["versions"]
    assert not list(out.rglob("*.part*"))  # no temporary files left behind
    first_predictions = (out / "predictions.csv").read_text()

    calls = []
    original = type(pipeline.source).candidates
    monkeypatch.setattr(type(pipeline.source), "candidates", lambda self, *a: calls.append(1) or original(self, *a))
    again = pipeline.run_folder(images, out, progress=False)
    assert calls == []  # nothing recomputed
    assert again["n_skipped_already_done"] == 2 and again["n_processed_now"] == 0
    assert (out / "predictions.csv").read_text() == first_predictions

    # a half-finished image (its record missing, as after Ctrl-C) is redone, the other is not
    (out / "parts" / "slide_b.json").unlink()
    third = pipeline.run_folder(images, out, progress=False)
    assert len(calls) == 1 and third["n_processed_now"] == 1
    assert (out / "predictions.csv").read_text() == first_predictions


def test_changed_config_redoes_the_images(checkpoints, pipeline, images, tmp_path):
    from fusion.pipeline import Pipeline

    out = tmp_path / "out"
    pipeline.run_folder(images, out, progress=False)
    shrunk = Pipeline(checkpoints["seg"], checkpoints["cls"], {**CONFIG, "box_shrink": 0.8})
    summary = shrunk.run_folder(images, out, progress=False)
    assert summary["n_processed_now"] == 2  # another config: the old parts are not reused


def test_mismatched_checkpoints_are_one_line_errors(checkpoints):
    from fusion.pipeline import Pipeline

    with pytest.raises(CheckpointError) as info:
        Pipeline(checkpoints["seg"], checkpoints["seg"], CONFIG)  # seg checkpoint given as the classifier
    assert "not a classification checkpoint" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not a segmentation checkpoint"):
        Pipeline(checkpoints["cls"], checkpoints["cls"], CONFIG)
    with pytest.raises(CheckpointError) as info:
        Pipeline(checkpoints["seg"], checkpoints["cls_other"], CONFIG, classes=NAMES)
    assert "benign, malignant" in str(info.value) and "SCC, AC, SCLC, NSCLC" in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_checkpoint_in_one_line(checkpoints, images, tmp_path, capsys):
    from experiments.cli import run

    code = run(["infer", "--seg", str(checkpoints["cls"]), "--cls", str(checkpoints["cls"]),
                "--images", str(images), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "not a segmentation checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_infer_with_a_fusion_file(checkpoints, images, tmp_path, capsys):
    import yaml

    from experiments.cli import run

    fusion = tmp_path / "fusion.json"
    fusion.write_text(json.dumps({"fusion": {"rule": "product", "weight": 0.5, "hierarchy": "auto"}, "box_shrink": 0.9}))
    config = tmp_path / "infer.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "o"
    code = run(["infer", "--seg", str(checkpoints["seg"]), "--cls", str(checkpoints["cls"]), "--images", str(images),
                "--out", str(out), "--config", str(config), "--fusion", str(fusion), "--classes", ",".join(NAMES),
                "--set", "overlay.enabled=false", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 3  # broken.png failed, the others finished: exit status 3
    assert "2 of 3 images done" in printed and "failed: " in printed and "broken.png" in printed
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["fusion"]["rule"] == "product" and run_json["fusion"]["source"] == str(fusion)
    assert run_json["config"]["box_shrink"] == 0.9
    assert not (out / "overlays").exists()


def _per_image_files(out):
    return {sub: sorted(p.stem for p in (out / sub).glob("*")) for sub in ("saliency", "overlays", "geojson")}


def test_another_checkpoint_redoes_and_leaves_nothing_stale(checkpoints, pipeline, images, tmp_path):
    """Issue 13 (3): re-running into the same --out with another model recomputes every image, and an
    image that now fails keeps no file of the older model."""
    from fusion.pipeline import Pipeline

    out = tmp_path / "out"
    pipeline.run_folder(images, out, progress=False)
    assert _per_image_files(out)["geojson"] == ["slide_a", "slide_b"]
    first_map = (out / "saliency" / "slide_a.png").read_bytes()
    (images / "slide_b.jpg").write_bytes(b"no longer an image")
    other = Pipeline(checkpoints["seg_other"], checkpoints["cls"], CONFIG)
    summary = other.run_folder(images, out, progress=False)
    assert summary["n_processed_now"] == 1 and summary["n_skipped_already_done"] == 0 and summary["n_failed"] == 2
    assert (out / "saliency" / "slide_a.png").read_bytes() != first_map  # the new model's map
    assert _per_image_files(out) == {"saliency": ["slide_a"], "overlays": ["slide_a"], "geojson": ["slide_a"]}
    assert not (out / "parts" / "slide_b.csv").exists() and not (out / "parts" / "slide_b.json").exists()
    assert pd.read_csv(out / "images.csv").image_id.tolist() == ["slide_a"]


def test_an_image_without_detections_is_a_normal_result(checkpoints, images, tmp_path):
    """Issue 13 (1): a healthy image (no cell found) gets its map, an images.csv row, an empty GeoJSON."""
    from fusion.pipeline import Pipeline

    strict = {**CONFIG, "segmentation": {**CONFIG["segmentation"], "postprocess": {"threshold": 1.0, "min_area": 4}}}
    out = tmp_path / "out"
    summary = Pipeline(checkpoints["seg"], checkpoints["cls"], strict).run_folder(images, out, progress=False)
    assert summary["n_done"] == 2 and summary["n_detections"] == 0
    assert _per_image_files(out) == {sub: ["slide_a", "slide_b"] for sub in ("saliency", "overlays", "geojson")}
    table = pd.read_csv(out / "images.csv")
    assert table.image_id.tolist() == ["slide_a", "slide_b"] and table.malignancy.tolist() == [0.0, 0.0]
    assert table.n_detections.tolist() == [0, 0]
    assert json.loads((out / "geojson" / "slide_a.geojson").read_text()) == {"type": "FeatureCollection", "features": []}
    assert len(pd.read_csv(out / "predictions.csv")) == 0


def test_a_k_plus_1_class_unet_gives_its_class_probabilities_to_the_semantic_rule(checkpoints, tmp_path):
    from cytocore.errors import CytoFuseError
    from fusion.pipeline import Pipeline

    low = {**CONFIG, "segmentation": {**CONFIG["segmentation"], "postprocess": {"threshold": 0.0, "min_area": 4}}}
    semantic = Pipeline(checkpoints["seg_classes"], checkpoints["cls"], low, classes=NAMES)
    assert semantic.source.semantic and semantic.source.seg_settings.postprocess["multiclass"] == "foreground"
    cand = semantic.candidates(_cells(3))
    assert len(cand) > 0 and cand.seg_class_probs.shape == (len(cand), len(NAMES))
    u = cand.seg_class_probs
    assert 0.0 <= u.min() and u.max() <= 1.0
    assert (u[:, 3] >= u[:, 0] + u[:, 1] - 1e-9).all()  # NSCLC holds its sub-types' mass
    binary = Pipeline(checkpoints["seg"], checkpoints["cls"], low, classes=NAMES)
    assert not binary.source.semantic and binary.candidates(_cells(3)).seg_class_probs is None

    coef = {c: {"coef": [0.5, 0.5, 0.0, 0.0, 0.0, 1.0], "intercept": 0.0} for c in NAMES}
    fused_cfg = {**low, "fusion": {"rule": "semantic_shape", "logistic": coef}}
    result = Pipeline(checkpoints["seg_classes"], checkpoints["cls"], fused_cfg, classes=NAMES).run_image(_cells(3), "x")
    assert len(result.detections.to_frame()) > 0
    with pytest.raises(CytoFuseError, match="needs a K\\+1-class segmentation U-Net") as info:
        Pipeline(checkpoints["seg"], checkpoints["cls"], fused_cfg, classes=NAMES)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="the U-Net's classes lack benign, malignant"):
        Pipeline(checkpoints["seg_classes"], checkpoints["cls_other"], low)
