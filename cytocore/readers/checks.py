"""Checks that need pixels, run on a data set after its reader: files that do not decode, masks
that contradict the boxes.

Readers only open headers (fast, and enough for sizes), but a PNG or JPEG cut short by an
interrupted copy has an intact header and fails only when its pixels are read -- otherwise in the
middle of a training run. Decoding every file once when the data set is loaded turns that into one
problem line naming the file, and the image is left out like any other unusable one.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError, ProblemLog
from ..imageio import check_decodes, read_mask
from ..records import Dataset, ImageRecord

#: Decoding threads: Pillow releases the GIL while it decodes, so a few threads use the cores.
MAX_WORKERS = 4


def _decode_error(record: ImageRecord) -> Optional[tuple[Path, str]]:
    """``(file, why)`` when the record's image (or mask) cannot be decoded, else None."""
    for path in (record.path, record.mask_path):
        if path is None:
            continue
        try:
            check_decodes(path, max_pixels=None)
        except DataError as exc:
            text = str(exc)
            prefix = f"{path}: "
            return Path(path), text[len(prefix):] if text.startswith(prefix) else text
    return None


def drop_undecodable(ds: Dataset, workers: Optional[int] = None) -> Dataset:
    """A copy of ``ds`` without the images whose file (or mask) does not decode, each reported once.

    Every file is decoded in full once; nothing is kept in memory.
    """
    if not ds.records:
        return ds
    workers = workers or max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(ds.records)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(_decode_error, ds.records))
    if not any(errors):
        return ds
    problems = ProblemLog()
    for r, error in zip(ds.records, errors):
        if error is not None:
            file, why = error
            what = "" if file == Path(r.path) else f" (the mask of image {r.image_id!r})"
            problems.error(file, None, f"{why}{what}; image and its boxes skipped")
    kept = [r for r, e in zip(ds.records, errors) if e is None]
    if not kept:
        raise DataError(f"{ds.root or 'data set'}: no image of the data set can be decoded "
                        f"({len(problems)} problem(s) reported above)")
    return replace(ds, records=kept, problems=list(ds.problems) + problems.items)


def check_healthy_masks(ds: Dataset) -> Dataset:
    """Warn about images without boxes whose mask marks cells: one of the two annotations is wrong.

    Such an image counts as healthy for the classifier and the metric, while a segmentation target
    made from the mask (``targets.kind`` auto or mask) teaches the U-Net that it holds cells.
    """
    problems = ProblemLog()
    for r in ds.records:
        if not r.is_healthy or r.mask_path is None:
            continue
        try:
            cells = int(np.count_nonzero(read_mask(r.mask_path, max_pixels=None)))
        except DataError:
            continue  # an unreadable mask is reported by the decode check or when it is used
        if cells:
            problems.warn(Path(r.mask_path), None,
                          f"mask marks {cells} pixel(s) as cells but the annotations have no box for image "
                          f"{r.image_id!r}, so it counts as healthy; fix the labels or the mask")
    if not len(problems):
        return ds
    return replace(ds, problems=list(ds.problems) + problems.items)
