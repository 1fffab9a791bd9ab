"""`cytofuse infer` end to end on slides and plain images, with untrained tiny networks (nothing trained).

Issue 15's done-when checks: a generated pyramidal TIFF (µm/px set) gives the same detections as the
same pixels as a plain image; the GeoJSON holds outline polygons (> 4 vertices, inside their boxes);
``coco_results.json`` loads with ``COCO.loadRes`` and runs through ``COCOeval`` against the data set's
own COCO export; µm/px sets the scale or the run is refused; ``--anonymise`` and no copied metadata.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, PngImagePlugin

pytest.importorskip("tiffslide", reason="the [slides] extra (tiffslide) is not installed")

from tests.test_slides import write_pyramid  # noqa: E402

NAMES = ["SCC", "AC", "SCLC", "NSCLC"]
CONFIG = {
    "segmentation": {"predict": {"tile": 64, "context": 8, "batch_size": 4},
                     "postprocess": {"threshold": 0.3, "min_area": 12}},
    "classification": {"batch_size": 16},
    "runtime": {"threads": 2, "seed": 0},
    "tissue": {"margin": 16},  # a small slide: keep little glass around the tissue
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
    seg_meta = {"stage": "segmentation", "model": model_cfg, "class_names": NAMES, "mode": "binary", "scale": 1.0,
                "mpp": 0.5, "input_multiple": 4, "threshold": 0.5, "config": {}}
    seg = runtime.save_checkpoint(folder / "seg.ckpt", [create_unet(**model_cfg)], seg_meta)
    no_mpp = runtime.save_checkpoint(folder / "seg_no_mpp.ckpt", [create_unet(**model_cfg)],
                                     {**seg_meta, "mpp": None})
    model = ModelConfig(name="efficientnet_b0", width_mult=0.25, depth_mult=0.25, drop_rate=0.0, drop_path_rate=0.0)
    net = build_network(model, len(NAMES))
    cls = runtime.save_checkpoint(folder / "cls.ckpt", [net], checkpoint_meta(model, NAMES, CropConfig(size=32)))
    config = folder / "fusion.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    return {"seg": seg, "seg_no_mpp": no_mpp, "cls": cls, "config": config}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from cytocore.readers import load_dataset
    from cytosynth.scene import generate

    return load_dataset(generate(tmp_path_factory.mktemp("synth") / "s", n_images=3, seed=5, size=128))


def _slide_pixels(synth) -> np.ndarray:
    """Two synthetic fields on clean glass: 224 x 320 level-0 pixels (field edges on the mask's 8-px grid)."""
    img = np.full((224, 320, 3), 246, np.uint8)
    img[16:112, 16:112] = np.asarray(Image.open(synth[0].path).convert("RGB"))[:96, :96]
    img[120:216, 208:304] = np.asarray(Image.open(synth[1].path).convert("RGB"))[:96, :96]
    return img


def _infer(checkpoints, images, out, *extra, seg="seg"):
    from experiments.cli import run

    return run(["infer", "--seg", str(checkpoints[seg]), "--cls", str(checkpoints["cls"]), "--images", str(images),
                "--out", str(out), "--config", str(checkpoints["config"]), "--no-progress", *extra])


def test_slide_gives_the_same_detections_as_its_pixels_as_a_plain_image(checkpoints, synth, tmp_path, monkeypatch):
    import tiffslide

    def refuse(self):
        raise AssertionError("a slide's label/macro images must never be read")

    monkeypatch.setattr(tiffslide.TiffSlide, "associated_images", property(refuse))
    pixels = _slide_pixels(synth)
    (tmp_path / "slides").mkdir()
    (tmp_path / "plain").mkdir()
    write_pyramid(tmp_path / "slides" / "case.tif", pixels, mpp=0.5)
    Image.fromarray(pixels).save(tmp_path / "plain" / "case.png")
    assert _infer(checkpoints, tmp_path / "slides", tmp_path / "out_slide") == 0
    assert _infer(checkpoints, tmp_path / "plain", tmp_path / "out_plain", "--mpp", "0.5",
                  "--set", "tissue.enabled=true") == 0
    a = pd.read_csv(tmp_path / "out_slide" / "detections.csv")
    b = pd.read_csv(tmp_path / "out_plain" / "detections.csv")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    record = json.loads((tmp_path / "out_slide" / "parts" / "case.json").read_text())
    assert record["mpp"] == 0.5 and record["scale"]["scale"] == 1.0 and record["slide"] is True
    # glass was neither decoded nor predicted: a slide's tissue share is recorded
    assert 0 < record["tissue_fraction"] < 0.9

    # outlines: polygons with more than 4 vertices inside their boxes, areas in µm² (0.5 µm/px known)
    features = json.loads((tmp_path / "out_slide" / "geojson" / "case.geojson").read_text())["features"]
    assert len(features) == len(a)
    many = 0
    for feature, row in zip(features, a.itertuples()):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert (ring[:, 0] >= row.x0 - 1e-6).all() and (ring[:, 0] <= row.x1 + 1e-6).all()
        assert (ring[:, 1] >= row.y0 - 1e-6).all() and (ring[:, 1] <= row.y1 + 1e-6).all()
        many += len(np.unique(ring[:-1], axis=0)) > 4
        assert feature["properties"]["measurements"]["Area µm^2"] > 0
    assert many >= 0.8 * len(features)

    labels = __import__("tifffile").imread(tmp_path / "out_slide" / "labels" / "case.tif")
    assert labels.dtype == np.uint32 and labels.shape == pixels.shape[:2]
    assert set(a["label_id"].astype(int)) <= set(np.unique(labels)) - {0}


def test_mpp_sets_the_scale_and_unknown_mpp_is_refused(checkpoints, synth, tmp_path):
    pixels = _slide_pixels(synth)
    for name, mpp in (("at40x", 0.25), ("nompp", None)):
        (tmp_path / name).mkdir()
        if mpp is None:
            import tifffile

            with tifffile.TiffWriter(tmp_path / name / "s.tif") as tif:  # pyramid without resolution tags
                tif.write(pixels, subifds=1, tile=(64, 64), photometric="rgb")
                tif.write(pixels[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
        else:
            write_pyramid(tmp_path / name / "s.tif", pixels, mpp=mpp)
    assert _infer(checkpoints, tmp_path / "at40x", tmp_path / "o1") == 0
    record = json.loads((tmp_path / "o1" / "parts" / "s.json").read_text())
    assert record["scale"]["scale"] == pytest.approx(0.5)  # 0.25 µm/px slide, model trained at 0.5 µm/px

    assert _infer(checkpoints, tmp_path / "nompp", tmp_path / "o2") == 3
    failed = json.loads((tmp_path / "o2" / "run.json").read_text())["failed"]
    assert "no µm per pixel in its metadata and no --mpp" in failed[0]["error"]
    assert _infer(checkpoints, tmp_path / "nompp", tmp_path / "o3", "--mpp", "0.5") == 0
    assert _infer(checkpoints, tmp_path / "at40x", tmp_path / "o4", seg="seg_no_mpp") == 3  # ratio impossible
    assert _infer(checkpoints, tmp_path / "at40x", tmp_path / "o5", "--scale", "0.5", seg="seg_no_mpp") == 0


def test_coco_results_evaluate_against_the_data_sets_own_export(checkpoints, synth, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cytocore.coco_export import write_dataset_coco

    write_dataset_coco(synth, tmp_path / "gt.json")
    assert _infer(checkpoints, synth.root / "images", tmp_path / "out", "--coco-gt", str(tmp_path / "gt.json")) == 0
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert isinstance(results, list) and results
    gt = COCO(str(tmp_path / "gt.json"))
    dt = gt.loadRes(str(tmp_path / "out" / "coco_results.json"))
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert np.isfinite(ev.stats[0])


def test_anonymise_and_no_input_metadata_in_outputs(checkpoints, synth, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", "Jane Doe 1957-03-02")
    Image.open(synth[0].path).convert("RGB").save(folder / "PATIENT-QZXW.png", pnginfo=info)
    out = tmp_path / "run"
    assert _infer(checkpoints, folder, out, "--anonymise") == 0
    key_file = tmp_path / "run.anonymise-key.csv"
    assert key_file.is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and not any("QZXW" in p.name for p in files)
    for p in files:
        data = p.read_bytes()
        assert b"QZXW" not in data and b"Jane Doe" not in data and b"Patient" not in data, p
    key = next(line.split(",")[2] for line in key_file.read_text().splitlines() if line.startswith("PATIENT-QZXW,"))
    assert (out / "saliency" / f"{key}.png").is_file() and (out / "labels" / f"{key}.tif").is_file()
