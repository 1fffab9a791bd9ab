"""The synthetic data set: the challenge layout exactly, sound annotations, and seeded determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytosynth import cells as sc, scene as synth
from cytocore.errors import CytoFuseError
from cytocore.imageio import image_size, read_image, read_mask
from cytocore.records import CHALLENGE_CLASSES

N_IMAGES, SIZE, SEED = 8, 256, 3
LABEL_COLUMNS = ["image_id", "xmin", "ymin", "xmax", "ymax", *CHALLENGE_CLASSES]
#: The only multi-hot rows a synthetic box may carry (SCC, AC, SCLC, NSCLC-NOS).
VALID_ROWS = {(1, 0, 0, 1), (0, 1, 0, 1), (0, 0, 1, 0), (0, 0, 0, 1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "a", n_images=N_IMAGES, seed=SEED, size=SIZE)


@pytest.fixture(scope="module")
def tables(data):
    return (
        pd.read_csv(data / "labels.csv"),
        pd.read_csv(data / "metadata.csv"),
        pd.read_csv(data / "splits.csv"),
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(data, tmp_path):
    again = synth.generate(tmp_path / "b", n_images=N_IMAGES, seed=SEED, size=SIZE)
    first, second = _files(data), _files(again)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []


def test_other_seed_gives_other_images():
    a = synth.render_image(np.random.default_rng(1), 96, 96, healthy=False, tumour="AC")[0]
    b = synth.render_image(np.random.default_rng(2), 96, 96, healthy=False, tumour="AC")[0]
    assert not np.array_equal(a, b)


def test_layout_files_and_columns(data, tables):
    labels, meta, splits = tables
    assert list(labels.columns) == LABEL_COLUMNS
    assert list(meta.columns) == ["image_id", "width", "height", "bbox_count"]
    assert list(splits.columns) == ["image_id", "split"]
    ids = list(meta["image_id"])
    assert len(ids) == N_IMAGES == len(set(ids))
    assert sorted(p.stem for p in (data / "images").glob("*.png")) == sorted(ids)
    assert sorted(p.stem for p in (data / "masks").glob("*.png")) == sorted(ids)
    assert sorted(splits["image_id"]) == sorted(ids)
    assert "seed 3" in (data / "README.md").read_text()
    assert not list(data.rglob("*.part*")), "temporary files left behind"


def test_metadata_matches_images_and_labels(data, tables):
    labels, meta, _ = tables
    per_image = labels.groupby("image_id").size()
    for row in meta.itertuples():
        assert image_size(data / "images" / f"{row.image_id}.png") == (row.width, row.height)
        assert read_image(data / "images" / f"{row.image_id}.png").shape == (row.height, row.width, 3)
        assert read_mask(data / "masks" / f"{row.image_id}.png").shape == (row.height, row.width)
        assert per_image.get(row.image_id, 0) == row.bbox_count


def test_healthy_images_in_metadata_not_in_labels(data, tables):
    labels, meta, _ = tables
    healthy = set(meta.loc[meta["bbox_count"] == 0, "image_id"])
    assert len(healthy) == round(N_IMAGES / 3)
    assert healthy.isdisjoint(labels["image_id"])
    for image_id in healthy:
        assert read_mask(data / "masks" / f"{image_id}.png").max() == 0


def test_boxes_inside_image_and_not_degenerate(tables):
    labels, meta, _ = tables
    coords = labels[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
    assert coords.min() >= 0 and coords.max() <= 1
    sizes = meta.set_index("image_id").loc[labels["image_id"], ["width", "height"]].to_numpy()
    w_px = (coords[:, 2] - coords[:, 0]) * sizes[:, 0]
    h_px = (coords[:, 3] - coords[:, 1]) * sizes[:, 1]
    assert w_px.min() >= 2 and h_px.min() >= 2


def test_masks_binary_and_cover_boxes(data, tables):
    labels, meta, _ = tables
    sizes = meta.set_index("image_id")
    fractions = []
    for image_id, rows in labels.groupby("image_id"):
        mask = read_mask(data / "masks" / f"{image_id}.png")
        assert set(np.unique(mask)) <= {0, 255}
        w, h = sizes.loc[image_id, ["width", "height"]]
        for x0, y0, x1, y1 in rows[["xmin", "ymin", "xmax", "ymax"]].to_numpy() * [w, h, w, h]:
            bw, bh = x1 - x0, y1 - y0
            centre = mask[int(y0 + 0.3 * bh): int(np.ceil(y1 - 0.3 * bh)), int(x0 + 0.3 * bw): int(np.ceil(x1 - 0.3 * bw))]
            fractions.append((centre > 0).mean())
    fractions = np.array(fractions)
    # Thin diagonal spindle cells fill less of their box centre than round cells do.
    assert fractions.min() > 0.3
    assert fractions.mean() > 0.8


def test_multi_hot_rule(tables):
    labels, _, _ = tables
    rows = labels[list(CHALLENGE_CLASSES)].to_numpy()
    assert {tuple(r) for r in rows} <= VALID_ROWS
    nsclc = rows[:, CHALLENGE_CLASSES.index("NSCLC")]
    for c in ("SCC", "AC"):
        assert (nsclc[rows[:, CHALLENGE_CLASSES.index(c)] == 1] == 1).all()
    assert (nsclc[rows[:, CHALLENGE_CLASSES.index("SCLC")] == 1] == 0).all()


def test_every_class_present(tables):
    labels, _, _ = tables
    rows = {tuple(r) for r in labels[list(CHALLENGE_CLASSES)].to_numpy()}
    assert rows == VALID_ROWS  # SCC, AC, SCLC and NSCLC-NOS boxes all occur


@pytest.mark.parametrize("n", [12, 40, 200])
def test_plan_has_every_type_and_a_third_healthy(n):
    plan = synth.plan_tumours(n, seed=5)
    assert plan.count(None) == round(n / 3)
    counts = {k: plan.count(k) for k in synth.TUMOUR_SHARE}
    assert min(counts.values()) >= 1
    assert counts["AC"] >= counts["SCC"] >= counts["SCLC"] >= counts["NSCLC"]  # the imbalance
    assert plan == synth.plan_tumours(n, seed=5)


def test_splits_have_healthy_and_cancer(tables):
    _, meta, splits = tables
    merged = splits.merge(meta, on="image_id")
    for split in ("train", "val", "test"):
        part = merged[merged["split"] == split]
        assert (part["bbox_count"] == 0).any() and (part["bbox_count"] > 0).any(), split


def test_splits_of_larger_set_are_about_70_15_15():
    ids = [f"i{k}" for k in range(200)]
    plan = synth.plan_tumours(200, seed=0)
    split = synth.tumour_splits(ids, plan, seed=0)
    shares = pd.Series(split).value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.03 and abs(shares["val"] - 0.15) < 0.03
    for name in ("val", "test"):  # every tumour type is evaluated
        assert {plan[k] for k, i in enumerate(ids) if split[i] == name} == {None, *synth.TUMOUR_SHARE}


def test_image_sizes_vary(tables):
    _, meta, _ = tables
    for side in ("width", "height"):
        assert meta[side].between(0.75 * SIZE, 1.25 * SIZE).all()
    assert meta["width"].nunique() > 1 and meta["height"].nunique() > 1
    assert (meta["width"] != meta["height"]).any()


def test_render_image_contract():
    rgb, mask, boxes, labels = synth.render_image(np.random.default_rng(0), 150, 190, healthy=False, tumour="SCLC")
    assert rgb.shape == (150, 190, 3) and rgb.dtype == np.uint8
    assert mask.shape == (150, 190) and mask.dtype == np.uint8
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(boxes) > 0
    assert labels.dtype == np.uint8 and labels.shape == (len(boxes), 4)
    assert (labels == synth.LABEL_ROWS["SCLC"]).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 190).all() and (boxes[:, 3] <= 150).all()
    # A pale background and stained cells, not a blank or saturated picture.
    assert 200 < np.median(rgb) < 250 and rgb.min() < 120


def test_healthy_render_has_cells_but_no_annotation():
    rgb, mask, boxes, labels = synth.render_image(np.random.default_rng(4), 200, 200, healthy=True)
    assert len(boxes) == 0 and labels.shape == (0, 4) and mask.max() == 0
    assert rgb.min() < 120  # benign cells were drawn


def test_tumour_types_differ_as_a_cytopathologist_expects():
    """Mean box area and cytoplasm hue separate the classes: SCLC small, SCC orange, AC blue-green."""
    area, redness = {}, {}
    for kind in synth.TUMOUR_SHARE:
        a, r = [], []
        for seed in range(3):
            rgb, mask, boxes, _ = synth.render_image(np.random.default_rng(seed), 256, 256, False, kind)
            a.append(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
            px = rgb[mask > 0].astype(float)
            r.append(np.mean(px[:, 0] - px[:, 2]))  # red minus blue: orange keratin vs cyanophilic
        area[kind], redness[kind] = np.mean(a), np.mean(r)
    assert area["SCLC"] < area["AC"] < area["NSCLC"]
    assert area["SCLC"] < area["SCC"]
    assert redness["SCC"] > max(redness["AC"], redness["SCLC"], redness["NSCLC"])


def _sprite(kind: str, y0: int, x0: int, size: int, z: float) -> sc.Sprite:
    return sc.Sprite(y0, x0, np.zeros((size, size, 3), np.float32), np.ones((size, size), np.float32), kind, z)


def test_hidden_malignant_cell_gets_no_box_but_stays_in_mask():
    under = _sprite("AC", 10, 10, 20, z=0.1)
    cover = _sprite("squamous", 5, 5, 30, z=0.9)  # lies on top and hides it completely
    half = _sprite("SCC", 10, 50, 20, z=0.1)
    part = _sprite("lymphocyte", 10, 50, 20, z=0.9)
    part.cover[:, :9] = 0  # hides 55%: 45% visible is enough for a box
    cut = _sprite("SCLC", 70, -15, 20, z=0.5)  # 25% inside the image: no box
    sprites = [under, cover, half, part, cut]
    _, owner, mask = synth._composite(sprites, 80, 80)
    boxes, labels = synth._boxes(sprites, owner)
    assert boxes.tolist() == [[50, 10, 70, 30]]
    assert labels.tolist() == [list(synth.LABEL_ROWS["SCC"])]
    assert mask[20, 20] == 255 and mask[75, 2] == 255 and mask[2, 2] == 0


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CytoFuseError, match="not empty"):
        synth.generate(tmp_path, n_images=2, size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_regenerating_smaller_set_removes_stale_images(tmp_path):
    synth.generate(tmp_path, n_images=3, size=64, seed=1)
    synth.generate(tmp_path, n_images=2, size=64, seed=1)
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    assert len(list((tmp_path / "masks").glob("*.png"))) == 2
    assert len(pd.read_csv(tmp_path / "metadata.csv")) == 2


@pytest.mark.parametrize("kwargs", [{"n_images": 0}, {"size": 10}])
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs):
    with pytest.raises(CytoFuseError):
        synth.generate(tmp_path / "x", **{"n_images": 2, "size": 64, **kwargs})
    assert not (tmp_path / "x").exists()
