"""Weak supervision: CAM → pseudo-mask arithmetic, the targets.mask_dir option, box classes for the CAM,
and ``cytofuse weak-masks`` end to end with an untrained tiny classifier."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytocore.errors import CytoFuseError, DataError
from cytocore.records import Dataset, ImageRecord
from segmentation.pseudo_masks import (
    box_pseudo_mask,
    cam_in_box,
    largest_component,
    mask_from_cam,
    pseudo_mask_dice,
    target_agreement,
    union_pseudo_masks,
)
from segmentation.targets import records_with_mask_dir


# ------------------------------------------------------------------------------ CAM -> mask (pure)


def _two_blobs(size=20):
    """A hand-made CAM: a big strong blob, a small strong blob and a weak haze."""
    cam = np.full((size, size), 0.2, np.float32)
    cam[2:10, 2:10] = 1.0  # 64 px
    cam[14:17, 14:17] = 0.9  # 9 px, disconnected
    return cam


def test_mask_keeps_only_the_largest_component():
    m = mask_from_cam(_two_blobs(), threshold=0.5)
    assert m.sum() == 64 and m[2:10, 2:10].all() and not m[14:17, 14:17].any()


def test_threshold_is_a_fraction_of_the_maximum():
    cam = _two_blobs() * 3.0  # scale must not matter
    assert mask_from_cam(cam, 0.5).sum() == 64
    everything = mask_from_cam(cam, 0.1)  # haze (0.2 of max) joins: one component, the whole map
    assert everything.all()
    ramp = np.tile(np.linspace(0, 1, 11, dtype=np.float32), (3, 1))
    assert mask_from_cam(ramp, 0.7).sum() == 3 * 4  # columns with 0.7, 0.8, 0.9, 1.0
    with pytest.raises(ValueError, match="threshold"):
        mask_from_cam(ramp, 0.0)


def test_no_positive_evidence_gives_an_empty_mask():
    assert not mask_from_cam(np.zeros((5, 5), np.float32)).any()
    assert mask_from_cam(np.zeros((0, 0), np.float32)).shape == (0, 0)


def test_largest_component_uses_8_connectivity():
    r = np.zeros((5, 5), bool)
    r[0, 0] = r[1, 1] = r[2, 2] = True  # diagonal chain: one 8-connected component
    r[4, 0] = r[4, 1] = True
    assert largest_component(r).sum() == 3


def test_cam_is_resized_to_its_window_and_clipped_to_the_box():
    # a 40x40 window at (10, 10) with the CAM hot everywhere: the mask is exactly the box
    cam = np.ones((8, 8), np.float32)
    window = (10, 10, 50, 50)
    box = (20, 25, 35, 40)
    mask, (y0, y1, x0, x1) = box_pseudo_mask(cam, window, box, (64, 64))
    assert (y0, y1, x0, x1) == (25, 40, 20, 35) and mask.all()
    # hot only in the window's left half: inside the box, only the columns left of x = 30 survive
    cam = np.zeros((40, 40), np.float32)
    cam[:, :20] = 1.0
    local, (y0, y1, x0, x1) = cam_in_box(cam, window, box, (64, 64))
    assert local.shape == (15, 15)
    mask = mask_from_cam(local, 0.5)
    cols = np.flatnonzero(mask.any(axis=0)) + x0
    assert cols.min() == 20 and cols.max() == 29


def test_windows_beyond_the_image_are_cut_at_the_border():
    cam = np.ones((4, 4), np.float32)
    mask, (y0, y1, x0, x1) = box_pseudo_mask(cam, (-10, -10, 20, 20), (-5, -5, 8, 6), (30, 30))
    assert (y0, y1, x0, x1) == (0, 6, 0, 8) and mask.shape == (6, 8) and mask.all()
    mask, where = box_pseudo_mask(cam, (40, 40, 50, 50), (42, 42, 48, 48), (30, 30))  # outside the image
    assert mask.size == 0


def test_union_over_boxes_and_empty_count():
    shape = (40, 40)
    hot, cold = np.ones((10, 10), np.float32), np.zeros((10, 10), np.float32)
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 30, 15, 40]], np.float32)
    out, empty = union_pseudo_masks(shape, [hot, hot, cold], boxes, boxes, 0.5)
    assert empty == 1
    assert out.sum() == 200 and out[0:10, 0:10].all() and out[20:30, 20:30].all() and not out[30:40, 5:15].any()


# ------------------------------------------------------------------------------ mask_dir option


def _write_dataset(root: Path, n: int = 6, size: int = 48, seed: int = 0) -> Dataset:
    """Pale slides with dark round cells: images, masks and one- or two-class boxes, 4 train / 2 val."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    records = []
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


def test_records_with_mask_dir_replaces_the_data_sets_masks(tmp_path):
    ds = _write_dataset(tmp_path / "d", n=3)
    other = tmp_path / "pseudo"
    other.mkdir()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(other / "im0.png")
    recs = records_with_mask_dir(ds.records, other)
    assert recs[0].mask_path == other / "im0.png"
    assert recs[1].mask_path is None and recs[2].mask_path is None  # never the real masks
    assert ds.records[1].mask_path is not None  # the data set itself is untouched
    with pytest.raises(DataError, match="not a folder"):
        records_with_mask_dir(ds.records, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no <image_id>.png"):
        records_with_mask_dir(ds.records, tmp_path / "empty")


def test_training_targets_come_from_mask_dir(tmp_path):
    """build_task's samples use the folder's masks (here: each real mask shifted) for train and val."""
    from segmentation.train import build_task, load_seg_config

    ds = _write_dataset(tmp_path / "d")
    folder = tmp_path / "pseudo"
    folder.mkdir()
    expected = {}
    for r in ds.records:
        m = np.zeros((48, 48), np.uint8)
        m[5:20, 30:45] = 255  # a square no real mask has
        Image.fromarray(m).save(folder / f"{r.image_id}.png")
        expected[r.image_id] = m > 0
    tiny = ["model.name=unet_tiny", "model.base_width=4", "model.depth=2", "patches.size=32", "patches.batch_size=2",
            "validation.tile=32", "validation.batch_size=2", "train.progress=false", "data.scale=1.0"]
    cfg = load_seg_config(None, tiny + ["targets.kind=mask", f"targets.mask_dir={folder}"])
    setup = build_task(cfg, ds, progress=False)
    for s in setup.train_samples + setup.val_samples:
        h, w = s.size
        assert np.array_equal(s.target[:h, :w] > 0, expected[s.image_id])
    # without the option the real masks are used
    plain = build_task(load_seg_config(None, tiny + ["targets.kind=mask"]), ds, progress=False)
    s = plain.train_samples[0]
    assert not np.array_equal(s.target[:48, :48] > 0, expected[s.image_id])


def test_mask_dir_config_checks():
    from segmentation.train import check_config, load_seg_config

    with pytest.raises(CytoFuseError, match="mask_dir is read only by"):
        check_config(load_seg_config(None, ["targets.kind=ellipse", "targets.mask_dir=/tmp"]))
    with pytest.raises(CytoFuseError, match="weak-masks"):
        check_config(load_seg_config(None, ["targets.kind=cam"]))


def test_pseudo_mask_dice_against_real_masks(tmp_path):
    ds = _write_dataset(tmp_path / "d", n=4)
    same, half = tmp_path / "same", tmp_path / "half"
    same.mkdir()
    half.mkdir()
    for r in ds.records:
        real = np.asarray(Image.open(r.mask_path))
        Image.fromarray(real).save(same / f"{r.image_id}.png")
        cut = real.copy()
        cut[:, :24] = 0
        Image.fromarray(cut).save(half / f"{r.image_id}.png")
    assert pseudo_mask_dice(ds, same)["dice"] == pytest.approx(1.0)
    d = pseudo_mask_dice(ds, half)["dice"]
    assert 0.0 < d < 1.0
    ellipse = target_agreement(ds, "ellipse")["dice"]  # ellipses inscribed in the discs' boxes ≈ the discs
    assert ellipse > 0.8
    assert pseudo_mask_dice(ds, same, split="val")["n_images"] == 2
    no_masks = Dataset([ImageRecord("x", ds.records[0].path, 48, 48)], ["A", "B"])
    assert pseudo_mask_dice(no_masks, same) is None


# ------------------------------------------------------------------------------ box classes


def test_the_cam_uses_the_most_specific_set_class():
    from experiments.weak_supervision import box_classes, most_specific_class

    names = ["SCC", "AC", "SCLC", "NSCLC"]
    hier = {"NSCLC": ["SCC", "AC"]}
    assert most_specific_class(np.array([1, 0, 0, 1]), names, hier) == 0  # SCC, not NSCLC
    assert most_specific_class(np.array([0, 0, 0, 1]), names, hier) == 3  # NSCLC alone
    assert most_specific_class(np.array([0, 1, 0, 1]), names, hier) == 1
    assert most_specific_class(np.array([0, 0, 0, 0]), names, hier) == -1
    # the classifier's output order may differ from the data set's
    labels = np.array([[0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    assert box_classes(labels, names, ["NSCLC", "SCLC", "AC", "SCC"]).tolist() == [2, 0, -1]


# ------------------------------------------------------------------------------ weak-masks CLI


def _tiny_classifier(path: Path, classes) -> Path:
    from classification.crops import CropConfig
    from classification.model import ModelConfig, build_network
    from classification.classifier import checkpoint_meta
    from cytocore import runtime

    runtime.setup(seed=0)
    model = ModelConfig(name="efficientnet_b0", width_mult=0.25, depth_mult=0.25, drop_rate=0.0, drop_path_rate=0.0)
    net = build_network(model, len(classes))
    runtime.save_checkpoint(path, [net], checkpoint_meta(model, list(classes), CropConfig(size=32)))
    return path


def _challenge_layout(ds: Dataset, root: Path) -> Path:
    """Write labels.csv / metadata.csv for the records (plus one healthy image) next to images/ and masks/."""
    rows, meta = ["image_id,xmin,ymin,xmax,ymax,A,B"], ["image_id,width,height,bbox_count"]
    for r in ds.records:
        for b, l in zip(r.normalised_boxes(), r.labels):
            rows.append(f"{r.image_id},{b[0]:.6f},{b[1]:.6f},{b[2]:.6f},{b[3]:.6f},{l[0]},{l[1]}")
        meta.append(f"{r.image_id},{r.width},{r.height},{r.n_boxes}")
    Image.fromarray(np.full((48, 48, 3), 230, np.uint8)).save(root / "images" / "healthy.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "masks" / "healthy.png")
    meta.append("healthy,48,48,0")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "metadata.csv").write_text("\n".join(meta) + "\n")
    return root


@pytest.mark.slow
def test_weak_masks_cli_end_to_end(tmp_path, capsys):
    from cytocore.readers import load_dataset
    from experiments.cli import run

    ds = _write_dataset(tmp_path / "d", n=4)
    data = _challenge_layout(ds, tmp_path / "d")
    ckpt = _tiny_classifier(tmp_path / "cls.ckpt", ["A", "B"])
    out = tmp_path / "cam"
    assert run(["weak-masks", "--cls", str(ckpt), "--data", str(data), "--out", str(out), "--stride", "8",
                "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "pseudo-masks" in text and "targets.mask_dir" in text
    loaded = load_dataset(data)
    assert len(loaded) == 5
    for r in loaded.records:
        m = np.asarray(Image.open(out / f"{r.image_id}.png"))
        assert m.shape == (r.height, r.width) and set(np.unique(m)) <= {0, 255}
        inside = np.zeros(m.shape, bool)  # every pseudo-mask pixel lies in one of the image's boxes
        for b in r.boxes:
            x0, y0 = int(np.floor(b[0])), int(np.floor(b[1]))
            inside[max(0, y0):int(np.ceil(b[3])), max(0, x0):int(np.ceil(b[2]))] = True
        assert not (m > 0)[~inside].any()
        if r.n_boxes == 0:
            assert not m.any()
    manifest = json.loads((out / "weak_masks.json").read_text())
    assert manifest["n_boxes"] == sum(r.n_boxes for r in loaded.records)
    assert sum(v["pixels"] for v in manifest["images"].values()) > 0  # the seeded tiny network's CAMs are not all empty
    # a second run reuses every mask; another threshold remakes them
    stamp = (out / "im0.png").stat().st_mtime_ns
    assert run(["weak-masks", "--cls", str(ckpt), "--data", str(data), "--out", str(out), "--stride", "8",
                "--no-progress"]) == 0
    assert (out / "im0.png").stat().st_mtime_ns == stamp
    assert run(["weak-masks", "--cls", str(ckpt), "--data", str(data), "--out", str(out), "--stride", "8",
                "--threshold", "0.3", "--no-progress"]) == 0
    assert (out / "im0.png").stat().st_mtime_ns != stamp
    # the data set's own masks are never overwritten
    assert run(["weak-masks", "--cls", str(ckpt), "--data", str(data), "--out", str(data / "masks"), "--no-progress"]) == 2
    assert "holds the data set's own masks" in capsys.readouterr().err
    # a classifier of other classes is refused in one line
    other = _tiny_classifier(tmp_path / "other.ckpt", ["X", "Y"])
    assert run(["weak-masks", "--cls", str(other), "--data", str(data), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "not among the classifier's" in capsys.readouterr().err


# ------------------------------------------------------------------------------ targets-compare


def test_targets_config_is_checked_before_anything_runs():
    from experiments.weak_supervision import load_targets_config

    cfg = load_targets_config(None, ["data.path=x"])
    assert cfg["targets"]["kinds"] == ["mask", "ellipse", "cam"] and cfg["budget"]["seg_minutes"] > 0
    assert load_targets_config(None, ["targets.kinds=ellipse"])["targets"]["kinds"] == ["ellipse"]
    with pytest.raises(CytoFuseError, match="targets.kinds"):
        load_targets_config(None, ["targets.kinds=[mask, boxes]"])
    with pytest.raises(CytoFuseError, match="targets.kinds"):
        load_targets_config(None, ["targets.kinds=[mask, mask]"])
    with pytest.raises(CytoFuseError, match="CAM threshold"):
        load_targets_config(None, ["targets.cam.threshold=1.5"])
    with pytest.raises(CytoFuseError, match="unknown option"):
        load_targets_config(None, ["targets.cam.thresh=0.5"])
    with pytest.raises(CytoFuseError, match="seg.train.time_budget_minutes .*budget.seg_minutes"):
        load_targets_config(None, ["seg.train.time_budget_minutes=30"])  # the budget block would overwrite it
    for name in ("targets_monusac.yaml", "targets_synth.yaml"):  # the shipped configs load
        from experiments.weak_supervision import CONFIG_DIR

        assert load_targets_config(CONFIG_DIR / name)["targets"]["kinds"]


TINY_TARGETS = """
name: tiny
data: {synth: {images: 10, seed: 0, size: 128}}
budget: {seg_minutes: 0.2, cls_minutes: 0.2}
seg:
  model: {name: unet_tiny}
  patches: {size: 32, batch_size: 4}
  validation: {tile: 64, batch_size: 2, max_images: 2}
  train: {epochs: 2, steps_per_epoch: 3}
  optimizer: {warmup_epochs: 0}
cls:
  model: {width_mult: 0.25, depth_mult: 0.25, drop_rate: 0.0, drop_path_rate: 0.0}
  crop: {size: 32}
  sampling: {batch_size: 8}
  val: {max_crops: 32, batch_size: 16}
  train: {epochs: 2, steps_per_epoch: 3}
  optimizer: {warmup_epochs: 0}
targets: {cam: {stride: 8}}
infer:
  segmentation:
    predict: {tile: 64, context: 8, batch_size: 2}
    postprocess: {min_area: 4}
  classification: {batch_size: 8}
progress: false
"""


@pytest.mark.slow
def test_targets_compare_end_to_end_on_tiny_synthetic_data(tmp_path, capsys):
    from experiments.cli import run

    out = tmp_path / "t"
    (tmp_path / "tiny.yaml").write_text(TINY_TARGETS)
    assert run(["targets-compare", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out)]) == 0
    assert "| real masks |" in capsys.readouterr().out
    md = (out / "targets.md").read_text()
    assert "| real masks | 1.000 |" in md and "CAM pseudo-masks" in md and "inscribed ellipses" in md
    results = json.loads((out / "targets.json").read_text())
    assert results["kinds"] == ["mask", "ellipse", "cam"]
    assert results["target_agreement"]["mask"]["dice"] == 1.0
    assert 0 < results["target_agreement"]["ellipse"]["dice"] < 1
    assert 0 <= results["target_agreement"]["cam"]["dice"] < 1
    for kind in results["kinds"]:
        assert 0 <= results["validation"][kind]["val_dice"] <= 1
        assert (out / f"seg_{kind}" / "done.json").is_file()
        assert results["test"][kind]["accuracy"] is not None
    # the CAM run trained on the pseudo-masks, not on the real masks
    import yaml

    cam_cfg = yaml.safe_load((out / "seg_cam" / "config.yaml").read_text())
    mask_dir = Path(cam_cfg["targets"]["mask_dir"])
    assert cam_cfg["targets"]["kind"] == "mask" and mask_dir.parent == out and mask_dir.name.startswith("cam_masks-")
    assert len(list(mask_dir.glob("*.png"))) == 10
    # a rerun reuses everything; another CAM threshold makes new masks and refuses the stale CAM run
    stamp = (out / "seg_cam" / "best.ckpt").stat().st_mtime_ns
    assert run(["targets-compare", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out)]) == 0
    assert (out / "seg_cam" / "best.ckpt").stat().st_mtime_ns == stamp
    assert run(["targets-compare", "--config", str(tmp_path / "tiny.yaml"), "--out", str(out),
                "--set", "targets.kinds=[cam]", "--set", "targets.fused_eval=false", "--set", "targets.cam.threshold=0.3"]) == 2
    assert "trained with another config" in capsys.readouterr().err
