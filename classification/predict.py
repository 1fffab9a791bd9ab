"""Classify boxes and crops with a trained classifier: the API the fused pipeline calls, and the CLI's work.

The crop geometry (size, margin, padding) always comes from the checkpoint, so the classifier sees
at inference exactly the kind of crop it was trained on.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pandas as pd

from cytocore.atomic import write_with
from cytocore.errors import DataError
from cytocore.imageio import IMAGE_SUFFIXES, list_images, read_image

from .crops import extract_crops

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


#: Boxes cropped at a time by :func:`classify_boxes`: a large field holds tens of thousands of
#: objects, and all their crops (with their test-time flips) would take gigabytes at once.
CHUNK_BOXES = 512


def classify_boxes(image: np.ndarray, boxes_xyxy: np.ndarray, classifier: Any, batch_size: int = 32,
                   chunk: int = CHUNK_BOXES) -> np.ndarray:
    """``(N, K)`` float32 class probabilities of pixel xyxy boxes in an RGB uint8 image (``(0, K)`` for none).

    Crops are cut and classified ``chunk`` boxes at a time (a whole number of batches, so only the
    last batch of the image is padded), which bounds memory by the chunk, not the image.
    """
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((0, classifier.num_classes), np.float32)
    batch_size = max(1, int(batch_size))
    step = max(batch_size, int(chunk) // batch_size * batch_size)
    return np.concatenate([
        classifier.predict_crops(extract_crops(image, boxes[s:s + step], classifier.crop), batch_size)
        for s in range(0, len(boxes), step)
    ])


def whole_image_crop(image: np.ndarray, classifier: Any) -> np.ndarray:
    """A crop file (or a folder-per-class tile) as the network's input: square-padded, resized, no margin."""
    h, w = image.shape[:2]
    crop = getattr(classifier, "tile_crop", classifier.crop)
    return extract_crops(image, np.array([[0, 0, w, h]], np.float32), crop, margin=0.0)[0]


def _probability_columns(classifier: Any) -> list[str]:
    return [f"p_{name}" for name in classifier.class_names]


def _attribution(classifier: Any, crops: np.ndarray, probs: np.ndarray, folder: Path, names: list[str], batch_size: int,
                 cam_stride: Optional[int] = None) -> list[str]:
    """Grad-CAM of each crop's top class, saved as ``folder/<name>.png``; returns the file names."""
    from .attribution import gradcam, save_heatmap

    cams = gradcam(classifier, crops, probs.argmax(axis=1), stride=cam_stride, batch_size=batch_size)
    files = []
    for crop, cam, name in zip(crops, cams, names):
        save_heatmap(folder / f"{name}.png", crop, cam)
        files.append(f"{name}.png")
    return files


def _write_csv(path: PathLike, frame: pd.DataFrame) -> None:
    write_with(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6f"))


def predict_crop_folder(
    folder: PathLike,
    classifier: Any,
    out_csv: PathLike,
    attribution_dir: Optional[PathLike] = None,
    batch_size: int = 32,
    chunk: int = 256,
    cam_stride: Optional[int] = None,
) -> pd.DataFrame:
    """Classify every image file in ``folder`` as one crop; write ``file,p_<class>...,top_class``."""
    files = list_images(folder)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    rows = []
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        crops = np.stack([whole_image_crop(read_image(f), classifier) for f in part])
        probs = classifier.predict_crops(crops, batch_size)
        attr = _attribution(classifier, crops, probs, Path(attribution_dir), [f.stem for f in part], batch_size,
                            cam_stride) if attribution_dir is not None else None
        for j, f in enumerate(part):
            row = {"file": f.name, **dict(zip(_probability_columns(classifier), probs[j].tolist())),
                   "top_class": classifier.class_names[int(probs[j].argmax())]}
            if attr is not None:
                row["attribution"] = attr[j]
            rows.append(row)
    frame = pd.DataFrame(rows)
    _write_csv(out_csv, frame)
    return frame


def read_box_csv(path: PathLike) -> pd.DataFrame:
    """Read ``image_id,x0,y0,x1,y1`` (pixels) with one-line errors naming the file and line."""
    from cytocore.tables import read_csv_table

    path = Path(path)
    frame = read_csv_table(path, required=("image_id",) + BOX_COLUMNS)
    coords = frame[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    bad = coords.isna().any(axis=1) | ~np.isfinite(coords.to_numpy(np.float64)).all(axis=1)
    if bad.any():
        line = int(coords.index[bad.to_numpy()][0])
        raise DataError(f"{path}:{line}: box coordinates must be numbers")
    inverted = (coords["x1"] < coords["x0"]) | (coords["y1"] < coords["y0"])
    if inverted.any():
        line = int(coords.index[inverted.to_numpy()][0])
        raise DataError(f"{path}:{line}: box has x1 < x0 or y1 < y0")
    empty_id = frame["image_id"] == ""
    if empty_id.any():
        raise DataError(f"{path}:{int(frame.index[empty_id.to_numpy()][0])}: empty image_id")
    out = coords.astype(np.float32)
    out.insert(0, "image_id", frame["image_id"])
    return out


def _image_index(folder: Path) -> dict[str, Path]:
    files = list_images(folder)
    index = {f.stem: f for f in files}
    index.update({f.name: f for f in files})
    return index


def predict_image_boxes(
    images_dir: PathLike,
    boxes_csv: PathLike,
    classifier: Any,
    out_csv: PathLike,
    attribution_dir: Optional[PathLike] = None,
    batch_size: int = 32,
    cam_stride: Optional[int] = None,
) -> pd.DataFrame:
    """Classify the boxes of a CSV (``image_id,x0,y0,x1,y1`` pixels); write them back with ``p_<class>``."""
    table = read_box_csv(boxes_csv)
    index = _image_index(Path(images_dir))
    unknown = ~table["image_id"].isin(index)
    if unknown.any():
        line = int(table.index[unknown.to_numpy()][0])
        raise DataError(f"{boxes_csv}:{line}: image {table['image_id'][line]!r} not found in {images_dir}")
    probs = np.zeros((len(table), classifier.num_classes), np.float32)
    attr: list[str] = [""] * len(table)
    positions = {line: k for k, line in enumerate(table.index)}
    for image_id, group in table.groupby("image_id", sort=False):
        image = read_image(index[image_id])
        h, w = image.shape[:2]
        boxes = group[list(BOX_COLUMNS)].to_numpy(np.float32)
        outside = (boxes[:, 0] >= w) | (boxes[:, 1] >= h) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
        if outside.any():
            raise DataError(f"{boxes_csv}:{int(group.index[outside][0])}: box lies outside image {image_id!r} ({w}x{h})")
        crops = extract_crops(image, boxes, classifier.crop)
        p = classifier.predict_crops(crops, batch_size)
        rows = [positions[line] for line in group.index]
        probs[rows] = p
        if attribution_dir is not None:
            names = [f"{Path(str(image_id)).stem}_box{r}" for r in rows]
            for r, f in zip(rows, _attribution(classifier, crops, p, Path(attribution_dir), names, batch_size,
                                                    cam_stride)):
                attr[r] = f
    out = table.reset_index(drop=True)
    for k, col in enumerate(_probability_columns(classifier)):
        out[col] = probs[:, k]
    if attribution_dir is not None:
        out["attribution"] = attr
    _write_csv(out_csv, out)
    return out
