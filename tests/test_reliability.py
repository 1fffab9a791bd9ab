"""Bad input end to end through the ``cytofuse`` command (issue 13): truncated images, a damaged
state.json, masks that contradict the labels, predictions for unknown images, file modes.

Each test runs the command in-process on a tiny data set (64-pixel images) and checks the exit code,
the one line that names the file, and what is (and is not) left on disk.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from experiments.cli import run
from tests.reliability_data import image_path, truncate, write_tiny_challenge

SEG_TINY = [
    "--no-progress",
    *[x for kv in ("model.name=unet_tiny", "model.base_width=4", "model.depth=2", "patches.size=32",
                   "patches.batch_size=2", "validation.tile=32", "validation.batch_size=2", "train.steps_per_epoch=1",
                   "data.scale=1.0", "train.time_budget_minutes=null", "augment.enabled=false")
      for x in ("--set", kv)],
]
CLS_TINY = [x for kv in ("model.width_mult=0.25", "model.depth_mult=0.25", "model.drop_rate=0", "model.drop_path_rate=0",
                         "crop.size=32", "sampling.batch_size=8", "val.batch_size=16", "train.steps_per_epoch=1",
                         "train.epochs=1", "train.progress=false", "augment.enabled=false")
            for x in ("--set", kv)]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def damaged(tmp_path) -> Path:
    """A tiny set with one truncated PNG (train split) and one truncated JPEG (train split)."""
    root = write_tiny_challenge(tmp_path / "data", jpeg=(2,))
    truncate(image_path(root, "im1"))
    truncate(image_path(root, "im2"))
    return root


# ------------------------------------------------------------------------------ data summary


def test_summary_decodes_every_image_and_reports_truncated_files(damaged, capsys):
    assert run(["data", "summary", str(damaged), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["problems"]["error"] == 2 and info["n_images"] == 6
    lines = info["problem_lines"]
    for name in ("im1.png", "im2.jpg"):
        line = next(x for x in lines if name in x)
        assert "truncated" in line and "skipped" in line and str(damaged / "images" / name) in line


def test_summary_quick_reads_headers_only(damaged, capsys):
    assert run(["data", "summary", str(damaged), "--json", "--quick"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["problems"]["error"] == 0 and info["n_images"] == 8


def test_healthy_image_with_nonempty_mask_is_a_warning(tmp_path, capsys):
    root = write_tiny_challenge(tmp_path / "data", healthy=(3,))
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(root / "masks" / "im3.png")
    assert run(["data", "summary", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["problems"] == {"error": 0, "warning": 1}
    line = info["problem_lines"][0]
    assert line.startswith(f"warning: {root / 'masks' / 'im3.png'}:") and "100 pixel(s)" in line and "'im3'" in line


def test_healthy_image_with_empty_mask_is_fine(tmp_path, capsys):
    root = write_tiny_challenge(tmp_path / "data", healthy=(3,))
    assert run(["data", "summary", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == {"error": 0, "warning": 0}


# --------------------------------------------------------------------------------- evaluate


def test_evaluate_skips_predictions_for_images_not_in_the_data_set(tmp_path, caplog):
    root = write_tiny_challenge(tmp_path / "data")
    preds = tmp_path / "predictions.csv"
    preds.write_text("image_id,xmin,ymin,xmax,ymax,p_A,p_B\n"
                     "im0,0.1,0.1,0.3,0.3,0.9,0.1\nghost,0.1,0.1,0.2,0.2,0.5,0.5\nim1,0.5,0.5,0.7,0.7,0.2,0.8\n")
    out = tmp_path / "metrics.json"
    assert run(["evaluate", "--data", str(root), "--predictions", str(preds), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n_predictions"] == 2
    said = [w for w in _warnings(caplog) if "'ghost'" in w]
    assert len(said) == 1 and f"{preds}:3" in said[0] and "skipped" in said[0]


# ------------------------------------------------------------------------------ file modes


def test_atomic_writes_follow_the_umask():
    from cytocore.atomic import write_text, write_with

    old = os.umask(0o027)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            write_text(Path(d) / "a.txt", "x")
            assert _mode(Path(d) / "a.txt") == 0o640

            def read_only_writer(tmp: Path) -> None:  # what MindSpore's save_checkpoint does
                tmp.write_text("weights")
                os.chmod(tmp, 0o400)

            write_with(Path(d) / "w.ckpt", read_only_writer)
            assert _mode(Path(d) / "w.ckpt") == 0o640
            os.umask(0o022)
            write_text(Path(d) / "a.txt", "y")  # replacing keeps no private mode either
            assert _mode(Path(d) / "a.txt") == 0o644
    finally:
        os.umask(old)


# -------------------------------------------------------------------------- training (MindSpore)


@pytest.mark.slow
def test_seg_train_skips_truncated_images_and_writes_readable_outputs(damaged, tmp_path, caplog, umask_022):
    out = tmp_path / "run"
    assert run(["seg", "train", "--data", str(damaged), "--out", str(out), *SEG_TINY, "--set", "train.epochs=1"]) == 0
    said = _warnings(caplog)
    for name in ("im1.png", "im2.jpg"):
        lines = [w for w in said if name in w]
        assert len(lines) == 1 and "truncated" in lines[0] and "skipped" in lines[0]
    assert len(pd.read_csv(out / "log.csv")) == 1
    for name in ("best.ckpt", "last.ckpt", "config.yaml", "log.csv", "state.json"):
        assert _mode(out / name) == 0o644, name


@pytest.mark.slow
def test_seg_resume_with_truncated_state_json_falls_back_to_the_checkpoint(tmp_path, caplog):
    data = write_tiny_challenge(tmp_path / "data")
    out = tmp_path / "run"
    assert run(["seg", "train", "--data", str(data), "--out", str(out), *SEG_TINY, "--set", "train.epochs=1"]) == 0
    state = out / "state.json"
    text = state.read_text()
    state.write_text(text[: len(text) // 2])
    caplog.clear()
    assert run(["seg", "train", "--data", str(data), "--out", str(out), *SEG_TINY, "--set", "train.epochs=2",
                "--resume"]) == 0
    said = [w for w in _warnings(caplog) if "state.json" in w]
    assert len(said) == 1 and str(state) in said[0] and "damaged" in said[0] and "last.ckpt" in said[0]
    log = pd.read_csv(out / "log.csv")
    assert log["epoch"].tolist() == [1, 2]  # the first epoch's row came back from log.csv, then one more
    assert json.loads(state.read_text())["epoch"] == 1


def test_resume_without_any_loop_record_is_one_line(tmp_path, capsys):
    from cytocore.trainloop import _resume_state
    from cytocore.errors import CheckpointError

    state = tmp_path / "state.json"
    state.write_text('{"epoch": 3, "hist')
    with pytest.raises(CheckpointError, match="state.json is damaged .*JSONDecodeError.* start a new run"):
        _resume_state(state, {}, tmp_path / "last.ckpt", tmp_path / "log.csv")


@pytest.mark.slow
def test_cls_train_skips_a_truncated_image(damaged, tmp_path, caplog, umask_022):
    out = tmp_path / "run"
    assert run(["cls", "train", "--data", str(damaged), "--out", str(out), *CLS_TINY]) == 0
    said = _warnings(caplog)
    assert len([w for w in said if "im2.jpg" in w and "truncated" in w]) == 1
    assert (out / "best.ckpt").is_file() and _mode(out / "best.ckpt") == 0o644


@pytest.mark.slow
def test_cls_train_failing_before_its_first_epoch_leaves_no_run_folder(tmp_path):
    from classification.train import load_cls_config, train_classifier
    from cytocore.errors import DataError
    from cytocore.readers import load_dataset

    data = write_tiny_challenge(tmp_path / "data")
    ds = load_dataset(data)  # read while intact, then damaged behind its back (no load-time check)
    train_image = next(r for r in ds.records if r.split == "train" and r.n_boxes)
    truncate(Path(train_image.path))
    cfg = load_cls_config(None, CLS_TINY[1::2] + ["sampling.mode=uniform"])
    out = tmp_path / "run"
    with pytest.raises(DataError, match="truncated"):
        for record in ds.records:  # make sure the damaged image is drawn in the first batch
            if record is not train_image and record.split == "train":
                record.split = "unused"
        train_classifier(cfg, out, dataset=ds)
    assert not out.exists()



# ------------------------------------------------------------------ memory of huge images (issue 13)


def test_disk_plane_keeps_what_was_written_after_its_pages_are_released():
    from cytocore.planes import disk_plane, is_disk_plane, plane, release

    p = disk_plane((64, 48), np.uint32)
    assert is_disk_plane(p) and is_disk_plane(p[3:5]) and not p.any()
    for a in range(0, 64, 16):
        p[a:a + 16] = a + 1
        release(p[a:a + 16])
    assert [int(p[a, 0]) for a in range(0, 64, 16)] == [1, 17, 33, 49] and int(p.sum()) == 48 * 16 * (1 + 17 + 33 + 49)
    small, big = plane((10, 10), np.uint8, min_pixels=100), plane((10, 11), np.uint8, min_pixels=100)
    assert not is_disk_plane(small) and is_disk_plane(big) and not big.any()
    release(small)  # ordinary arrays: nothing to do


def test_classify_boxes_in_chunks_gives_the_one_pass_result():
    from classification.crops import CropConfig
    from classification.predict import classify_boxes

    class Classifier:
        num_classes, crop = 2, CropConfig(size=16)
        calls: list = []

        def predict_crops(self, crops, batch_size):
            self.calls.append(len(crops))
            mean = crops.reshape(len(crops), -1).mean(axis=1) / 255.0
            return np.stack([mean, 1 - mean], axis=1).astype(np.float32)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 300, 3), np.uint8)
    xy = rng.uniform(0, 180, (70, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 20, (70, 2))], axis=1)
    clf = Classifier()
    whole = classify_boxes(image, boxes, clf, batch_size=8, chunk=1000)
    chunked = classify_boxes(image, boxes, clf, batch_size=8, chunk=20)
    assert clf.calls == [70, 16, 16, 16, 16, 6]  # chunks are whole batches
    np.testing.assert_array_equal(whole, chunked)


def test_huge_image_planes_go_to_disk_and_give_the_same_instances():
    from cytocore.planes import is_disk_plane
    from segmentation.predict import segment_image

    rng = np.random.default_rng(0)
    image = np.full((96, 128, 3), 230, np.uint8)
    yy, xx = np.mgrid[:96, :128]
    for _ in range(6):
        cy, cx = rng.uniform(12, 84), rng.uniform(12, 116)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = (90, 60, 140)

    def network(batch):  # dark pixels are cells
        return (-8.0 * batch.mean(axis=1, keepdims=True) - 2.0).astype(np.float32)

    post = {"min_area": 5, "block_size": 48, "block_margin": 16}
    small = segment_image(image, network, {"tile": 32, "context": 4}, post)
    huge = segment_image(image, network, {"tile": 32, "context": 4, "float_max_pixels": 1000}, post)
    assert not is_disk_plane(small.probability) and is_disk_plane(huge.probability) and is_disk_plane(huge.labels)
    assert len(small.instances) > 0
    pd.testing.assert_frame_equal(small.instances, huge.instances, check_exact=False, atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(np.asarray(small.labels), np.asarray(huge.labels))
