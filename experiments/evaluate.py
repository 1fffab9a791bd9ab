"""Score a predictions table against a data set: the challenge metric plus AP50, in one dict.

This is the glue behind ``cytofuse evaluate``: it turns a :class:`~cytocore.records.Dataset` and the
challenge's normalised predictions table into the arrays :mod:`cytocore.froc`,
:mod:`experiments.explain_auc` and :mod:`cytocore.coco_ap` work on, and checks the inputs on the
way. Predictions for images the data set does not have are reported (file, first row, count) and
left out, like other bad input; only when no prediction names any of its images -- the wrong file
or folder was passed -- does it stop instead of scoring nothing.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd

from cytocore.coco_ap import ap50_per_class
from cytocore.errors import DataError
from cytocore.false_positives import KINDS, box_kinds
from cytocore.froc import FP_RATES, Thresholds, per_class_froc, stack_ground_truth
from cytocore.records import Dataset, ImageRecord

from .explain_auc import explainability_auc

log = logging.getLogger("cytofuse")

COORDS = ("xmin", "ymin", "xmax", "ymax")
#: Weights of the challenge's model score.
ACCURACY_WEIGHT, EXPLAIN_WEIGHT = 0.8, 0.2


def evaluate(
    dataset: Dataset,
    predictions_df: pd.DataFrame,
    saliency_dir: Optional[Union[str, Path]] = None,
    thresholds: Thresholds = "distinct",
    pooled: bool = False,
    *,
    split: Optional[str] = None,
    predictions_path: Optional[Union[str, Path]] = None,
    ceiling: bool = False,
) -> dict:
    """All metrics of ``predictions_df`` (challenge columns, coordinates in [0, 1]) on ``dataset``.

    With ``split`` only that split's images are evaluated (N = their number) and predictions for the
    data set's other images are dropped; predictions for images the data set does not have at all
    are reported in ``warnings`` and skipped (a :class:`DataError` when that is every row).
    ``predictions_path`` only names the file in messages. With ``ceiling``, ``metrics["ceiling"]`` holds
    the accuracy and AP50 of the same boxes ranked perfectly (:mod:`cytocore.ranking_ceiling`): what a
    perfect classifier could reach with them, and ``metrics["box_kinds"]`` what each class's top-ranked boxes
    are under either hit test (:mod:`cytocore.false_positives`): hits, duplicates, pieces, loose boxes, ...
    """
    source = str(predictions_path) if predictions_path is not None else "predictions"
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log.warning(message)

    records = dataset.subset(split=split).records if split is not None else list(dataset.records)
    if not records:
        where = f"split {split!r} of " if split is not None else ""
        raise DataError(f"{dataset.root or 'data set'}: {where}the data set has no images to evaluate")
    class_names = list(dataset.class_names)
    preds = _prepare_predictions(predictions_df, class_names, source)
    foreign = [c for c in predictions_df.columns if str(c).startswith("p_") and str(c)[2:] not in class_names]
    if foreign:
        warn(f"{source}: column(s) {', '.join(map(str, foreign))} name no class of the data set and were ignored")
    preds, dropped = _select_images(preds, records, {r.image_id for r in dataset.records}, source, warn)
    if dropped:
        warn(f"{source}: {dropped} prediction rows are for images outside split {split!r} and were ignored")

    n_images = len(records)
    index = {r.image_id: i for i, r in enumerate(records)}
    gt_image, gt_boxes, gt_labels = _ground_truth(records, len(class_names))
    pred_image = preds["image_id"].map(index).to_numpy(np.int64)
    pred_boxes = _to_pixels(preds, records, pred_image)
    pred_scores = preds[[f"p_{c}" for c in class_names]].to_numpy(np.float64).reshape(len(preds), len(class_names))

    frocs = per_class_froc(pred_image, pred_boxes, pred_scores, gt_image, gt_boxes, gt_labels, class_names,
                           n_images, thresholds)
    for name in frocs.skipped:
        warn(f"class {name!r} has no ground-truth box in the evaluated images: skipped, not in accuracy")
    froc, curves, n_gt, accuracy = frocs.froc, frocs.curves, frocs.n_gt, frocs.accuracy
    if accuracy is None:
        warn("no class has ground truth in the evaluated images: accuracy is undefined")

    explain = None
    if saliency_dir is not None:
        explain = _explainability(records, Path(saliency_dir), pooled, warn)
    explain_auc = explain["auc"] if explain is not None else None
    model_score = (
        ACCURACY_WEIGHT * accuracy + EXPLAIN_WEIGHT * explain_auc
        if accuracy is not None and explain_auc is not None
        else None
    )

    ap50 = ap50_per_class(
        [(r.width, r.height) for r in records], gt_image, gt_boxes, gt_labels,
        pred_image, pred_boxes, pred_scores, class_names,
    )
    if ceiling:
        from cytocore.ranking_ceiling import Truth, ceiling_metrics

        truth = Truth(gt_image, gt_boxes, gt_labels)
        best = ceiling_metrics(pred_image, pred_boxes, pred_scores, truth, class_names,
                               [(r.width, r.height) for r in records])
        kinds = {hit: box_kinds(pred_image, pred_boxes, pred_scores, truth, class_names, hit) for hit in ("iop", "iou")}
    return {
        "froc": froc,
        "accuracy": accuracy,
        "explainability_auc": explain_auc,
        "model_score": model_score,
        "ap50": ap50,
        "n_images": n_images,
        "n_gt": n_gt,
        "n_predictions": int(len(preds)),
        "thresholds": thresholds if isinstance(thresholds, str) else [float(t) for t in thresholds],
        "fp_rates": list(FP_RATES),
        "split": split,
        "froc_curves": curves,
        "explainability": explain,
        "warnings": warnings,
        **({"ceiling": best, "box_kinds": kinds} if ceiling else {}),
    }


def _row_numbers(df: pd.DataFrame) -> np.ndarray:
    """1-based line numbers in the CSV (header = line 1) for messages.

    The CSV readers index rows by line number (index named ``line``); a plain 0-based frame made in
    code is taken to be in file order.
    """
    for col in ("line", "row"):
        if col in df.columns:
            return df[col].to_numpy()
    if df.index.name in ("line", "row"):
        return np.asarray(df.index)
    return np.arange(len(df)) + 2


def _prepare_predictions(df: pd.DataFrame, class_names: Sequence[str], source: str) -> pd.DataFrame:
    """Check the columns and values the metric relies on; return a numeric copy with line numbers."""
    needed = ["image_id", *COORDS, *[f"p_{c}" for c in class_names]]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (classes of the data set: {', '.join(class_names)})")
    out = df[needed].copy()
    out["_line"] = _row_numbers(df)
    out["image_id"] = out["image_id"].astype(str)
    for col in needed[1:]:
        values = pd.to_numeric(out[col], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}:{out['_line'].iloc[i]}: column {col} is not a number ({df[col].iloc[i]!r})")
        out[col] = values.astype(np.float64)
    return out.reset_index(drop=True)


def _select_images(
    preds: pd.DataFrame, records: Sequence[ImageRecord], all_ids: set, source: str, warn
) -> tuple[pd.DataFrame, int]:
    """Keep the predictions of the evaluated images; report and skip those of images the data set
    does not know, and stop only when that is all of them (the wrong file or data folder)."""
    unknown = ~preds["image_id"].isin(all_ids).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        n_images = preds.loc[unknown, "image_id"].nunique()
        where = f"{source}:{preds['_line'].iloc[i]}: image_id {preds['image_id'].iloc[i]!r} is not in the evaluated data set"
        if unknown.all():
            raise DataError(f"{where}, nor is any other image of the {len(preds)} prediction row(s); "
                            "wrong predictions file or data folder?")
        warn(f"{where}: {int(unknown.sum())} row(s) for {n_images} such image(s) skipped")
        preds = preds.loc[~unknown].reset_index(drop=True)
    keep = preds["image_id"].isin({r.image_id for r in records}).to_numpy()
    return preds[keep].reset_index(drop=True), int((~keep).sum())


def _ground_truth(records: Sequence[ImageRecord], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of all images stacked, with the image index of each box."""
    try:
        return stack_ground_truth(records, k)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _to_pixels(preds: pd.DataFrame, records: Sequence[ImageRecord], pred_image: np.ndarray) -> np.ndarray:
    sizes = np.array([[r.width, r.height, r.width, r.height] for r in records], np.float64).reshape(-1, 4)
    return preds[list(COORDS)].to_numpy(np.float64).reshape(-1, 4) * sizes[pred_image]


def _explainability(records: Sequence[ImageRecord], saliency_dir: Path, pooled: bool, warn) -> Optional[dict]:
    """Read masks and saliency maps lazily (one image in memory at a time) and score them."""
    from cytocore.imageio import read_mask

    if not saliency_dir.is_dir():
        raise DataError(f"{saliency_dir}: saliency folder not found")
    with_mask = [r for r in records if r.mask_path is not None and Path(r.mask_path).is_file()]
    no_mask = [r.image_id for r in records if r.mask_path is None or not Path(r.mask_path).is_file()]

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for r in with_mask:
            mask = read_mask(r.mask_path, max_pixels=None)
            if mask.shape != (r.height, r.width):
                raise DataError(
                    f"{r.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {r.image_id!r} is {r.width}x{r.height}"
                )
            positive = mask > 0
            if not pooled and (positive.all() or not positive.any()):
                # No AUC for this image: give a trivially single-valued pair without reading saliency.
                yield r.image_id, mask, np.zeros(mask.shape, np.uint8)
                continue
            path = saliency_dir / f"{r.image_id}.png"
            if not path.is_file():
                raise DataError(f"{path}: saliency map missing for image {r.image_id!r}, which has a mask")
            sal = read_mask(path, max_pixels=None)
            if sal.shape != (r.height, r.width):
                raise DataError(
                    f"{path}: saliency is {sal.shape[1]}x{sal.shape[0]} but image {r.image_id!r} is {r.width}x{r.height}"
                )
            yield r.image_id, mask, sal

    result = explainability_auc(pairs(), pooled=pooled)
    if no_mask:
        warn(f"explainability: {len(no_mask)} image(s) have no mask file and were skipped")
    if result.single_valued and not pooled:
        warn(f"explainability: {len(result.single_valued)} image(s) have a single-valued mask and were skipped")
    if result.auc is None:
        warn("explainability: no image has a mask with both values; explainability AUC is undefined")
    out = result.to_dict()
    out["n_skipped_no_mask"] = len(no_mask)
    out["skipped_no_mask"] = no_mask
    return out


def format_table(metrics: dict) -> str:
    """A compact text table of the per-class scores and the totals, for the terminal."""
    names = list(metrics["froc"])
    width = max([5, *(len(n) for n in names)])

    def num(v: Optional[float]) -> str:
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"

    lines = [f"{'class':<{width}}  {'n_gt':>6}  {'FROC':>6}  {'AP50':>6}"]
    for n in names:
        lines.append(f"{n:<{width}}  {metrics['n_gt'].get(n, 0):>6}  {num(metrics['froc'][n])}  {num(metrics['ap50'].get(n))}")
    lines.append(f"images: {metrics['n_images']}   predictions: {metrics.get('n_predictions', '?')}")
    lines.append(
        f"accuracy (mean FROC): {num(metrics['accuracy']).strip()}   "
        f"explainability AUC: {num(metrics['explainability_auc']).strip()}   "
        f"model score: {num(metrics['model_score']).strip()}"
    )
    best = metrics.get("ceiling")
    if best:
        aps = [v for v in best["ap50"].values() if v is not None]
        lines.append(
            f"ranked perfectly (same boxes, a perfect classifier): accuracy {num(best['accuracy']).strip()}   "
            f"mean AP50 {num(float(np.mean(aps)) if aps else None).strip()}"
        )
    kinds = metrics.get("box_kinds", {}).get("iou")
    if kinds:
        lines.append("what each class's top-N boxes are (N = its annotated cells; hit test IoU > 0.5):")
        lines.append(f"  {'class':<{width}}  " + "  ".join(KINDS))
        lines += [f"  {n:<{width}}  " + "  ".join(f"{v:>{len(k)}}" for k, v in counts.items()) for n, counts in kinds.items()]
    return "\n".join(lines)
