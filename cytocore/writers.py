"""Writers for detections, the challenge's predictions CSV, and a data set in the challenge layout.

Every stage that outputs boxes builds the same detections table with :func:`detections_frame`, so
``predictions.csv`` (the challenge's submission rows), ``detections.csv`` and the evaluator agree on
column names and coordinate conventions. Everything is written atomically: an interrupted run never
leaves a half-written CSV that a later ``evaluate`` would read as complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .atomic import atomic_path, write_with
from .errors import DataError
from .imageio import read_mask, write_png
from .readers.challenge import BOX_COLUMNS
from .records import Dataset
from .splits import write_split_file
from .tables import read_csv_table, to_numbers

PathLike = Union[str, Path]

PIXEL_COLUMNS = ("x0", "y0", "x1", "y1")
#: Normalised values this far outside [0, 1] are float rounding, not a mistake.
TOLERANCE = 1e-6


def prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"p_{c}" for c in class_names]


def detections_columns(class_names: Sequence[str]) -> list[str]:
    """The canonical detections table's columns, in order."""
    return ["image_id", *PIXEL_COLUMNS, *BOX_COLUMNS, *prob_columns(class_names), "seg_score", "area", "label"]


def detections_frame(
    image_ids: Union[str, Sequence[str]],
    boxes: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    sizes: Union[Mapping[str, tuple[int, int]], Sequence, np.ndarray],
    seg_scores: Optional[np.ndarray] = None,
    labels: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Build the canonical detections table from pixel boxes and class probabilities.

    ``boxes`` is ``(N, 4)`` pixel xyxy; ``probs`` is ``(N, K)``; ``sizes`` is an id → (width, height)
    mapping, one ``(width, height)`` for all rows, or ``(N, 2)``. ``image_ids`` may be one id for all
    rows. ``label`` is ``labels`` when given (the detector's choice), else the most probable class;
    ``seg_score`` is NaN when not given.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    n = len(boxes)
    probs = np.asarray(probs, np.float64).reshape(n, len(class_names))
    ids = [image_ids] * n if isinstance(image_ids, str) else [str(i) for i in image_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} image ids for {n} boxes")
    if isinstance(sizes, Mapping):
        missing = sorted({i for i in ids if i not in sizes})
        if missing:
            raise ValueError(f"no image size for {missing[:3]}")
        wh = np.array([sizes[i] for i in ids], np.float64).reshape(n, 2)
    else:
        wh = np.asarray(sizes, np.float64)
        wh = np.broadcast_to(wh, (n, 2)) if wh.shape == (2,) else wh.reshape(n, 2)
    scores = np.full(n, np.nan) if seg_scores is None else np.asarray(seg_scores, np.float64).reshape(n)

    frame = pd.DataFrame({"image_id": pd.Series(ids, dtype=object)})
    for k, col in enumerate(PIXEL_COLUMNS):
        frame[col] = boxes[:, k]
    normalised = boxes / np.concatenate([wh, wh], axis=1) if n else boxes
    for k, col in enumerate(BOX_COLUMNS):
        frame[col] = normalised[:, k]
    for k, col in enumerate(prob_columns(class_names)):
        frame[col] = probs[:, k]
    frame["seg_score"] = scores
    frame["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if labels is not None:
        frame["label"] = pd.Series(list(labels), dtype=object)
    else:
        names = np.asarray(list(class_names), dtype=object)
        frame["label"] = names[probs.argmax(axis=1)] if n and len(names) else pd.Series([""] * n, dtype=object)
    return frame


def _as_frame(detections: Union[pd.DataFrame, Mapping], class_names: Optional[Sequence[str]]) -> pd.DataFrame:
    if isinstance(detections, pd.DataFrame):
        return detections
    boxes = np.asarray(detections["boxes"], np.float64).reshape(-1, 4)
    if class_names is None:
        raise ValueError("class_names is needed when detections are given as arrays")
    probs = np.asarray(detections["probs"], np.float64).reshape(len(boxes), len(class_names))
    frame = pd.DataFrame({"image_id": list(detections["image_id"])})
    for k, col in enumerate(BOX_COLUMNS):
        frame[col] = boxes[:, k]
    for k, col in enumerate(prob_columns(class_names)):
        frame[col] = probs[:, k]
    return frame


def write_predictions_csv(
    path: PathLike,
    detections: Union[pd.DataFrame, Mapping],
    class_names: Optional[Sequence[str]] = None,
) -> None:
    """Write the challenge's submission rows ``image_id,xmin,ymin,xmax,ymax,p_<class>…`` (normalised).

    ``detections`` is a detections table (extra columns are dropped) or a mapping with ``image_id``
    (N ids), ``boxes`` (N×4 normalised xyxy) and ``probs`` (N×K). Without ``class_names`` the
    table's ``p_*`` columns are written in their order.
    """
    frame = _as_frame(detections, class_names)
    probs = prob_columns(class_names) if class_names is not None else [c for c in frame.columns if c.startswith("p_")]
    missing = [c for c in ("image_id", *BOX_COLUMNS, *probs) if c not in frame.columns]
    if missing or not probs:
        raise ValueError(f"detections lack column(s) {', '.join(missing) or 'p_<class>'}")
    out = frame[["image_id", *BOX_COLUMNS, *probs]]
    write_with(path, lambda tmp: out.to_csv(tmp, index=False, float_format="%.6f"))


def write_detections_csv(path: PathLike, detections: pd.DataFrame, class_names: Optional[Sequence[str]] = None) -> None:
    """Write a detections table (pixel and normalised boxes, scores), canonical columns first.

    ``p_*`` columns follow ``class_names`` when given, else the table's order.
    """
    probs = prob_columns(class_names) if class_names is not None else [c for c in detections.columns if c.startswith("p_")]
    missing = [c for c in ("image_id", *PIXEL_COLUMNS, *probs) if c not in detections.columns]
    if missing:
        raise ValueError(f"detections lack column(s) {', '.join(missing)}")
    first = [c for c in ["image_id", *PIXEL_COLUMNS, *BOX_COLUMNS, *probs, "seg_score", "area", "label"]
             if c in detections.columns]
    out = detections[first + [c for c in detections.columns if c not in first]]
    write_with(path, lambda tmp: out.to_csv(tmp, index=False, float_format="%.8g"))


def read_predictions_csv(path: PathLike, class_names: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Read and check a predictions CSV; return ``image_id``, normalised xyxy and ``p_<class>`` columns.

    A predictions file is scored as a whole, so unlike annotations nothing is skipped: the first
    bad cell raises :class:`DataError` naming the file, line and column. A header with no rows is
    valid (a model that found nothing).
    """
    path = Path(path)
    df = read_csv_table(path, required=("image_id", *BOX_COLUMNS))
    if class_names is not None:
        probs = prob_columns(class_names)
        missing = [c for c in probs if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(df.columns)})")
    else:
        probs = [c for c in df.columns if c.startswith("p_")]
        if not probs:
            raise DataError(f"{path}: no p_<class> probability columns (header has: {', '.join(df.columns)})")

    empty = df["image_id"] == ""
    if empty.any():
        raise DataError(f"{path}:{df.index[np.argmax(empty.to_numpy())]}: empty image_id")
    out = pd.DataFrame({"image_id": df["image_id"].astype(object)}, index=df.index)
    for col in (*BOX_COLUMNS, *probs):
        values = to_numbers(df[col])
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{path}:{df.index[i]}: column {col} has {df[col].iat[i]!r}, not a number")
        out[col] = values
    coords = out[list(BOX_COLUMNS)].to_numpy()
    p = out[probs].to_numpy()
    _first_bad(path, out.index, (coords < -TOLERANCE) | (coords > 1 + TOLERANCE), list(BOX_COLUMNS),
               "coordinates must be normalised to [0, 1]")
    _first_bad(path, out.index, (p < 0) | (p > 1), probs, "probabilities must lie in [0, 1]")
    zero = (coords[:, 2] <= coords[:, 0]) | (coords[:, 3] <= coords[:, 1])
    if zero.any():
        i = int(np.argmax(zero))
        raise DataError(f"{path}:{out.index[i]}: zero-area box (xmin={coords[i, 0]:g}, ymin={coords[i, 1]:g}, "
                        f"xmax={coords[i, 2]:g}, ymax={coords[i, 3]:g})")
    return out[["image_id", *BOX_COLUMNS, *probs]].reset_index(drop=True)


def _first_bad(path: Path, lines: pd.Index, bad: np.ndarray, columns: list[str], why: str) -> None:
    rows = bad.any(axis=1)
    if rows.any():
        i = int(np.argmax(rows))
        col = columns[int(np.argmax(bad[i]))]
        raise DataError(f"{path}:{lines[i]}: column {col} is out of range; {why}")


# ------------------------------------------------------------------------------ challenge layout


def _safe_id(image_id: str) -> str:
    if not image_id or image_id in (".", "..") or any(ch in image_id for ch in "/\\\0"):
        raise DataError(f"image id {image_id!r} cannot be a file name in the challenge layout")
    return image_id


def _copy(src: Path, dst: Path, mode: str) -> None:
    if dst.exists() and src.resolve() == dst.resolve():
        return
    if mode == "link":
        with atomic_path(dst) as tmp:
            tmp.unlink()
            os.symlink(src.resolve(), tmp)
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_challenge_dataset(ds: Dataset, out: PathLike, images: str = "copy") -> Path:
    """Write ``ds`` in the challenge layout under ``out``: images/, masks/, labels.csv, metadata.csv, splits.csv.

    Converts VOC/COCO/folder sets to the layout the challenge tools read. ``images`` is "copy",
    "link" (symlinks, for big sets on one disk) or "none" (CSV files only). Box coordinates are
    written normalised; classes come from ``ds.class_names``. The CSVs are written after the images
    and ``metadata.csv`` last, so a set interrupted half-way is not mistaken for a complete one.
    """
    if images not in ("copy", "link", "none"):
        raise ValueError(f"images must be 'copy', 'link' or 'none', not {images!r}")
    out = Path(out)
    ids = [_safe_id(r.image_id) for r in ds.records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"image id {dup!r} is used twice; ids must be unique in the challenge layout")

    for r in ds.records:
        if images != "none":
            _copy(Path(r.path), out / "images" / f"{r.image_id}{Path(r.path).suffix.lower()}", images)
        if r.mask_path is not None:
            dst = out / "masks" / f"{r.image_id}.png"
            if Path(r.mask_path).suffix.lower() == ".png":
                _copy(Path(r.mask_path), dst, "copy" if images == "none" else images)
            else:
                write_png(dst, read_mask(r.mask_path))

    rows_ids, rows_boxes, rows_labels = [], [], []
    for r in ds.records:
        if r.n_boxes:
            rows_ids += [r.image_id] * r.n_boxes
            rows_boxes.append(r.normalised_boxes().astype(np.float64))
            rows_labels.append(r.labels.reshape(r.n_boxes, ds.num_classes))
    boxes = np.concatenate(rows_boxes) if rows_boxes else np.zeros((0, 4))
    labels = np.concatenate(rows_labels) if rows_labels else np.zeros((0, ds.num_classes), np.uint8)
    table = pd.DataFrame({"image_id": pd.Series(rows_ids, dtype=object)})
    for k, col in enumerate(BOX_COLUMNS):
        table[col] = boxes[:, k]
    for k, name in enumerate(ds.class_names):
        table[name] = labels[:, k].astype(np.int64)
    write_with(out / "labels.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))

    if any(r.split is not None for r in ds.records):
        write_split_file(out / "splits.csv", ds)
    meta = pd.DataFrame({
        "image_id": pd.Series(ids, dtype=object),
        "width": [int(r.width) for r in ds.records],
        "height": [int(r.height) for r in ds.records],
        "bbox_count": [r.n_boxes for r in ds.records],
    })
    write_with(out / "metadata.csv", lambda tmp: meta.to_csv(tmp, index=False))
    return out
