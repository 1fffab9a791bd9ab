"""Prediction: boxes of an image, folders of crops, box CSVs, heat maps, and the ``cytofuse cls`` commands."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from classification.crops import CropConfig
from classification.model import ModelConfig, build_network
from classification.classifier import checkpoint_meta
from classification.model_io import load_classifier
from classification.predict import classify_boxes, read_box_csv
from cytocore import runtime
from cytocore.errors import DataError
from cytocore.imageio import read_image, write_png
from experiments.cli import run
from tests.test_cls_data import toy_dataset

TINY = ModelConfig(name="efficientnet_b0", width_mult=0.25, depth_mult=0.25, drop_rate=0.0, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny classifier checkpoint: prediction plumbing does not need good weights."""
    path = tmp_path_factory.mktemp("cls") / "cls.ckpt"
    runtime.setup(seed=0)
    net = build_network(TINY, 3)
    runtime.save_checkpoint(path, [net], checkpoint_meta(TINY, ["SQ", "AD", "NS"], CropConfig(size=32)))
    return path


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return load_classifier(checkpoint)


def test_classify_boxes_is_batched_and_order_preserving(classifier, tmp_path):
    ds = toy_dataset(tmp_path / "toy", n_images=2)
    image = read_image(ds.records[0].path)
    boxes = np.array([[10, 10, 30, 30], [50, 40, 80, 70], [0, 0, 96, 96], [90, 90, 96, 96], [40, 40, 41, 41]], np.float32)
    all_at_once = classify_boxes(image, boxes, classifier, batch_size=32)
    in_pairs = classify_boxes(image, boxes, classifier, batch_size=2)
    assert all_at_once.shape == (5, 3) and all_at_once.dtype == np.float32
    np.testing.assert_allclose(in_pairs, all_at_once, rtol=1e-5, atol=1e-6)
    one = classify_boxes(image, boxes[1:2], classifier, batch_size=2)
    np.testing.assert_allclose(one[0], all_at_once[1], rtol=1e-5, atol=1e-6)
    assert classify_boxes(image, np.zeros((0, 4)), classifier).shape == (0, 3)


def test_read_box_csv_reports_the_bad_line(tmp_path):
    good = tmp_path / "boxes.csv"
    good.write_text("image_id,x0,y0,x1,y1\na,1,2,10,12\nb,0,0,5,5\n")
    table = read_box_csv(good)
    assert list(table.columns) == ["image_id", "x0", "y0", "x1", "y1"] and len(table) == 2
    for body, match in [
        ("image_id,x0,y0,x1,y1\na,1,2,10,12\nb,0,zero,5,5\n", r"boxes\.csv:3: box coordinates must be numbers"),
        ("image_id,x0,y0,x1,y1\na,10,2,1,12\n", r"boxes\.csv:2: box has x1 < x0"),
        ("image_id,x0,y0,x1\na,1,2,3\n", r"missing column\(s\) y1"),
    ]:
        good.write_text(body)
        with pytest.raises(DataError, match=match):
            read_box_csv(good)


def test_cli_predict_images_with_boxes_and_attribution(checkpoint, classifier, tmp_path):
    ds = toy_dataset(tmp_path / "toy", n_images=2)
    rows = [(r.image_id, *b) for r in ds.records for b in r.boxes.tolist()]
    pd.DataFrame(rows, columns=["image_id", "x0", "y0", "x1", "y1"]).to_csv(tmp_path / "boxes.csv", index=False)
    out = tmp_path / "pred.csv"
    code = run(["cls", "predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "toy"),
                "--boxes", str(tmp_path / "boxes.csv"), "--out", str(out), "--attribution", str(tmp_path / "cam")])
    assert code == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["image_id", "x0", "y0", "x1", "y1", "p_SQ", "p_AD", "p_NS", "attribution"]
    assert len(frame) == len(rows)
    heat = read_image(tmp_path / "cam" / frame["attribution"][0])
    assert heat.shape == (32, 64, 3)  # crop and overlay side by side
    rec = ds.records[0]
    expected = classify_boxes(read_image(rec.path), rec.boxes, classifier)
    got = frame.loc[frame["image_id"] == rec.image_id, ["p_SQ", "p_AD", "p_NS"]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_cli_predict_crop_folder(checkpoint, tmp_path):
    crops = tmp_path / "crops"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(crops / f"c{i}.png", rng.integers(0, 255, (20 + 10 * i, 30, 3)).astype(np.uint8))
    out = tmp_path / "pred.csv"
    assert run(["cls", "predict", "--checkpoint", str(checkpoint), "--crops", str(crops), "--out", str(out),
                "--attribution", str(tmp_path / "cam"), "--cam-stride", "16"]) == 0
    frame = pd.read_csv(out)
    assert list(frame["file"]) == ["c0.png", "c1.png", "c2.png"]
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == ["c0.png", "c1.png", "c2.png"]
    assert set(frame["top_class"]) <= {"SQ", "AD", "NS"}
    assert frame[["p_SQ", "p_AD", "p_NS"]].to_numpy().min() >= 0


def test_cli_errors_are_one_line_and_leave_no_output(checkpoint, tmp_path, capsys):
    ds = toy_dataset(tmp_path / "toy", n_images=1)
    (tmp_path / "boxes.csv").write_text("image_id,x0,y0,x1,y1\nnope,1,1,5,5\n")
    out = tmp_path / "pred.csv"
    code = run(["cls", "predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "toy"),
                "--boxes", str(tmp_path / "boxes.csv"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "boxes.csv:2: image 'nope' not found" in err and not out.exists()
    assert ds.records  # the folder exists; only the id was wrong
    runtime.save_checkpoint(tmp_path / "seg.ckpt", [build_network(TINY, 3)], {"stage": "segmentation"})
    code = run(["cls", "predict", "--checkpoint", str(tmp_path / "seg.ckpt"), "--crops", str(tmp_path / "toy"),
                "--out", str(out)])
    assert code == 2 and "not a classification checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["cls", "predict", "--checkpoint", str(checkpoint), "--images", str(tmp_path / "toy"), "--out", str(out)])


def test_cli_train_with_init_checkpoint_then_resume_finished_run(tmp_path, capsys, caplog):
    data = tmp_path / "toy"
    ds = toy_dataset(data, n_images=8)  # written out below in the challenge layout the CLI reads
    rows, meta = [], []
    for r in ds.records:
        meta.append((r.image_id, r.width, r.height, r.n_boxes))
        for b, lab in zip(r.normalised_boxes().tolist(), r.labels.tolist()):
            rows.append((r.image_id, *b, *lab))
    pd.DataFrame(rows, columns=["image_id", "xmin", "ymin", "xmax", "ymax", "SQ", "AD", "NS"]).to_csv(data / "labels.csv", index=False)
    pd.DataFrame(meta, columns=["image_id", "width", "height", "bbox_count"]).to_csv(data / "metadata.csv", index=False)
    (data / "images").mkdir()
    for f in data.glob("*.png"):
        f.rename(data / "images" / f.name)
    pd.DataFrame([(r.image_id, r.split) for r in ds.records], columns=["image_id", "split"]).to_csv(data / "splits.csv", index=False)
    args = ["cls", "train", "--data", str(data), "--out", str(tmp_path / "run"),
            "--set", "model.width_mult=0.25", "--set", "model.depth_mult=0.25", "--set", "crop.size=32",
            "--set", "sampling.batch_size=8", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
            "--no-progress"]
    runtime.setup(seed=1)
    donor = build_network(ModelConfig(**{**TINY.to_dict(), "name": "efficientnet_b0"}), 5)  # 5 other classes
    runtime.save_checkpoint(tmp_path / "donor.ckpt", [donor])
    with caplog.at_level("INFO", logger="cytofuse"):
        assert run(args + ["--init-checkpoint", str(tmp_path / "donor.ckpt")]) == 0
    assert "best val_mean_auc" in capsys.readouterr().out
    assert "skipped 2 with another shape: mlp_head.weight (5, " in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["progress"] is False
    assert run(args) == 2  # refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert run(args + ["--resume"]) == 0  # finished run: returns at once
