"""Training the classifier with the shared loop: outputs, exact resume, folder-per-class sets, CLI."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classification.dataset import CropSampler
from classification.model_io import load_classifier
from classification.train import build_setup, evaluate_checkpoint, load_cls_config, train_classifier
from cytocore import runtime
from cytocore.errors import CheckpointError, CytoFuseError
from tests.test_cls_data import TOY_CLASSES, toy_dataset, toy_folders

TINY = [
    "model.width_mult=0.25", "model.depth_mult=0.25", "model.drop_rate=0", "model.drop_path_rate=0",
    "crop.size=32", "sampling.batch_size=8", "val.batch_size=16", "train.steps_per_epoch=3",
    "train.epochs=3", "train.progress=false", "optimizer.lr=0.003",
]


def _cfg(*extra: str) -> dict:
    return load_cls_config(None, TINY + list(extra))


def _weights(net) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_default_config_loads_and_rejects_typos(tmp_path):
    cfg = load_cls_config()
    assert cfg["model"]["name"] == "efficientnet_b0" and cfg["model"]["head"] == "sigmoid"
    assert cfg["train"]["monitor"] == "val_mean_auc"
    with pytest.raises(CytoFuseError, match="unknown option"):
        load_cls_config(None, ["crop.sise=64"])


@pytest.mark.slow
def test_training_writes_checkpoints_with_classification_metadata(tmp_path):
    ds = toy_dataset(tmp_path / "toy")
    result = train_classifier(_cfg("train.epochs=2"), tmp_path / "run", dataset=ds)
    for name in ("best.ckpt", "last.ckpt", "log.csv", "config.yaml", "state.json"):
        assert (tmp_path / "run" / name).is_file(), name
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert {"val_mean_auc", "val_cancer_auc", "val_auc_SQ", "val_ap_NS", "val_bacc_AD", "val_loss"} <= set(log.columns)
    _, meta = runtime.load_checkpoint(result.best_checkpoint)
    assert meta["stage"] == "classification" and meta["class_names"] == TOY_CLASSES
    assert meta["head"] == "sigmoid" and meta["crop"]["size"] == 32 and meta["model"]["width_mult"] == 0.25
    assert meta["config"]["sampling"]["batch_size"] == 8
    clf = load_classifier(result.best_checkpoint)
    from classification.predict import classify_boxes
    from cytocore.imageio import read_image

    rec = ds.records[0]
    probs = classify_boxes(read_image(rec.path), rec.boxes, clf)
    assert probs.shape == (rec.n_boxes, 3) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    assert classify_boxes(read_image(rec.path), np.zeros((0, 4)), clf).shape == (0, 3)
    # Re-scoring the best checkpoint on its validation split reproduces the metrics logged for it.
    from classification.train import evaluate_checkpoint

    again = evaluate_checkpoint(result.best_checkpoint, ds, split="val")
    assert again["mean_auc"] == pytest.approx(meta["metrics"]["val_mean_auc"], abs=1e-6)
    assert again["cancer_auc"] == pytest.approx(meta["metrics"]["val_cancer_auc"], abs=1e-6)
    with pytest.raises(CheckpointError, match="--resume"):
        train_classifier(_cfg("train.epochs=2"), tmp_path / "run", dataset=ds)


@pytest.mark.slow
def test_resume_after_a_kill_equals_uninterrupted_training(tmp_path, monkeypatch):
    ds = toy_dataset(tmp_path / "toy")
    cfg = _cfg()  # augmentation, jitter, negatives and balanced sampling all on
    full = build_setup(cfg, ds)
    from classification.train import make_task
    from cytocore.trainloop import train

    train(make_task(full), full.loop, tmp_path / "full")
    expected = _weights(full.network)

    original = CropSampler.batches

    def killed_in_epoch_2(self, epoch, rng, steps):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies; only epoch 1's files survive
        return original(self, epoch, rng, steps)

    monkeypatch.setattr(CropSampler, "batches", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg, tmp_path / "cut", dataset=ds)
    monkeypatch.setattr(CropSampler, "batches", original)
    runtime.setup(seed=999)  # a new process: different global RNG state; everything else comes from disk
    second = build_setup(_cfg("train.seed=0"), ds)
    train(make_task(second), second.loop, tmp_path / "cut", resume=True)
    got = _weights(second.network)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_folder_per_class_set_trains_with_the_softmax_head(tmp_path):
    root = toy_folders(tmp_path / "tiles", per_class=3)
    cfg = _cfg("model.head=softmax", "negatives.ratio=0", "train.epochs=1", "train.steps_per_epoch=1",
               f"data.path={root}", "sampling.tile_zoom=0.5")
    result = train_classifier(cfg, tmp_path / "run")
    row = result.history[0]
    assert {"val_accuracy", "val_balanced_accuracy", "val_auc_red"} <= set(row)
    clf = load_classifier(result.best_checkpoint)
    assert clf.head == "softmax" and clf.class_names == ["blue", "plain", "red"]
    probs = clf.predict_crops(np.zeros((2, 32, 32, 3), np.uint8))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Trained on half-side windows: whole tiles are shown at twice the crop size (same pixel scale).
    assert clf.tile_crop.size == 2 * clf.crop.size
    metrics = evaluate_checkpoint(result.best_checkpoint, root, split="val", data_format="folders")
    assert metrics["crops"] == 9 and 0.0 <= metrics["balanced_accuracy"] <= 1.0


def test_softmax_head_refuses_multi_hot_boxes_and_negatives(tmp_path):
    ds = toy_dataset(tmp_path / "toy", n_images=4, val_every=2)
    with pytest.raises(CytoFuseError, match="one class per box"):
        build_setup(_cfg("model.head=softmax", "negatives.ratio=0"), ds)
    single = ds.subset()
    for r in single.records:
        r.labels[:, 2] = 0  # SQ / AD only: mutually exclusive
    with pytest.raises(CytoFuseError, match="negative"):
        build_setup(_cfg("model.head=softmax"), single)


def test_pos_weight_auto_and_bad_values(tmp_path, caplog):
    ds = toy_dataset(tmp_path / "toy", n_images=4, val_every=2)
    with caplog.at_level("INFO", logger="cytofuse"):
        build_setup(_cfg("loss.pos_weight=auto"), ds)
    assert "pos_weight (auto): SQ=" in caplog.text
    with pytest.raises(CytoFuseError, match="pos_weight"):
        build_setup(_cfg("loss.pos_weight=[1, 2]"), ds)


def test_missing_validation_split_is_a_clear_error(tmp_path):
    ds = toy_dataset(tmp_path / "toy", n_images=4, val_every=100)
    with pytest.raises(CytoFuseError, match="split 'val' has no images"):
        build_setup(_cfg(), ds)
