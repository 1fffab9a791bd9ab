"""Reader for Pascal VOC: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{train,val,test}.txt``.

VOC boxes are 1-based inclusive pixel indices; the records' convention is 0-based ``xyxy`` with an
exclusive max edge, so a VOC box becomes ``(xmin - 1, ymin - 1, xmax, ymax)``. A box whose max does
not exceed its min is degenerate as written (BCCD has two, ``xmin == xmax``): it is reported and
skipped rather than kept as a one-pixel box that the annotator never drew.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import DataError, ProblemLog
from ..imageio import image_size
from ..records import Dataset, ImageRecord
from .challenge import index_images

PathLike = Union[str, Path]

ANNOTATIONS_DIR = "Annotations"
IMAGES_DIR = "JPEGImages"
SPLIT_FILES = ("train", "val", "test")
_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


def read_voc(path: PathLike, class_names: Optional[Sequence[str]] = None, check_images: bool = False) -> Dataset:
    """Read a Pascal VOC data set rooted at ``path``.

    Class names are the sorted set of object names found, unless ``class_names`` fixes them (objects
    of other names are then reported and skipped). Sizes come from each XML's ``<size>``; the image
    header is read only when that is missing or zero, or with ``check_images``.
    """
    root = Path(path)
    ann_dir = root / ANNOTATIONS_DIR
    if not ann_dir.is_dir():
        raise DataError(f"{ann_dir}: Annotations folder not found (Pascal VOC layout)")
    img_dir = root / IMAGES_DIR
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: JPEGImages folder not found (Pascal VOC layout)")
    problems = ProblemLog()
    files = index_images(img_dir, problems)
    xml_files = sorted(ann_dir.glob("*.xml"))
    if not xml_files:
        raise DataError(f"{ann_dir}: no .xml annotation files")

    parsed = [p for p in (_parse(x, files, img_dir, check_images, problems) for x in xml_files) if p is not None]
    if class_names is None:
        class_names = sorted({name for item in parsed for name, _ in item["objects"]})
    index = {name: k for k, name in enumerate(class_names)}
    split_of = _read_image_sets(root, problems)

    records = []
    for item in parsed:
        boxes, rows = [], []
        for name, box in item["objects"]:
            if name not in index:
                problems.warn(item["xml"], None, f"object class {name!r} is not one of {list(class_names)}, skipped")
                continue
            boxes.append(box)
            rows.append(index[name])
        labels = np.zeros((len(rows), len(class_names)), np.uint8)
        labels[np.arange(len(rows)), rows] = 1
        records.append(ImageRecord(
            image_id=item["image_id"], path=item["path"], width=item["width"], height=item["height"],
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=labels, split=split_of.get(item["image_id"]),
        ))
    if not records:
        raise DataError(f"{ann_dir}: no usable annotated images ({len(problems)} problem(s) reported above)")
    return Dataset(records=records, class_names=list(class_names), root=root, format="voc", problems=problems.items)


def _text(node: Optional[ET.Element], tag: str) -> Optional[str]:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _number(node: Optional[ET.Element], tag: str) -> float:
    try:
        return float(_text(node, tag))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _parse(xml_path: Path, files: dict[str, Path], img_dir: Path, check_images: bool, problems: ProblemLog) -> Optional[dict]:
    """One annotation file to ``{image_id, path, width, height, objects: [(name, xyxy)]}``, or None if unusable."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as exc:
        problems.error(xml_path, exc.position[0] if exc.position else None, f"malformed XML ({exc}), file skipped")
        return None
    except OSError as exc:
        problems.error(xml_path, None, f"cannot read ({exc.strerror or exc}), file skipped")
        return None
    ann = tree.getroot()
    image_id = xml_path.stem
    filename = _text(ann, "filename")
    image = files.get(filename) if filename else None
    if image is None:
        image = files.get(image_id) or (files.get(Path(filename).stem) if filename else None)
    if image is None:
        problems.error(xml_path, None, f"image {filename or image_id!r} not found in {img_dir}, file skipped")
        return None

    size = ann.find("size")
    width, height = _number(size, "width"), _number(size, "height")
    if check_images or not (width > 0 and height > 0):
        try:
            header = image_size(image)
        except DataError as exc:
            problems.error(xml_path, None, f"{exc}; file skipped")
            return None
        if width > 0 and height > 0 and (int(width), int(height)) != header:
            problems.warn(xml_path, None, f"<size> {int(width)}x{int(height)} differs from the image's "
                          f"{header[0]}x{header[1]}; using the image's")
        width, height = header

    objects = []
    for k, obj in enumerate(ann.iter("object"), start=1):
        name = _text(obj, "name")
        bnd = obj.find("bndbox")
        raw = [_number(bnd, t) for t in _BOX_TAGS]
        what = f"object {k} ({name or 'unnamed'})"
        if not name:
            problems.error(xml_path, None, f"{what}: no <name>, skipped")
            continue
        if not np.isfinite(raw).all():
            problems.error(xml_path, None, f"{what}: missing or non-numeric <bndbox> value, skipped")
            continue
        xmin, ymin, xmax, ymax = raw
        if xmax <= xmin or ymax <= ymin:
            problems.error(xml_path, None, f"{what}: degenerate box xmin={xmin:g} ymin={ymin:g} xmax={xmax:g} "
                           f"ymax={ymax:g} (zero width or height), skipped")
            continue
        box = np.array([xmin - 1, ymin - 1, xmax, ymax], np.float64)
        clipped = np.clip(box, 0, [width, height, width, height])
        if (clipped != box).any():
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                problems.error(xml_path, None, f"{what}: box lies outside the {int(width)}x{int(height)} image, skipped")
                continue
            problems.warn(xml_path, None, f"{what}: box extends outside the {int(width)}x{int(height)} image, clipped")
        objects.append((name, clipped))
    return {"xml": xml_path, "image_id": image_id, "path": image, "width": int(width), "height": int(height),
            "objects": objects}


def _read_image_sets(root: Path, problems: ProblemLog) -> dict[str, str]:
    """Split of each image from ``ImageSets/Main/{train,val,test}.txt`` (``trainval`` is their union, ignored)."""
    folder = root / "ImageSets" / "Main"
    split_of: dict[str, str] = {}
    for split in SPLIT_FILES:
        file = folder / f"{split}.txt"
        if not file.is_file():
            continue
        for line_no, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            image_id = parts[0]
            if image_id in split_of and split_of[image_id] != split:
                problems.warn(file, line_no, f"image {image_id!r} is also in {split_of[image_id]}.txt; keeping {split_of[image_id]}")
                continue
            split_of[image_id] = split
    return split_of
