"""A per-class ensemble of a comparison's two systems, chosen on the validation split.

The two designs fail on different classes. On MoNuSAC the two-stage system finds epithelial nuclei
and lymphocytes far better than the single-stage U-Net, which ranks the rare macrophages and
neutrophils better (its class maps see a wide field; the crop classifier saw few of them). A user
who trained both can keep, for each class, the detections of the system that ranks that class
better on the validation split, and the explanation map (either system's, or their pixel mean) that
scores higher there. Nothing of the test split enters the choice.

Files, in a ``cytofuse compare`` run folder ``R`` that holds both systems' checkpoints:

    R/val_images/                  links to the validation images
    R/val/two-stage/, single-stage/  both systems' outputs on them (reused when the checkpoints match)
    R/ensemble.json                the choice and the validation figures it was made by
    R/ensemble/                    predictions.csv, saliency/, images.csv, run.json, metrics.json (test)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cytocore.atomic import write_json
from cytocore.errors import CytoFuseError, DataError
from cytocore.records import Dataset

from .runkit import ENSEMBLE, SINGLE_STAGE, TWO_STAGE

log = logging.getLogger("cytofuse")

SYSTEM = ENSEMBLE
#: The explanation maps the ensemble may keep: either system's, or the pixel mean of both.
MEAN_MAP = "mean"
MAPS = (TWO_STAGE, SINGLE_STAGE, MEAN_MAP)


@dataclass(frozen=True)
class EnsembleChoice:
    """Which system each class's detections come from, and which explanation map is written."""

    classes: dict[str, str]
    saliency: str

    def describe(self) -> str:
        by = ", ".join(f"{c} from {s}" for c, s in self.classes.items())
        return f"per-class ensemble chosen on val: {by}; explanation map {self.saliency}"

    def to_dict(self) -> dict:
        return {"classes": dict(self.classes), "saliency": self.saliency}


def choose(per_class: Mapping[str, Mapping[str, Optional[float]]], class_names: Sequence[str],
           map_aucs: Mapping[str, Optional[float]]) -> EnsembleChoice:
    """For each class the system with the higher validation figure, and the map with the higher AUC.

    ``per_class[system][class]`` is that system's figure (FROC or AP50; None when the validation
    split has no box of the class). The two-stage system keeps a class on a tie or when there is
    nothing to judge it by (it is the design; the baseline has to win a class to take it), and its
    map when no map has an AUC (no masks).
    """
    classes = {}
    for c in class_names:
        a, b = per_class[TWO_STAGE].get(c), per_class[SINGLE_STAGE].get(c)
        classes[c] = SINGLE_STAGE if a is not None and b is not None and b > a else TWO_STAGE
    scored = {m: v for m, v in map_aucs.items() if v is not None}
    best = TWO_STAGE
    for m in MAPS:  # in MAPS order: the earlier one wins a tie
        if m in scored and scored[m] > scored.get(best, -1.0):
            best = m
    return EnsembleChoice(classes, best)


def merge_predictions(frames: Mapping[str, pd.DataFrame], choice: EnsembleChoice,
                      class_names: Sequence[str]) -> pd.DataFrame:
    """The challenge rows of both systems, each keeping only the scores of the classes it was chosen
    for (the others 0); rows left with no score are dropped. Per class the rows scored above 0 are
    exactly the chosen system's, so that class's FROC is that system's. (The official metric counts a
    0 as a score: the other system's rows enter at the last threshold, which moves the FROC only when
    the chosen system's own curve ends below 8 false positives per image. AP50 takes them in too, as
    its lowest-ranked detections, so the ensemble's AP50 of a class is not the chosen system's.)"""
    cols = [f"p_{c}" for c in class_names]
    parts = []
    for system in (TWO_STAGE, SINGLE_STAGE):
        frame = frames[system].copy()
        for c in class_names:
            if choice.classes[c] != system:
                frame[f"p_{c}"] = 0.0
        parts.append(frame[frame[cols].to_numpy().max(axis=1) > 0] if len(frame) else frame)
    merged = pd.concat(parts, ignore_index=True)
    return merged[["image_id", "xmin", "ymin", "xmax", "ymax", *cols]]


def mean_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pixel mean of two 8-bit maps, rounded half up, as 8-bit."""
    if a.shape != b.shape:
        raise DataError(f"the two systems' explanation maps differ in size: {a.shape} and {b.shape}")
    return ((a.astype(np.uint16) + b.astype(np.uint16) + 1) // 2).astype(np.uint8)


def map_of(choice: str, folders: Mapping[str, Path], image_id: str) -> np.ndarray:
    """Image ``image_id``'s explanation map under ``choice`` (one of :data:`MAPS`)."""
    if choice == MEAN_MAP:
        return mean_map(read_map(folders, TWO_STAGE, image_id), read_map(folders, SINGLE_STAGE, image_id))
    return read_map(folders, choice, image_id)


def read_map(folders: Mapping[str, Path], system: str, image_id: str) -> np.ndarray:
    """One system's saved explanation map; a missing one is a one-line error naming the file."""
    from cytocore.imageio import read_mask

    path = folders[system] / "saliency" / f"{image_id}.png"
    if not path.is_file():
        raise DataError(f"{path}: saliency map missing for image {image_id!r}")
    return read_mask(path, max_pixels=None)


def map_aucs(records: Sequence[Any], folders: Mapping[str, Path]) -> dict[str, Optional[float]]:
    """Each candidate map's explainability AUC (the official per-image mean) on ``records``.

    Image by image, its mask and the two systems' maps are read once and scored under every candidate
    (the mean map is made from the two already read), instead of one pass over the split per candidate.
    """
    from cytocore.imageio import read_mask

    from .explain_auc import explainability_auc

    per_image: dict[str, list[float]] = {m: [] for m in MAPS}
    for r in records:
        if r.mask_path is None or not Path(r.mask_path).is_file():
            continue
        mask = read_mask(r.mask_path, max_pixels=None)
        maps = {s: read_map(folders, s, r.image_id) for s in (TWO_STAGE, SINGLE_STAGE)}
        maps[MEAN_MAP] = mean_map(maps[TWO_STAGE], maps[SINGLE_STAGE])
        for m in MAPS:
            auc = explainability_auc([(r.image_id, mask, maps[m])]).auc
            if auc is not None:
                per_image[m].append(auc)
    return {m: (float(np.mean(v)) if v else None) for m, v in per_image.items()}


def per_class_figures(ds: Dataset, split: str, folder: Path, metric: str) -> dict[str, Optional[float]]:
    """One system's per-class validation figure: FROC (``accuracy``) or AP50 (``ap50``)."""
    from cytocore.writers import read_predictions_csv

    from .evaluate import evaluate

    path = folder / "predictions.csv"
    m = evaluate(ds, read_predictions_csv(path, ds.class_names), split=split, predictions_path=path)
    figures = m["ap50"] if metric == "ap50" else m["froc"]
    return {c: (None if figures.get(c) is None else float(figures[c])) for c in ds.class_names}


def write_ensemble(folders: Mapping[str, Path], choice: EnsembleChoice, class_names: Sequence[str],
                   image_ids: Sequence[str], out: Path) -> Path:
    """The ensemble's outputs from both systems' folders on the same images: ``predictions.csv``,
    ``saliency/``, ``images.csv`` and ``run.json`` (the last file written, so a folder with it is whole)."""
    from cytocore.atomic import write_text
    from cytocore.runfolder import write_saliency
    from cytocore.writers import read_predictions_csv, write_predictions_csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").unlink(missing_ok=True)
    frames = {s: read_predictions_csv(folders[s] / "predictions.csv", class_names) for s in (TWO_STAGE, SINGLE_STAGE)}
    write_predictions_csv(out / "predictions.csv", merge_predictions(frames, choice, class_names), class_names)
    (out / "saliency").mkdir(exist_ok=True)
    for image_id in image_ids:
        write_saliency(out / "saliency" / f"{image_id}.png", map_of(choice.saliency, folders, image_id))
    # image-level triage: the two-stage system's (its calibrated score; the ensemble does not refit it)
    images = pd.read_csv(folders[TWO_STAGE] / "images.csv", dtype={"image_id": str})
    write_text(out / "images.csv", images.to_csv(index=False))
    runs = {s: json.loads((folders[s] / "run.json").read_text(encoding="utf-8")) for s in (TWO_STAGE, SINGLE_STAGE)}
    timings = {i: {k: sum(float((r.get("timings") or {}).get(i, {}).get(k, 0.0)) for r in runs.values())
                   for k in ("segment", "classify", "fuse")} for i in image_ids}
    write_json(out / "run.json", {
        "system": SYSTEM,
        "choice": choice.to_dict(),
        "fusion": {"description": choice.describe()},
        "sources": {s: str(folders[s]) for s in folders},
        "n_images": len(image_ids),
        "n_failed": max(int(r.get("n_failed", 0)) for r in runs.values()),
        "timings": timings,
    })
    return out


def system_folders(run: Path, sub: str = "") -> dict[str, Path]:
    base = run / sub if sub else run
    return {TWO_STAGE: base / TWO_STAGE, SINGLE_STAGE: base / SINGLE_STAGE}


def checkpoints(run: Path) -> dict[str, Path]:
    """The comparison's finished checkpoints; a clear error naming what is missing."""
    paths = {"seg": run / "seg" / "best.ckpt", "cls": run / "cls" / "best.ckpt", "baseline": run / "baseline" / "best.ckpt"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise CytoFuseError(f"{run}: the ensemble needs both systems trained; missing {', '.join(missing)} "
                            "(run `cytofuse compare` with systems [two-stage, single-stage] first)")
    return paths


def validation_outputs(cfg: Mapping[str, Any], ds: Dataset, run: Path, ck: Mapping[str, Path],
                       progress: bool) -> dict[str, Path]:
    """Both systems' outputs on the validation images (resumed: images done with the same
    checkpoints and config are skipped)."""
    from fusion.pipeline import Pipeline

    from .baseline import run_baseline_folder
    from .runkit import link_split_images
    from .stages import infer_config

    images = link_split_images(ds, cfg["data"]["val_split"], run / "val_images")
    folders = system_folders(run, "val")
    fusion_file = run / "fusion.json" if cfg.get("fusion_fit") and (run / "fusion.json").is_file() else None
    pipe = Pipeline(ck["seg"], ck["cls"], infer_config(cfg), classes=ds.class_names, fusion_file=fusion_file)
    for system, summary in ((TWO_STAGE, pipe.run_folder(images, folders[TWO_STAGE], progress=progress)),
                            (SINGLE_STAGE, run_baseline_folder(ck["baseline"], images, folders[SINGLE_STAGE],
                                                               infer_config(cfg, single_stage=True), progress=progress))):
        if summary["n_failed"]:
            raise DataError(f"{folders[system]}: {summary['n_failed']} validation image(s) failed, e.g. {summary['failed'][:1]}")
    return folders


def fit_ensemble(cfg: Mapping[str, Any], ds: Dataset, run: Path, progress: bool = True) -> EnsembleChoice:
    """Choose per class and the map on the validation split; write ``R/ensemble.json``."""
    split, metric = cfg["data"]["val_split"], str(cfg.get("fusion_metric", "accuracy"))
    ck = checkpoints(run)
    folders = validation_outputs(cfg, ds, run, ck, progress)
    figures = {s: per_class_figures(ds, split, folders[s], metric) for s in folders}
    aucs = map_aucs(ds.subset(split=split).records, folders)
    choice = choose(figures, ds.class_names, aucs)
    write_json(run / "ensemble.json", {**choice.to_dict(), "split": split, "metric": metric,
                                       "validation": {"per_class": figures, "map_auc": aucs},
                                       "checkpoints": {k: str(v) for k, v in ck.items()}})
    log.info("    %s", choice.describe())
    return choice


def run_ensemble(cfg: Mapping[str, Any], ds: Dataset, run: Path, progress: bool = True) -> Path:
    """Fit the ensemble on val and write its test outputs from both systems' ``R/<system>/``."""
    folders = system_folders(run)
    for s, f in folders.items():  # before the val inference, which the missing outputs would waste
        if not (f / "run.json").is_file():
            raise CytoFuseError(f"{f}: the {s} system has no finished test outputs (run `cytofuse compare` first)")
    choice = fit_ensemble(cfg, ds, run, progress)
    records = ds.subset(split=cfg["data"]["test_split"]).records
    return write_ensemble(folders, choice, ds.class_names, [r.image_id for r in records], run / SYSTEM)


def score_table(run: Path, systems: Sequence[str] = (TWO_STAGE, SINGLE_STAGE, SYSTEM)) -> str:
    """The systems' test figures side by side (from each ``R/<system>/metrics.json``), as the report's table."""
    from .report import markdown_table, summary_rows

    scored = {s: {"metrics": json.loads((run / s / "metrics.json").read_text(encoding="utf-8"))}
              for s in systems if (run / s / "metrics.json").is_file()}
    return markdown_table(summary_rows({"systems": scored}))
