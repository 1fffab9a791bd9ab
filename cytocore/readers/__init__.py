"""Annotation readers: every supported layout becomes a :class:`cytocore.records.Dataset`.

One entry point, :func:`load_dataset`, so the command line, training and evaluation accept the same
inputs; the layout is detected from what is on disk unless ``format`` names it. Readers report bad
rows in ``Dataset.problems`` and keep going (users' annotations are never perfect); a data set with
nothing usable raises :class:`DataError` in one line.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..errors import DataError
from ..imageio import IMAGE_SUFFIXES
from ..records import Dataset
from .challenge import IMAGES_DIR, LABELS_FILE, METADATA_FILE, read_challenge
from .checks import check_healthy_masks, drop_undecodable
from .coco import find_annotation_json, read_coco
from .folders import folder_layout, read_folders
from .voc import ANNOTATIONS_DIR, read_voc

PathLike = Union[str, Path]

FORMATS: tuple[str, ...] = ("challenge", "voc", "coco", "folders")

READERS: dict[str, Callable[..., Dataset]] = {
    "challenge": read_challenge,
    "voc": read_voc,
    "coco": read_coco,
    "folders": read_folders,
}


def detect_format(path: PathLike) -> str:
    """Name the layout at ``path`` from the files present (no annotation is parsed).

    Order matters: a COCO folder and a challenge folder both have ``images/``, so the marker files
    (``labels.csv``, ``Annotations/``, one ``.json``) are checked before the bare folder shapes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        if path.suffix.lower() == ".csv":
            return "challenge"
        raise DataError(f"{path}: cannot tell the data set format of this file (expected a folder, "
                        "a COCO .json or a labels.csv)")
    if (path / LABELS_FILE).is_file() or (path / METADATA_FILE).is_file():
        return "challenge"
    if (path / ANNOTATIONS_DIR).is_dir():
        return "voc"
    if find_annotation_json(path) is not None:
        return "coco"
    if (path / IMAGES_DIR).is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in (path / IMAGES_DIR).iterdir()):
        return "challenge"  # its reader then says labels.csv is missing, which is the useful message
    if folder_layout(path) is not None:
        return "folders"
    raise DataError(f"{path}: cannot tell the data set format (expected labels.csv + images/ for the challenge "
                    "layout, Annotations/ for Pascal VOC, one COCO .json, or one folder per class)")


def load_dataset(
    path: PathLike,
    format: str = "auto",
    strict: bool = False,
    class_names: Optional[Sequence[str]] = None,
    decode: bool = False,
    check_masks: bool = True,
    **options: Any,
) -> Dataset:
    """Read the data set at ``path`` in ``format`` ("auto", "challenge", "voc", "coco" or "folders").

    ``class_names`` fixes the class order (and, for VOC/COCO/folders, which classes are kept).
    Other keyword options go to the format's reader: ``check_images`` (challenge, voc, coco),
    ``images_dir`` (challenge, coco) and ``masks_dir`` (coco). With ``strict``, any problem of
    severity "error" (a skipped row, box or image) raises :class:`DataError` instead of being
    skipped, for pipelines that must not train on a silently shrunk data set.

    With ``decode`` every image and mask is decoded once and those that fail (a truncated PNG or
    JPEG) are reported and left out: what training and ``data summary`` do, so that one bad file
    costs one warning line instead of a run. ``check_masks`` warns about images without boxes whose
    mask marks cells.
    """
    fmt = detect_format(path) if format in (None, "auto") else format
    if fmt not in READERS:
        raise DataError(f"{path}: unknown data set format {format!r} (choose from auto, {', '.join(FORMATS)})")
    if format not in (None, "auto") and not Path(path).exists():
        raise DataError(f"{path}: no such file or folder")
    reader = READERS[fmt]
    accepted = inspect.signature(reader).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(f"option(s) {', '.join(unknown)} do not apply to the {fmt} format")
    ds = reader(path, class_names=class_names, **options)
    if decode:
        ds = drop_undecodable(ds)
    if check_masks:
        ds = check_healthy_masks(ds)
    if strict:
        errors = [p for p in ds.problems if p.severity == "error"]
        if errors:
            more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
            raise DataError(f"{str(errors[0]).split(': ', 1)[1]}{more} [strict mode]")
    return ds


__all__ = ["FORMATS", "detect_format", "load_dataset", "read_challenge", "read_voc", "read_coco", "read_folders"]
