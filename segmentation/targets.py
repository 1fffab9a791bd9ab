"""Pixel targets for the U-Net: from masks when a data set has them, otherwise derived from boxes.

Challenge annotations are boxes, so a box has to become a cell-shaped region:

- ``ellipse``: the ellipse inscribed in the box. Cells are roughly round, so it covers most of the
  cell and little background; it is the default when there is no mask.
- ``refined``: the pixels inside the box that carry more stain than the glass around the cell:
  optical density above the *lower* of the two 3-class Otsu thresholds (glass | cytoplasm |
  nucleus) of the box plus a margin of background, so a pale cytoplasm counts as cell and is not
  split off from its dark nucleus as a 2-class Otsu would do (never below the glass level measured
  around the cell, for cells of one uniform stain); kept inside the ellipse grown by
  ``grow`` × the box's half-size, holes filled, largest component. If that leaves less than
  ``min_fraction`` of the ellipse (faint or blurred cell), the ellipse is used instead.
  Measured against the masks (Dice at scale 0.5): synthetic Pap brushings 0.93 vs 0.84 for the
  ellipse; MoNuSAC H&E nuclei 0.88 vs 0.92 (nuclei are ellipses, and tissue leaves no glass to
  compare with), so it suits cytology's clear background, not dense tissue.
- ``mask``: the data set's ``masks/<id>.png`` (nonzero = cell). ``auto`` uses the mask of every
  image that has one and the ellipse elsewhere. ``targets.mask_dir`` replaces the data set's masks
  by ``<mask_dir>/<image_id>.png`` (:func:`records_with_mask_dir`): how pseudo-masks made from boxes
  alone, e.g. the classifier's CAMs (``cytofuse weak-masks``), become training targets.

Class-index maps (the single-stage baseline, ``mode: classes``): ``0`` = background, ``k + 1`` =
class ``k`` in header order. Each box paints its footprint (mask ∩ box when the image has a mask,
the ellipse if that intersection is empty; otherwise the ellipse or refined shape) with one class:
**the first class set in its multi-hot row, in header order** (in the challenge's order SCC, AC,
SCLC, NSCLC a box marked SCC+NSCLC becomes SCC, the more specific type). Boxes are painted from
the largest to the smallest area (ties: file order), so where boxes overlap **the smaller box wins**
— it is usually the cell in front. Boxes with no class set are left as background, and mask pixels
outside every box are background too: in this mode only classed cells are foreground.

Everything works at the scale the network sees: images are resized by ``data.scale`` first
(:func:`rescale_image`), and boxes and masks are scaled to match.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw, filters, measure, morphology

from cytocore.errors import DataError
from cytocore.imageio import read_mask
from cytocore.records import ImageRecord
from cytocore.tiling import box_window

log = logging.getLogger("cytofuse")

TARGET_KINDS = ("auto", "mask", "ellipse", "refined")
MODES = ("binary", "classes")


@dataclass(frozen=True)
class RefineOptions:
    """Options of the ``refined`` box-to-shape rule (``targets.refine`` in the config)."""

    grow: float = 0.15  # the ellipse is dilated by this fraction of the box's smaller half-side
    min_fraction: float = 0.3  # below this share of the ellipse's area, fall back to the ellipse
    margin: float = 0.25  # background margin around the box for the Otsu threshold, in box sizes


# ------------------------------------------------------------------------------------ scaling


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(width, height)`` after scaling by ``scale`` (at least 1 pixel each)."""
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an RGB uint8 image by ``scale`` with PIL's bilinear filter (antialiased when shrinking).

    The same filter and rounding as ``segmentation.predict`` uses on the checkpoint's ``scale``, so
    the network sees at prediction time what it trained on.
    """
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = scaled_size(w, h, scale)
    return np.asarray(Image.fromarray(image).resize(size, resample=Image.Resampling.BILINEAR))


def rescale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a label/binary mask to ``size = (width, height)`` with nearest-neighbour sampling."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, resample=Image.Resampling.NEAREST))


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Scale pixel xyxy boxes from an image of ``(w, h)`` to one of ``(w2, h2)``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)


#: Resolution rule: the small cells (5th percentile of the boxes' shorter side) keep at least this many
#: pixels across at network scale. Below ~8 px the instance head's core of a cell is 1–2 px and the
#: seeded watershed loses small cells in chains (synthetic SCLC, 12–16 px boxes: scale 0.5 leaves 6–8 px).
MIN_CELL_PIXELS = 8.0


#: ``data.scale: auto`` resolves to :func:`recommended_scale` of the training images' boxes.
AUTO_SCALE = "auto"


def data_scale(value: Any, train_records: Sequence[ImageRecord]) -> float:
    """``data.scale`` as the number the U-Net trains at.

    ``auto`` applies the resolution rule to the training boxes: a data set of large cells (blood-smear
    photos, red cells ~100 px) then trains at a quarter of the size, with whole cells in a patch and 9x
    fewer pixels per cell, instead of at the 0.75 that suits 12 px nuclei. Without boxes there is
    nothing to measure, so the images keep their size.
    """
    if value != AUTO_SCALE:
        return float(value)
    scale = recommended_scale(train_records)
    if scale is None:
        log.info("data.scale auto: the training images have no boxes to measure, so 1 (full size)")
        return 1.0
    log.info("data.scale auto: %g (the resolution rule on %d training images: the 5th percentile of the "
             "boxes' shorter sides keeps >= %g px)", scale, len(train_records), MIN_CELL_PIXELS)
    return scale


def box_short_sides(records: Sequence[ImageRecord]) -> np.ndarray:
    """The shorter side of every box of ``records`` (pixels at full size): the size of a cell that both
    the training scale and the marker spacing follow."""
    sides = [np.minimum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1]) for r in records if r.n_boxes]
    return np.concatenate(sides) if sides else np.zeros(0, np.float32)


def recommended_scale(records: Sequence[ImageRecord], min_pixels: float = MIN_CELL_PIXELS, percentile: float = 5.0,
                      step: float = 0.25) -> Optional[float]:
    """The smallest scale (a multiple of ``step``, at most 1) at which the ``percentile``-th smallest
    box side has ``min_pixels`` pixels; ``None`` without boxes."""
    sides = box_short_sides(records)
    if not len(sides):
        return None
    small = float(np.percentile(sides, percentile))
    if small <= 0:
        return 1.0
    return float(min(1.0, max(step, np.ceil(min_pixels / small / step) * step)))


# ------------------------------------------------------------------------------------ box shapes


def ellipse_in_box(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` mask of the ellipse inscribed in ``box`` (pixel xyxy, exclusive max edges).

    A pixel belongs to it when its centre does; a box too thin for any centre still gets the pixel
    holding its centre, so no box vanishes from the target.
    """
    out = np.zeros(shape, bool)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    rx, ry = (box[2] - box[0]) / 2.0, (box[3] - box[1]) / 2.0
    if rx <= 0 or ry <= 0:
        return out
    # skimage's ellipse works in index coordinates, where pixel i's centre sits at i (here i + 0.5).
    rr, cc = draw.ellipse(cy - 0.5, cx - 0.5, ry, rx, shape=shape)
    out[rr, cc] = True
    if not out.any():
        y, x = int(np.clip(cy, 0, shape[0] - 1)), int(np.clip(cx, 0, shape[1] - 1))
        out[y, x] = True
    return out


def optical_density(image: np.ndarray) -> np.ndarray:
    """Summed optical density of an RGB image: how much stain a pixel carries, whatever its colour.

    Pap stains colour cells blue, green, orange or pink on a pale background; the total absorbance
    separates stained cell from clear glass for all of them, where one colour channel would not.
    """
    rgb = np.asarray(image, np.float32)
    return -np.log((rgb + 1.0) / 256.0).sum(axis=2)


def stain_threshold(od: np.ndarray, glass: Optional[np.ndarray] = None) -> float:
    """Optical density separating glass from any stained matter.

    The lower 3-class Otsu threshold (glass | cytoplasm | nucleus), or the 2-class one when the values
    are too few to split three ways. A cell of one uniform stain has only two populations, and then the
    lower 3-class threshold falls inside the glass's noise; so the threshold is never below the glass
    level estimated from ``glass`` (pixels around the cell): median + 3 robust standard deviations.
    """
    try:
        t = float(filters.threshold_multiotsu(od, classes=3)[0])
    except ValueError:
        t = float(filters.threshold_otsu(od))
    if glass is not None and glass.size >= 16:
        med = float(np.median(glass))
        spread = 1.4826 * float(np.median(np.abs(glass - med)))
        t = max(t, med + 3.0 * spread)
    return t


def refine_box(od: np.ndarray, box: np.ndarray, options: RefineOptions = RefineOptions()) -> np.ndarray:
    """Boolean image-sized mask of the stained region of one box (see the module docstring)."""
    shape = od.shape
    ellipse = ellipse_in_box(box, shape)
    y0, y1, x0, x1 = box_window(box, shape)
    if y1 - y0 < 3 or x1 - x0 < 3:
        return ellipse
    bw, bh = box[2] - box[0], box[3] - box[1]
    my, mx = int(np.ceil(options.margin * bh)), int(np.ceil(options.margin * bw))
    cy0, cx0 = max(0, y0 - my), max(0, x0 - mx)
    context = od[cy0: y1 + my, cx0: x1 + mx]
    if np.ptp(context) <= 1e-6:
        return ellipse
    radius = max(1, int(round(options.grow * min(bw, bh) / 2.0)))
    structure = morphology.disk(radius).astype(bool)
    around = np.ones(context.shape, bool)  # context pixels outside the grown ellipse: mostly glass
    around[y0 - cy0: y1 - cy0, x0 - cx0: x1 - cx0] = ~ndimage.binary_dilation(ellipse[y0:y1, x0:x1], structure=structure)
    threshold = stain_threshold(context, context[around])
    grown = ndimage.binary_dilation(ellipse[y0:y1, x0:x1], structure=structure)
    region = (od[y0:y1, x0:x1] > threshold) & grown
    region = ndimage.binary_fill_holes(region)
    labels = measure.label(region, connectivity=1)
    if labels.max() > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        region = labels == int(np.argmax(sizes))
    if region.sum() < options.min_fraction * ellipse.sum():
        return ellipse
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = region
    return out


def box_shapes(image: Optional[np.ndarray], boxes: np.ndarray, shape: tuple[int, int], kind: str,
               options: RefineOptions = RefineOptions()) -> list[np.ndarray]:
    """One boolean mask per box: its ellipse or its refined shape."""
    if kind == "refined":
        if image is None:
            raise ValueError("refined targets need the image")
        od = optical_density(image)
        return [refine_box(od, b, options) for b in boxes]
    return [ellipse_in_box(b, shape) for b in boxes]


# ------------------------------------------------------------------------------------ targets


def _resolve_kind(kind: str, has_mask: bool, where: str) -> str:
    if kind not in TARGET_KINDS:
        raise DataError(f"targets.kind must be one of {', '.join(TARGET_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "mask" if has_mask else "ellipse"
    if kind == "mask" and not has_mask:
        raise DataError(f"{where}: targets.kind is 'mask' but this image has no mask (use auto, ellipse or refined)")
    return kind


def binary_target(image: np.ndarray, boxes: np.ndarray, mask: Optional[np.ndarray] = None, kind: str = "auto",
                  options: RefineOptions = RefineOptions(), where: str = "<image>") -> np.ndarray:
    """``(H, W)`` uint8 0/1 cell-foreground target for the two-stage system's U-Net."""
    shape = image.shape[:2]
    kind = _resolve_kind(kind, mask is not None, where)
    if kind == "mask":
        if mask.shape != shape:
            raise DataError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {shape[1]}x{shape[0]}")
        return (mask > 0).astype(np.uint8)
    out = np.zeros(shape, bool)
    for region in box_shapes(image, boxes, shape, kind, options):
        out |= region
    return out.astype(np.uint8)


def box_class(labels: np.ndarray) -> np.ndarray:
    """Class index per box for class maps: the first set class in header order, ``-1`` if none."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.full(len(labels), -1, np.int64)
    has = labels.any(axis=1)
    return np.where(has, np.argmax(labels > 0, axis=1), -1)


def class_target(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, num_classes: int,
                 mask: Optional[np.ndarray] = None, kind: str = "auto",
                 options: RefineOptions = RefineOptions(), where: str = "<image>") -> np.ndarray:
    """``(H, W)`` uint8 class-index map (0 = background, k+1 = class k) for the single-stage baseline."""
    if num_classes > 254:
        raise DataError(f"{where}: class maps support at most 254 classes, got {num_classes}")
    shape = image.shape[:2]
    kind = _resolve_kind(kind, mask is not None, where)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = np.zeros(shape, np.uint8)
    if not len(boxes):
        return out
    if kind == "mask":
        if mask.shape != shape:
            raise DataError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {shape[1]}x{shape[0]}")
        shapes = []
        for b in boxes:
            y0, y1, x0, x1 = box_window(b, shape)
            region = np.zeros(shape, bool)
            region[y0:y1, x0:x1] = mask[y0:y1, x0:x1] > 0
            shapes.append(region if region.any() else ellipse_in_box(b, shape))
    else:
        shapes = box_shapes(image, boxes, shape, kind, options)
    classes = box_class(labels)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-areas, kind="stable"):  # largest first, so smaller boxes paint over them
        if classes[i] >= 0:
            out[shapes[i]] = classes[i] + 1
    return out


def records_with_mask_dir(records: Sequence[ImageRecord], mask_dir: Union[str, Path]) -> list[ImageRecord]:
    """Copies of ``records`` whose mask is ``<mask_dir>/<image_id>.png`` (``None`` where it has none).

    The data set's own masks are dropped, not mixed in: a folder of pseudo-masks must stand alone,
    or a comparison of target kinds would quietly train on the real masks it is compared with.
    A folder that is missing, or that holds a mask for none of the records, is an error naming it.
    """
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: targets.mask_dir is not a folder")
    out = []
    for r in records:
        path = folder / f"{r.image_id}.png"
        out.append(replace(r, mask_path=path if path.is_file() else None))
    if records and not any(r.mask_path is not None for r in out):
        raise DataError(f"{folder}: targets.mask_dir holds no <image_id>.png for any of these images "
                        f"(e.g. {records[0].image_id}.png)")
    return out


def load_mask(record: ImageRecord, size: tuple[int, int]) -> Optional[np.ndarray]:
    """The record's mask resized to ``size = (width, height)``, or ``None`` when it has none.

    Values are kept (nearest-neighbour resizing), so an instance label mask stays one; callers that
    want the foreground test ``> 0``.
    """
    if record.mask_path is None:
        return None
    mask = read_mask(record.mask_path)
    if (mask.shape[1], mask.shape[0]) != (record.width, record.height):
        raise DataError(
            f"{record.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {record.image_id!r} "
            f"is {record.width}x{record.height}"
        )
    return rescale_mask(mask, size)


def make_targets(record: ImageRecord, image: np.ndarray, mode: str = "binary", kind: str = "auto",
                 num_classes: int = 0, options: RefineOptions = RefineOptions(),
                 head: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Semantic target and (with ``head``) the instance head's uint8 target of one record, for an
    ``image`` already rescaled to the training scale.

    The instance labels behind the head come from the mask when the target kind uses it (an
    instance mask as it is, a union mask split between its boxes), else from the semantic target's
    regions split between the boxes (:func:`segmentation.instance_targets.instance_labels`).
    """
    from .instance_targets import head_target, instance_labels, quantise

    h, w = image.shape[:2]
    boxes = scale_boxes(record.boxes, (record.width, record.height), (w, h))
    mask = load_mask(record, (w, h)) if kind in ("auto", "mask") else None
    where = str(record.path)
    if mode == "binary":
        semantic = binary_target(image, boxes, mask, kind, options, where)
    elif mode == "classes":
        semantic = class_target(image, boxes, record.labels, num_classes, mask, kind, options, where)
    else:
        raise DataError(f"targets.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if head is None:
        return semantic, None
    uses_mask = _resolve_kind(kind, mask is not None, where) == "mask"
    labels = instance_labels((h, w), boxes, region=semantic > 0, mask=mask if uses_mask else None)
    return semantic, quantise(head_target(labels, head))


def make_target(record: ImageRecord, image: np.ndarray, mode: str = "binary", kind: str = "auto",
                num_classes: int = 0, options: RefineOptions = RefineOptions()) -> np.ndarray:
    """The semantic target of one record for an ``image`` already rescaled to the training scale."""
    return make_targets(record, image, mode, kind, num_classes, options)[0]
