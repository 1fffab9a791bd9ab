"""Reader for COCO JSON: ``images``, ``annotations`` (``bbox`` = x, y, w, h) and ``categories``.

COCO is single-label per annotation while the challenge is multi-label, so annotations of one image
with the same box are merged into one multi-hot row (that is how a multi-label set written to COCO
comes back). Segmentations (polygons or RLE) are rasterised with pycocotools only when a mask folder
is given, since decoding every instance costs far more than reading the boxes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import DataError, ProblemLog
from ..imageio import image_size, write_png
from ..records import Dataset, ImageRecord

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]


def find_annotation_json(folder: PathLike) -> Optional[Path]:
    """The one ``*.json`` in ``folder`` or ``folder/annotations``; None if there is none.

    Several candidates are ambiguous and raise, naming them, rather than picking one by luck.
    """
    folder = Path(folder)
    found = sorted(folder.glob("*.json")) + sorted((folder / "annotations").glob("*.json"))
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:5])
        raise DataError(f"{folder}: several JSON files ({names}{', ...' if len(found) > 5 else ''}); "
                        "pass the COCO annotation file itself")
    return found[0] if found else None


def load_coco_json(path: PathLike) -> dict:
    """Parse and shape-check a COCO file: a dict with ``images`` and ``categories`` lists."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO annotation file (top level is not an object)")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: not a COCO annotation file (no {key!r} list)")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' is not a list")
    return data


def read_coco(
    path: PathLike,
    class_names: Optional[Sequence[str]] = None,
    check_images: bool = False,
    images_dir: Optional[PathLike] = None,
    masks_dir: Optional[PathLike] = None,
) -> Dataset:
    """Read a COCO data set (``path`` is the JSON file or a folder holding exactly one).

    Images are looked up in ``images_dir``, else in the JSON's sibling ``images/``, else relative
    to the JSON (and its parent, for an ``annotations/`` subfolder layout). Classes are the
    categories in id order unless ``class_names`` fixes them. With ``masks_dir``, each image's
    segmentations are rasterised (union of instances) to ``masks_dir/<image_id>.png`` once and
    reused while newer than the JSON; records then point at them.
    """
    path = Path(path)
    json_path = path if path.is_file() else find_annotation_json(path)
    if json_path is None:
        raise DataError(f"{path}: no COCO annotation .json found")
    data = load_coco_json(json_path)
    problems = ProblemLog()

    cat_names = _categories(data["categories"], json_path, problems)
    if class_names is None:
        class_names = [cat_names[k] for k in sorted(cat_names)]
    index = {name: k for k, name in enumerate(class_names)}
    column = {cid: index.get(name) for cid, name in cat_names.items()}
    for cid, name in cat_names.items():
        if column[cid] is None:
            problems.warn(json_path, None, f"category {cid} ({name!r}) is not one of {list(class_names)}; its annotations are skipped")

    search = _image_folders(json_path, images_dir)
    images = _images(data["images"], search, json_path, check_images, problems)
    listed = {e.get("id") for e in data["images"] if isinstance(e, dict) and isinstance(e.get("id"), (int, str))}
    by_image = _annotations(data.get("annotations", []), images, listed, column, json_path, problems)

    mask_files: dict[str, Path] = {}
    n_segm = sum(1 for a in data.get("annotations", []) if isinstance(a, dict) and a.get("segmentation"))
    if masks_dir is not None and n_segm:
        mask_files = rasterise_masks(json_path, masks_dir, data=data)
    elif n_segm:
        log.info("%s: %d annotations carry segmentations; pass masks_dir= to rasterise them", json_path, n_segm)

    records = []
    for coco_id, info in images.items():
        rows = by_image.get(coco_id, {})
        labels = np.zeros((len(rows), len(class_names)), np.uint8)
        for r, cols in enumerate(rows.values()):
            labels[r, sorted(cols)] = 1
        records.append(ImageRecord(
            image_id=info["image_id"], path=info["path"], width=info["width"], height=info["height"],
            boxes=np.array(list(rows), np.float32).reshape(-1, 4), labels=labels,
            mask_path=mask_files.get(info["image_id"]),
        ))
    if not records:
        raise DataError(f"{json_path}: no usable images ({len(problems)} problem(s) reported above)")
    return Dataset(records=records, class_names=list(class_names), root=json_path.parent, format="coco",
                   problems=problems.items)


def _categories(categories: list, json_path: Path, problems: ProblemLog) -> dict[int, str]:
    names: dict[int, str] = {}
    for k, cat in enumerate(categories, start=1):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not cat.get("name"):
            problems.error(json_path, None, f"category {k}: needs an integer 'id' and a 'name', skipped")
            continue
        if cat["id"] in names:
            problems.error(json_path, None, f"category id {cat['id']} appears twice, second ({cat['name']!r}) skipped")
            continue
        names[cat["id"]] = str(cat["name"])
    if len(set(names.values())) < len(names):
        raise DataError(f"{json_path}: two categories share a name; class names must be unique")
    if not names:
        raise DataError(f"{json_path}: no usable categories")
    return names


def _image_folders(json_path: Path, images_dir: Optional[PathLike]) -> list[Path]:
    if images_dir is not None:
        return [Path(images_dir)]
    here = json_path.parent
    return [here / "images", here, here.parent / "images", here.parent]


def _images(entries: list, search: list[Path], json_path: Path, check_images: bool, problems: ProblemLog) -> dict[Any, dict]:
    """COCO image id → ``{image_id, path, width, height}`` for the images that exist."""
    images: dict[Any, dict] = {}
    seen: dict[str, Any] = {}
    for k, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)) or not entry.get("file_name"):
            problems.error(json_path, None, f"image entry {k}: needs 'id' and 'file_name', skipped")
            continue
        name = str(entry["file_name"])
        image_id = Path(name).stem
        if image_id in seen:
            problems.error(json_path, None, f"image {entry['id']} ({name}): image id {image_id!r} already used by "
                           f"image {seen[image_id]}, skipped")
            continue
        if entry["id"] in images:
            problems.error(json_path, None, f"image id {entry['id']} appears twice, second ({name}) skipped")
            continue
        file = next((d / name for d in search if (d / name).is_file()), None)
        if file is None:
            problems.error(json_path, None, f"image {entry['id']}: file {name!r} not found in "
                           f"{', '.join(str(d) for d in search)}; image and its annotations skipped")
            continue
        width, height = entry.get("width"), entry.get("height")
        known = isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0
        if check_images or not known:
            try:
                header = image_size(file)
            except DataError as exc:
                problems.error(json_path, None, f"image {entry['id']}: {exc}; image and its annotations skipped")
                continue
            if known and (int(width), int(height)) != header:
                problems.warn(json_path, None, f"image {entry['id']} ({name}): size {int(width)}x{int(height)} differs "
                              f"from the file's {header[0]}x{header[1]}; using the file's")
            width, height = header
        seen[image_id] = entry["id"]
        images[entry["id"]] = {"image_id": image_id, "path": file, "width": int(width), "height": int(height)}
    return images


def _annotations(annotations: list, images: dict, listed: set, column: dict, json_path: Path,
                 problems: ProblemLog) -> dict[Any, dict[tuple, set]]:
    """COCO image id → {pixel xyxy box: class columns}; identical boxes of one image merge (multi-hot)."""
    by_image: dict[Any, dict[tuple, set]] = {}
    for k, ann in enumerate(annotations, start=1):
        what = f"annotation {ann.get('id', k) if isinstance(ann, dict) else k}"
        if not isinstance(ann, dict):
            problems.error(json_path, None, f"{what}: not an object, skipped")
            continue
        if not isinstance(ann.get("image_id"), (int, str)):
            problems.error(json_path, None, f"{what}: 'image_id' must be a number or string, skipped")
            continue
        if ann.get("image_id") not in images:
            if ann.get("image_id") not in listed:  # annotations of a skipped image went with its report
                problems.error(json_path, None, f"{what}: image_id {ann.get('image_id')!r} is not in 'images', skipped")
            continue
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in column:
            problems.error(json_path, None, f"{what}: unknown category_id {ann.get('category_id')!r}, skipped")
            continue
        col = column[ann["category_id"]]
        if col is None:
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.error(json_path, None, f"{what}: 'bbox' must be [x, y, width, height], skipped")
            continue
        if not np.isfinite([x, y, w, h]).all() or w <= 0 or h <= 0:
            problems.error(json_path, None, f"{what}: zero-area or NaN bbox [{x:g}, {y:g}, {w:g}, {h:g}], skipped")
            continue
        info = images[ann["image_id"]]
        W, H = info["width"], info["height"]
        box = (x, y, x + w, y + h)
        clipped = (max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H))
        if clipped != box:
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                problems.error(json_path, None, f"{what}: bbox lies outside the {W}x{H} image, skipped")
                continue
            problems.warn(json_path, None, f"{what}: bbox extends outside the {W}x{H} image, clipped")
        by_image.setdefault(ann["image_id"], {}).setdefault(clipped, set()).add(col)
    return by_image


def segmentation_mask(annotations: Iterable[dict], height: int, width: int) -> np.ndarray:
    """Union of the annotations' segmentations (polygons, RLE or uncompressed RLE) as a 0/255 mask."""
    from pycocotools import mask as mask_utils

    out = np.zeros((height, width), np.uint8)
    for ann in annotations:
        segm = ann.get("segmentation")
        if not segm:
            continue
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
        elif isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = dict(segm)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        out |= mask_utils.decode(rle).astype(bool).reshape(height, width) * np.uint8(255)
    return out


def rasterise_masks(json_path: PathLike, masks_dir: PathLike, data: Optional[dict] = None) -> dict[str, Path]:
    """Write ``masks_dir/<image_id>.png`` for every image with segmentations; return id → mask path.

    A mask newer than the JSON is reused, so a second load costs a directory listing, not a decode.
    """
    json_path, masks_dir = Path(json_path), Path(masks_dir)
    data = data if data is not None else load_coco_json(json_path)
    stamp = json_path.stat().st_mtime
    anns: dict[Any, list] = {}
    for ann in data.get("annotations", []):
        if isinstance(ann, dict) and ann.get("segmentation") and isinstance(ann.get("image_id"), (int, str)):
            anns.setdefault(ann["image_id"], []).append(ann)
    out: dict[str, Path] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)) or entry["id"] not in anns \
                or not entry.get("file_name"):
            continue
        image_id = Path(str(entry["file_name"])).stem
        target = masks_dir / f"{image_id}.png"
        if not (target.is_file() and target.stat().st_mtime >= stamp):
            try:
                mask = segmentation_mask(anns[entry["id"]], int(entry["height"]), int(entry["width"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{json_path}: image {entry['id']}: cannot rasterise segmentation ({exc})") from None
            write_png(target, mask)
        out[image_id] = target
    return out
