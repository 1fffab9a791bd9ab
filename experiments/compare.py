"""``cytofuse compare``: train the two-stage system and the single-stage baseline, test both, report.

One config (``experiments/configs/<name>.yaml`` over ``compare_defaults.yaml``) says which data, which
split, which stage options and how many training minutes. The run folder then holds everything:

    OUT/data/            the synthetic data set (when data.synth is set)
    OUT/splits.csv       the split every system used (made once, reused on every later run)
    OUT/seg/ cls/ baseline/   training runs (best.ckpt, last.ckpt, log.csv, config.yaml, done.json)
    OUT/test_images/     links to the test images
    OUT/two-stage/ single-stage/   inference outputs (predictions.csv, detections.csv, images.csv,
                         saliency/, overlays/, detections.geojson, run.json) and metrics.json
    OUT/report.md, results.json, froc_<class>.png, overlay_<id>.png   (experiments.report.build_report)

Fair comparison: both systems train on the same split with the same seed; the baseline is the
segmentation stage's own U-Net and loop with K+1 outputs, and its training budget is the minutes
the two stages actually used together (``budget.baseline_minutes: auto``), or their minute budgets
in full when the systems run side by side on half the cores each (:mod:`experiments.side_by_side`,
``parallel: auto``). Both are scored by :func:`experiments.evaluate.evaluate` on the same files the
CLI writes.

This module holds the run's phases (config, train, fit fusion, infer, evaluate, report); the
training stages' configs and reuse are in :mod:`experiments.stages`, data, test images and scoring
in :mod:`experiments.runkit`, the report's text and figures in :mod:`experiments.report`.

Resumable: a stage whose ``done.json`` exists is reused (a stage killed mid-run continues from its
``last.ckpt``), inference skips finished images, and evaluation and the report are rebuilt each time.
A finished stage trained with a different config is refused rather than silently reused.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from cytocore.atomic import write_json, write_text
from cytocore.config import dump_yaml, load_config
from cytocore.errors import CytoFuseError, DataError
from cytocore.records import Dataset

from .report import budget_text, build_report, classifier_report, report_notes
from .runkit import (
    CLASSIFIER,
    ENSEMBLE,
    SINGLE_STAGE,
    SYSTEMS,
    TWO_STAGE,
    Phases,
    dataset_info,
    link_split_images,
    pick_overlays,
    prepare_data,
    score_system,
)
from .stages import (DEFAULTS, baseline_stage_config, cls_stage_config, freeze_stage_configs, infer_config,
                     refuse_stage_budgets, run_stage, seg_stage_config)

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

__all__ = ["load_compare_config", "run_compare", "run_classifier_only", "run_two_stage", "run_single_stage"]


# ------------------------------------------------------------------------------------------- config


def load_compare_config(path: Optional[PathLike] = None, overrides: Iterable[str] = ()) -> dict:
    """``compare_defaults.yaml`` ← the user's YAML ← ``--set`` overrides, checked."""
    cfg = load_config(DEFAULTS, path, overrides)
    systems = cfg["systems"]
    if isinstance(systems, str):
        systems = [systems]
    systems = [str(s) for s in systems or []]
    unknown = [s for s in systems if s not in SYSTEMS]
    source = path or "config"
    if unknown or not systems:
        raise CytoFuseError(f"{source}: systems must be a list of {', '.join(SYSTEMS)}, got {cfg['systems']!r}")
    if CLASSIFIER in systems and len(systems) > 1:
        raise CytoFuseError(f"{source}: systems [classifier] is a classifier-only run; do not mix it with detection systems")
    from .fuse_fit import METRICS

    if cfg["fusion_metric"] not in METRICS:
        raise CytoFuseError(f"{source}: fusion_metric must be one of {', '.join(METRICS)}, got {cfg['fusion_metric']!r}")
    if cfg["ensemble"] and not {TWO_STAGE, SINGLE_STAGE} <= set(systems):
        raise CytoFuseError(f"{source}: ensemble: true needs both systems, two-stage and single-stage, in `systems`")
    refuse_stage_budgets(cfg, source)
    cfg["systems"] = systems
    return scale_budget(cfg)


def budget_label(minutes: Optional[float]) -> str:
    return "step-limited (no time budget)" if minutes is None else f"budget {minutes} min"


def scale_budget(cfg: dict) -> dict:
    """``budget.total_minutes`` (``--budget-minutes``) shares a total between the stages in the ratio of
    their configured minutes: more time, more epochs, same recipe. The baseline's ``auto`` budget then
    follows the two stages' minutes as before."""
    b = cfg["budget"]
    total = b.get("total_minutes")
    if total is None:
        return cfg
    total = float(total)
    if total <= 0:
        raise CytoFuseError(f"budget.total_minutes must be positive, not {total}")
    systems = cfg["systems"]
    keys = ["cls_minutes"] if systems == [CLASSIFIER] else (["seg_minutes", "cls_minutes"] if TWO_STAGE in systems else [])
    if not keys:  # single-stage alone: the whole budget is the baseline's
        b["baseline_minutes"] = total
        return cfg
    if any(b[k] is None for k in keys):  # a step-limited stage: share the total equally
        for k in keys:
            b[k] = round(total / len(keys), 3)
        return cfg
    configured = sum(float(b[k]) for k in keys)
    for k in keys:
        b[k] = round(total * float(b[k]) / configured, 3)
    return cfg


# ------------------------------------------------------------------------------------------- phases


def phase_names(systems: Sequence[str], fusion_fit: bool, side_by_side: bool = False, ensemble: bool = False) -> list[str]:
    if systems == [CLASSIFIER]:
        return ["data", "train classifier", "evaluate classifier", "report"]
    runs = ["train and infer side by side"] if side_by_side else system_phase_names(systems, fusion_fit)
    return ["data"] + runs + ([ENSEMBLE] if ensemble else []) + ["evaluate", "report"]


def system_phase_names(systems: Sequence[str], fusion_fit: bool) -> list[str]:
    """Each system's own phases, in the order :func:`run_two_stage` and :func:`run_single_stage` run them."""
    names = []
    if TWO_STAGE in systems:
        names += ["train segmentation", "train classifier"] + (["fit fusion"] if fusion_fit else []) + [f"infer {TWO_STAGE}"]
    if SINGLE_STAGE in systems:
        names += ["train single-stage", f"infer {SINGLE_STAGE}"]
    return names


# ------------------------------------------------------------------------------------------- budget


def baseline_budget(cfg: Mapping[str, Any], seg: Optional[dict], cls: Optional[dict]) -> tuple[Optional[float], Optional[int]]:
    """The baseline's minutes and epochs: by default the two stages' measured minutes together, and
    the segmentation stage's epochs scaled to them (same U-Net and patches: same cost per epoch)
    with half as many again in reserve. The budget, not the epoch count, is meant to end the run:
    the train loop stops when it is used up and its cosine schedule follows the budget, so the
    reserve only keeps a faster-than-expected run from ending early at the step limit.

    Side by side (:mod:`experiments.side_by_side`) the two stages have not run yet: ``seg`` and
    ``cls`` are then their planned budgets (:func:`planned_stage_budgets`), which the baseline gets
    in full, at least the compute the two stages can use."""
    b = cfg["budget"]
    minutes = b["baseline_minutes"]
    if minutes == "auto":
        if seg is None or cls is None:
            raise CytoFuseError("budget.baseline_minutes: auto needs the two-stage system in `systems` (set a number instead)")
        if seg["minutes"] is None or cls["minutes"] is None:
            raise CytoFuseError("budget.baseline_minutes: auto needs seg_minutes and cls_minutes to run the systems side by "
                                "side (set baseline_minutes, or parallel: false)")
        minutes = float(seg["minutes"]) + float(cls["minutes"])
    minutes = None if minutes is None else float(minutes)
    epochs = b["baseline_epochs"]
    if epochs == "auto":
        if seg is not None and minutes is not None and (seg["minutes"] or 0) > 0 and seg["epochs"] > 0:
            epochs = max(1, int(math.ceil(1.5 * seg["epochs"] * minutes / float(seg["minutes"]))))
        else:
            epochs = None
    return minutes, (None if epochs is None else int(epochs))


def planned_stage_budgets(cfg: Mapping[str, Any], data_path: Path) -> tuple[dict, dict]:
    """The two stages' minute caps and planned epochs, in the shape of their ``done.json``."""
    b = cfg["budget"]
    seg_epochs = int(seg_stage_config(cfg, data_path, b["seg_minutes"])["train"]["epochs"])
    cls_epochs = int(cls_stage_config(cfg, data_path, b["cls_minutes"])["train"]["epochs"])
    return {"minutes": b["seg_minutes"], "epochs": seg_epochs}, {"minutes": b["cls_minutes"], "epochs": cls_epochs}


# ------------------------------------------------------------------------------------------- compare


def run_compare(cfg: Mapping[str, Any], out_dir: PathLike) -> dict:
    """Run a whole comparison (see the module doc); returns the results dict written to results.json."""
    from . import side_by_side

    cfg = freeze_stage_configs(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare_config.yaml", dump_yaml(cfg))
    systems = list(cfg["systems"])
    if systems == [CLASSIFIER]:
        return run_classifier_only(cfg, out)
    threads = side_by_side.threads_each(cfg)
    phases = Phases(phase_names(systems, bool(cfg["fusion_fit"]), side_by_side=threads is not None,
                                ensemble=bool(cfg["ensemble"])))
    progress = bool(cfg["progress"])

    phases.start("data")
    ds, data_path = prepare_data(cfg, out)
    d = cfg["data"]
    for split in (d["train_split"], d["val_split"], d["test_split"]):
        if not ds.subset(split=split).records:
            raise DataError(f"{data_path}: split {split!r} has no images (splits: {', '.join(ds.splits()) or 'none'})")
    counts = {s: len(ds.subset(split=s)) for s in ds.splits()}
    phases.note(f"{len(ds)} images, classes {', '.join(ds.class_names)}; splits " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    link_split_images(ds, d["test_split"], out / "test_images")

    if threads is not None:
        phases.start("train and infer side by side", f"{' and '.join(systems)}, {threads} thread(s) each")
        runs = side_by_side.run_systems(systems, threads, out)
        where = f" with the two systems side by side, each in its own process with {threads} CPU thread(s)"
    else:
        runs = {}
        if TWO_STAGE in systems:
            runs.update(run_two_stage(cfg, ds, data_path, out, phases, progress))
        if SINGLE_STAGE in systems:
            runs.update(run_single_stage(cfg, ds, data_path, out, phases, progress, runs.get("seg"), runs.get("cls")))
        where = None
    scored = list(systems)
    if cfg["ensemble"]:
        from .ensemble import run_ensemble

        phases.start(ENSEMBLE, f"each class from the system that wins it on split {d['val_split']}")
        run_ensemble(cfg, ds, out, progress)
        scored.append(ENSEMBLE)

    phases.start("evaluate", f"split {d['test_split']}")
    test_records = ds.subset(split=d["test_split"]).records
    overlay_ids = pick_overlays(test_records, int(cfg["report"]["overlays"]))
    results = {
        "dataset": dataset_info(cfg, ds, data_path, d["test_split"]),
        "seed": int(cfg["seed"]),
        "budget": budget_text(runs, systems, where),
        "systems": {},
        "training": runs,
        "notes": [],
        "config": cfg,
    }
    for system in scored:
        sysres = score_system(ds, d["test_split"], out / system, float(cfg["report"]["mask_threshold"]), overlay_ids)
        minutes = {TWO_STAGE: ("seg", "cls"), SINGLE_STAGE: ("baseline",), ENSEMBLE: ("seg", "cls", "baseline")}[system]
        sysres["train_minutes"] = round(sum(runs[k]["minutes"] for k in minutes), 3)
        results["systems"][system] = sysres
    results["notes"] = report_notes(results, runs, systems, cfg)

    phases.start("report")
    report = build_report(results, out)
    results["report"] = str(report)
    results["wall_minutes"] = round((time.time() - phases.started) / 60, 2)
    phases.note(f"wrote {report}")
    return results


def run_two_stage(cfg: Mapping[str, Any], ds: Dataset, data_path: Path, out: Path, phases: Phases,
                  progress: bool) -> dict:
    """Train the segmentation stage and the classifier (on the U-Net's proposals too when
    ``cls_proposals``), fit the fusion rule on val when ``fusion_fit``, and run the fused pipeline on
    ``OUT/test_images``. Returns the two stages' ``done.json`` records."""
    from classification.train import train_classifier
    from fusion.pipeline import Pipeline

    from .baseline import train_unet

    budget, d = cfg["budget"], cfg["data"]
    phases.start("train segmentation", budget_label(budget["seg_minutes"]))
    scfg = seg_stage_config(cfg, data_path, budget["seg_minutes"])
    seg = run_stage("segmentation", out / "seg", scfg, lambda: train_unet(scfg, ds, out / "seg", resume=True, progress=progress))
    phases.start("train classifier", budget_label(budget["cls_minutes"]))
    ccfg = cls_stage_config(cfg, data_path, budget["cls_minutes"])
    icfg = infer_config(cfg)
    learns_from: dict[str, Path] = {}
    if cfg["cls_proposals"]:
        from .proposals_stage import training_proposals

        learns_from["proposals"] = training_proposals(seg["best_checkpoint"], ds, d["train_split"],
                                                      infer_config(cfg, proposals=True), out / "proposals", progress)
        ccfg["proposals"]["csv"] = str(learns_from["proposals"])
        phases.note(f"classifier also trains on the segmenter's proposals: {ccfg['proposals']['csv']}")
    cls = run_stage("classifier", out / "cls", ccfg, lambda: train_classifier(ccfg, out / "cls", resume=True, dataset=ds),
                    inputs=learns_from)
    fusion_file = None
    if cfg["fusion_fit"]:
        phases.start("fit fusion", f"on split {d['val_split']}")
        fusion_file = fit_fusion_file(seg["best_checkpoint"], cls["best_checkpoint"], icfg, ds, d["val_split"],
                                      out / "fusion.json", progress, metric=str(cfg["fusion_metric"]))
    phases.start(f"infer {TWO_STAGE}", f"{len(ds.subset(split=d['test_split']))} test images")
    pipe = Pipeline(seg["best_checkpoint"], cls["best_checkpoint"], icfg, classes=ds.class_names, fusion_file=fusion_file)
    _warn_failed(TWO_STAGE, pipe.run_folder(out / "test_images", out / TWO_STAGE, progress=progress))
    return {"seg": seg, "cls": cls}


def run_single_stage(cfg: Mapping[str, Any], ds: Dataset, data_path: Path, out: Path, phases: Phases, progress: bool,
                     seg: Optional[dict], cls: Optional[dict]) -> dict:
    """Train the single-stage baseline on the budget :func:`baseline_budget` gives it and run it on
    ``OUT/test_images``. Returns its ``done.json`` record."""
    from .baseline import run_baseline_folder, train_unet

    minutes, epochs = baseline_budget(cfg, seg, cls)
    shown = "none" if minutes is None else f"{minutes:.1f} min"
    phases.start("train single-stage", f"budget {shown}" + (f", {epochs} epochs" if epochs else ""))
    bcfg = baseline_stage_config(cfg, data_path, minutes, epochs)
    derived = [("train", "epochs")] if cfg["budget"]["baseline_epochs"] == "auto" else []
    run = run_stage("single-stage", out / "baseline", bcfg,
                    lambda: train_unet(bcfg, ds, out / "baseline", resume=True, progress=progress), derived=derived)
    had = run.get("budget_minutes")
    if minutes is not None and had is not None and abs(float(had) - minutes) > 0.05:
        log.info("    the reused baseline was trained on a %.1f min budget, this run's is %.1f (delete %s to retrain "
                 "it on this one)", float(had), minutes, out / "baseline")
    phases.start(f"infer {SINGLE_STAGE}", f"{len(ds.subset(split=cfg['data']['test_split']))} test images")
    _warn_failed(SINGLE_STAGE, run_baseline_folder(run["best_checkpoint"], out / "test_images", out / SINGLE_STAGE,
                                                   infer_config(cfg, single_stage=True), progress=progress))
    return {"baseline": run}


def _warn_failed(system: str, summary: Mapping[str, Any]) -> None:
    if summary["n_failed"]:
        log.warning("%s: %d test image(s) failed: %s", system, summary["n_failed"], summary["failed"][:3])


def fit_fusion_file(seg_ckpt: PathLike, cls_ckpt: PathLike, icfg: dict, ds: Dataset, split: str, path: Path,
                    progress: bool, metric: str = "accuracy") -> Path:
    """``cytofuse fuse fit`` on the val split, once: later runs reuse ``fusion.json`` while the
    candidates it was fitted on would be made the same way (checkpoints, post-processing and its
    hypotheses) and the metric it maximised is unchanged; a new ``infer.segmentation`` setting refits, and
    so does a fusion.json written before fits chose soft-NMS and each class's box factor."""
    from fusion.pipeline import Pipeline

    from .fuse_fit import candidates_fingerprint, describe_class_shrink, describe_soft, fit_fusion

    pipe = Pipeline(seg_ckpt, cls_ckpt, icfg, classes=ds.class_names)
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if (saved.get("candidates_fingerprint") == candidates_fingerprint(pipe) and saved.get("metric", "accuracy") == metric
                and "soft_nms" in saved and "box_shrink_by_class" in saved):
            log.info("    reusing %s (%s)", path, saved.get("selected"))
            return path
        log.info("    %s was fitted on other candidates, by another metric or before fits chose soft-NMS and each "
                 "class's box factor: fitting again", path)
    report = fit_fusion(pipe, ds, split=split, progress=progress, metric=metric)
    write_json(path, report)
    value = report["validation_ap50" if metric == "ap50" else "validation_accuracy"]
    own = describe_class_shrink(report["box_shrink_by_class"])
    log.info("    fusion chosen on %s by %s: %s, box shrink %g%s, soft-NMS %s (val %s %s)", split, metric, report["selected"],
             report["box_shrink"], f", {own}" if own else "", describe_soft(report.get("soft_nms")), metric,
             "n/a" if value is None else f"{value:.4f}")
    return path


# ------------------------------------------------------------------------------------------- classifier only


def evaluate_classifier(checkpoint: PathLike, ds: Dataset, split: str, batch_size: int = 64) -> dict:
    """Per-class ROC AUC, AP and one-vs-rest balanced accuracy of a classifier on one split's boxes
    (whole tiles for folder-per-class data), plus arg-max accuracy when every item has one class."""
    from classification.crops import NegativeConfig
    from classification.dataset import validation_crops
    from classification.metrics import classification_metrics, multiclass_balanced_accuracy
    from classification.model_io import load_classifier

    clf = load_classifier(checkpoint)
    if list(clf.class_names) != list(ds.class_names):
        raise CytoFuseError(f"{checkpoint}: classifier classes {', '.join(clf.class_names)} differ from the data set's "
                            f"{', '.join(ds.class_names)}")
    part = ds.subset(split=split)
    crops, labels = validation_crops(part, clf.crop, NegativeConfig(ratio=0.0), whole_image=ds.format == "folders",
                                     max_crops=None, seed=0)
    if not len(crops):
        raise DataError(f"{ds.root or 'data set'}: split {split!r} has no labelled items to evaluate the classifier on")
    t0 = time.perf_counter()
    probs = clf.predict_crops(crops, batch_size)
    seconds = time.perf_counter() - t0
    metrics = classification_metrics(labels, probs, clf.class_names, clf.head, threshold=0.5)
    single = labels.sum(axis=1) == 1
    if single.all():
        truth, guess = labels.argmax(axis=1), probs.argmax(axis=1)
        metrics["argmax_accuracy"] = float(np.mean(truth == guess))
        metrics["argmax_balanced_accuracy"] = multiclass_balanced_accuracy(truth, guess, len(clf.class_names))
    metrics["n_items"] = int(len(crops))
    metrics["n_per_class"] = {c: int(labels[:, k].sum()) for k, c in enumerate(clf.class_names)}
    metrics["infer_seconds_per_item"] = seconds / len(crops)
    metrics["checkpoint"] = str(checkpoint)
    return metrics


def run_classifier_only(cfg: Mapping[str, Any], out: Path) -> dict:
    """``systems: [classifier]``: train the classifier, evaluate it on ``data.test_split`` (val for
    data sets that have no test split), write ``report.md`` and ``results.json``."""
    from classification.train import train_classifier

    phases = Phases(phase_names([CLASSIFIER], False))
    d = cfg["data"]
    phases.start("data")
    ds, data_path = prepare_data(cfg, out)
    for split in (d["train_split"], d["test_split"]):
        if not ds.subset(split=split).records:
            raise DataError(f"{data_path}: split {split!r} has no images (splits: {', '.join(ds.splits()) or 'none'})")
    phases.note(f"{len(ds)} items, classes {', '.join(ds.class_names)}")
    phases.start("train classifier", budget_label(cfg["budget"]["cls_minutes"]))
    ccfg = cls_stage_config(cfg, data_path, cfg["budget"]["cls_minutes"])
    run = run_stage("classifier", out / "cls", ccfg, lambda: train_classifier(ccfg, out / "cls", resume=True, dataset=ds))
    phases.start("evaluate classifier", f"split {d['test_split']}")
    metrics = evaluate_classifier(run["last_checkpoint"], ds, d["test_split"])
    phases.start("report")
    info = dataset_info(cfg, ds, data_path, d["test_split"])
    results = {"dataset": info, "seed": int(cfg["seed"]), "systems": [CLASSIFIER], "metrics": metrics,
               "training": run, "config": dict(cfg)}
    write_json(out / "results.json", results)
    write_text(out / "report.md", classifier_report(results))
    results["report"] = str(out / "report.md")
    results["wall_minutes"] = round((time.time() - phases.started) / 60, 2)
    phases.note(f"wrote {out / 'report.md'}")
    return results
