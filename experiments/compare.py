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
the two stages actually used together (``budget.baseline_minutes: auto``). Both are scored by
:func:`experiments.evaluate.evaluate` on the same files the CLI writes.

Resumable: a stage whose ``done.json`` exists is reused (a stage killed mid-run continues from its
``last.ckpt``), inference skips finished images, and evaluation and the report are rebuilt each time.
A finished stage trained with a different config is refused rather than silently reused.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from cytocore.atomic import write_json, write_text
from cytocore.config import load_config, merge, read_yaml
from cytocore.errors import CytoFuseError, DataError
from cytocore.hashing import fingerprint, sha256_file
from cytocore.records import Dataset

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULTS = CONFIG_DIR / "compare_defaults.yaml"
TWO_STAGE, SINGLE_STAGE, CLASSIFIER = "two-stage", "single-stage", "classifier"
SYSTEMS = (TWO_STAGE, SINGLE_STAGE, CLASSIFIER)
SYNTH_DEFAULTS = {"images": 100, "seed": 0, "size": 512}
#: Keys left out of a stage's config fingerprint: they change how a run looks, not what it learns.
NOT_FINGERPRINTED = (("train", "progress"), ("train", "time_budget_minutes"), ("out",))


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
    cfg["systems"] = systems
    return scale_budget(cfg)


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
    configured = sum(float(b[k]) for k in keys)
    for k in keys:
        b[k] = round(total * float(b[k]) / configured, 3)
    return cfg


def repo_path(path: PathLike) -> Path:
    """Config paths are relative to the repository root (``../shared/datasets/...``), so a config
    means the same thing whatever the working directory."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def _without(cfg: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> dict:
    out = copy.deepcopy(dict(cfg))
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def config_hash(cfg: Mapping[str, Any]) -> str:
    return fingerprint(_without(cfg, NOT_FINGERPRINTED))


def _section(cfg: Mapping[str, Any], name: str) -> tuple[Optional[Path], dict]:
    """A stage section: its ``config:`` file (resolved) and the remaining override keys."""
    section = dict(cfg.get(name) or {})
    base = section.pop("config", None)
    return (repo_path(base) if base else None), section


def seg_stage_config(cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float]) -> dict:
    """The segmentation stage's config: its defaults ← ``seg.config`` ← ``seg`` overrides ← compare's data, seed, budget."""
    from segmentation.train import load_seg_config

    base, overrides = _section(cfg, "seg")
    scfg = load_seg_config(base)
    if overrides:
        scfg = merge(scfg, overrides, "compare config seg")
    return _common_train_options(scfg, cfg, data_path, budget_minutes)


def baseline_stage_config(cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float],
                          epochs: Optional[int] = None) -> dict:
    """The baseline's config: the *segmentation stage's* config (same U-Net, patches, scale,
    augmentation, optimiser) with the single-stage sections of ``segmentation/configs/baseline.yaml``
    (or ``baseline.config``) — everything but its ``model`` and ``out`` — then ``baseline`` overrides.

    Taking the architecture from the segmentation stage keeps the comparison about the design
    (one network doing both jobs), not about a wider or deeper U-Net.
    """
    from .baseline import baseline_config_path

    base, overrides = _section(cfg, "baseline")
    bfile = base or baseline_config_path()
    scfg = seg_stage_config(cfg, data_path, budget_minutes)
    single = {k: v for k, v in read_yaml(bfile).items() if k not in ("model", "out")}
    bcfg = merge(scfg, single, str(bfile))
    if overrides:
        bcfg = merge(bcfg, overrides, "compare config baseline")
    if bcfg["targets"]["mode"] != "classes":
        raise CytoFuseError(f"{bfile}: the single-stage baseline needs targets.mode: classes, not {bcfg['targets']['mode']!r}")
    if epochs is not None:
        bcfg["train"]["epochs"] = int(epochs)
    return _common_train_options(bcfg, cfg, data_path, budget_minutes)


def cls_stage_config(cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float]) -> dict:
    from classification.train import load_cls_config

    base, overrides = _section(cfg, "cls")
    ccfg = load_cls_config(base)
    if overrides:
        ccfg = merge(ccfg, overrides, "compare config cls")
    ccfg["data"]["split_fractions"] = list(cfg["data"]["split_fractions"])
    return _common_train_options(ccfg, cfg, data_path, budget_minutes)


def _common_train_options(stage: dict, cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float]) -> dict:
    """What compare decides for every stage: data (for the record: the split data set is passed in),
    split names and seed, training seed, budget and progress bars."""
    d = cfg["data"]
    stage["data"]["path"] = str(data_path)
    stage["data"]["train_split"] = d["train_split"]
    stage["data"]["val_split"] = d["val_split"]
    stage["data"]["split_seed"] = int(d["split_seed"])
    stage["train"]["seed"] = int(cfg["seed"])
    stage["train"]["time_budget_minutes"] = None if budget_minutes is None else float(budget_minutes)
    stage["train"]["progress"] = bool(cfg["progress"])
    return stage


def infer_config(cfg: Mapping[str, Any]) -> dict:
    """The fusion-stage config both systems run inference with."""
    from fusion.pipeline import load_fusion_config

    block = copy.deepcopy(dict(cfg.get("infer") or {}))
    block.setdefault("runtime", {})
    block["runtime"] = {**dict(block["runtime"] or {}), "seed": int(cfg["seed"])}
    return load_fusion_config(block)


# ------------------------------------------------------------------------------------------- progress


@dataclass
class Phases:
    """``[3/8 train classifier] ... (elapsed 4:12)`` log lines, so a long run always says where it is."""

    names: list[str]
    started: float = field(default_factory=time.time)
    current: int = 0

    def elapsed(self) -> str:
        s = int(time.time() - self.started)
        return f"{s // 60}:{s % 60:02d}"

    def start(self, name: str, detail: str = "") -> None:
        self.current = self.names.index(name) + 1 if name in self.names else self.current + 1
        log.info("[%d/%d %s] %s(elapsed %s)", self.current, len(self.names), name, f"{detail} " if detail else "", self.elapsed())

    def note(self, message: str) -> None:
        log.info("    %s (elapsed %s)", message, self.elapsed())


def phase_names(systems: Sequence[str], fusion_fit: bool) -> list[str]:
    if systems == [CLASSIFIER]:
        return ["data", "train classifier", "evaluate classifier", "report"]
    names = ["data"]
    if TWO_STAGE in systems:
        names += ["train segmentation", "train classifier"]
    if SINGLE_STAGE in systems:
        names.append("train single-stage")
    if TWO_STAGE in systems and fusion_fit:
        names.append("fit fusion")
    names += [f"infer {s}" for s in systems] + ["evaluate", "report"]
    return names


# ------------------------------------------------------------------------------------------- data


def prepare_data(cfg: Mapping[str, Any], out: Path) -> tuple[Dataset, Path]:
    """The data set with every image in a split, and its folder.

    ``data.synth`` generates the synthetic set into ``OUT/data`` (once: reused when its options are
    unchanged). Images without a split get one from :func:`cytocore.splits.assign_splits`; the split
    used is written to ``OUT/splits.csv`` and read back on later runs, so finished checkpoints are
    never tested on images they trained on.
    """
    from cytocore.readers import load_dataset
    from cytocore.splits import apply_splits, assign_splits, load_split_file, write_split_file

    d = cfg["data"]
    if d.get("synth"):
        path, fmt = generate_synth(d["synth"], out), "challenge"
    else:
        if not d.get("path"):
            raise CytoFuseError("the compare config sets neither data.path nor data.synth")
        path, fmt = repo_path(d["path"]), d.get("format", "auto")
        if not path.exists():
            raise DataError(f"data set not found: {d['path']} (looked in {path}); put it there or set data.path")
    ds = load_dataset(path, format=fmt)  # the readers log each problem (skipped rows) themselves
    split_file = out / "splits.csv"
    if split_file.is_file():
        ds = apply_splits(ds, load_split_file(split_file))
    if any(r.split is None for r in ds.records):
        ds = assign_splits(ds, fractions=tuple(d["split_fractions"]), seed=int(d["split_seed"]))
    write_split_file(split_file, ds)
    return ds, path


def generate_synth(options: Any, out: Path) -> Path:
    """Generate (or reuse) the synthetic data set of ``data.synth`` in ``OUT/data``."""
    from cytosynth.scene import generate

    if not isinstance(options, Mapping):
        raise CytoFuseError(f"data.synth must be a mapping like {{images: 100, seed: 0, size: 512}}, not {options!r}")
    unknown = sorted(set(options) - set(SYNTH_DEFAULTS))
    if unknown:
        raise CytoFuseError(f"data.synth: unknown option(s) {', '.join(unknown)} (known: {', '.join(SYNTH_DEFAULTS)})")
    opts = {k: int(options.get(k, v)) for k, v in SYNTH_DEFAULTS.items()}
    folder, marker = out / "data", out / "data_synth.json"
    if marker.is_file() and json.loads(marker.read_text()) == opts and (folder / "metadata.csv").is_file():
        log.info("    reusing the synthetic data set in %s (%d images, seed %d, %d px)", folder, opts["images"], opts["seed"], opts["size"])
        return folder
    marker.unlink(missing_ok=True)
    generate(folder, n_images=opts["images"], seed=opts["seed"], size=opts["size"], progress=True)
    write_json(marker, opts)
    return folder


def link_split_images(ds: Dataset, split: str, folder: Path) -> Path:
    """A folder of links (copies where links are not allowed) to one split's images, named
    ``<image_id><suffix>`` so the pipelines' image ids are the data set's."""
    records = ds.subset(split=split).records
    if not records:
        raise DataError(f"{ds.root or 'data set'}: split {split!r} has no images (splits: {', '.join(ds.splits()) or 'none'})")
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{r.image_id}{Path(r.path).suffix}": Path(r.path).resolve() for r in records}
    for p in folder.iterdir():
        if p.name not in wanted:
            p.unlink()
    for name, src in wanted.items():
        dst = folder / name
        if dst.is_symlink() and dst.resolve() == src:
            continue
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copy2(src, dst)
    return folder


# ------------------------------------------------------------------------------------------- training


def _read_done(folder: Path) -> Optional[dict]:
    path = folder / "done.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def run_stage(name: str, folder: Path, stage_cfg: dict, train: Callable[[], Any]) -> dict:
    """Train one stage, or reuse it when ``done.json`` says it finished with this config.

    A run without ``done.json`` (killed mid-way) is resumed from its ``last.ckpt`` by the loop.
    """
    from .baseline import images_seen

    digest = config_hash(stage_cfg)
    done = _read_done(folder)
    if done is not None and Path(done.get("best_checkpoint", "")).is_file():
        if done.get("config_hash") != digest:
            raise CytoFuseError(
                f"{folder}: this {name} stage was trained with another config (fingerprint {done.get('config_hash')} "
                f"!= {digest}); delete {folder} to retrain it, or use another --out"
            )
        log.info("    reusing the finished %s run in %s (%.1f min, %d epochs)", name, folder, done["minutes"], done["epochs"])
        return done
    result = train()
    done = {
        "stage": name,
        "best_checkpoint": str(result.best_checkpoint),
        "last_checkpoint": str(result.last_checkpoint),
        "minutes": round(float(result.minutes), 3),
        "epochs": len(result.history),
        "samples": images_seen(result.history),
        "best_value": result.best_value,
        "monitor": stage_cfg["train"]["monitor"],
        "budget_minutes": stage_cfg["train"]["time_budget_minutes"],
        "epochs_planned": int(stage_cfg["train"]["epochs"]),
        "config_hash": digest,
    }
    write_json(folder / "done.json", done)
    log.info("    %s trained: %d epochs, %.1f min, best %s = %s", name, done["epochs"], done["minutes"], done["monitor"],
             "n/a" if done["best_value"] is None else f"{done['best_value']:.4f}")
    return done


def baseline_budget(cfg: Mapping[str, Any], seg: Optional[dict], cls: Optional[dict]) -> tuple[Optional[float], Optional[int]]:
    """The baseline's minutes and epochs: by default the two stages' measured minutes together, and
    the segmentation stage's epochs scaled to them (same U-Net and patches: same cost per epoch)
    with half as many again in reserve. The budget, not the epoch count, is meant to end the run:
    the train loop stops when it is used up and its cosine schedule follows the budget, so the
    reserve only keeps a faster-than-expected run from ending early at the step limit."""
    b = cfg["budget"]
    minutes = b["baseline_minutes"]
    if minutes == "auto":
        if seg is None or cls is None:
            raise CytoFuseError("budget.baseline_minutes: auto needs the two-stage system in `systems` (set a number instead)")
        minutes = float(seg["minutes"]) + float(cls["minutes"])
    minutes = None if minutes is None else float(minutes)
    epochs = b["baseline_epochs"]
    if epochs == "auto":
        if seg is not None and minutes is not None and seg["minutes"] > 0 and seg["epochs"] > 0:
            epochs = max(1, int(math.ceil(1.5 * seg["epochs"] * minutes / float(seg["minutes"]))))
        else:
            epochs = None
    return minutes, (None if epochs is None else int(epochs))


# ------------------------------------------------------------------------------------------- scoring


def saliency_scores(records: Sequence[Any], saliency_dir: Path, threshold: float = 0.5) -> Optional[dict]:
    """Dice, IoU and adapted Rand error of the thresholded saliency maps against the masks.

    Pooled over the images that have a mask (segmentation.metrics.SegScores); None when none has.
    """
    from cytocore.imageio import read_mask
    from segmentation.metrics import SegScores

    scores = SegScores(num_classes=0, with_rand=True)
    used = 0
    for r in records:
        if r.mask_path is None or not Path(r.mask_path).is_file():
            continue
        path = saliency_dir / f"{r.image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: saliency map missing for image {r.image_id!r}")
        mask = read_mask(r.mask_path, max_pixels=None) > 0
        sal = read_mask(path, max_pixels=None).astype(np.float32) / 255.0
        if sal.shape != mask.shape:
            raise DataError(f"{path}: saliency is {sal.shape[1]}x{sal.shape[0]} but the mask of {r.image_id!r} is "
                            f"{mask.shape[1]}x{mask.shape[0]}")
        scores.add(sal >= threshold, mask)
        used += 1
    if not used:
        return None
    out = scores.summary(prefix="")
    out["n_images"] = used
    out["threshold"] = threshold
    return out


def inference_seconds(run: Mapping[str, Any]) -> Optional[float]:
    """Median seconds per image of segment + classify + fuse (file writing excluded) from ``run.json``.

    The median, because the first image also pays for compiling the networks' graphs.
    """
    per_image = [sum(float(t.get(k, 0.0)) for k in ("segment", "classify", "fuse")) for t in (run.get("timings") or {}).values()]
    return float(np.median(per_image)) if per_image else None


def pick_overlays(records: Sequence[Any], n: int) -> list[str]:
    """The test images to show: those with the most boxes, and one healthy image when there is one."""
    if n <= 0:
        return []
    ranked = sorted(records, key=lambda r: (-r.n_boxes, r.image_id))
    with_boxes = [r.image_id for r in ranked if r.n_boxes > 0]
    healthy = [r.image_id for r in ranked if r.n_boxes == 0]
    chosen = with_boxes[: n - 1 if healthy else n] + healthy[:1]
    return chosen[:n]


def score_system(ds: Dataset, split: str, folder: Path, mask_threshold: float, overlay_ids: Sequence[str]) -> dict:
    """Everything the report needs about one system's outputs in ``folder``."""
    from cytocore.writers import read_predictions_csv

    from .evaluate import evaluate
    from .triage import triage_metrics

    records = ds.subset(split=split).records
    with_masks = any(r.mask_path is not None and Path(r.mask_path).is_file() for r in records)
    predictions_path = folder / "predictions.csv"
    predictions = read_predictions_csv(predictions_path, ds.class_names)
    metrics = evaluate(ds, predictions, saliency_dir=folder / "saliency" if with_masks else None, split=split,
                       predictions_path=predictions_path)
    write_json(folder / "metrics.json", metrics)
    images = pd.read_csv(folder / "images.csv", dtype={"image_id": str})
    malignancy = dict(zip(images["image_id"], images["malignancy"].astype(float)))
    truth = {r.image_id: r.n_boxes > 0 for r in records}
    run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    overlays = {i: str(folder / "overlays" / f"{i}.png") for i in overlay_ids if (folder / "overlays" / f"{i}.png").is_file()}
    return {
        "metrics": metrics,
        "triage": triage_metrics(truth, malignancy),
        "segmentation": saliency_scores(records, folder / "saliency", mask_threshold) if with_masks else None,
        "infer_seconds_per_image": inference_seconds(run),
        "overlays": overlays,
        "fusion": (run.get("fusion") or {}).get("description"),
        "outputs": str(folder),
        "n_failed": run.get("n_failed", 0),
    }


# ------------------------------------------------------------------------------------------- compare


def run_compare(cfg: Mapping[str, Any], out_dir: PathLike) -> dict:
    """Run a whole comparison (see the module doc); returns the results dict written to results.json."""
    cfg = copy.deepcopy(dict(cfg))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    write_text(out / "compare_config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    systems = list(cfg["systems"])
    if systems == [CLASSIFIER]:
        return run_classifier_only(cfg, out)
    phases = Phases(phase_names(systems, bool(cfg["fusion_fit"])))
    budget = cfg["budget"]
    progress = bool(cfg["progress"])

    phases.start("data")
    ds, data_path = prepare_data(cfg, out)
    d = cfg["data"]
    for split in (d["train_split"], d["val_split"], d["test_split"]):
        if not ds.subset(split=split).records:
            raise DataError(f"{data_path}: split {split!r} has no images (splits: {', '.join(ds.splits()) or 'none'})")
    counts = {s: len(ds.subset(split=s)) for s in ds.splits()}
    phases.note(f"{len(ds)} images, classes {', '.join(ds.class_names)}; splits " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    runs: dict[str, dict] = {}
    if TWO_STAGE in systems:
        from classification.train import train_classifier

        from .baseline import train_unet

        phases.start("train segmentation", f"budget {budget['seg_minutes']} min")
        scfg = seg_stage_config(cfg, data_path, budget["seg_minutes"])
        runs["seg"] = run_stage("segmentation", out / "seg", scfg,
                                lambda: train_unet(scfg, ds, out / "seg", resume=True, progress=progress))
        phases.start("train classifier", f"budget {budget['cls_minutes']} min")
        ccfg = cls_stage_config(cfg, data_path, budget["cls_minutes"])
        if cfg["cls_proposals"]:
            from .proposals_stage import training_proposals

            ccfg["proposals"]["csv"] = str(training_proposals(runs["seg"]["best_checkpoint"], ds, d["train_split"],
                                                              infer_config(cfg), out / "proposals", progress))
            phases.note(f"classifier also trains on the segmenter's proposals: {ccfg['proposals']['csv']}")
        runs["cls"] = run_stage("classifier", out / "cls", ccfg,
                                lambda: train_classifier(ccfg, out / "cls", resume=True, dataset=ds))
    if SINGLE_STAGE in systems:
        from .baseline import train_unet

        minutes, epochs = baseline_budget(cfg, runs.get("seg"), runs.get("cls"))
        shown = "none" if minutes is None else f"{minutes:.1f} min"
        phases.start("train single-stage", f"budget {shown}" + (f", {epochs} epochs" if epochs else ""))
        bcfg = baseline_stage_config(cfg, data_path, minutes, epochs)
        runs["baseline"] = run_stage("single-stage", out / "baseline", bcfg,
                                     lambda: train_unet(bcfg, ds, out / "baseline", resume=True, progress=progress))

    icfg = infer_config(cfg)
    fusion_file = None
    if TWO_STAGE in systems and cfg["fusion_fit"]:
        phases.start("fit fusion", f"on split {d['val_split']}")
        fusion_file = fit_fusion_file(runs["seg"]["best_checkpoint"], runs["cls"]["best_checkpoint"], icfg, ds,
                                      d["val_split"], out / "fusion.json", progress)

    test_dir = link_split_images(ds, d["test_split"], out / "test_images")
    for system in systems:
        phases.start(f"infer {system}", f"{len(ds.subset(split=d['test_split']))} test images")
        folder = out / system
        if system == TWO_STAGE:
            from fusion.pipeline import Pipeline

            pipe = Pipeline(runs["seg"]["best_checkpoint"], runs["cls"]["best_checkpoint"], icfg,
                            classes=ds.class_names, fusion_file=fusion_file)
            summary = pipe.run_folder(test_dir, folder, progress=progress)
        else:
            from .baseline import run_baseline_folder

            summary = run_baseline_folder(runs["baseline"]["best_checkpoint"], test_dir, folder, icfg, progress=progress)
        if summary["n_failed"]:
            log.warning("%s: %d test image(s) failed: %s", system, summary["n_failed"], summary["failed"][:3])

    phases.start("evaluate", f"split {d['test_split']}")
    test_records = ds.subset(split=d["test_split"]).records
    overlay_ids = pick_overlays(test_records, int(cfg["report"]["overlays"]))
    results = {
        "dataset": dataset_info(cfg, ds, data_path, d["test_split"]),
        "seed": int(cfg["seed"]),
        "budget": budget_text(runs, systems),
        "systems": {},
        "training": runs,
        "notes": [],
        "config": cfg,
    }
    for system in systems:
        sysres = score_system(ds, d["test_split"], out / system, float(cfg["report"]["mask_threshold"]), overlay_ids)
        if system == TWO_STAGE:
            sysres["train_minutes"] = round(runs["seg"]["minutes"] + runs["cls"]["minutes"], 3)
        else:
            sysres["train_minutes"] = round(runs["baseline"]["minutes"], 3)
        results["systems"][system] = sysres
    results["notes"] = report_notes(results, runs, systems, cfg)

    phases.start("report")
    from .report import build_report

    report = build_report(results, out)
    results["report"] = str(report)
    results["wall_minutes"] = round((time.time() - phases.started) / 60, 2)
    phases.note(f"wrote {report}")
    return results


def fit_fusion_file(seg_ckpt: PathLike, cls_ckpt: PathLike, icfg: dict, ds: Dataset, split: str, path: Path,
                    progress: bool) -> Path:
    """``cytofuse fuse fit`` on the val split, once: later runs reuse ``fusion.json`` while the
    checkpoints it names are unchanged."""
    from fusion.pipeline import Pipeline

    from .fuse_fit import fit_fusion

    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        ck = saved.get("checkpoints") or {}
        if (ck.get("seg", {}).get("sha256") == sha256_file(seg_ckpt) and ck.get("cls", {}).get("sha256") == sha256_file(cls_ckpt)):
            log.info("    reusing %s (%s)", path, saved.get("selected"))
            return path
    pipe = Pipeline(seg_ckpt, cls_ckpt, icfg, classes=ds.class_names)
    report = fit_fusion(pipe, ds, split=split, progress=progress)
    write_json(path, report)
    log.info("    fusion chosen on %s: %s, box shrink %g (val accuracy %s)", split, report["selected"], report["box_shrink"],
             "n/a" if report["validation_accuracy"] is None else f"{report['validation_accuracy']:.4f}")
    return path


def dataset_info(cfg: Mapping[str, Any], ds: Dataset, path: Path, split: str) -> dict:
    test = ds.subset(split=split)
    synth = cfg["data"].get("synth")
    name = cfg.get("name") or ("synthetic lung cytology" if synth else path.name)
    shown = str(cfg["data"]["path"]) if not synth else f"{path} (cytofuse synth {', '.join(f'{k} {v}' for k, v in synth.items())})"
    return {
        "name": name,
        "path": shown,
        "format": ds.format,
        "classes": list(ds.class_names),
        "split": split,
        "n_images": len(test),
        "n_boxes": int(sum(r.n_boxes for r in test.records)),
        "n_healthy": int(sum(r.n_boxes == 0 for r in test.records)),
        "splits": {s: len(ds.subset(split=s)) for s in ds.splits()},
        "split_seed": int(cfg["data"]["split_seed"]),
        "n_problems": sum(p.severity == "error" for p in ds.problems),
        "problems": [str(p) for p in ds.problems if p.severity == "error"][:5],
    }


def budget_text(runs: Mapping[str, dict], systems: Sequence[str]) -> str:
    """The compute each system got, in wall-clock minutes and samples seen."""
    from cytocore import runtime

    parts = []
    if TWO_STAGE in systems:
        s, c = runs["seg"], runs["cls"]
        parts.append(f"two-stage = segmentation {s['minutes']:.1f} min ({s['epochs']} epochs, {s['samples']} patches) + "
                     f"classifier {c['minutes']:.1f} min ({c['epochs']} epochs, {c['samples']} crops) = "
                     f"{s['minutes'] + c['minutes']:.1f} min")
    if SINGLE_STAGE in systems:
        b = runs["baseline"]
        budget = "none" if b.get("budget_minutes") is None else f"{b['budget_minutes']:.1f} min"
        parts.append(f"single-stage budget {budget}, used {b['minutes']:.1f} min ({b['epochs']} epochs, {b['samples']} patches)")
    threads = runtime.runtime_info().get("threads") if "mindspore" in sys.modules else None
    where = f" on {threads} CPU thread(s)" if threads else ""
    return "; ".join(parts) + f". Training wall-clock{where}; a stage stops when its budget is used up (one validation pass may follow)"


def report_notes(results: Mapping[str, Any], runs: Mapping[str, dict], systems: Sequence[str], cfg: Mapping[str, Any]) -> list[str]:
    notes = []
    ds = results["dataset"]
    notes.append(f"Split: {', '.join(f'{k} {v}' for k, v in ds['splits'].items())} images (seed {ds['split_seed']}, "
                 "fixed in splits.csv); every system trained on the train split, chose its checkpoint on val "
                 f"and is scored on {ds['split']} ({ds['n_healthy']} healthy image(s) included).")
    if ds.get("n_problems"):
        notes.append(f"Data: {ds['n_problems']} annotation problem(s) skipped while reading (first: {ds['problems'][0]}).")
    if TWO_STAGE in systems:
        fusion = results["systems"][TWO_STAGE].get("fusion")
        how = "chosen on val by `cytofuse fuse fit`" if cfg.get("fusion_fit") else "from the config, not tuned"
        notes.append(f"Two-stage fusion rule: {fusion} ({how}).")
    if SINGLE_STAGE in systems:
        notes.append("Single-stage: the segmentation stage's U-Net with K+1 outputs (class-index targets); a box's class "
                     "probabilities are the mean softmax inside its component, a parent class (NSCLC) gets its "
                     "sub-types' mass (the targets paint SCC+NSCLC boxes as SCC); saliency = 1 − p(background).")
    notes.append("infer s/image: median per test image of segmentation + classification + fusion (graph compile and "
                 "file writing excluded by the median and the timer); Dice and Rand error: saliency ≥ "
                 f"{cfg['report']['mask_threshold']} against the masks, pooled over test images with a mask.")
    for system, sysres in results["systems"].items():
        for w in (sysres.get("metrics") or {}).get("warnings", [])[:3]:
            notes.append(f"{system}: {w}")
        if sysres.get("n_failed"):
            notes.append(f"{system}: {sysres['n_failed']} test image(s) failed in inference (see {sysres['outputs']}/run.json).")
    return notes


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


def classifier_report(results: Mapping[str, Any]) -> str:
    """A short markdown report of a classifier-only run (the detection report's table does not apply)."""
    m, ds, tr = results["metrics"], results["dataset"], results["training"]

    def f(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"

    lines = [
        f"# CytoFuse classifier — {ds['name']}",
        "",
        f"Data set: `{ds['path']}`, evaluated on split **{ds['split']}** ({m['n_items']} items; splits "
        f"{', '.join(f'{k} {v}' for k, v in ds['splits'].items())}). Seed {results['seed']}.",
        f"Training: {tr['minutes']:.1f} min, {tr['epochs']} epochs, {tr['samples']} crops seen "
        f"(budget {tr['budget_minutes']} min). Weights: the final epoch's ({Path(m['checkpoint']).name}), so the "
        "evaluated split chose nothing.",
        "",
        "| class | ROC AUC | AP | balanced accuracy (one-vs-rest, p ≥ 0.5) | items |",
        "|---|---|---|---|---|",
    ]
    for c in ds["classes"]:
        lines.append(f"| {c} | {f(m.get(f'auc_{c}'))} | {f(m.get(f'ap_{c}'))} | {f(m.get(f'bacc_{c}'))} | {m['n_per_class'][c]} |")
    lines.append(f"| **mean** | {f(m.get('mean_auc'))} | {f(m.get('mean_ap'))} | {f(m.get('mean_bacc'))} | {m['n_items']} |")
    lines.append("")
    if "argmax_accuracy" in m:
        lines.append(f"Arg-max class: accuracy {f(m['argmax_accuracy'])}, balanced accuracy (mean per-class recall) "
                     f"{f(m['argmax_balanced_accuracy'])}.")
    lines.append(f"Inference: {1000 * m['infer_seconds_per_item']:.1f} ms per item (batched, graph compile included).")
    return "\n".join(lines) + "\n"


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
    phases.start("train classifier", f"budget {cfg['budget']['cls_minutes']} min")
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
