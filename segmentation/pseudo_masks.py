"""Pseudo-masks from boxes: class activation maps inside a box → a cell-shaped binary target.

Weak supervision for the U-Net when a data set has boxes but no masks (the challenge's case). The
crop classifier already looks at every box; where its Grad-CAM for the box's class is strong is
where the cell's evidence lies. Per box: the map (computed over the classifier's square crop window,
which extends beyond the box for context) is resized back to that window in image pixels, cut to
the box, scaled so the box's strongest pixel is 1, thresholded at ``threshold`` of that maximum, and
reduced to its largest connected component (a cell is one blob; CAMs of a neighbour or of debris
inside the box are dropped). The result never leaves the box, so a pseudo-mask can only be wrong
inside an annotation. An image's pseudo-mask is the union of its boxes'.

This module holds only the map → mask arithmetic (NumPy and scikit-image), so it is testable on
hand-made maps and usable without the classifier; computing the maps is the experiments stage's job
(:mod:`experiments.weak_supervision`), because segmentation must not import classification.
:func:`pseudo_mask_dice` and :func:`target_agreement` measure how close any target kind comes to
real masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
from skimage.measure import label as connected_components

from cytocore.imageio import read_image
from cytocore.records import Dataset, ImageRecord

from .metrics import SegScores
from .targets import RefineOptions, box_window, load_mask, make_target, records_with_mask_dir, rescale_image

PathLike = Union[str, Path]
Window = tuple[int, int, int, int]  # (y0, y1, x0, x1) in image pixels, end exclusive


def largest_component(region: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean map (ties: the first in scan order)."""
    labels = connected_components(np.asarray(region, bool), connectivity=2)
    if labels.max() <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def cam_in_box(cam: np.ndarray, window: Sequence[float], box: Sequence[float], shape: tuple[int, int]) -> tuple[np.ndarray, Window]:
    """The part of a crop's map that lies inside ``box``, at image resolution.

    ``cam`` covers the crop ``window`` (integer xyxy, may extend beyond the image, as
    :func:`classification.crops.square_windows` makes them); it is resized bilinearly to the window's
    size in pixels and cut to the box's pixels inside the image. Returns the map and its
    ``(y0, y1, x0, x1)`` in the image (an empty map for a box outside the image).
    """
    cam = np.asarray(cam, np.float32)
    wx0, wy0, wx1, wy1 = (int(round(v)) for v in window)
    y0, y1, x0, x1 = box_window(np.asarray(box, np.float32), shape)
    # only the rows/columns of the window that the box needs
    y0, y1, x0, x1 = max(y0, wy0), min(y1, wy1), max(x0, wx0), min(x1, wx1)
    if y1 <= y0 or x1 <= x0 or wx1 <= wx0 or wy1 <= wy0:
        return np.zeros((0, 0), np.float32), (y0, y0, x0, x0)
    full = cv2.resize(cam, (wx1 - wx0, wy1 - wy0), interpolation=cv2.INTER_LINEAR)
    return full[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0], (y0, y1, x0, x1)


def mask_from_cam(cam: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean mask of one box's map: ``cam ≥ threshold × max(cam)``, largest component only.

    A map without positive evidence (all ≤ 0) gives an empty mask rather than a guess: the caller
    counts those boxes, so a weak classifier shows up in the numbers instead of hiding behind a
    fallback shape.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"CAM threshold must be in (0, 1], got {threshold}")
    cam = np.asarray(cam, np.float32)
    top = float(cam.max()) if cam.size else 0.0
    if not top > 0.0:
        return np.zeros(cam.shape, bool)
    return largest_component(cam / top >= threshold)


def box_pseudo_mask(cam: np.ndarray, window: Sequence[float], box: Sequence[float], shape: tuple[int, int],
                    threshold: float = 0.5) -> tuple[np.ndarray, Window]:
    """One box's pseudo-mask and where it goes: ``(mask, (y0, y1, x0, x1))``, clipped to the box."""
    local, where = cam_in_box(cam, window, box, shape)
    return mask_from_cam(local, threshold), where


def union_pseudo_masks(shape: tuple[int, int], cams: Sequence[np.ndarray], windows: np.ndarray, boxes: np.ndarray,
                       threshold: float = 0.5) -> tuple[np.ndarray, int]:
    """An image's pseudo-mask (bool ``shape``) as the union of its boxes', and how many boxes came out empty."""
    out = np.zeros(shape, bool)
    empty = 0
    for cam, window, box in zip(cams, np.asarray(windows).reshape(-1, 4), np.asarray(boxes).reshape(-1, 4)):
        mask, (y0, y1, x0, x1) = box_pseudo_mask(cam, window, box, shape, threshold)
        if not mask.any():
            empty += 1
            continue
        out[y0:y1, x0:x1] |= mask
    return out, empty


# --------------------------------------------------------------------------------- agreement


def target_agreement(dataset: Dataset, kind: str = "mask", mask_dir: Optional[PathLike] = None, scale: float = 1.0,
                     split: Optional[str] = None, refine: RefineOptions = RefineOptions(),
                     with_rand: bool = False) -> Optional[dict]:
    """Dice, IoU (pooled) and per-image Dice of one kind of U-Net target against the real masks.

    ``kind`` is a ``targets.kind`` (``ellipse``, ``refined``, ``mask``); with ``mask_dir`` the
    targets are that folder's masks (pseudo-masks). Computed at ``scale`` (the training scale, where
    the network meets its targets) over the images of ``split`` (all when None) that have a real
    mask. None when no image has one.
    """
    records = dataset.subset(split=split).records if split is not None else list(dataset.records)
    records = [r for r in records if r.mask_path is not None and Path(r.mask_path).is_file()]
    if not records:
        return None
    sources: list[ImageRecord] = records_with_mask_dir(records, mask_dir) if mask_dir is not None else records
    scores = SegScores(num_classes=0, with_rand=with_rand)
    for real, source in zip(records, sources):
        image = rescale_image(read_image(real.path), scale)
        size = (image.shape[1], image.shape[0])
        truth = load_mask(real, size)
        if mask_dir is not None and source.mask_path is None:
            target = np.zeros_like(truth)  # an image the folder has no mask for counts as all background
        else:
            target = make_target(source, image, "binary", kind, 0, refine)
        scores.add(target > 0, truth > 0)
    out = scores.summary(prefix="")
    out["n_images"] = len(records)
    return out


def pseudo_mask_dice(dataset: Dataset, mask_dir: PathLike, scale: float = 1.0, split: Optional[str] = None) -> Optional[dict]:
    """:func:`target_agreement` of a folder of pseudo-masks (``<mask_dir>/<image_id>.png``); None
    when the data set has no real masks."""
    return target_agreement(dataset, "mask", mask_dir=mask_dir, scale=scale, split=split)
