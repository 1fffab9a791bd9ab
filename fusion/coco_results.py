"""``coco_results.json``: the detections as a COCO *results list*, what ``COCO.loadRes`` and ``COCOeval`` read.

A results list is ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`` whose ids
are those of a ground-truth file. Two ways to get the ids:

- ``--coco-gt FILE``: the user's own ground truth. Images are matched by file name (then by file
  name without extension, when that is unique), categories by name (then case-insensitively).
  Images or classes the file does not have are left out with one warning line each, since
  ``loadRes`` refuses results for unknown images.
- otherwise CytoFuse's own numbering (images 1..N in run order, categories 1..K in class order),
  the same ids as ``detections.coco.json`` and as ``cytofuse data coco`` gives a data set whose
  images are listed in the same order.

A multi-label detection gives one result per class whose score reaches that class's floor. When the
cell's outline is known it is added as a polygon ``segmentation``, so ``iouType="segm"`` works too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from cytocore.atomic import write_json
from cytocore.errors import DataError

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]


@dataclass
class CocoIds:
    """COCO ids of the run's images (by image id) and classes (by name), and where they came from."""

    images: dict[str, int]
    categories: dict[str, int]
    source: str = "cytofuse"
    unmatched_images: list[str] = field(default_factory=list)
    unmatched_classes: list[str] = field(default_factory=list)


def own_ids(image_ids: Sequence[str], class_names: Sequence[str]) -> CocoIds:
    """CytoFuse's numbering: images 1..N in the given order, categories 1..K in class order."""
    return CocoIds({str(i): k + 1 for k, i in enumerate(image_ids)}, {c: k + 1 for k, c in enumerate(class_names)})


def ids_from_ground_truth(path: PathLike, file_names: Mapping[str, str], class_names: Sequence[str]) -> CocoIds:
    """Map the run's images (``image_id → file name``) and classes onto a COCO ground-truth file's ids.

    Raises a one-line :class:`DataError` naming the file when nothing matches (a wrong file is more
    likely than a run with no overlap at all).
    """
    from cytocore.readers.coco import load_coco_json

    path = Path(path)
    data = load_coco_json(path)
    by_name: dict[str, int] = {}
    by_stem: dict[str, list[int]] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{path}: images[{k}] has no 'id' and 'file_name'")
        name = Path(str(img["file_name"]).replace("\\", "/")).name
        by_name.setdefault(name, img["id"])
        by_stem.setdefault(Path(name).stem, []).append(img["id"])
    images: dict[str, int] = {}
    unmatched_images = []
    for image_id, file_name in file_names.items():
        name = Path(str(file_name)).name
        if name in by_name:
            images[image_id] = by_name[name]
        elif len(by_stem.get(Path(name).stem, [])) == 1:
            images[image_id] = by_stem[Path(name).stem][0]
        else:
            unmatched_images.append(image_id)
    cats: dict[str, int] = {}
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DataError(f"{path}: categories[{k}] has no 'id' and 'name'")
        cats.setdefault(str(cat["name"]), cat["id"])
    folded = {name.casefold(): cid for name, cid in cats.items()}
    categories: dict[str, int] = {}
    unmatched_classes = []
    for name in class_names:
        if name in cats:
            categories[name] = cats[name]
        elif name.casefold() in folded:
            categories[name] = folded[name.casefold()]
        else:
            unmatched_classes.append(name)
    if file_names and not images:
        raise DataError(f"{path}: none of the {len(file_names)} image file names is in this COCO file's 'images' "
                        f"(e.g. {next(iter(file_names.values()))!r}); is it the ground truth of these images?")
    if not categories:
        raise DataError(f"{path}: none of the classes {', '.join(class_names)} is a category name in this COCO file "
                        f"(it has {', '.join(sorted(cats)[:8]) or 'none'})")
    if unmatched_images:
        log.warning("%s: %d image(s) not in this ground truth, left out of coco_results.json (e.g. %s)",
                    path, len(unmatched_images), file_names[unmatched_images[0]])
    if unmatched_classes:
        log.warning("%s: class(es) %s have no category of that name, left out of coco_results.json",
                    path, ", ".join(unmatched_classes))
    return CocoIds(images, categories, str(path), unmatched_images, unmatched_classes)


def coco_results(
    detections: pd.DataFrame,
    class_names: Sequence[str],
    ids: CocoIds,
    floors: Optional[Sequence[float]] = None,
    outlines: Optional[Sequence[Optional[np.ndarray]]] = None,
) -> list[dict]:
    """The results list: one entry per (detection, class) with score ≥ the class floor.

    ``detections`` is the canonical table (pixel ``x0..y1``, ``p_<class>``, ``image_id``);
    ``outlines`` (aligned with its rows, None where unknown) are closed ``(N, 2)`` x, y rings.
    """
    floors_arr = np.zeros(len(class_names)) if floors is None else np.asarray(floors, np.float64)
    if not len(detections):
        return []
    boxes = detections[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    scores = detections[[f"p_{c}" for c in class_names]].to_numpy(np.float64)
    image_ids = detections["image_id"].astype(str).tolist()
    results = []
    for d, image_id in enumerate(image_ids):
        coco_image = ids.images.get(image_id)
        if coco_image is None:
            continue
        x0, y0, x1, y1 = boxes[d]
        bbox = [round(float(x0), 3), round(float(y0), 3), round(float(max(x1 - x0, 0.0)), 3), round(float(max(y1 - y0, 0.0)), 3)]
        ring = outlines[d] if outlines is not None else None
        for c, name in enumerate(class_names):
            if name not in ids.categories or not scores[d, c] >= floors_arr[c]:
                continue
            entry = {"image_id": ids.images[image_id], "category_id": ids.categories[name], "bbox": bbox,
                     "score": round(float(scores[d, c]), 6)}
            if ring is not None and len(ring) >= 3:
                entry["segmentation"] = [[round(float(v), 2) for v in np.asarray(ring, np.float64).ravel()]]
            results.append(entry)
    return results


def write_coco_results(path: PathLike, results: list[dict]) -> None:
    """Write the results list atomically. A run without detections gives ``[]`` (pycocotools' ``loadRes``
    cannot index an empty list, but then there is nothing to score)."""
    write_json(path, results)
