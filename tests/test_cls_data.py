"""The crop sampler: class balance, negatives away from cancer, deterministic batches, validation crops.

Also home of ``toy_dataset``, a tiny detection-style data set the other classifier tests train on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from classification.crops import CropConfig, JitterConfig, NegativeConfig, overlap_fractions
from classification.dataset import (
    AugmentConfig,
    CropSampler,
    ImageCache,
    SamplingConfig,
    positive_pool,
    sampling_weights,
    validation_crops,
)
from cytocore.imageio import write_png
from cytocore.records import Dataset, ImageRecord

TOY_CLASSES = ["SQ", "AD", "NS"]  # SQ and AD boxes are NS too, as SCC/AC are NSCLC
BACKGROUND = (232, 226, 238)


def _disc(img: np.ndarray, cx: float, cy: float, r: float, colour) -> None:
    ys, xs = np.ogrid[: img.shape[0], : img.shape[1]]
    img[(xs - cx) ** 2 + (ys - cy) ** 2 <= r * r] = colour


def toy_dataset(root: Path, n_images: int = 12, size: int = 96, seed: int = 0, val_every: int = 4) -> Dataset:
    """Pale images with red (SQ+NS) and blue (AD+NS) discs boxed, purple benign discs not boxed.

    Every ``val_every``-th image is in the val split; one image in six is healthy (benign cells only).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_images):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = BACKGROUND
        img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        boxes, labels = [], []
        cells = [] if i % 6 == 5 else [(0, (170, 40, 60)), (1, (50, 60, 170))]
        slots = [(24, 24), (72, 72), (24, 72), (72, 24)]
        order = rng.permutation(4)
        for (kind, colour), slot in zip(cells, (slots[j] for j in order[:2])):
            r = rng.uniform(7, 11)
            cx, cy = slot[0] + rng.uniform(-4, 4), slot[1] + rng.uniform(-4, 4)
            _disc(img, cx, cy, r, colour)
            boxes.append([cx - r, cy - r, cx + r, cy + r])
            labels.append([1, 0, 1] if kind == 0 else [0, 1, 1])
        bx, by = slots[order[3]]
        _disc(img, bx, by, 6, (140, 90, 160))  # benign, never boxed
        path = root / f"img{i:02d}.png"
        write_png(path, img)
        records.append(ImageRecord(
            image_id=path.stem, path=path, width=size, height=size,
            boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.uint8).reshape(-1, 3),
            split="val" if i % val_every == val_every - 1 else "train",
        ))
    return Dataset(records=records, class_names=list(TOY_CLASSES), root=root, format="challenge")


def toy_folders(root: Path, per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """A folder-per-class set ``root/{train,val}/{red,blue,plain}/*.png`` of whole tiles."""
    rng = np.random.default_rng(seed)
    colours = {"red": (180, 40, 50), "blue": (40, 50, 180), "plain": BACKGROUND}
    for split in ("train", "val"):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                img = np.empty((size, size + 8, 3), np.uint8)  # not square: tiles are padded square
                img[:] = BACKGROUND
                _disc(img, size / 2 + rng.uniform(-5, 5), size / 2, size / 4, colour)
                write_png(folder / f"{name}{j}.png", img)
    return root


@pytest.fixture()
def toy(tmp_path) -> Dataset:
    return toy_dataset(tmp_path / "toy")


def _sampler(ds: Dataset, **kw) -> CropSampler:
    sampling = SamplingConfig(batch_size=kw.pop("batch_size", 16), mode=kw.pop("mode", "balanced"), jitter=JitterConfig())
    return CropSampler(ds.subset("train"), CropConfig(size=32), sampling, kw.pop("negatives", NegativeConfig(ratio=0.25)),
                       kw.pop("augment", AugmentConfig()), whole_image=kw.pop("whole_image", False), cache=ImageCache(64))


def test_balanced_weights_give_every_class_the_same_share():
    labels = np.array([[1, 0, 1]] * 2 + [[0, 1, 1]] * 8 + [[0, 0, 1]] * 10, np.float32)
    w = sampling_weights(labels, "balanced")
    share = w @ labels  # expected frequency of each class among drawn boxes
    # each class hands a third to its boxes; SQ and AD boxes also get their part of NS's third
    assert share == pytest.approx([1 / 3 + 1 / 3 * 2 / 20, 1 / 3 + 1 / 3 * 8 / 20, 1.0])
    single = np.eye(3, dtype=np.float32)[[0] * 2 + [1] * 8 + [2] * 10]
    assert sampling_weights(single, "balanced") @ single == pytest.approx([1 / 3] * 3)
    assert sampling_weights(labels, "uniform") == pytest.approx(np.full(20, 1 / 20))
    sqrt = sampling_weights(labels, "sqrt") @ labels
    assert share[0] > sqrt[0] > 2 / 20  # rare class: between balanced and as annotated


def test_batches_have_the_configured_shape_negatives_and_normalisation(toy):
    sampler = _sampler(toy)
    x, y = sampler.batch(np.random.default_rng(0))
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert y.shape == (16, 3) and y.dtype == np.float32
    assert int((y.max(axis=1) == 0).sum()) == 4  # round(16 × 0.25) negatives
    assert abs(float(x.mean())) < 3.0  # normalised, not 0..255


def test_negative_crops_avoid_every_annotated_box(toy):
    sampler = _sampler(toy, negatives=NegativeConfig(ratio=0.5, on_objects=0.5))
    rng = np.random.default_rng(3)
    items = sampler._negative_items(rng, 200)
    assert len(items) >= 150
    for i, box in items:
        rec = sampler.dataset.records[i]
        if rec.n_boxes:
            assert overlap_fractions(box[None], rec.boxes).max() <= 0.05 + 1e-6


def test_epoch_batches_are_a_function_of_the_rng_only(toy):
    a = _sampler(toy)
    b = _sampler(toy)  # another process: fresh sampler and cache
    xa = [x for x, _ in a.batches(2, np.random.default_rng([0, 2]), 3)]
    xb = [x for x, _ in b.batches(2, np.random.default_rng([0, 2]), 3)]
    for p, q in zip(xa, xb):
        np.testing.assert_array_equal(p, q)
    xc = next(iter(a.batches(3, np.random.default_rng([0, 3]), 1)))[0]
    assert not np.array_equal(xa[0], xc)


def test_validation_crops_hold_every_box_and_fixed_negatives(toy):
    val = toy.subset("val")
    crops, labels = validation_crops(val, CropConfig(size=32), NegativeConfig(ratio=0.25), seed=0)
    n_boxes = sum(r.n_boxes for r in val.records)
    assert int((labels.max(axis=1) > 0).sum()) == n_boxes
    assert int((labels.max(axis=1) == 0).sum()) == round(n_boxes / 3)
    again, _ = validation_crops(val, CropConfig(size=32), NegativeConfig(ratio=0.25), seed=0)
    np.testing.assert_array_equal(crops, again)


def test_whole_tile_sets_have_no_negatives_and_no_margin(tmp_path):
    from cytocore.readers import load_dataset

    ds = load_dataset(toy_folders(tmp_path / "tiles"), format="folders")
    assert ds.format == "folders" and ds.class_names == ["blue", "plain", "red"]
    sampler = _sampler(ds, whole_image=True, augment=AugmentConfig(enabled=False),
                       negatives=NegativeConfig(ratio=0.5))
    x, y = sampler.batch_crops(np.random.default_rng(0))
    assert np.all(y.sum(axis=1) == 1)  # no all-zero rows
    crops, labels = validation_crops(ds.subset("val"), CropConfig(size=32), NegativeConfig(ratio=0.5), whole_image=True)
    assert len(crops) == 18 and np.all(labels.sum(axis=1) == 1)


def test_positive_pool_skips_boxes_without_a_class(toy):
    rec = toy.records[0]
    rec.labels[0] = 0
    idx, boxes, labels = positive_pool(toy)
    assert len(idx) == sum(r.n_boxes for r in toy.records) - 1
    assert np.all(labels.sum(axis=1) > 0)
