"""Segmentation training: patch sampling, augmentation, the task handed to the loop, exact resume,
checkpoints that load as a Segmenter, and the ``cytofuse seg train`` command."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytocore import runtime
from cytocore.errors import CheckpointError
from cytocore.records import Dataset, ImageRecord
from segmentation.metrics import dice_iou
from segmentation.patches import PatchBatches, PatchSampler, SegSample, build_augment
from segmentation.train import build_task, load_seg_config

TINY = [
    "model.name=unet_tiny", "model.base_width=4", "model.depth=2", "patches.size=32", "patches.batch_size=2",
    "validation.tile=32", "validation.batch_size=2", "train.epochs=3", "train.steps_per_epoch=2",
    "train.progress=false", "train.time_budget_minutes=null", "data.scale=1.0", "optimizer.warmup_epochs=0",
]


def _write_dataset(root: Path, n: int = 6, size: int = 48, seed: int = 0) -> Dataset:
    """Pale slides with dark round cells: images, masks and boxes of two classes, 4 train / 2 val."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    records = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.clip(230 + rng.normal(0, 3, (size, size, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 3))):
            r = float(rng.uniform(4, 7))
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            disc = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
            img[disc] = (100, 70, 150)
            mask[disc] = 255
            boxes.append([cx - r, cy - r, cx + r, cy + r])
            labels.append([1, 0] if rng.random() < 0.7 else [0, 1])
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
        records.append(ImageRecord(f"im{i}", root / "images" / f"im{i}.png", size, size, boxes, labels,
                                   mask_path=root / "masks" / f"im{i}.png", split="val" if i >= n - 2 else "train"))
    return Dataset(records, ["A", "B"], root=root, format="test")


def _sample(h, w, boxes, labels):
    img = np.full((h, w, 3), 230, np.uint8)
    tgt = np.zeros((h, w), np.uint8)
    for b in boxes:
        tgt[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = 1
    return SegSample("s", img, tgt, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.uint8).reshape(len(boxes), -1), (h, w))


def _contains(positions, sampler, y, x):
    p = sampler.patch
    return np.mean([y0 <= y < y0 + p and x0 <= x < x0 + p for _, y0, x0 in positions])


def test_sampler_oversamples_cells():
    s = _sample(256, 256, [[200, 30, 210, 40]], [[1]])
    cells = PatchSampler([s], 32, cell_fraction=0.7)
    uniform = PatchSampler([s], 32, cell_fraction=0.0)
    rng = np.random.default_rng(0)
    hit_cells = _contains(cells.positions(rng, 1000), cells, 35, 205)
    hit_uniform = _contains(uniform.positions(np.random.default_rng(0), 1000), uniform, 35, 205)
    assert hit_cells > 0.65 and hit_uniform < 0.1
    for i, y0, x0 in cells.positions(rng, 200):  # patches never leave the image
        assert 0 <= y0 <= 256 - 32 and 0 <= x0 <= 256 - 32


def test_sampler_draws_rare_class_boxes_as_often_as_common_ones():
    common = [[10 + 20 * k, 10, 20 + 20 * k, 20] for k in range(9)]
    s1 = _sample(64, 256, common, [[1, 0]] * 9)
    s2 = _sample(64, 64, [[30, 30, 40, 40]], [[0, 1]])  # the one rare box, in its own image
    for balance, expected in [(True, 0.5), (False, 0.1)]:
        sampler = PatchSampler([s1, s2], 32, cell_fraction=1.0, balance=balance)
        owners = [i for i, _, _ in sampler.positions(np.random.default_rng(1), 2000)]
        assert np.mean(np.array(owners) == 1) == pytest.approx(expected, abs=0.04)


def test_batches_are_deterministic_per_seed_and_epoch():
    s = _sample(96, 96, [[20, 20, 40, 40], [60, 50, 80, 70]], [[1], [1]])
    s.image[s.target > 0] = (90, 60, 140)
    aug = build_augment(load_seg_config()["augment"])
    batches = PatchBatches(PatchSampler([s], 32), batch_size=4, steps=3, mode="binary", augment=aug)

    def epoch(e, seed=0):
        return [b for b in batches(e, np.random.default_rng([seed, e]))]

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (4, 3, 32, 32) and ya.shape == (4, 1, 32, 32) and xa.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert set(np.unique(ya)) <= {0.0, 1.0}
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    plain = PatchBatches(PatchSampler([s], 32), 4, 3, "binary", augment=None)
    assert not np.array_equal(a[0][0], next(iter(plain(1, np.random.default_rng([0, 1]))))[0])


def test_geometric_augmentation_moves_image_and_target_together():
    s = _sample(64, 64, [[10, 12, 30, 40], [40, 20, 56, 30]], [[1], [1]])
    s.image[s.target > 0] = (60, 40, 120)
    aug = build_augment({"enabled": True, "flip": 0.5, "rotate90": 1.0, "affine": {"p": 1.0, "scale": [0.9, 1.1], "rotate": 15},
                         "elastic": {"p": 1.0, "alpha": 20.0, "sigma": 5.0}})
    aug.set_random_seed(3)
    for _ in range(5):
        out = aug(image=s.image, mask=s.target)
        dark = out["image"].mean(axis=2) < 150
        assert dice_iou(dark, out["mask"] > 0)[0] > 0.9


def test_classes_mode_batches_are_class_indices():
    s = _sample(64, 64, [[10, 10, 30, 30]], [[0, 1]])
    s.target[s.target > 0] = 2
    x, y = PatchBatches(PatchSampler([s], 32), 2, 1, "classes")(0, np.random.default_rng(0)).__next__()
    assert y.shape == (2, 32, 32) and y.dtype == np.int32 and set(np.unique(y)) <= {0, 2}


def test_build_task_meta_and_validation(tmp_path):
    ds = _write_dataset(tmp_path / "data")
    cfg = load_seg_config(overrides=TINY)
    setup = build_task(cfg, ds, progress=False)
    meta = setup.meta
    assert meta["stage"] == "segmentation" and meta["mode"] == "binary" and meta["scale"] == 1.0
    assert meta["class_names"] == ["A", "B"] and meta["model"]["out_channels"] == 1 and meta["model"]["depth"] == 2
    assert meta["config"] == cfg
    assert len(setup.train_samples) == 4 and len(setup.val_samples) == 2
    setup.task.network.set_train(False)
    metrics = setup.task.validate(setup.task.network)
    assert {"val_dice", "val_iou", "val_dice_image", "val_rand_error"} <= set(metrics)
    assert 0.0 <= metrics["val_dice"] <= 1.0
    auto = build_task(load_seg_config(overrides=TINY + ["data.scale=auto"]), ds, progress=False).meta
    # the 8-14 px cells keep their size (the rule asks >= 8 px); the config keeps saying auto
    assert auto["scale"] == 1.0 and auto["config"]["data"]["scale"] == "auto"
    # validation.tune.min_distance auto (the default): spacings from the train split's cells, not the fixed [4, 7]
    from segmentation.selection import marker_spacings

    train_recs = [r for r in ds.records if r.split == "train"]
    assert cfg["validation"]["tune"]["min_distance"] == "auto"
    spacings = marker_spacings("auto", train_recs)
    assert setup.validator.tuner.grid["min_distance"] == spacings   # the search starts at the larger one, not at 7
    assert setup.validator.tuner.current["min_distance"] == max(spacings) != 7
    listed = build_task(load_seg_config(overrides=TINY + ["validation.tune.min_distance=[9, 11]"]), ds, progress=False)
    assert listed.validator.tuner.grid["min_distance"] == [7, 9, 11]   # a list is taken as it is (7: postprocess's)
    set_start = build_task(load_seg_config(overrides=TINY + ["postprocess.min_distance=5"]), ds, progress=False)
    assert set_start.validator.tuner.current["min_distance"] == 5   # a start the config sets is kept
    classes = build_task(load_seg_config(overrides=TINY + ["targets.mode=classes", "loss.class_weights=auto"]), ds, progress=False)
    assert classes.meta["model"]["out_channels"] == 3 and classes.meta["mode"] == "classes"
    assert "val_dice_A" in classes.task.validate(classes.task.network)


def _weights(net):
    return [p.asnumpy().copy() for p in net.get_parameters()]


@pytest.mark.slow  # ~11 s: three graph compilations (the per-epoch seeding itself is tested fast above)
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from cytocore.trainloop import train

    ds = _write_dataset(tmp_path / "data")
    cfg = load_seg_config(overrides=TINY + ["train.epochs=2"])
    full = build_task(cfg, ds, progress=False)
    train(full.task, full.loop, tmp_path / "full")
    expected = _weights(full.task.network)

    cut = build_task(cfg, ds, progress=False)
    batches = cut.task.batches

    def killed_in_epoch_2(epoch, rng):
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies; only epoch 1 is on disk
        return batches(epoch, rng)

    cut.task.batches = killed_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        train(cut.task, cut.loop, tmp_path / "cut")
    again = build_task(cfg, ds, progress=False)  # a new process: state only from disk
    import mindspore as ms

    rng = np.random.default_rng(7)
    for p in again.task.network.get_parameters():
        p.set_data(ms.Tensor(rng.normal(size=p.shape).astype(np.float32)))
    result = train(again.task, again.loop, tmp_path / "cut", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    for a, b in zip(expected, _weights(again.task.network)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_loads_as_a_segmenter(tmp_path):
    from cytocore.trainloop import train
    from segmentation.model_io import load_segmenter

    ds = _write_dataset(tmp_path / "data")
    cfg = load_seg_config(overrides=TINY + ["train.epochs=1", "data.scale=0.5", "patches.size=16", "validation.tile=16"])
    setup = build_task(cfg, ds, progress=False)
    result = train(setup.task, setup.loop, tmp_path / "run")
    seg = load_segmenter(result.last_checkpoint)
    assert seg.scale == 0.5 and seg.out_channels == 1 and seg.class_names == ["A", "B"] and seg.mode == "binary"
    assert seg.multiple == 2 and seg.meta["config"]["data"]["scale"] == 0.5
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    import mindspore as ms

    setup.task.network.set_train(False)
    np.testing.assert_allclose(seg.logits(x), setup.task.network(ms.Tensor(x)).asnumpy(), rtol=1e-5, atol=1e-5)
    p = seg.probabilities(x)
    assert p.shape == (2, 2, 16, 16) and (p >= 0).all() and (p <= 1).all()  # foreground + instance head
    assert seg.instance_channels == 1 and seg.meta["model"]["instance_channels"] == 1


def test_wrong_checkpoints_give_one_line_errors(tmp_path):
    import mindspore.nn as nn

    from segmentation.model_io import load_segmenter
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=0)
    other = tmp_path / "cls.ckpt"
    runtime.save_checkpoint(other, [nn.Dense(2, 2)], {"stage": "classification"})
    with pytest.raises(CheckpointError, match=r"cls.ckpt: not a segmentation checkpoint \(classification\)"):
        load_segmenter(other)
    model = resolve_model_config({"name": "unet_tiny", "base_width": 4})
    misfit = tmp_path / "misfit.ckpt"
    runtime.save_checkpoint(misfit, [create_unet(**model)], {"stage": "segmentation", "model": {**model, "base_width": 8}})
    with pytest.raises(CheckpointError, match="misfit.ckpt: checkpoint does not fit this model") as err:
        load_segmenter(misfit)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="nothere.ckpt: checkpoint not found"):
        load_segmenter(tmp_path / "nothere.ckpt")


def test_bad_config_key_is_a_one_line_error(tmp_path, capsys):
    from experiments.cli import run

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 8\n")
    assert run(["seg", "train", "--config", str(bad), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.yaml: unknown option 'model.widht'" in err and "\n" not in err
    assert run(["seg", "train", "--data", str(tmp_path), "--set", "patches.size=30"]) == 2
    assert "must be a multiple of" in capsys.readouterr().err


def test_cli_seg_train_runs_end_to_end_on_synthetic_data(tmp_path, capsys):
    from cytosynth.scene import generate
    from experiments.cli import run

    data = generate(tmp_path / "synth", n_images=8, seed=1, size=96)
    t0 = time.time()
    args = ["seg", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    sets = ["model.name=unet_tiny", "model.base_width=4", "patches.size=32", "patches.batch_size=2",
            "validation.tile=32", "train.epochs=2", "train.steps_per_epoch=2"]
    assert run(args + [x for s in sets for x in ("--set", s)]) == 0
    seconds = time.time() - t0
    out = capsys.readouterr().out
    assert "trained 2 epoch(s)" in out and "best checkpoint" in out
    for name in ("best.ckpt", "last.ckpt", "log.csv", "config.yaml", "state.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert len((tmp_path / "run" / "log.csv").read_text().strip().splitlines()) == 3
    # A finished run resumes to nothing; the same out without --resume is refused in one line.
    assert run(args + ["--resume"] + [x for s in sets for x in ("--set", s)]) == 0
    assert run(args + [x for s in sets for x in ("--set", s)]) == 2
    assert "--resume" in capsys.readouterr().err
    print(f"seg train CLI took {seconds:.1f} s")


@pytest.mark.parametrize("value", ["big", "[4, x]", "[0, 7]", "[4.5]", "7"])
def test_a_bad_marker_spacing_list_is_one_clear_line(value):
    """``validation.tune.min_distance`` is ``auto`` or whole pixels >= 1; anything else stops before any
    data is read (before, a word or a fraction ended in a bare ``int()`` traceback after the data was loaded)."""
    from cytocore.errors import CytoFuseError
    from segmentation.train import check_config

    with pytest.raises(CytoFuseError, match=r"^validation.tune.min_distance must be auto or a list of whole pixels") as info:
        check_config(load_seg_config(overrides=TINY + [f"validation.tune.min_distance={value}"]))
    assert "\n" not in str(info.value)
    check_config(load_seg_config(overrides=TINY + ["validation.tune.min_distance=[4, 7]"]))


@pytest.mark.parametrize("value", ["big", "0", "-0.5", "5", "null"])
def test_a_bad_data_scale_is_one_clear_line(value):
    """``data.scale`` is ``auto`` or a number in (0, 4]; anything else stops before any data is read."""
    from cytocore.errors import CytoFuseError
    from segmentation.train import check_config

    with pytest.raises(CytoFuseError, match=r"^data.scale must be auto or a number in \(0, 4\], got ") as info:
        check_config(load_seg_config(overrides=TINY + [f"data.scale={value}"]))
    assert "\n" not in str(info.value)
