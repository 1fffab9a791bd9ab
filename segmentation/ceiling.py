"""``cytofuse seg ceiling``: the metric a perfect network would reach through this post-processing.

StarDist users reconstruct the ground truth from its own perfect targets before training anything;
this is that check for CytoFuse. For every image, the U-Net's targets are made exactly as training
makes them (at the configured ``data.scale``, from masks or boxes), taken as the network's output
(foreground probability and instance head), optionally blurred by ``blur`` pixels (a Gaussian at
network scale, about what a trained network's soft edges look like), resized to the image's size
as prediction does, and put through the configured post-processing. A perfect classifier then gives
each box the classes of the ground-truth box it overlaps most (IoP), and the boxes are scored with
the challenge's metric (:mod:`cytocore.froc`) and COCO AP50 (:mod:`cytocore.coco_ap`).

If the ceiling is low, no amount of training helps: the scale loses the smallest cells, or the
post-processing merges or splits them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from scipy import ndimage as ndi

from cytocore.errors import DataError
from cytocore.records import ImageRecord

from .predict import resize_plane

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]


def perfect_maps(record: ImageRecord, cfg: dict, blur: float = 0.0) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Foreground and instance-head maps at the image's size, made from the record's annotations."""
    from cytocore.imageio import read_image

    from .instance_targets import TARGET_LEVELS
    from .targets import RefineOptions, make_targets, rescale_image
    from .train import instance_head_kind

    t = cfg["targets"]
    head_kind = instance_head_kind(cfg)
    image = rescale_image(read_image(record.path), float(cfg["data"]["scale"]))
    semantic, head = make_targets(record, image, "binary", t["kind"], 0, RefineOptions(**t["refine"]), head_kind)
    fg = semantic.astype(np.float32)
    head_f = head.astype(np.float32) / TARGET_LEVELS if head is not None else None
    if blur > 0:
        fg = ndi.gaussian_filter(fg, blur)
        head_f = ndi.gaussian_filter(head_f, blur) if head_f is not None else None
    size = (record.width, record.height)
    return resize_plane(fg, size), (resize_plane(head_f, size) if head_f is not None else None)


def perfect_classes(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, k: int) -> np.ndarray:
    """``(P, k)`` 0/1: the classes of the ground-truth box each box overlaps most (IoP), none if none."""
    from cytocore.froc import iop_matrix

    out = np.zeros((len(boxes), k), np.float64)
    if len(boxes) and len(gt_boxes):
        iop = iop_matrix(boxes, gt_boxes)
        best = iop.argmax(axis=1)
        hit = iop[np.arange(len(boxes)), best] > 0
        out[hit] = gt_labels.reshape(-1, k)[best[hit]]
    return out


def ceiling(records: Sequence[ImageRecord], class_names: Sequence[str], cfg: dict, post_cfg: Optional[dict] = None,
            blur: float = 0.0, progress: bool = False) -> dict:
    """The metric ceiling of ``records`` under the config (see the module doc); keys as ``cytofuse evaluate``."""
    from tqdm.auto import tqdm

    from cytocore.coco_ap import ap50_per_class
    from cytocore.froc import class_froc, per_class_froc, stack_ground_truth

    from .postprocess import find_instances, postprocess_config
    from .targets import data_scale, recommended_scale
    from .train import instance_head_kind

    records = list(records)
    if not records:
        raise DataError("seg ceiling: no images to evaluate")
    # data.scale auto and no training split to resolve it on (run_ceiling resolves it on one): the evaluated images
    cfg = {**cfg, "data": {**cfg["data"], "scale": data_scale(cfg["data"]["scale"], records)}}
    post = postprocess_config({**(cfg.get("postprocess") or {}), **(post_cfg or {})})
    k = len(class_names)
    gt_image, gt_boxes, gt_labels = stack_ground_truth(records, k)
    rows_image, rows_boxes, rows_scores, rows_probs = [], [], [], []
    for i, r in enumerate(tqdm(records, desc="seg ceiling", unit="img", disable=not progress, leave=False)):
        fg, head = perfect_maps(r, cfg, blur)
        table = find_instances(fg, post, head)
        boxes = table[["x0", "y0", "x1", "y1"]].to_numpy(np.float64).reshape(-1, 4)
        mine = gt_image == i
        rows_image.append(np.full(len(boxes), i, np.int64))
        rows_boxes.append(boxes)
        rows_scores.append(table["seg_mean"].to_numpy(np.float64))
        rows_probs.append(perfect_classes(boxes, gt_boxes[mine], gt_labels[mine], k))
    pred_image = np.concatenate(rows_image)
    pred_boxes = np.concatenate(rows_boxes).reshape(-1, 4)
    seg_scores = np.concatenate(rows_scores)
    scores = np.concatenate(rows_probs).reshape(-1, k) * seg_scores[:, None]
    frocs = per_class_froc(pred_image, pred_boxes, scores, gt_image, gt_boxes, gt_labels, class_names, len(records))
    ap50 = ap50_per_class([(r.width, r.height) for r in records], gt_image, gt_boxes, gt_labels,
                          pred_image, pred_boxes, scores, class_names)
    detection = class_froc(pred_image, pred_boxes, seg_scores, gt_image, gt_boxes, len(records)).froc if len(gt_boxes) else None
    scored_ap = [v for v in ap50.values() if v is not None]
    return {
        "froc": frocs.froc,
        "accuracy": frocs.accuracy,
        "ap50": ap50,
        "mean_ap50": float(np.mean(scored_ap)) if scored_ap else None,
        "detection_froc": detection,
        "n_images": len(records),
        "n_gt": frocs.n_gt,
        "n_predictions": int(len(pred_boxes)),
        "froc_curves": frocs.curves,
        "scale": float(cfg["data"]["scale"]),
        "target_kind": cfg["targets"]["kind"],
        "instance_head": instance_head_kind(cfg),
        "blur": float(blur),
        "recommended_scale": recommended_scale(records),
        "postprocess": post,
        "warnings": [f"class {n!r} has no ground-truth box in the evaluated images: skipped, not in accuracy"
                     for n in frocs.skipped],
    }


def format_ceiling(result: dict) -> str:
    """Per-class FROC and AP50 and the totals, for the terminal."""
    names = list(result["froc"])
    width = max([5, *(len(n) for n in names)])

    def num(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.4f}"

    lines = [f"{'class':<{width}}  {'n_gt':>6}  {'FROC':>6}  {'AP50':>6}"]
    for n in names:
        lines.append(f"{n:<{width}}  {result['n_gt'].get(n, 0):>6}  {num(result['froc'][n])}  {num(result['ap50'].get(n))}")
    lines.append(f"images: {result['n_images']}   boxes found: {result['n_predictions']}   scale {result['scale']:g}   "
                 f"instance head: {result['instance_head'] or 'none'}   blur {result['blur']:g} px")
    lines.append(f"ceiling accuracy (mean FROC): {num(result['accuracy']).strip()}   mean AP50: {num(result['mean_ap50']).strip()}   "
                 f"class-agnostic detection FROC: {num(result['detection_froc']).strip()}")
    if result.get("recommended_scale") is not None:
        lines.append(f"resolution rule (small cells >= 8 px across at network scale) suggests data.scale >= "
                     f"{result['recommended_scale']:g}")
    return "\n".join(lines)


def run_ceiling(cfg: dict, data: Optional[PathLike] = None, split: Optional[str] = None, fmt: Optional[str] = None,
                post_cfg: Optional[dict] = None, blur: float = 0.0, progress: bool = True) -> dict:
    """Read the data set (``--data`` or ``data.path``), keep ``split`` (all images if ``None``), measure."""
    from .train import load_split_dataset

    if data is not None:
        cfg = {**cfg, "data": {**cfg["data"], "path": str(data)}}
    ds = load_split_dataset(cfg, fmt=fmt) if split is not None else _load_all(cfg, fmt)
    records = [r for r in ds.records if r.split == split] if split is not None else list(ds.records)
    if not records:
        raise DataError(f"{cfg['data']['path']}: no images in split {split!r} (splits found: {', '.join(ds.splits()) or 'none'})")
    cfg = _scale_of_training(cfg, ds.records)
    result = ceiling(records, ds.class_names, cfg, post_cfg, blur, progress)
    result["split"] = split
    result["data"] = str(cfg["data"]["path"])
    return result


def _scale_of_training(cfg: dict, records: Sequence[ImageRecord]) -> dict:
    """``data.scale: auto`` resolved on the training split, as ``seg train`` resolves it, so that the
    ceiling of the val or test images is measured at the scale the U-Net would train at; a data set
    without that split keeps ``auto`` for :func:`ceiling` to resolve on the evaluated images."""
    from .targets import AUTO_SCALE, data_scale

    train = [r for r in records if r.split == cfg["data"].get("train_split")]
    if cfg["data"].get("scale") != AUTO_SCALE or not train:
        return cfg
    return {**cfg, "data": {**cfg["data"], "scale": data_scale(AUTO_SCALE, train)}}


def _load_all(cfg: dict, fmt: Optional[str]) -> Any:
    from cytocore.errors import CytoFuseError
    from cytocore.readers import load_dataset

    path = cfg["data"]["path"]
    if not path:
        raise CytoFuseError("no data set given: pass --data DIR or set data.path in the config")
    return load_dataset(path, format=fmt or cfg["data"]["format"])

