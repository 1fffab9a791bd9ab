"""Annotation readers: challenge layout, Pascal VOC, COCO JSON, folder per class, auto-detection.

Every bad-input case is checked for the line the user will see: the file, the 1-based line (header =
line 1) and what happened to the row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from cytocore.errors import DataError
from cytocore.readers import detect_format, load_dataset
from cytocore.readers.coco import rasterise_masks
from cytocore.writers import write_challenge_dataset
from tests.conftest import shared_dataset

HEADER = "image_id,xmin,ymin,xmax,ymax,tumour,immune\n"


# ------------------------------------------------------------------------------------------ helpers


def make_image(path: Path, width: int, height: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), 128).save(path)
    return path


def make_challenge(
    root: Path,
    labels: Optional[str] = HEADER + "a,0.1,0.1,0.5,0.5,1,0\na,0.5,0.5,1.0,1.0,1,1\nb,0.2,0.2,0.4,0.6,0,1\n",
    metadata: Optional[str] = "image_id,width,height,bbox_count\na,40,20,2\nb,10,10,1\nc,16,16,0\n",
    images: dict = {"a": (40, 20), "b": (10, 10), "c": (16, 16)},
    masks: tuple = (),
    splits: Optional[str] = None,
) -> Path:
    """A tiny challenge-layout data set: a has two boxes (one multi-hot), b one, c is healthy."""
    for image_id, (w, h) in images.items():
        make_image(root / "images" / f"{image_id}.png", w, h)
    for image_id in masks:
        w, h = images[image_id]
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(root / "masks" / f"{image_id}.png")
    if labels is not None:
        (root / "labels.csv").write_text(labels)
    if metadata is not None:
        (root / "metadata.csv").write_text(metadata)
    if splits is not None:
        (root / "splits.csv").write_text(splits)
    return root


def problem_lines(ds) -> list[str]:
    return [str(p) for p in ds.problems]


def find(ds, *needles: str) -> str:
    """The one problem line containing every needle (fails the test otherwise)."""
    hits = [line for line in problem_lines(ds) if all(n in line for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {hits} in {problem_lines(ds)}"
    return hits[0]


# ---------------------------------------------------------------------------------------- challenge


def test_challenge_reads_boxes_classes_masks_and_splits(tmp_path):
    root = make_challenge(tmp_path, masks=("a",), splits="image_id,split\na,train\nb,val\n")
    ds = load_dataset(root)
    assert ds.format == "challenge"
    assert ds.class_names == ["tumour", "immune"]
    assert [r.image_id for r in ds] == ["a", "b", "c"]
    a, b, c = ds.records
    np.testing.assert_allclose(a.boxes, [[4, 2, 20, 10], [20, 10, 40, 20]])
    np.testing.assert_array_equal(a.labels, [[1, 0], [1, 1]])
    np.testing.assert_allclose(b.boxes, [[2, 2, 4, 6]])
    assert c.is_healthy and c.labels.shape == (0, 2)
    assert a.mask_path == root / "masks" / "a.png" and b.mask_path is None
    assert (a.split, b.split, c.split) == ("train", "val", None)
    assert (a.width, a.height) == (40, 20)
    assert ds.problems == []


def test_challenge_pixel_rows_are_accepted_with_a_warning(tmp_path):
    labels = HEADER + "a,0.1,0.1,0.5,0.5,1,0\na,20,10,30,15,0,1\nb,0.2,0.2,0.4,0.6,0,1\n"
    root = make_challenge(tmp_path, labels=labels, metadata="image_id,width,height,bbox_count\na,40,20,2\nb,10,10,1\n")
    ds = load_dataset(root)
    line = find(ds, "values > 1")
    assert line.startswith("warning:") and f"{root / 'labels.csv'}:3:" in line
    np.testing.assert_allclose(ds.by_id()["a"].boxes, [[4, 2, 20, 10], [20, 10, 30, 15]])


def test_challenge_file_wholly_in_pixels_gives_one_warning(tmp_path):
    labels = HEADER + "a,4,2,20,10,1,0\na,20,10,40,20,1,1\nb,2,2,4,6,0,1\n"
    ds = load_dataset(make_challenge(tmp_path, labels=labels))
    assert len(ds.problems) == 1 and "all 3 boxes" in find(ds, "pixel coordinates")
    np.testing.assert_allclose(ds.by_id()["a"].boxes, [[4, 2, 20, 10], [20, 10, 40, 20]])


def test_challenge_row_problems_name_file_and_line(tmp_path):
    labels = HEADER + "\n".join([
        "a,0.1,0.1,0.5,0.5,1,0",      # line 2: good
        "a,0.9,0.5,1.0,0.9,1,1",      # line 3: good, multi-hot
        "a,-0.1,0.2,0.3,0.4,1,0",     # line 4: outside -> clipped
        "a,0.3,0.3,0.3,0.6,0,1",      # line 5: zero area
        "a,,0.1,0.2,0.2,1,0",         # line 6: empty coordinate
        "a,abc,0.1,0.2,0.2,1,0",      # line 7: non-numeric
        "a,0.1,0.1,0.2,0.2,2,0",      # line 8: class value 2
        "a,0.1,0.1,0.2,0.2,0,0",      # line 9: no class
        "b,0.2,0.2,0.4,0.6,0,yes",    # line 10: class value 'yes'
        "b,0.2,0.2,0.4,0.6,0,1",      # line 11: good
    ]) + "\n"
    root = make_challenge(tmp_path, labels=labels)
    ds = load_dataset(root)
    f = str(root / "labels.csv")
    assert find(ds, f"{f}:4:", "outside the image", "clipped").startswith("warning:")
    assert find(ds, f"{f}:5:", "zero-area").startswith("error:")
    assert find(ds, f"{f}:6:", "non-numeric", "row skipped").startswith("error:")
    assert "'abc'" in find(ds, f"{f}:7:", "non-numeric")
    assert find(ds, f"{f}:8:", "tumour", "'2'", "must be 0 or 1").startswith("error:")
    assert find(ds, f"{f}:9:", "no class set").startswith("warning:")
    assert find(ds, f"{f}:10:", "immune", "'yes'").startswith("error:")
    a = ds.by_id()["a"]
    np.testing.assert_allclose(a.boxes, [[4, 2, 20, 10], [36, 10, 40, 18], [0, 4, 12, 8]], atol=1e-5)
    np.testing.assert_array_equal(a.labels, [[1, 0], [1, 1], [1, 0]])
    assert ds.by_id()["b"].n_boxes == 1


def test_challenge_unknown_column_is_ignored_with_a_warning(tmp_path):
    labels = "image_id,xmin,ymin,xmax,ymax,tumour,immune,comment\na,0.1,0.1,0.5,0.5,1,0,looks odd\nb,0.2,0.2,0.4,0.6,0,1,\n"
    root = make_challenge(tmp_path, labels=labels, metadata="image_id,width,height\na,40,20\nb,10,10\n")
    ds = load_dataset(root)
    assert ds.class_names == ["tumour", "immune"]
    assert find(ds, "unknown column comment ignored").startswith(f"warning: {root / 'labels.csv'}:1:")


def test_challenge_missing_and_unreadable_images_are_skipped(tmp_path):
    meta = "image_id,width,height,bbox_count\na,40,20,2\nb,10,10,1\nc,16,16,0\nghost,8,8,0\nbroken,8,8,0\n"
    root = make_challenge(tmp_path, metadata=meta)
    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    ds = load_dataset(root)
    m = str(root / "metadata.csv")
    assert find(ds, f"{m}:5:", "'ghost' not found").startswith("error:")
    assert find(ds, f"{m}:6:", "broken.png", "cannot read image").startswith("error:")
    assert sorted(ds.by_id()) == ["a", "b", "c"]


def test_challenge_missing_image_drops_its_boxes(tmp_path):
    root = make_challenge(tmp_path, images={"a": (40, 20), "c": (16, 16)})
    ds = load_dataset(root)
    assert "'b' not found" in find(ds, f"{root / 'metadata.csv'}:3:")
    assert sorted(ds.by_id()) == ["a", "c"]
    assert sum(r.n_boxes for r in ds) == 2


def test_challenge_label_id_not_in_metadata_takes_size_from_image(tmp_path):
    meta = "image_id,width,height,bbox_count\na,40,20,2\nc,16,16,0\n"
    root = make_challenge(tmp_path, metadata=meta)
    ds = load_dataset(root)
    assert find(ds, f"{root / 'labels.csv'}:4:", "'b' is not in metadata.csv").startswith("warning:")
    b = ds.by_id()["b"]
    assert (b.width, b.height) == (10, 10)
    np.testing.assert_allclose(b.boxes, [[2, 2, 4, 6]])


def test_challenge_duplicate_metadata_ids_and_bbox_count(tmp_path):
    meta = "image_id,width,height,bbox_count\na,40,20,3\nb,10,10,1\na,40,20,2\nc,16,16,0\n"
    root = make_challenge(tmp_path, metadata=meta)
    ds = load_dataset(root)
    m = str(root / "metadata.csv")
    assert find(ds, f"{m}:4:", "duplicate image_id 'a'", "line 2").startswith("error:")
    assert find(ds, f"{m}:2:", "bbox_count 3", "2 row(s)").startswith("warning:")
    assert [r.image_id for r in ds] == ["a", "b", "c"]


def test_challenge_metadata_size_disagreeing_with_image_uses_the_image(tmp_path):
    meta = "image_id,width,height,bbox_count\na,80,40,2\nb,10,10,1\nc,16,16,0\n"
    root = make_challenge(tmp_path, metadata=meta)
    ds = load_dataset(root)
    assert "80x40" in find(ds, f"{root / 'metadata.csv'}:2:", "differs")
    assert (ds.by_id()["a"].width, ds.by_id()["a"].height) == (40, 20)


def test_challenge_without_metadata_uses_headers_and_keeps_unlabelled_images(tmp_path):
    root = make_challenge(tmp_path, metadata=None)
    ds = load_dataset(root)
    assert [r.image_id for r in ds] == ["a", "b", "c"]
    assert ds.by_id()["c"].is_healthy and ds.problems == []
    np.testing.assert_allclose(ds.by_id()["a"].boxes[0], [4, 2, 20, 10])


def test_challenge_header_only_labels_means_all_healthy(tmp_path):
    ds = load_dataset(make_challenge(tmp_path, labels=HEADER))
    assert ds.class_names == ["tumour", "immune"]
    assert len(ds) == 3 and all(r.is_healthy for r in ds)


def test_challenge_blank_lines_keep_line_numbers(tmp_path):
    labels = HEADER + "a,0.1,0.1,0.5,0.5,1,0\n\nb,0.3,0.3,0.3,0.6,0,1\n"
    root = make_challenge(tmp_path, labels=labels)
    assert find(load_dataset(root), "zero-area").startswith(f"error: {root / 'labels.csv'}:4:")


@pytest.mark.parametrize("labels, metadata, message", [
    (None, "image_id,width,height\na,40,20\n", "labels.csv: labels file not found"),
    ("", "image_id,width,height\na,40,20\n", "labels.csv: file is empty"),
    ("image_id,xmin,ymin,xmax\na,0.1,0.1,0.2\n", None, "labels.csv: missing column(s) ymax"),
    (HEADER + "a,0.1,0.1,0.5,0.5,1,0,extra,more\n", None, "labels.csv:2: row has more fields than the header"),
    (HEADER + "a,0.1,0.1,0.5,0.5,1,0\na,0.1,0.1,0.5,0.5,1,0,extra\n", None, "labels.csv:3: row has 8 fields but the header has 7"),
    ("image_id,xmin,ymin,xmax,ymax,comment\na,0.1,0.1,0.5,0.5,hello\n", None, "no class columns"),
    (HEADER, "image_id,height\na,20\n", "metadata.csv: missing column(s) width"),
    ("image_id,xmin,ymin,xmax,ymax,t,t\na,0.1,0.1,0.5,0.5,1,0\n", None, "labels.csv:1: column t appears more than once"),
])
def test_challenge_unusable_inputs_raise_one_line(tmp_path, labels, metadata, message):
    root = make_challenge(tmp_path, labels=labels, metadata=metadata)
    with pytest.raises(DataError) as err:
        load_dataset(root, format="challenge")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_challenge_empty_dataset_raises(tmp_path):
    root = make_challenge(tmp_path, images={})
    (root / "images").mkdir()
    with pytest.raises(DataError, match="no usable images"):
        load_dataset(root)


def test_strict_mode_raises_on_the_first_error(tmp_path):
    labels = HEADER + "a,0.1,0.1,0.5,0.5,1,0\nb,0.3,0.3,0.3,0.6,0,1\n"
    root = make_challenge(tmp_path, labels=labels)
    assert len(load_dataset(root).problems) >= 1
    with pytest.raises(DataError, match=r"labels\.csv:3: zero-area.*strict"):
        load_dataset(root, strict=True)


def test_challenge_handles_many_rows_quickly_and_correctly(tmp_path):
    """100 000 rows go through the column-wise checks (no per-row Python on good rows)."""
    rng = np.random.default_rng(0)
    n = 100_000
    ids = rng.integers(0, 50, n)
    x0, y0 = rng.uniform(0, 0.8, n), rng.uniform(0, 0.8, n)
    cls = rng.integers(0, 2, n)
    lines = [HEADER.strip()] + [f"i{i},{a:.4f},{b:.4f},{a + 0.1:.4f},{b + 0.1:.4f},{c},{1 - c}"
                                for i, a, b, c in zip(ids, x0, y0, cls)]
    images = {f"i{i}": (32, 32) for i in range(50)}
    root = make_challenge(tmp_path, labels="\n".join(lines) + "\n", metadata=None, images=images)
    ds = load_dataset(root)
    assert sum(r.n_boxes for r in ds) == n and ds.problems == []
    assert int(sum(r.labels[:, 0].sum() for r in ds)) == int((cls == 1).sum())


# -------------------------------------------------------------------------------------------- VOC


def voc_xml(filename: str, objects: list, size: Optional[tuple] = (64, 48)) -> str:
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def make_voc(root: Path) -> Path:
    ann = root / "Annotations"
    ann.mkdir(parents=True)
    for name in ("im1", "im2", "im3", "bad"):
        make_image(root / "JPEGImages" / f"{name}.jpg", 64, 48)
    (ann / "im1.xml").write_text(voc_xml("im1.jpg", [("WBC", (1, 1, 10, 20)), ("RBC", (30, 5, 64, 48))]))
    (ann / "im2.xml").write_text(voc_xml("im2.jpg", [("RBC", (5, 5, 5, 9)), ("Platelets", (2, 3, 4, 6)),
                                                     ("RBC", (60, 40, 70, 50))], size=None))
    (ann / "im3.xml").write_text(voc_xml("im3.jpg", []))
    (ann / "bad.xml").write_text("<annotation><filename>bad.jpg</filename><object>")
    (ann / "lost.xml").write_text(voc_xml("lost.jpg", [("RBC", (1, 1, 4, 4))]))
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("im1\nim3\n")
    (sets / "val.txt").write_text("im2\n")
    (sets / "trainval.txt").write_text("im1\nim2\nim3\n")
    return root


def test_voc_reads_boxes_splits_and_reports_bad_files(tmp_path):
    root = make_voc(tmp_path)
    assert detect_format(root) == "voc"
    ds = load_dataset(root)
    assert ds.format == "voc" and ds.class_names == ["Platelets", "RBC", "WBC"]
    assert [r.image_id for r in ds] == ["im1", "im2", "im3"]
    im1, im2, im3 = ds.records
    np.testing.assert_allclose(im1.boxes, [[0, 0, 10, 20], [29, 4, 64, 48]])  # 1-based inclusive -> 0-based exclusive
    np.testing.assert_array_equal(im1.labels, [[0, 0, 1], [0, 1, 0]])
    np.testing.assert_allclose(im2.boxes, [[1, 2, 4, 6], [59, 39, 64, 48]])  # size from the image header, clipped
    np.testing.assert_array_equal(im2.labels, [[1, 0, 0], [0, 1, 0]])
    assert im3.is_healthy
    assert (im1.split, im2.split, im3.split) == ("train", "val", "train")
    ann = root / "Annotations"
    assert find(ds, str(ann / "im2.xml"), "object 1 (RBC)", "degenerate").startswith("error:")
    assert find(ds, str(ann / "im2.xml"), "object 3", "clipped").startswith("warning:")
    assert find(ds, str(ann / "bad.xml"), "malformed XML", "file skipped").startswith("error:")
    assert find(ds, str(ann / "lost.xml"), "'lost.jpg' not found").startswith("error:")


def test_skipped_box_is_logged_once_as_a_warning_naming_file_and_object(tmp_path, caplog):
    root = make_voc(tmp_path)
    with caplog.at_level("WARNING"):
        load_dataset(root)
    lines = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(lines) == 1 and all(r.levelname == "WARNING" for r in caplog.records if "degenerate" in r.getMessage())
    # "WARNING: error: ..." read as a crash; the line names the file and object and says it was skipped
    assert lines[0].startswith(str(root / "Annotations" / "im2.xml") + ": object 1 (RBC)") and "skipped" in lines[0]


def test_voc_with_given_class_names_skips_other_objects(tmp_path):
    ds = load_dataset(make_voc(tmp_path), format="voc", class_names=["WBC", "RBC"])
    assert ds.class_names == ["WBC", "RBC"]
    assert "'Platelets'" in find(ds, "im2.xml", "not one of")
    np.testing.assert_array_equal(ds.by_id()["im1"].labels, [[1, 0], [0, 1]])


def test_voc_round_trips_through_the_challenge_layout(tmp_path):
    ds = load_dataset(make_voc(tmp_path / "voc"))
    out = write_challenge_dataset(ds, tmp_path / "challenge")
    back = load_dataset(out)
    assert back.format == "challenge" and back.class_names == ds.class_names
    assert back.problems == []
    for r in ds:
        b = back.by_id()[r.image_id]
        assert (b.width, b.height, b.split) == (r.width, r.height, r.split)
        np.testing.assert_allclose(b.boxes, r.boxes, atol=1e-3)
        np.testing.assert_array_equal(b.labels, r.labels)
        assert b.path.read_bytes() == r.path.read_bytes()


# ------------------------------------------------------------------------------------------- COCO


def make_coco(root: Path, name: str = "annotations.json") -> Path:
    make_image(root / "images" / "x.png", 50, 40)
    make_image(root / "images" / "y.png", 30, 30)
    data = {
        "images": [
            {"id": 7, "file_name": "x.png", "width": 50, "height": 40},
            {"id": 8, "file_name": "y.png", "width": 30, "height": 30},
            {"id": 9, "file_name": "missing.png", "width": 10, "height": 10},
        ],
        "categories": [{"id": 5, "name": "later"}, {"id": 2, "name": "first"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "bbox": [5, 5, 10, 20],
             "segmentation": [[5, 5, 15, 5, 15, 25, 5, 25]]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [5, 5, 10, 20]},  # same box: multi-hot
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [40, 30, 20, 20]},  # clipped
            {"id": 4, "image_id": 8, "category_id": 2, "bbox": [3, 3, 0, 4]},  # zero area
            {"id": 5, "image_id": 8, "category_id": 99, "bbox": [3, 3, 4, 4]},  # unknown category
            {"id": 6, "image_id": 9, "category_id": 2, "bbox": [1, 1, 2, 2]},  # image skipped: silent
            {"id": 7, "image_id": 123, "category_id": 2, "bbox": [1, 1, 2, 2]},  # no such image
        ],
    }
    path = root / name
    path.write_text(json.dumps(data))
    return path


def test_coco_reads_boxes_in_category_id_order(tmp_path):
    path = make_coco(tmp_path)
    for given in (path, tmp_path):
        ds = load_dataset(given)
        assert ds.format == "coco" and ds.class_names == ["first", "later"]
        assert [r.image_id for r in ds] == ["x", "y"]
        x, y = ds.records
        np.testing.assert_allclose(x.boxes, [[5, 5, 15, 25], [40, 30, 50, 40]])
        np.testing.assert_array_equal(x.labels, [[1, 1], [0, 1]])
        assert y.is_healthy and x.mask_path is None
    assert find(ds, "annotation 3", "clipped").startswith("warning:")
    assert find(ds, "annotation 4", "zero-area").startswith("error:")
    assert find(ds, "annotation 5", "unknown category_id 99").startswith("error:")
    assert find(ds, "image 9", "'missing.png' not found").startswith("error:")
    assert find(ds, "annotation 7", "123").startswith("error:")
    assert not any("annotation 6" in line for line in problem_lines(ds))


def test_coco_masks_are_rasterised_only_when_asked(tmp_path):
    path = make_coco(tmp_path)
    masks = tmp_path / "cache"
    ds = load_dataset(path, masks_dir=masks)
    x = ds.by_id()["x"]
    assert x.mask_path == masks / "x.png" and ds.by_id()["y"].mask_path is None
    mask = np.asarray(Image.open(x.mask_path))
    assert mask.shape == (40, 50) and mask[15, 10] == 255 and mask[35, 45] == 0
    assert 150 <= (mask > 0).sum() <= 260  # the 10x20 polygon
    stamp = x.mask_path.stat().st_mtime_ns
    assert rasterise_masks(path, masks) == {"x": masks / "x.png"}
    assert x.mask_path.stat().st_mtime_ns == stamp  # cached, not redone


def test_coco_bad_files(tmp_path):
    (tmp_path / "a.json").write_text("{\n  \"images\": [,]\n}")
    with pytest.raises(DataError, match=r"a\.json:2: malformed JSON"):
        load_dataset(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no 'categories' list"):
        load_dataset(tmp_path / "b.json")
    with pytest.raises(DataError, match="several JSON files"):
        detect_format(tmp_path)


# ---------------------------------------------------------------------------------------- folders


def test_folders_with_and_without_split_level(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("benign", "malignant"):
            for k in range(n):
                make_image(tmp_path / "split" / split / cls / f"{cls}{split}{k}.jpg", 24, 16)
    (tmp_path / "split" / "train" / "benign" / "broken.jpg").write_bytes(b"junk")
    ds = load_dataset(tmp_path / "split")
    assert ds.format == "folders" and ds.class_names == ["benign", "malignant"]
    assert len(ds) == 6 and sorted(ds.splits()) == ["train", "val"]
    r = ds.by_id()["malignantval0"]
    assert r.split == "val" and (r.width, r.height) == (24, 16)
    np.testing.assert_allclose(r.boxes, [[0, 0, 24, 16]])
    np.testing.assert_array_equal(r.labels, [[0, 1]])
    assert find(ds, "broken.jpg", "skipped").startswith("error:")

    for cls in ("a", "b"):
        make_image(tmp_path / "flat" / cls / "same.png", 8, 8)
    flat = load_dataset(tmp_path / "flat", format="folders")
    assert sorted(flat.by_id()) == ["a__same", "b__same"]  # colliding stems get their folder
    assert all(r.split is None for r in flat)


# ------------------------------------------------------------------------------------ detection


def test_detect_format(tmp_path):
    assert detect_format(make_challenge(tmp_path / "c")) == "challenge"
    assert detect_format(tmp_path / "c" / "labels.csv") == "challenge"
    assert detect_format(make_voc(tmp_path / "v")) == "voc"
    assert detect_format(make_coco(tmp_path / "j").parent) == "coco"
    make_image(tmp_path / "f" / "cls" / "1.png", 4, 4)
    assert detect_format(tmp_path / "f") == "folders"
    make_image(tmp_path / "only" / "images" / "1.png", 4, 4)
    with pytest.raises(DataError, match="labels.csv: labels file not found"):
        load_dataset(tmp_path / "only")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the data set format"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown data set format 'yolo'"):
        load_dataset(tmp_path / "c", format="yolo")


# ------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_monusac():
    ds = load_dataset(shared_dataset("monusac"))
    assert ds.format == "challenge" and len(ds) == 46
    assert ds.class_names == ["epithelial", "lymphocyte", "macrophage", "neutrophil"]
    totals = sum(r.labels.astype(int).sum(axis=0) for r in ds if r.n_boxes)
    assert totals.tolist() == [4056, 4058, 153, 76]
    assert all(r.mask_path is not None for r in ds)
    assert not [p for p in ds.problems if p.severity == "error"]


@pytest.mark.slow
def test_real_bccd():
    ds = load_dataset(shared_dataset("bccd"))
    assert ds.format == "voc" and len(ds) == 364
    assert ds.class_names == ["Platelets", "RBC", "WBC"]
    totals = sum(r.labels.astype(int).sum(axis=0) for r in ds if r.n_boxes)
    assert dict(zip(ds.class_names, totals.tolist())) == {"Platelets": 361, "RBC": 4155 - 2, "WBC": 372}
    degenerate = [p for p in ds.problems if "degenerate" in p.message]
    assert sorted(Path(p.file).name for p in degenerate) == ["BloodImage_00338.xml", "BloodImage_00343.xml"]
    assert {r.split for r in ds} == {"train", "val", "test"}
    assert all((r.boxes[:, 2:] > r.boxes[:, :2]).all() for r in ds)


@pytest.mark.slow
def test_real_lc25000_lung():
    ds = load_dataset(shared_dataset("lc25000-lung"))
    assert ds.format == "folders" and ds.class_names == ["lung_aca", "lung_n", "lung_scc"]
    assert len(ds) == 600 and len(ds.subset("train")) == 450 and len(ds.subset("val")) == 150
    assert all(r.n_boxes == 1 and r.labels.sum() == 1 for r in ds)


def test_challenge_tolerates_blanks_around_cells(tmp_path):
    labels = " image_id , xmin,ymin,xmax,ymax, tumour ,immune\na , 0.1, 0.1 ,0.5,0.5, 1 ,0\nb,0.2,0.2,0.4,0.6,0,1\n"
    ds = load_dataset(make_challenge(tmp_path, labels=labels, metadata="image_id,width,height\n a ,40,20\nb , 10,10\nc,16,16\n"))
    assert ds.class_names == ["tumour", "immune"] and ds.problems == []
    np.testing.assert_allclose(ds.by_id()["a"].boxes, [[4, 2, 20, 10]])


def test_challenge_image_losing_every_box_is_flagged(tmp_path):
    labels = HEADER + "a,0.1,0.1,0.5,0.5,1,0\nb,0.3,0.3,0.3,0.6,0,1\nb,0.1,0.1,0.2,0.2,0,0\n"
    meta = "image_id,width,height,bbox_count\na,40,20,1\nb,10,10,2\nc,16,16,0\n"
    root = make_challenge(tmp_path, labels=labels, metadata=meta)
    ds = load_dataset(root / "labels.csv")  # the labels file itself names the data set too
    assert ds.by_id()["b"].is_healthy
    assert "counts as healthy" in find(ds, f"{root / 'metadata.csv'}:3:", "all 2 box row(s) of 'b'")
    # problems come sorted by file and line, ready to read
    assert [(p.file, p.row) for p in ds.problems] == sorted((p.file, p.row) for p in ds.problems)


def test_coco_entries_of_the_wrong_type_are_reported(tmp_path):
    make_image(tmp_path / "images" / "x.png", 20, 20)
    data = {"images": [{"id": 1, "file_name": "x.png", "width": 20, "height": 20}, {"id": [2], "file_name": "y.png"}],
            "categories": [{"id": 1, "name": "cell"}],
            "annotations": [{"id": 1, "image_id": [1], "category_id": 1, "bbox": [1, 1, 2, 2]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": "wide"},
                            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]}
    (tmp_path / "coco.json").write_text(json.dumps(data))
    ds = load_dataset(tmp_path)
    assert find(ds, "image entry 2", "needs 'id'").startswith("error:")
    assert find(ds, "annotation 1", "'image_id' must be").startswith("error:")
    assert find(ds, "annotation 2", "'bbox' must be").startswith("error:")
    np.testing.assert_allclose(ds.by_id()["x"].boxes, [[1, 1, 6, 6]])
