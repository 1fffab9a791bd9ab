"""``cytofuse fuse fit``: choose (and fit) the fusion rule on validation data by the official FROC.

The fusion stage may not import the metric (a stage never imports a later one), so choosing a rule
lives here: run the pipeline's two networks once over the validation images, keep their candidates
(boxes, seg scores, class probabilities), then score every candidate rule by the challenge's FROC
through :func:`experiments.evaluate.evaluate`, exactly as ``cytofuse evaluate`` would.

The logistic rule (and its variants with the image's evidence, ``specimen``, with the object's
geometry, ``shape``, and with both, ``specimen_shape``) is fitted on candidates labelled by the metric's own hit test (IoP > 0.5 with a
ground-truth box of the class). ``semantic_shape`` (``shape`` plus the segmentation U-Net's own class
probability) is offered only when the U-Net is a K+1-class one, so that every candidate carries one. To compare it fairly with the fixed rules, its FROC is measured
*cross-fitted*: images are split into folds and each fold is scored by a model fitted on the other
folds; the parameters written to ``fusion.json`` are then refitted on all validation images. The
best rule's box shrink factor is finally chosen from a grid the same way, and everything measured
goes into ``fusion.json`` for ``cytofuse infer --fusion fusion.json``.

Which figure is maximised is ``metric``: the challenge's accuracy (FROC at IoP > 0.5), or mean AP50
(pycocotools, IoU > 0.5) for data sets judged by detection AP such as BCCD. With AP50 the fitted rules
learn from candidates labelled by IoU, so a box that covers half of a cell cluster is no hit.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from dataclasses import replace
from typing import Callable, Collection, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cytocore.errors import DataError
from cytocore.records import Dataset, ImageRecord

log = logging.getLogger("cytofuse")

#: Weights tried for the weighted rules.
DEFAULT_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 0.75)
#: Box shrink factors tried. Down to half the side: a box at the object's centre stays inside its cell, which
#: is all IoP asks; 0.7, the earlier floor, was chosen at the edge of the grid in every MoNuSAC and demo fit.
DEFAULT_SHRINKS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
#: Soft-NMS sigmas tried with the best rule, each with both overlap measures (and off, which wins ties).
#: On BCCD val (the scale-0.25 run's checkpoints, scores of its fitted rule) Gaussian decay by containment
#: lifted white-cell AP50 0.902 -> 0.948 at sigma 1 and red cells 0.732 -> 0.746 at 0.5: lobes and
#: halves of white cells had ranked among other images' whole ones.
DEFAULT_SOFT_SIGMAS: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)
#: Each class's own box factor tried after the global shrink, as a multiple of it (fusion.json keeps the
#: product). On BCCD val a white cell's box fit best 3-15 % larger than segmented, a platelet's as segmented:
#: annotators draw some classes with a margin.
DEFAULT_CLASS_SCALES: tuple[float, ...] = (0.85, 0.9, 0.95, 1.05, 1.1, 1.15, 1.2)
#: What a class's own factor must add to the validation figure to be kept: seven tries a class find a
#: small gain by chance (BCCD val, RBC at 1.1: +0.0024, and -0.001 on test with the same models).
CLASS_SHRINK_MIN_GAIN = 0.005
#: A fold model fitted on fewer positives of a class than this is not on the other folds' scale for it.
MIN_FOLD_POSITIVES = 20
#: How the report names each fitted rule (``k``: the specimen rules' evidence count).
FITTED_DESCRIPTIONS: dict[str, str] = {
    "logistic": "logistic",
    "specimen": "specimen (cell + image evidence, k={k})",
    "shape": "shape (cell + its relative size and border contact)",
    "specimen_shape": "specimen_shape (cell + image evidence, k={k}, + size and border)",
    "specimen_shape_rank": "specimen_shape_rank (specimen_shape + the cell's rank for the class in its image)",
    "semantic_shape": "semantic_shape (shape + the K+1-class U-Net's own class probability)",
}
#: What ``fit_fusion`` can maximise on the validation images, and how each is described in fusion.json.
METRICS: dict[str, str] = {
    "accuracy": "official FROC accuracy (mean FROC over classes) on the validation images",
    "ap50": "mean AP50 (pycocotools, IoU > 0.5) on the validation images",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fusion of segmentation and classifier scores")
    fsub = p.add_subparsers(dest="fuse_command", metavar="ACTION", required=True)
    f = fsub.add_parser(
        "fit",
        help="choose the fusion rule (and box shrink) by validation FROC; writes fusion.json for `cytofuse infer --fusion`",
    )
    f.add_argument("--seg", required=True, metavar="CKPT", help="segmentation checkpoint")
    f.add_argument("--cls", required=True, metavar="CKPT", help="classifier checkpoint")
    f.add_argument("--data", required=True, metavar="DIR", help="data set with ground truth (the validation images)")
    f.add_argument("--out", required=True, metavar="JSON", help="fusion.json to write")
    f.add_argument("--split", default="val", help="split to fit on (default val; 'all' = every image)")
    f.add_argument("--format", choices=["auto", "challenge", "voc", "coco"], default="auto", help="data set layout")
    f.add_argument("--config", default=None, metavar="YAML", help="fusion config (floor, NMS, cap... as for infer)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="config override (repeatable)")
    f.add_argument("--classes", default=None, metavar="A,B,...", help="class names you expect from the classifier")
    f.add_argument("--metric", choices=sorted(METRICS), default="accuracy",
                   help="what to maximise: the challenge's FROC accuracy (IoP > 0.5, default) or mean AP50 (IoU > 0.5)")
    f.add_argument("--folds", type=int, default=3, help="image folds for the cross-fitted logistic rule's FROC (default 3)")
    f.add_argument("--l2", type=float, default=1e-2, help="L2 penalty of the logistic rule (default 0.01)")
    f.add_argument("--specimen-k", type=int, default=5,
                   help="specimen rule: an image's evidence for a class = mean of its k best seg*cls scores (default 5)")
    f.add_argument("--shrink", default=",".join(f"{s:g}" for s in DEFAULT_SHRINKS), metavar="S1,S2,...",
                   help="box shrink factors to try with the best rule")
    f.add_argument("--class-scales", default=",".join(f"{s:g}" for s in DEFAULT_CLASS_SCALES), metavar="M1,M2,...",
                   help="each class's own box factor to try, as multiples of the chosen box shrink ('none': one "
                        "factor for every class)")
    f.add_argument("--soft-sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SOFT_SIGMAS), metavar="S1,S2,...",
                   help="soft-NMS sigmas to try with the best rule, by IoU and by containment ('none': keep the "
                        "config's nms.soft)")
    f.add_argument("--threads", type=int, default=None, help="CPU threads for MindSpore")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(handler=_fit)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"--{what}: expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise DataError(f"--{what}: no value given")
    return values


def _optional_grid(text: str, what: str, noun: str) -> tuple[float, ...]:
    """Positive numbers separated by commas, or ``none`` for an empty grid (that choice switched off)."""
    if text.strip().lower() == "none":
        return ()
    values = _floats(text, what)
    if any(v <= 0 for v in values):
        raise DataError(f"--{what}: every {noun} must be positive, got {text!r}")
    return tuple(values)


def _fit(args: argparse.Namespace) -> int:
    from cytocore.atomic import write_json
    from cytocore.readers import load_dataset
    from fusion.cli import parse_classes
    from fusion.pipeline import Pipeline

    shrinks = _floats(args.shrink, "shrink")
    sigmas = _optional_grid(args.soft_sigmas, "soft-sigmas", "sigma")
    scales = _optional_grid(args.class_scales, "class-scales", "multiple")
    overrides = list(args.overrides) + ([f"runtime.threads={int(args.threads)}"] if args.threads else [])
    pipeline = Pipeline(args.seg, args.cls, args.config, classes=parse_classes(args.classes), overrides=overrides)
    dataset = load_dataset(args.data, format=args.format, class_names=pipeline.class_names)
    report = fit_fusion(pipeline, dataset, split=None if args.split == "all" else args.split, folds=args.folds,
                        l2=args.l2, shrinks=shrinks, progress=not args.no_progress, specimen_k=args.specimen_k,
                        metric=args.metric, soft_sigmas=sigmas, class_scales=scales)
    report["data"] = str(args.data)
    write_json(args.out, report)
    print(format_report(report))
    print(f"wrote {args.out}  (use: cytofuse infer ... --fusion {args.out})")
    return 0


# ------------------------------------------------------------------------------------------- library


def validation_records(dataset: Dataset, split: Optional[str]) -> list[ImageRecord]:
    """The images to fit on: ``split`` if the data set has splits, else every image (with a warning)."""
    if split is None:
        return list(dataset.records)
    if split in dataset.splits():
        return dataset.subset(split=split).records
    if not dataset.splits():
        log.warning("%s has no splits: fitting the fusion on all %d images (hold some out to avoid optimism)",
                    dataset.root or "data set", len(dataset))
        return list(dataset.records)
    raise DataError(f"{dataset.root or 'data set'}: no split {split!r} (splits: {', '.join(dataset.splits())})")


def collect_candidates(pipeline, records: Sequence[ImageRecord], progress: bool = True) -> dict:
    """Both networks' candidates for every record (probability maps dropped to save memory)."""
    from tqdm import tqdm

    from cytocore.detections import Candidates
    from cytocore.imageio import read_image

    out: dict[str, Candidates] = {}
    for rec in tqdm(records, desc="candidates", unit="img", disable=not progress):
        image = read_image(rec.path, channel_order=str(pipeline.config.get("channel_order", "RGB")),
                           max_pixels=pipeline.config.get("max_pixels"))
        if image.shape[:2] != (rec.height, rec.width):
            raise DataError(f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but the annotations say "
                            f"{rec.width}x{rec.height}")
        cand = pipeline.candidates(image)
        cand.probability = np.zeros((0, 0), np.float32)
        out[rec.image_id] = cand
    return out


def candidate_targets(boxes: np.ndarray, record: ImageRecord, n_classes: int, metric: str = "accuracy") -> np.ndarray:
    """``(N, K)`` 0/1: candidate hits a class-c ground-truth box by the metric's test (IoP > 0.5 for
    accuracy, IoU > 0.5 for AP50)."""
    from cytocore.froc import IOP_THRESHOLD, iop_matrix, iou_matrix

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    targets = np.zeros((len(boxes), n_classes), np.uint8)
    if not len(boxes) or not record.n_boxes:
        return targets
    iop = (iou_matrix if metric == "ap50" else iop_matrix)(boxes, record.boxes)
    labels = record.labels.reshape(record.n_boxes, n_classes).astype(bool)
    for c in range(n_classes):
        if labels[:, c].any():
            targets[:, c] = (iop[:, labels[:, c]] > IOP_THRESHOLD).any(axis=1)
    return targets


def candidates_fingerprint(pipeline) -> str:
    """The fingerprint of what makes a pipeline's candidates: checkpoints and the source's settings."""
    from cytocore.detections import identity_fingerprint

    return identity_fingerprint(pipeline.source.identity())


def fold_of(records: Sequence[ImageRecord], folds: int, seed: int = 0) -> dict[str, int]:
    """A fixed fold per image (images, not candidates, so one image never sits on both sides), with the
    images of each class spread over the folds, rarest class first.

    Cross-fitting scores each fold by a model fitted on the others; when the only two images with
    macrophages share a fold, that fold's model has never seen one and its scores for them sit on
    another scale than the other folds' (MoNuSAC val: macrophage FROC 0.46 or 0.0 by the luck of the
    draw). Spreading them leaves every fold's training part a positive of each class that has two
    images or more.
    """
    rng = np.random.default_rng(seed)
    present = [set(np.flatnonzero(r.labels.reshape(r.n_boxes, -1).any(axis=0)).tolist()) if r.n_boxes else set()
               for r in records]
    images_with = {c: sum(c in p for p in present) for p in present for c in p}
    rarity = [min((images_with[c] for c in p), default=len(records) + 1) for p in present]
    order = sorted(rng.permutation(len(records)), key=lambda i: rarity[i])  # stable: random among equals
    per_class = np.zeros((folds, 1 + max(images_with, default=0)), np.int64)
    sizes = np.zeros(folds, np.int64)
    out: dict[str, int] = {}
    for i in order:
        cost = [(sum(per_class[f, c] for c in present[i]), sizes[f], rng.random()) for f in range(folds)]
        f = min(range(folds), key=lambda j: cost[j])
        out[records[i].image_id] = f
        sizes[f] += 1
        for c in present[i]:
            per_class[f, c] += 1
    return out


def predictions_for(cands: Mapping, records: Sequence[ImageRecord], class_names: Sequence[str],
                    rule_for: Callable[[str], object], settings) -> pd.DataFrame:
    """The predictions table a rule gives on the cached candidates (what infer would write)."""
    from cytocore.writers import detections_columns
    from fusion.pipeline import detections_from_candidates

    frames = [
        detections_from_candidates(r.image_id, cands[r.image_id], r.width, r.height, class_names, rule_for(r.image_id),
                                   settings).to_frame()
        for r in records
    ]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in detections_columns(class_names)})


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """The evaluator's per-call warnings (a class without ground truth...) would repeat for every rule."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def froc_of(dataset: Dataset, records: Sequence[ImageRecord], predictions: pd.DataFrame) -> dict:
    """Official FROC per class and accuracy, and mean AP50, of ``predictions`` on ``records``."""
    from .evaluate import evaluate

    subset = dataset.subset(ids=[r.image_id for r in records])
    with _quiet(log):
        metrics = evaluate(subset, predictions.reset_index(drop=True))
    aps = [v for v in metrics["ap50"].values() if v is not None]
    return {"accuracy": metrics["accuracy"], "froc": metrics["froc"], "ap50": float(np.mean(aps)) if aps else None,
            "ap50_per_class": metrics["ap50"], "n_predictions": metrics["n_predictions"]}


def judged_classes(targets: Mapping[str, np.ndarray], fold: Mapping[str, int], n_folds: int, names: Sequence[str],
                   min_positives: int = MIN_FOLD_POSITIVES) -> list[str]:
    """The classes cross-fitting can judge: every fold's training part holds ``min_positives`` of them.

    For the others the fitted rules' cross-fitted figure is the fallback's (:func:`same_scale_folds`),
    which says nothing about the fitted model itself, so rules are compared on these classes only.
    """
    counts = np.zeros((n_folds, len(names)), np.int64)
    for i, t in targets.items():
        counts[fold[i]] += np.asarray(t, np.int64).reshape(-1, len(names)).sum(axis=0)
    training = counts.sum(axis=0)[None, :] - counts
    return [c for j, c in enumerate(names) if training[:, j].min() >= min_positives]


def selection_score(result: Mapping, metric: str, judged: Sequence[str]) -> Optional[float]:
    """The figure rules are ranked by: ``metric`` over the judged classes (all classes when none is)."""
    if not judged:
        return result[metric]
    per_class = result["froc"] if metric == "accuracy" else result["ap50_per_class"]
    values = [per_class.get(c) for c in judged if per_class.get(c) is not None]
    return float(np.mean(values)) if values else None


def candidate_rules(class_names: Sequence[str], hierarchy, weights: Sequence[float] = DEFAULT_WEIGHTS) -> list:
    """Every fixed rule to compare (weighted ones at each weight)."""
    from fusion.rules import FITTED_RULES, RULES, WEIGHTED_RULES, FusionRule

    rules = []
    for name in RULES:
        if name in FITTED_RULES:
            continue
        for w in (weights if name in WEIGHTED_RULES else (0.5,)):
            rules.append(FusionRule(name=name, weight=w, hierarchy=dict(hierarchy)))
    return rules


def same_scale_folds(fold_rules: dict, weak: Collection[str] = ()) -> dict:
    """The fold models with one scale per class: a class that some fold could not fit, or that is ``weak``
    (some fold trains on fewer than ``MIN_FOLD_POSITIVES`` of it, :func:`judged_classes`; one image holds
    593 of the val split's lymphocytes and another 7), gets the unfitted fallback (ranks like the
    geometric mean of seg and class scores) in every fold.

    Cross-fitted scores of all folds are ranked together; one fold's fallback scores beside the other
    folds' calibrated probabilities would put that fold's cells wherever the two scales happen to
    meet, not where their evidence does (MoNuSAC val: lymphocyte FROC 0.0 for every fitted rule).
    """
    weak = set(weak) | {c for rule in fold_rules.values() for c, p in (rule.logistic or {}).items() if not p.get("fitted", True)}
    if not weak:
        return fold_rules
    from fusion.rules import unfitted_params

    out = {}
    for k, rule in fold_rules.items():
        params = dict(rule.logistic or {})
        for c in weak:
            params[c] = unfitted_params(len(params[c]["coef"]), params[c].get("n_pos"), params[c].get("n"))
        out[k] = replace(rule, logistic=params)
    return out


def fit_image_triage(cands: Mapping, records: Sequence[ImageRecord], names: Sequence[str], rule_for: Callable,
                     final_rule, settings, n_folds: int, fold: Mapping[str, int], l2: float) -> dict:
    """The image-level malignancy model on validation images, with its cross-fitted ROC AUC there.

    Each image's features come from the detections of the chosen rule (cross-fitted when the rule
    itself is fitted); the reported AUC scores every fold with a model fitted on the other folds,
    and the model kept (``model``) is fitted on all validation images. ``model`` is None when the
    validation images are all with, or all without, annotated cells.
    """
    from fusion.pipeline import detections_from_candidates
    from fusion.triage import fit_triage

    from .explain_auc import roc_auc

    scores = {r.image_id: detections_from_candidates(r.image_id, cands[r.image_id], r.width, r.height, names,
                                                     rule_for(r.image_id), settings).scores for r in records}
    truth = {r.image_id: bool(r.n_boxes and r.labels.any()) for r in records}
    ids = [r.image_id for r in records]
    y = np.array([truth[i] for i in ids])
    out: dict = {"model": None, "n_images": len(ids), "n_cancer": int(y.sum()), "roc_auc_cross_fitted": None,
                 "roc_auc_top_score": None}
    if y.all() or not y.any():
        out["note"] = "validation images are all of one kind (with or without annotated cells): no triage model"
        return out
    top = np.array([s.max() if s.size else 0.0 for s in (scores[i] for i in ids)])
    out["roc_auc_top_score"] = roc_auc(y, top)
    crossed = np.full(len(ids), np.nan)
    for k in range(n_folds):
        train = [j for j, i in enumerate(ids) if fold[i] != k]
        model = fit_triage([scores[ids[j]] for j in train], y[train], l2=l2)
        for j, i in enumerate(ids):
            if fold[i] == k:
                crossed[j] = model.score(scores[i]) if model is not None else top[j]
    out["roc_auc_cross_fitted"] = roc_auc(y, crossed)
    final = fit_triage([scores[i] for i in ids], y, l2=l2)
    out["model"] = final.to_dict() if final is not None else None
    return out


def describe_class_shrink(factors: Optional[Mapping[str, float]]) -> str:
    """``RBC 1.1, WBC 1.05`` (empty when every class keeps the global factor): how reports and logs name them."""
    return ", ".join(f"{c} {f:.4g}" for c, f in (factors or {}).items())


def describe_soft(soft: Optional[Mapping]) -> str:
    """``off`` or ``containment sigma 0.5``: how reports and logs name a soft-NMS setting."""
    return "off" if not soft else f"{soft['overlap']} sigma {soft['sigma']:g}"


def soft_nms_grid(settings, sigmas: Sequence[float]) -> list[Optional[dict]]:
    """The soft-NMS settings ``fuse fit`` compares: off, the config's own, then each sigma by each overlap."""
    from fusion.nms import SOFT_OVERLAPS

    grid: list[Optional[dict]] = [None, settings.soft_nms]
    grid += [{"sigma": float(s), "overlap": o} for o in SOFT_OVERLAPS for s in sigmas]
    return [g for k, g in enumerate(grid) if g not in grid[:k]]


def fit_fusion(pipeline, dataset: Dataset, split: Optional[str] = "val", folds: int = 3, l2: float = 1e-2,
               shrinks: Sequence[float] = DEFAULT_SHRINKS, progress: bool = True,
               weights: Sequence[float] = DEFAULT_WEIGHTS, specimen_k: int = 5, metric: str = "accuracy",
               soft_sigmas: Sequence[float] = DEFAULT_SOFT_SIGMAS,
               class_scales: Sequence[float] = DEFAULT_CLASS_SCALES) -> dict:
    """Measure every rule's validation FROC, fit the logistic rule and its variants, pick the best rule,
    then its soft-NMS, box shrink and each class's own box factor, and fit the image-level triage model;
    only images of ``split`` are ever read."""
    from fusion.geometry import cell_geometry
    from fusion.rules import FITTED, SEMANTIC_RULES, FitImage, fit_image_rule

    if metric not in METRICS:
        raise ValueError(f"fusion fit metric must be one of {', '.join(METRICS)}, got {metric!r}")
    names = list(pipeline.class_names)
    if sorted(dataset.class_names) != sorted(names):
        raise DataError(f"{dataset.root or 'data set'}: classes {', '.join(dataset.class_names)} differ from the "
                        f"classifier's {', '.join(names)}")
    records = validation_records(dataset, split)
    if not records:
        raise DataError(f"{dataset.root or 'data set'}: no images to fit the fusion on")
    started = time.time()
    cands = collect_candidates(pipeline, records, progress)
    seconds_networks = time.time() - started
    hierarchy = pipeline.rule.hierarchy
    settings = pipeline.settings
    by_id = {r.image_id: r for r in records}
    targets = {i: candidate_targets(c.boxes, by_id[i], len(names), metric) for i, c in cands.items()}

    results = []
    for rule in candidate_rules(names, hierarchy, weights):
        scored = froc_of(dataset, records, predictions_for(cands, records, names, lambda _i, r=rule: r, settings))
        results.append({"rule": rule.name, "weight": rule.weight, "description": rule.describe(), **scored})

    # The fitted rules: each one's figure cross-fitted over image folds, then a final fit on every image.
    all_ids = [r.image_id for r in records]
    geometry = {r.image_id: cell_geometry(cands[r.image_id].boxes, cands[r.image_id].object_area, r.width, r.height)
                for r in records}
    per_image = lambda ids: [FitImage(cands[i].seg_scores, cands[i].cls_probs.reshape(-1, len(names)), geometry[i],  # noqa: E731
                                      targets[i], cands[i].seg_class_probs) for i in ids]
    # the semantic rules read a K+1-class U-Net's class probabilities: offered only when every candidate has them
    semantic = all(cands[i].seg_class_probs is not None for i in all_ids)
    rules_to_fit = [name for name in FITTED if semantic or name not in SEMANTIC_RULES]
    n_folds = max(2, min(int(folds), len(records)))
    fold = fold_of(records, n_folds)
    logistic_note = None if len(records) >= 2 else "too few images to cross-fit the fitted rules; not compared"
    judgeable = judged_classes(targets, fold, n_folds, names) if len(records) >= 2 else list(names)
    weak = [c for c in names if c not in judgeable]
    fitted: dict[str, tuple] = {}
    for name in rules_to_fit:
        folds_of = same_scale_folds({k: fit_image_rule(name, per_image([i for i in all_ids if fold[i] != k]), names,
                                                       specimen_k, l2, hierarchy)
                                     for k in range(n_folds)} if len(records) >= 2 else {}, weak)
        if folds_of:
            scored = froc_of(dataset, records, predictions_for(cands, records, names, lambda i, f=folds_of: f[fold[i]], settings))
            results.append({"rule": name, "weight": 0.5,
                            "description": f"{FITTED_DESCRIPTIONS[name].format(k=specimen_k)} (cross-fitted, {n_folds} folds)",
                            **scored})
        final = fit_image_rule(name, per_image(all_ids), names, specimen_k, l2, hierarchy)
        fitted[name] = (final, lambda i, f=folds_of: f[fold[i]])

    judged = judgeable if weak else []  # all judged: the metric itself
    for r in results:
        r["selection_score"] = selection_score(r, metric, judged)
    ranked = [r for r in results if r["selection_score"] is not None]
    if not ranked:
        raise DataError(f"{dataset.root or 'data set'}: the validation images have no ground-truth boxes; {metric} is undefined")
    best = max(ranked, key=lambda r: r["selection_score"])  # first of equals: the simpler rule listed earlier
    if best["rule"] in fitted:
        best_rule, rule_for = fitted[best["rule"]]  # box shrink below: cross-fitted, as the rule's FROC was
    else:
        best_rule = next(rule for rule in candidate_rules(names, hierarchy, weights)
                         if rule.name == best["rule"] and rule.weight == best["weight"])
        rule_for = lambda _i: best_rule  # noqa: E731
    def measured(trial) -> dict:
        out = froc_of(dataset, records, predictions_for(cands, records, names, rule_for, trial))
        return {**out, "selection_score": selection_score(out, metric, judged)}

    # soft-NMS (off first, so it wins ties), then the box shrink with the soft-NMS chosen
    soft_results = [{"soft_nms": soft, **measured(settings.with_choices(soft=soft))}
                    for soft in soft_nms_grid(settings, soft_sigmas)]
    best_soft = max(soft_results, key=_score)
    softened = settings.with_choices(soft=best_soft["soft_nms"])
    # one factor for every class first (the config's per-class ones dropped: the fit chooses them next)
    shrink_results = [{"box_shrink": float(s), **measured(softened.with_choices(box_shrink=float(s), class_shrink={}))}
                      for s in shrinks]
    best_shrink = max(shrink_results, key=lambda r: (_score(r), -abs(r["box_shrink"] - 1.0)))

    shrunk = softened.with_choices(box_shrink=float(best_shrink["box_shrink"]), class_shrink={})
    shrunk, class_results, final = fit_class_shrinks(shrunk, best_shrink, judged or names, class_scales, measured)
    triage = fit_image_triage(cands, records, names, rule_for, best_rule, shrunk, n_folds, fold, l2)

    info = pipeline.checkpoint_info()
    return {
        "triage": triage.pop("model"),
        "triage_fit": triage,
        "specimen_fit": fitted["specimen"][0].to_dict(),
        "shape_fit": fitted["shape"][0].to_dict(),
        "specimen_shape_fit": fitted["specimen_shape"][0].to_dict(),
        "specimen_shape_rank_fit": fitted["specimen_shape_rank"][0].to_dict(),
        **({"semantic_shape_fit": fitted["semantic_shape"][0].to_dict()} if "semantic_shape" in fitted else {}),
        "fusion": best_rule.to_dict(),
        "box_shrink": best_shrink["box_shrink"],
        "box_shrink_by_class": dict(shrunk.class_shrink),
        "soft_nms": best_soft["soft_nms"],
        "metric": metric,
        "selected_by": METRICS[metric] + (f", over the classes cross-fitting can judge ({', '.join(judged)})" if judged else ""),
        "judged_classes": judged or list(names),
        "selected": best["description"],
        "validation_accuracy": final["accuracy"],
        "validation_ap50": final["ap50"],
        "split": split,
        "n_images": len(records),
        "n_candidates": int(sum(len(c) for c in cands.values())),
        "n_positive_candidates": {c: int(sum(t[:, j].sum() for t in targets.values())) for j, c in enumerate(names)},
        "classes": names,
        "results": results,
        "soft_nms_results": soft_results,
        "shrink_results": shrink_results,
        "class_shrink_results": class_results,
        "shrink_rule": best["description"],
        "logistic_fit": fitted["logistic"][0].to_dict(),  # kept even when not chosen: copy into "fusion" to use it
        "logistic_l2": l2,
        "logistic_folds": n_folds,
        "logistic_note": logistic_note,
        "settings": {"score_floor": settings.floors.tolist(), "nms_iou": settings.iou, "nms_containment": settings.containment,
                     "max_detections": settings.max_detections, "config_box_shrink": settings.box_shrink,
                     "config_box_shrink_by_class": settings.class_shrink,
                     "config_soft_nms": settings.soft_nms},
        "checkpoints": {k: {"path": v["path"], "sha256": v["sha256"]} for k, v in info.items()},
        # what made the candidates (checkpoint hashes, post-processing and its hypotheses): a fit is only
        # valid for candidates made the same way
        "candidates_fingerprint": candidates_fingerprint(pipeline),
        "seconds_networks": round(seconds_networks, 2),
        "seconds_total": round(time.time() - started, 2),
    }


def _score(result: Mapping) -> float:
    """A result's selection score, -1 when it has none (below every real one)."""
    return -1.0 if result["selection_score"] is None else float(result["selection_score"])


def fit_class_shrinks(settings, start: Mapping, classes: Sequence[str], scales: Sequence[float],
                      measured: Callable, min_gain: float = CLASS_SHRINK_MIN_GAIN) -> tuple[object, list[dict], Mapping]:
    """Each class's own box factor, one class after the other, kept only where it raises the figure by
    ``min_gain`` or more.

    ``start`` is the measured result at ``settings`` (every class at the global factor); each factor is
    the global one times a multiple of ``scales``, capped at 2. Returns the settings, every trial, and the
    final measured result.
    """
    best, tried = start, []
    for name in classes:
        chosen, before = None, _score(best)
        for m in scales:
            factor = round(min(2.0, settings.box_shrink * float(m)), 4)
            if factor == settings.class_shrink.get(name, settings.box_shrink):
                continue
            trial = settings.with_choices(class_shrink={**settings.class_shrink, name: factor})
            result = measured(trial)
            tried.append({"class": name, "factor": factor, **result})
            if _score(result) >= before + min_gain and _score(result) > _score(best):
                best, chosen = result, trial
        settings = chosen or settings
    return settings, tried, best


def format_report(report: dict) -> str:
    def num(v: Optional[float]) -> str:
        return "  -   " if v is None else f"{v:.4f}"

    lines = [f"{'rule':<34} {'accuracy':>8} {'AP50':>8}  " + "  ".join(f"{c:>8}" for c in report["classes"])]
    for r in report["results"]:
        lines.append(f"{r['description']:<34} {num(r['accuracy']):>8} {num(r.get('ap50')):>8}  "
                     + "  ".join(f"{num(r['froc'].get(c)):>8}" for c in report["classes"]))
    if report.get("soft_nms_results"):
        lines.append(f"soft-NMS with {report['shrink_rule']}:")
        for r in report["soft_nms_results"]:
            lines.append(f"  soft_nms {describe_soft(r['soft_nms']):<22} accuracy {num(r['accuracy'])}  AP50 {num(r.get('ap50'))}")
    lines.append(f"box shrink with {report['shrink_rule']}:")
    for r in report["shrink_results"]:
        lines.append(f"  box_shrink {r['box_shrink']:<5g} accuracy {num(r['accuracy'])}  AP50 {num(r.get('ap50'))}")
    if report.get("class_shrink_results"):
        lines.append(f"each class's own box factor (kept where it raises the figure by {CLASS_SHRINK_MIN_GAIN:g} or more):")
        for r in report["class_shrink_results"]:
            lines.append(f"  {r['class']:<12} {r['factor']:<6.4g} accuracy {num(r['accuracy'])}  AP50 {num(r.get('ap50'))}")
    own = describe_class_shrink(report.get("box_shrink_by_class"))
    lines.append(f"chosen by {report.get('metric', 'accuracy')}: {report['selected']} with box_shrink {report['box_shrink']:g}"
                 f"{f' ({own})' if own else ''}, "
                 f"soft-NMS {describe_soft(report.get('soft_nms'))} "
                 f"(validation accuracy {num(report['validation_accuracy'])}, AP50 {num(report.get('validation_ap50'))}, "
                 f"{report['n_images']} images)")
    tri = report.get("triage_fit") or {}
    if tri.get("roc_auc_cross_fitted") is not None:
        lines.append(f"image triage ROC AUC on validation: calibrated model {tri['roc_auc_cross_fitted']:.4f} (cross-fitted), "
                     f"highest detection score {tri['roc_auc_top_score']:.4f}")
    elif tri.get("note"):
        lines.append(f"image triage: {tri['note']}")
    return "\n".join(lines)
