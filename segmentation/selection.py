"""Choose the checkpoint and the post-processing values by the metric the challenge scores.

Validation Dice moves *against* the challenge's metric on touching cells (a mask cut higher has
lower Dice and better-separated cells), so ``cytofuse seg train`` monitors ``val_froc``: the
class-agnostic FROC (IoP > 0.5 with the ignore rule, :mod:`cytocore.froc`) of the boxes the real
post-processing makes from the validation images' maps, all ground-truth boxes against all found
boxes ranked by their seg score (``seg_mean``). The maps are resized to each image's full size
first, exactly as prediction does, so pixel values (``min_area``, ``min_distance``) mean the same
at training and at inference.

Every epoch, the post-processing values are searched one at a time (coordinate search over the
``validation.tune`` lists, starting from the values chosen so far, ties keeping the current value):
the marker kind (with an instance head: its thresholded cores, or its peaks, which split touching
cells better while a briefly trained head is still blurred: class-agnostic val FROC 0.23 with cores
against 0.56 with peaks for the same demo checkpoint), ``threshold``, ``marker_threshold``,
``min_distance`` and ``min_area`` (factors of the configured value). The values are reported as
``tuned_<key>`` metrics, so the best checkpoint carries the values chosen with its own weights, and
prediction uses them
(:func:`segmentation.predict.tuned_postprocess`). Only the validation split is ever used.

``validation.box_metric: ap50`` scores the same search by class-agnostic AP at IoU > 0.5 instead
(``val_ap50``), for data sets judged by detection AP such as BCCD. IoP rewards pieces: a fragment
inside a cell's box has IoP 1, so on BCCD the FROC search chose markers that cut each red cell
into 3-6 pieces (single-stage val FROC 0.63, test AP50 0.02); IoU counts such a piece as a miss.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from cytocore.records import ImageRecord

from .postprocess import TUNED_KEYS, concrete_markers, encode_tuned, find_class_instances, find_instances, postprocess_config


#: What the post-processing search maximises (``validation.box_metric``); the metric is logged as ``val_<name>``.
BOX_METRICS = ("froc", "ap50")


log = logging.getLogger("cytofuse")

#: ``validation.tune.min_distance: auto``: the marker spacings tried, as fractions of the training
#: cells' size (the 25th percentile of the boxes' shorter sides). The synthetic lung cells (20 px) get
#: the [4, 7] px tuned on them; BCCD's red cells (86 px) get [17, 30], where its hand-set grid's winners
#: were 28-40 and 4-7 px cut each red cell into pieces.
AUTO_SPACING_FRACTIONS = (0.2, 0.35)
#: The spacings for images without boxes to measure: the synthetic set's.
FALLBACK_SPACINGS = (4, 7)


def marker_spacings(value: Any, train_records: Sequence[ImageRecord]) -> list[int]:
    """``validation.tune.min_distance`` as the pixel spacings (full size) the search tries.

    ``min_distance`` is about the smallest cell's radius, so a fixed list fits one cell size: a user who
    brings large cells with the default config would have them cut into pieces by a spacing meant for
    nuclei, as ``data.scale: auto`` would otherwise have them trained at the nuclei's scale.
    """
    from .targets import AUTO_SCALE, box_short_sides

    if value != AUTO_SCALE:
        return [int(v) for v in value or []]
    sides = box_short_sides(train_records)
    if not len(sides):
        log.info("validation.tune.min_distance auto: no training boxes to measure, so %s px", list(FALLBACK_SPACINGS))
        return list(FALLBACK_SPACINGS)
    size = float(np.percentile(sides, 25))
    spacings = sorted({max(1, int(round(f * size))) for f in AUTO_SPACING_FRACTIONS})
    log.info("validation.tune.min_distance auto: %s px (%s x %.0f px, the 25th percentile of the training boxes' "
             "shorter sides)", spacings, " and ".join(f"{f:g}" for f in AUTO_SPACING_FRACTIONS), size)
    return spacings


def spacing_search(tune: Optional[dict], post: Optional[dict], train_records: Sequence[ImageRecord]) -> tuple[dict, dict]:
    """``validation.tune`` and ``postprocess`` with the marker spacings resolved (:func:`marker_spacings`).

    With ``auto``, the search also starts at the larger spacing unless ``postprocess.min_distance`` is
    set: it moves one value at a time from its start, and from 7 px on BCCD's U-Net it settled on the
    marker kind that ignores the spacing (val AP50 0.655 on 87 images); from 30 px it reached 0.713
    (``bccd.yaml``'s hand-set grid 0.715).
    """
    from .targets import AUTO_SCALE

    tune, post = dict(tune or {}), dict(post or {})
    asked = tune.get("min_distance")
    tune["min_distance"] = marker_spacings(asked, train_records)
    if asked == AUTO_SCALE and "min_distance" not in post:
        post["min_distance"] = max(tune["min_distance"])
    return tune, post


@dataclass
class ValImage:
    """One validation image's maps at full size and its ground-truth boxes (pixel xyxy)."""

    foreground: np.ndarray  # (H, W) float32, or the (K+1, H, W) softmax maps of a K+1-class model
    head: Optional[np.ndarray]  # (H, W) float32 instance head, or None
    boxes: np.ndarray


def tune_grid(tune: Optional[dict], post: dict, has_head: bool) -> dict[str, list]:
    """The values tried per key (the configured value always among them), from ``validation.tune``."""
    tune = dict(tune or {})
    grid: dict[str, list] = {}
    # The marker kind is only a choice with a head: without one the mask's distance transform is all there is.
    grid["markers"] = [concrete_markers(str(v), True) for v in tune.get("markers") or []] if has_head else []
    grid["threshold"] = [float(v) for v in tune.get("threshold") or []]
    grid["marker_threshold"] = [float(v) for v in tune.get("marker_threshold") or []] if has_head else []
    post = {**post, "markers": concrete_markers(str(post.get("markers", "auto")), has_head)}
    base_area = int(post["min_area"])
    grid["min_area"] = sorted({max(1, int(round(f * base_area))) for f in tune.get("min_area_factor") or []})
    grid["min_distance"] = [int(v) for v in tune.get("min_distance") or []]
    for key in TUNED_KEYS:
        if grid[key] and post[key] not in grid[key]:
            grid[key] = sorted(grid[key] + [post[key]])
    return grid


class FrocTuner:
    """Scores post-processing values on the validation images and keeps the best ones between epochs."""

    def __init__(self, post_cfg: Optional[dict], tune: Optional[dict], has_head: bool, multiclass: bool = False,
                 metric: str = "froc") -> None:
        if metric not in BOX_METRICS:
            raise ValueError(f"validation.box_metric must be one of {', '.join(BOX_METRICS)}, not {metric!r}")
        self.metric = metric
        self.base = postprocess_config(post_cfg or {})
        self.base["markers"] = concrete_markers(self.base["markers"], has_head)
        self.grid = tune_grid(tune, self.base, has_head)
        self.current = {k: self.base[k] for k in TUNED_KEYS}
        self.multiclass = multiclass

    def boxes(self, image: ValImage, values: dict) -> tuple[np.ndarray, np.ndarray]:
        """Boxes and seg scores the post-processing makes from one image with ``values``."""
        cfg = {**self.base, **values}
        if self.multiclass:
            table, _ = find_class_instances(image.foreground, None, cfg, image.head)
        else:
            table = find_instances(image.foreground, cfg, image.head)
        return table[["x0", "y0", "x1", "y1"]].to_numpy(np.float64).reshape(-1, 4), table["seg_mean"].to_numpy(np.float64)

    def froc(self, images: Sequence[ValImage], values: dict) -> float:
        """Class-agnostic FROC (or AP50, with ``metric="ap50"``) over ``images`` (NaN when they hold
        no ground-truth box)."""
        from cytocore.froc import class_froc

        gt_image = np.concatenate([np.full(len(im.boxes), i) for i, im in enumerate(images)] + [np.zeros(0, int)])
        gt_boxes = np.concatenate([im.boxes.reshape(-1, 4) for im in images] + [np.zeros((0, 4))])
        if not len(gt_boxes):
            return float("nan")
        found = [self.boxes(im, values) for im in images]
        pred_image = np.concatenate([np.full(len(b), i) for i, (b, _) in enumerate(found)] + [np.zeros(0, int)])
        pred_boxes = np.concatenate([b for b, _ in found] + [np.zeros((0, 4))])
        scores = np.concatenate([s for _, s in found] + [np.zeros(0)])
        if self.metric == "ap50":
            from cytocore.coco_ap import ap50_per_class

            sizes = [(im.foreground.shape[-1], im.foreground.shape[-2]) for im in images]
            ap = ap50_per_class(sizes, gt_image, gt_boxes, np.ones((len(gt_boxes), 1)), pred_image, pred_boxes,
                                scores.reshape(-1, 1), ["cell"])["cell"]
            return float("nan") if ap is None else float(ap)
        return class_froc(pred_image, pred_boxes, scores, gt_image, gt_boxes, len(images)).froc

    def search(self, images: Sequence[ValImage], known: Optional[dict] = None) -> tuple[float, dict]:
        """Coordinate search from the current values; returns the best FROC and values (kept for next time).

        ``known`` maps :meth:`key` of values to scores already computed on ``images``; the scores
        computed here are added to it, so a second pass on the same images repeats none.
        """
        cache: dict[tuple, float] = known if known is not None else {}

        def score(values: dict) -> float:
            key = self.key(values)
            if key not in cache:
                cache[key] = self.froc(images, values)
            return cache[key]

        best_values = dict(self.current)
        best = score(best_values)
        for key in TUNED_KEYS:
            for v in self.grid[key]:
                trial = {**best_values, key: v}
                s = score(trial)
                if np.isfinite(s) and (not np.isfinite(best) or s > best):
                    best, best_values = s, trial
        self.current = best_values
        return best, best_values

    def metrics(self, images: Sequence[ValImage]) -> dict[str, float]:
        """``val_froc`` and the chosen ``tuned_<key>`` values, for the train loop's log and checkpoint.

        The values are searched again every epoch, starting from the last epoch's choice (one
        coordinate pass, about a dozen post-processings of the validation set: seconds). Searching
        only when an epoch beat the best one so far froze the values of an early lucky epoch: a demo
        run kept epoch 2's marker threshold and scored 0.16-0.24 for the next seven epochs, while the
        same weights re-tuned scored 0.6-0.7.
        """
        current = self.froc(images, self.current)
        if np.isfinite(current):
            current, _ = self.search(images, known={self.key(self.current): current})
        return {f"val_{self.metric}": float(current), **{f"tuned_{k}": encode_tuned(k, v) for k, v in self.current.items()}}

    @staticmethod
    def key(values: dict) -> tuple:
        """The values of :data:`TUNED_KEYS` in order: how searched values are cached."""
        return tuple(values[k] for k in TUNED_KEYS)
