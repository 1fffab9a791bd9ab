"""Outputs a pathologist or another tool opens: QuPath GeoJSON, a COCO json, and overlay images.

The CSV tables (``predictions.csv``, ``detections.csv``) are written with :mod:`cytocore.writers`
so every stage and the evaluator agree on columns; this module only adds the formats that belong to
fused inference. Every file is written atomically.

- GeoJSON follows QuPath's import format: a ``FeatureCollection`` of ``Feature`` s whose geometry is
  the cell's outline (or, when unknown, its box) as a closed ``Polygon`` ring in level-0 pixel coordinates, with
  ``properties.objectType = "detection"``, ``classification {name, color}`` and ``measurements``.
  QuPath imports one file per image, so the per-image files are what a user drags onto a slide; the
  combined file carries ``image_id`` in each feature's properties.
- The COCO file is a full data-set-style dict (images, categories, annotations with ``score``) so it
  opens in COCO tools as is, and its ``annotations`` list is a valid results list for
  ``COCO.loadRes``. A multi-label detection gives one annotation per class scoring at least that
  class's floor, linked by ``detection_id``.
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from cytocore.atomic import write_json, write_with
from cytocore.planes import release

PathLike = Union[str, Path]

#: Fixed colours for the challenge's classes (red, blue, green, orange): the same in every output.
KNOWN_COLOURS: dict[str, tuple[int, int, int]] = {
    "SCC": (230, 25, 75),
    "AC": (0, 130, 200),
    "SCLC": (60, 180, 75),
    "NSCLC": (245, 130, 48),
}
#: Namespace for deterministic feature ids (same detection → same id on every run).
_UUID_NAMESPACE = uuid.UUID("6f1c2f4e-58b4-4d59-9a53-0c7d5e3f1a20")


def class_colours(class_names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A colour per class: the fixed ones for the challenge's names, matplotlib's tab10 for the rest."""
    from matplotlib import colormaps

    tab = colormaps["tab10"]
    used = {KNOWN_COLOURS[c] for c in class_names if c in KNOWN_COLOURS}
    out: dict[str, tuple[int, int, int]] = {}
    k = 0
    for name in class_names:
        if name in KNOWN_COLOURS:
            out[name] = KNOWN_COLOURS[name]
            continue
        while True:
            rgb = tuple(int(round(255 * v)) for v in tab(k % 10)[:3])
            k += 1
            if rgb not in used or k > 20:
                break
        used.add(rgb)
        out[name] = rgb  # type: ignore[assignment]
    return out


def _finite(value: Any) -> Optional[float]:
    """JSON has no NaN: missing measurements become ``null``."""
    v = float(value)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ GeoJSON


def geojson_features(
    detections: pd.DataFrame,
    class_names: Sequence[str],
    colours: Optional[Mapping[str, Sequence[int]]] = None,
    outlines: Optional[Sequence[Optional[np.ndarray]]] = None,
    mpp: Optional[float] = None,
) -> list[dict]:
    """One QuPath detection Feature per row of a detections table (pixel boxes ``x0..y1``).

    The geometry is the cell's outline (``outlines[i]``, a closed x, y ring in level-0 pixels) when
    known, else its box. Measurements: the class scores, ``score`` (the best of them), the seg
    score, areas in pixels and, when ``mpp`` (µm per level-0 pixel) is known, ``Area µm^2``.
    """
    colours = dict(colours or class_colours(class_names))
    probs = [f"p_{c}" for c in class_names]
    features = []
    for i, row in enumerate(detections.itertuples(index=False)):
        rec = row._asdict()
        x0, y0, x1, y1 = (float(rec[k]) for k in ("x0", "y0", "x1", "y1"))
        outline = outlines[i] if outlines is not None else None
        if outline is not None and len(outline) >= 4:
            ring = [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(outline, np.float64)]
        else:
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        measurements: dict[str, Optional[float]] = {p: _finite(rec[p]) for p in probs if p in rec}
        present = [rec[p] for p in probs if p in rec]
        if present:
            measurements["score"] = _finite(max(float(v) for v in present))
        for extra in ("seg_score", "area", "object_area"):
            if extra in rec:
                measurements[extra] = _finite(rec[extra])
        if mpp is not None:
            pixels = rec.get("object_area", rec.get("area"))
            if pixels is not None:
                measurements["Area µm^2"] = _finite(float(pixels) * float(mpp) ** 2)
        name = str(rec.get("label", ""))
        image_id = str(rec["image_id"])
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{image_id}/{i}/{x0:.2f},{y0:.2f},{x1:.2f},{y1:.2f}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": name, "color": [int(v) for v in colours.get(name, (255, 255, 255))]},
                "measurements": measurements,
                "isLocked": False,
                "image_id": image_id,
            },
        })
    return features


def write_geojson(path: PathLike, detections: pd.DataFrame, class_names: Sequence[str],
                  outlines: Optional[Sequence[Optional[np.ndarray]]] = None, mpp: Optional[float] = None) -> None:
    """Write a detections table (with cell outlines when given) as a QuPath-importable FeatureCollection."""
    features = geojson_features(detections, class_names, outlines=outlines, mpp=mpp)
    write_json(path, {"type": "FeatureCollection", "features": features})


# --------------------------------------------------------------------------------------------- COCO


def coco_dict(
    images: pd.DataFrame,
    detections: pd.DataFrame,
    class_names: Sequence[str],
    floors: Optional[Sequence[float]] = None,
    file_names: Optional[Mapping[str, str]] = None,
) -> dict:
    """A COCO data-set-style dict of the detections (1-based integer ids, ``image_id`` strings kept).

    ``images`` has ``image_id, width, height``; ``floors`` (one per class) leaves out a class's
    annotation when its score is below the floor.
    """
    floors_arr = np.zeros(len(class_names)) if floors is None else np.asarray(floors, np.float64)
    image_ids = [str(i) for i in images["image_id"]]
    numeric = {image_id: k + 1 for k, image_id in enumerate(image_ids)}
    coco_images = [
        {
            "id": numeric[image_id],
            "file_name": (file_names or {}).get(image_id, image_id),
            "width": int(w),
            "height": int(h),
            "image_id": image_id,
        }
        for image_id, w, h in zip(image_ids, images["width"], images["height"])
    ]
    colours = class_colours(class_names)
    categories = [{"id": k + 1, "name": c, "supercategory": "cell", "color": list(colours[c])} for k, c in enumerate(class_names)]
    annotations = []
    if len(detections):
        boxes = detections[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        scores = detections[[f"p_{c}" for c in class_names]].to_numpy(np.float64)
        det_images = detections["image_id"].astype(str).tolist()
        unknown = sorted(set(det_images) - set(numeric))
        if unknown:
            raise ValueError(f"detections for image(s) not in the images table: {unknown[:3]}")
        for d in range(len(boxes)):
            x0, y0, x1, y1 = boxes[d]
            w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
            for c in range(len(class_names)):
                if scores[d, c] < floors_arr[c]:
                    continue
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": numeric[det_images[d]],
                    "category_id": c + 1,
                    "bbox": [round(float(x0), 3), round(float(y0), 3), round(float(w), 3), round(float(h), 3)],
                    "area": round(float(w * h), 3),
                    "score": round(float(scores[d, c]), 6),
                    "iscrowd": 0,
                    "detection_id": d,
                })
    return {
        "info": {"description": "CytoFuse detections", "version": "1.0"},
        "licenses": [],
        "images": coco_images,
        "categories": categories,
        "annotations": annotations,
    }


def write_coco(path: PathLike, images: pd.DataFrame, detections: pd.DataFrame, class_names: Sequence[str], **kwargs: Any) -> None:
    write_json(path, coco_dict(images, detections, class_names, **kwargs))


# ------------------------------------------------------------------------------------------ overlay


def render_overlay(
    image: np.ndarray,
    probability: Optional[np.ndarray],
    detections: pd.DataFrame,
    class_names: Sequence[str],
    min_score: float = 0.3,
    heatmap_alpha: float = 0.45,
    colormap: str = "jet",
    max_side: Optional[int] = 4096,
) -> np.ndarray:
    """The image with a translucent probability heat map and class-coloured, labelled boxes.

    The heat map's opacity follows the probability, so background stays the stain's own colour and
    only cells are tinted. Only detections whose best score reaches ``min_score`` are drawn, best
    last (on top); labels go above (else below) their box, strongest first, and a label that would
    cover another is left out, so a crowded slide stays readable. Images larger than ``max_side`` are drawn
    downscaled (an overlay is for looking at, the CSVs keep full resolution). ``probability`` may be
    float in [0, 1] or uint8 0..255 (how the segmentation stage stores maps of huge images).
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    base = np.asarray(image, np.uint8)
    if base.ndim == 3 and base.shape[2] > 3:
        base = base[..., :3]
    height, width = base.shape[:2]
    scale = 1.0
    if max_side is not None and max(height, width) > max_side:
        scale = max_side / float(max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    lut = None
    if probability is not None and heatmap_alpha > 0:
        lut = (colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)  # 256-entry table
    # Drawn in row strips of the output: memory is the overlay plus a strip, never a float copy of
    # the image (a 8192x8192 field would otherwise need gigabytes for a 4096-pixel picture).
    out = np.empty((size[1], size[0], 3), np.uint8)
    for a in range(0, size[1], OVERLAY_STRIP_ROWS):
        b = min(size[1], a + OVERLAY_STRIP_ROWS)
        rows = _scaled_rows(base, size, a, b)
        if lut is not None:
            prob = _probability_rows(np.asarray(probability), size, a, b)
            heat = lut[np.round(prob * 255.0).astype(np.uint8)]
            alpha = (heatmap_alpha * prob)[..., None]
            rows = np.clip(rows.astype(np.float32) * (1.0 - alpha) + heat * alpha + 0.5, 0, 255).astype(np.uint8)
        out[a:b] = rows
        release(probability)  # a disk plane's pages, read for this strip
    canvas = Image.fromarray(out)
    del out

    draw = ImageDraw.Draw(canvas)
    short = min(canvas.size)
    line = max(1, round(short / 400))
    font = ImageFont.load_default(size=max(10, min(28, round(short / 45))))
    colours = class_colours(class_names)
    if len(detections):
        probs = detections[[f"p_{c}" for c in class_names]].to_numpy(np.float64)
        best = probs.max(axis=1) if probs.shape[1] else np.zeros(len(detections))
        shown = np.flatnonzero(best >= min_score)
        boxes = detections[["x0", "y0", "x1", "y1"]].to_numpy(np.float64) * scale
        labels = detections["label"].astype(str).to_numpy() if "label" in detections else np.array([""] * len(detections))
        # Boxes: weakest first, so the strongest are drawn on top.
        for i in shown[np.argsort(best[shown], kind="stable")]:
            draw.rectangle(boxes[i].tolist(), outline=colours.get(labels[i], (255, 255, 255)), width=line)
        # Labels: strongest first; a label that would cover an earlier one is left out (its box stays).
        taken: list[tuple[float, float, float, float]] = []
        for i in shown[np.argsort(-best[shown], kind="stable")]:
            colour = colours.get(labels[i], (255, 255, 255))
            text = f"{labels[i]} {best[i]:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left + 4, bottom - top + 4
            x0, y0, x1, y1 = boxes[i]
            for ty in (y0 - th - line, y1 + line):  # above the box, else below it
                tx = min(max(x0, 0.0), max(canvas.size[0] - tw, 0.0))
                rect = (tx, ty, tx + tw, ty + th)
                inside = ty >= 0 and ty + th <= canvas.size[1]
                if inside and not any(_overlaps(rect, other) for other in taken):
                    taken.append(rect)
                    draw.rectangle(rect, fill=colour)
                    draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_colour(colour), font=font)
                    break
    return np.asarray(canvas)


#: Output rows of an overlay computed at a time.
OVERLAY_STRIP_ROWS = 256


def _source_rows(length: int, out_length: int, a: int, b: int) -> tuple[int, int]:
    """Source rows ``[lo, hi)`` that output rows ``[a, b)`` of a resize to ``out_length`` read (with slack)."""
    f = length / out_length
    return max(0, int(np.floor(a * f)) - 2 - int(np.ceil(f))), min(length, int(np.ceil(b * f)) + 2 + int(np.ceil(f)))


def _resize_rows(src: np.ndarray, size: tuple[int, int], a: int, b: int) -> np.ndarray:
    """Rows ``[a, b)`` of ``src`` resized to ``size`` (w, h), reading only the source rows they need."""
    from PIL import Image

    height, width = src.shape[:2]
    if (width, height) == size:
        return np.asarray(src[a:b])
    lo, hi = _source_rows(height, size[1], a, b)
    fy = height / size[1]
    box = (0.0, a * fy - lo, float(width), b * fy - lo)
    part = np.ascontiguousarray(src[lo:hi])
    mode = None if part.dtype == np.uint8 else "F"
    return np.asarray(Image.fromarray(part if mode is None else part.astype(np.float32), mode).resize(
        (size[0], b - a), Image.BILINEAR, box=box))


def _scaled_rows(image: np.ndarray, size: tuple[int, int], a: int, b: int) -> np.ndarray:
    rows = _resize_rows(image, size, a, b)
    return rows if rows.ndim == 3 else np.repeat(rows[..., None], 3, axis=2)


def _probability_rows(probability: np.ndarray, size: tuple[int, int], a: int, b: int) -> np.ndarray:
    """Rows of the probability map at the overlay's size as float32 in [0, 1] (uint8 maps are 0..255)."""
    rows = _resize_rows(probability, size, a, b)
    if probability.dtype == np.uint8:
        return rows.astype(np.float32) / 255.0
    return np.clip(rows.astype(np.float32), 0.0, 1.0)


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones."""
    r, g, b = rgb[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def write_overlay(path: PathLike, image: np.ndarray, probability: Optional[np.ndarray], detections: pd.DataFrame,
                  class_names: Sequence[str], **options: Any) -> None:
    from PIL import Image

    rendered = render_overlay(image, probability, detections, class_names, **options)
    write_with(path, lambda tmp: Image.fromarray(rendered).save(tmp, format="PNG"))
