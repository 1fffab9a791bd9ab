"""Weak supervision: the segmentation stage trained from boxes alone, via the classifier's CAMs.

Two steps, because segmentation must not import classification (they are sibling stages):

1. ``cytofuse weak-masks --cls CKPT --data DIR --out MASKDIR``: for every ground-truth box, the crop
   classifier's Grad-CAM of the box's class (its most specific set class: SCC rather than NSCLC)
   becomes a cell-shaped pseudo-mask inside the box (:mod:`segmentation.pseudo_masks`); each image's
   boxes are united into ``MASKDIR/<image_id>.png`` (binary 0/255, healthy images all 0).
2. ``cytofuse seg train --set targets.kind=mask --set targets.mask_dir=MASKDIR``: the U-Net learns
   from those masks as it would from drawn ones.

The folder holds ``weak_masks.json`` too (classifier checksum, settings, boxes per image that came
out empty); a second run with the same settings only does the images still missing.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from cytocore.atomic import write_json
from cytocore.errors import CytoFuseError, DataError
from cytocore.hashing import fingerprint, sha256_file
from cytocore.imageio import read_image, write_png
from cytocore.records import Dataset

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
MANIFEST = "weak_masks.json"


@dataclass
class CamMaskOptions:
    """How CAMs become pseudo-masks (``targets.cam`` of a targets-compare config, weak-masks flags)."""

    threshold: float = 0.5  # fraction of the box's strongest CAM value
    stride: Optional[int] = None  # feature map: None = the classifier's last (coarsest), 16 or 8 = finer
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) <= 1.0:
            raise CytoFuseError(f"CAM threshold must be in (0, 1], got {self.threshold}")
        if self.stride is not None and int(self.stride) not in (8, 16, 32):
            raise CytoFuseError(f"CAM stride must be 8, 16, 32 or null, got {self.stride}")
        self.threshold = float(self.threshold)
        self.stride = None if self.stride is None else int(self.stride)
        self.batch_size = max(1, int(self.batch_size))


def most_specific_class(row: np.ndarray, class_names: Sequence[str], hierarchy: dict[str, list[str]]) -> int:
    """Index (in ``class_names``) of a box's most specific set class, or -1 when none is set.

    A set class that is the parent of another set class (NSCLC of SCC) is skipped: the sub-type's
    CAM points at what makes the cell that sub-type. Ties go to header order.
    """
    names = list(class_names)
    set_names = [names[i] for i in np.flatnonzero(np.asarray(row) > 0)]
    if not set_names:
        return -1
    leaves = [n for n in set_names if not any(c in set_names for c in hierarchy.get(n, []))]
    return names.index((leaves or set_names)[0])


def box_classes(labels: np.ndarray, data_classes: Sequence[str], classifier_classes: Sequence[str]) -> np.ndarray:
    """Per box, the classifier's output index of its most specific class (-1: no class set)."""
    from fusion.rules import resolve_hierarchy

    hierarchy = resolve_hierarchy("auto", data_classes)
    to_clf = {c: i for i, c in enumerate(classifier_classes)}
    out = np.full(len(labels), -1, np.int64)
    for k, row in enumerate(np.asarray(labels).reshape(len(labels), -1)):
        i = most_specific_class(row, data_classes, hierarchy)
        if i >= 0:
            out[k] = to_clf[data_classes[i]]
    return out


def image_cam_mask(classifier: Any, image: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
                   options: CamMaskOptions = CamMaskOptions()) -> tuple[np.ndarray, int]:
    """An image's pseudo-mask (bool, image size) from its boxes, and how many boxes came out empty.

    ``classes`` holds each box's class index in the classifier's order; -1 (a box with no class)
    uses the classifier's own top class for that crop.
    """
    from classification.attribution import gradcam
    from classification.crops import extract_crops, square_windows
    from segmentation.pseudo_masks import union_pseudo_masks

    shape = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if not len(boxes):
        return np.zeros(shape, bool), 0
    crop = classifier.crop
    crops = extract_crops(image, boxes, crop)
    windows = square_windows(boxes, crop.margin, crop.min_side)
    classes = np.asarray(classes, np.int64).copy()
    unknown = classes < 0
    if unknown.any():
        classes[unknown] = classifier.predict_crops(crops[unknown], options.batch_size).argmax(axis=1)
    cams = gradcam(classifier, crops, classes, stride=options.stride, batch_size=options.batch_size)
    return union_pseudo_masks(shape, cams, windows, boxes, options.threshold)


def _settings(cls_path: Path, options: CamMaskOptions) -> dict:
    return {"classifier": str(cls_path), "classifier_sha256": sha256_file(cls_path),
            "threshold": options.threshold, "stride": options.stride}


def make_cam_masks(cls_checkpoint: PathLike, dataset: Dataset, out_dir: PathLike,
                   options: CamMaskOptions = CamMaskOptions(), progress: bool = True) -> dict:
    """Write ``out_dir/<image_id>.png`` (0/255) for every image of ``dataset``; returns the manifest.

    Resumable: images already written under the same classifier and settings are kept.
    """
    from tqdm.auto import tqdm

    from classification.model_io import load_classifier

    cls_path = Path(cls_checkpoint)
    classifier = load_classifier(cls_path)
    missing = [c for c in dataset.class_names if c not in classifier.class_names]
    if missing and any(r.n_boxes for r in dataset.records):
        raise DataError(f"{dataset.root or 'data set'}: classes {', '.join(missing)} are not among the classifier's "
                        f"({', '.join(classifier.class_names)}, {cls_path}); use a classifier trained on this data set's classes")
    out = Path(out_dir)
    real = {Path(r.mask_path).resolve().parent for r in dataset.records if r.mask_path is not None}
    if out.resolve() in real:
        raise CytoFuseError(f"{out}: holds the data set's own masks; write the pseudo-masks to another folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(cls_path, options)
    manifest_path = out / MANIFEST
    images: dict[str, dict] = {}
    if manifest_path.is_file():
        try:
            saved = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        if {k: saved.get(k) for k in settings if k != "classifier"} == {k: v for k, v in settings.items() if k != "classifier"}:
            images = {i: v for i, v in (saved.get("images") or {}).items() if (out / f"{i}.png").is_file()}
        else:
            log.info("%s: made with another classifier or settings; remaking every mask", out)
    todo = [r for r in dataset.records if r.image_id not in images]
    if len(todo) < len(dataset.records):
        log.info("%d of %d pseudo-masks already in %s: kept", len(dataset.records) - len(todo), len(dataset.records), out)

    def save_manifest() -> dict:
        boxes = sum(v["boxes"] for v in images.values())
        empty = sum(v["empty_boxes"] for v in images.values())
        manifest = {**settings, **{"options": asdict(options)}, "n_images": len(images), "n_boxes": boxes,
                    "n_empty_boxes": empty, "images": images}
        write_json(manifest_path, manifest)
        return manifest

    manifest = save_manifest() if not todo else {}
    for k, r in enumerate(tqdm(todo, desc="CAM masks", unit="img", disable=not progress or not todo)):
        image = read_image(r.path)
        if image.shape[:2] != (r.height, r.width):
            raise DataError(f"{r.path}: image is {image.shape[1]}x{image.shape[0]} but its record says {r.width}x{r.height}")
        classes = box_classes(r.labels, dataset.class_names, classifier.class_names) if r.n_boxes else np.zeros(0, np.int64)
        mask, empty = image_cam_mask(classifier, image, r.boxes, classes, options)
        write_png(out / f"{r.image_id}.png", mask.astype(np.uint8) * 255)
        images[r.image_id] = {"boxes": r.n_boxes, "empty_boxes": int(empty), "pixels": int(mask.sum())}
        if (k + 1) % 20 == 0 or k + 1 == len(todo):  # a killed run keeps its finished images
            manifest = save_manifest()
    if manifest.get("n_empty_boxes"):
        log.warning("%d of %d boxes gave no CAM evidence for their class: no pseudo-mask there (a weak classifier?)",
                    manifest["n_empty_boxes"], manifest["n_boxes"])
    return manifest


# ------------------------------------------------------------------------- comparison of target kinds
#
# ``cytofuse targets-compare``: the segmentation stage trained three ways on one split and budget —
# the real masks, the inscribed ellipses of the boxes, and CAM pseudo-masks from the boxes — so the
# table says what weak supervision costs against drawn masks. Built from the experiments'
# shared pieces: stage configs and resumable ``run_stage`` (experiments.stages), data and split
# file, test images and scoring of fused outputs (experiments.runkit).

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TARGETS_DEFAULTS = CONFIG_DIR / "targets_defaults.yaml"
KIND_LABELS = {"mask": "real masks", "ellipse": "inscribed ellipses (boxes)", "refined": "refined boxes (stain)",
               "cam": "CAM pseudo-masks (boxes + classifier)"}


def load_targets_config(path: Optional[PathLike] = None, overrides: Sequence[str] = ()) -> dict:
    """``compare_defaults.yaml`` + ``targets_defaults.yaml`` ← the user's YAML ← ``--set``, checked."""
    from cytocore.config import load_config, merge, read_yaml

    from .stages import DEFAULTS, refuse_stage_budgets

    base = merge(read_yaml(DEFAULTS), read_yaml(TARGETS_DEFAULTS), str(TARGETS_DEFAULTS), strict=False)
    cfg = load_config(base, path, overrides)
    refuse_stage_budgets(cfg, path or "config")
    t = cfg["targets"]
    kinds = [t["kinds"]] if isinstance(t["kinds"], str) else list(t["kinds"] or [])
    allowed = tuple(KIND_LABELS)
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise CytoFuseError(f"{path or 'config'}: targets.kinds must list distinct kinds of {', '.join(allowed)}, got {t['kinds']!r}")
    t["kinds"] = kinds
    CamMaskOptions(**t["cam"])  # checked now, not after the first training
    return cfg


def real_mask_validation(checkpoint: PathLike, ds: Dataset, seg_cfg: dict) -> dict:
    """Validation Dice, IoU and adapted Rand error of a trained U-Net against the **real** masks.

    A run's own log scores it against its own targets (ellipses, pseudo-masks), which says nothing
    about cells; this re-runs the segmentation stage's validator (same tiles, scale and threshold)
    with the data set's masks as truth, so the target kinds are judged on one scale.
    """
    from segmentation.model_io import load_segmenter
    from segmentation.patches import load_samples
    from segmentation.train import Validator, split_records

    _, val = split_records(ds, seg_cfg)
    val = [r for r in val if r.mask_path is not None]
    if not val:
        raise DataError(f"{ds.root or 'data set'}: no validation image has a mask to score against")
    v = seg_cfg["validation"]
    segmenter = load_segmenter(checkpoint, mode=seg_cfg["runtime"]["mode"])
    samples = load_samples(val, scale=segmenter.scale, mode="binary", kind="mask")
    validator = Validator(samples, int(v["tile"]), int(v["batch_size"]), "binary", 0, [], float(v["threshold"]), True)
    out = validator(segmenter.network)
    out["val_images"] = len(samples)
    return out


def cam_folder_name(cls_checkpoint: PathLike, options: CamMaskOptions) -> str:
    """``cam_masks-<digest>``: one folder per classifier and CAM settings.

    The segmentation run trained on the masks names the folder in its config, so another
    classifier or threshold changes that config's fingerprint and the finished run is not
    mistaken for one trained on the new masks.
    """
    settings = {k: v for k, v in _settings(Path(cls_checkpoint), options).items() if k != "classifier"}
    digest = fingerprint(settings, length=10)
    return f"cam_masks-{digest}"


def kind_seg_config(cfg: dict, kind: str, data_path: Path, mask_dir: Optional[Path]) -> dict:
    """The segmentation stage's config for one target kind (same budget, seed and options otherwise)."""
    from .stages import seg_stage_config

    scfg = seg_stage_config(cfg, data_path, cfg["budget"]["seg_minutes"])
    if kind == "cam":
        scfg["targets"].update(kind="mask", mask_dir=str(mask_dir))
    else:
        scfg["targets"].update(kind=kind, mask_dir=None)
    return scfg


def classifier_checkpoint(cfg: dict, ds: Dataset, data_path: Path, out: Path, progress: bool) -> tuple[Optional[Path], Optional[dict]]:
    """The classifier for the CAMs and the fused test: ``targets.classifier``, else one trained on the
    boxes (``budget.cls_minutes``), else none when neither CAMs nor the fused test need one."""
    from .stages import cls_stage_config, repo_path, run_stage

    t = cfg["targets"]
    if t["classifier"]:
        path = repo_path(t["classifier"])
        if not path.is_file():
            raise CytoFuseError(f"targets.classifier: {path} not found")
        return path, None
    if "cam" not in t["kinds"] and not t["fused_eval"]:
        return None, None
    from classification.train import train_classifier

    ccfg = cls_stage_config(cfg, data_path, cfg["budget"]["cls_minutes"])
    run = run_stage("classifier", out / "cls", ccfg, lambda: train_classifier(ccfg, out / "cls", resume=True, dataset=ds))
    return Path(run["best_checkpoint"]), run


def run_targets_compare(cfg: dict, out_dir: PathLike) -> dict:
    """Train and score the segmentation stage once per target kind; write targets.md and targets.json."""
    import time

    from cytocore.atomic import write_text
    from cytocore.config import dump_yaml
    from segmentation.pseudo_masks import target_agreement
    from segmentation.targets import data_scale

    from .baseline import train_unet
    from .runkit import Phases, dataset_info, link_split_images, prepare_data, score_system
    from .stages import infer_config, run_stage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "targets_config.yaml", dump_yaml(cfg))
    t, d = cfg["targets"], cfg["data"]
    kinds, progress = list(t["kinds"]), bool(cfg["progress"])
    fused = bool(t["fused_eval"])
    names = ["data", "classifier", "CAM masks", "target agreement"] + [f"train {k}" for k in kinds]
    names += [f"test {k}" for k in kinds] if fused else []
    phases = Phases(names + ["report"])

    phases.start("data")
    ds, data_path = prepare_data(cfg, out)
    if not ds.has_masks:
        raise DataError(f"{data_path}: no masks/<id>.png: comparing target kinds needs real masks to score against")
    scale = data_scale(kind_seg_config(cfg, "mask", data_path, None)["data"]["scale"],
                       [r for r in ds.records if r.split == d["train_split"]])

    phases.start("classifier")
    cls_ckpt, cls_run = classifier_checkpoint(cfg, ds, data_path, out, progress)
    if cls_ckpt is not None:
        phases.note(f"classifier: {cls_ckpt}")

    mask_dir = None
    cam_manifest = None
    if "cam" in kinds:
        phases.start("CAM masks", f"threshold {t['cam']['threshold']}, stride {t['cam']['stride']}")
        options = CamMaskOptions(**t["cam"])
        mask_dir = out / cam_folder_name(cls_ckpt, options)
        cam_manifest = make_cam_masks(cls_ckpt, ds, mask_dir, options, progress=progress)
        cam_manifest = {k: v for k, v in cam_manifest.items() if k != "images"}

    phases.start("target agreement", f"split {d['train_split']}, scale {scale:g}")
    agreement: dict[str, Optional[dict]] = {}
    for kind in kinds:
        if kind == "mask":
            agreement[kind] = {"dice": 1.0, "iou": 1.0, "dice_image": 1.0}
        elif kind == "cam":
            agreement[kind] = target_agreement(ds, "mask", mask_dir=mask_dir, scale=scale, split=d["train_split"])
        else:
            agreement[kind] = target_agreement(ds, kind, scale=scale, split=d["train_split"])
        phases.note(f"{kind}: target Dice {agreement[kind]['dice']:.4f}" if agreement[kind] else f"{kind}: no masks")

    runs: dict[str, dict] = {}
    validation: dict[str, dict] = {}
    for kind in kinds:
        phases.start(f"train {kind}", f"budget {cfg['budget']['seg_minutes']} min")
        scfg = kind_seg_config(cfg, kind, data_path, mask_dir)
        folder = out / f"seg_{kind}"
        runs[kind] = run_stage(f"segmentation ({kind})", folder, scfg,
                               lambda c=scfg, f=folder: train_unet(c, ds, f, resume=True, progress=progress))
        validation[kind] = real_mask_validation(runs[kind]["best_checkpoint"], ds, scfg)
        phases.note(f"{kind}: val Dice {validation[kind]['val_dice']:.4f}, Rand error {validation[kind]['val_rand_error']:.4f} (real masks)")

    tests: dict[str, dict] = {}
    if fused and cls_ckpt is not None:
        from fusion.pipeline import Pipeline

        icfg = infer_config(cfg)
        test_dir = link_split_images(ds, d["test_split"], out / "test_images")
        for kind in kinds:
            phases.start(f"test {kind}", f"fused pipeline on split {d['test_split']}")
            folder = out / f"fused_{kind}"
            pipe = Pipeline(runs[kind]["best_checkpoint"], cls_ckpt, icfg, classes=ds.class_names)
            pipe.run_folder(test_dir, folder, progress=progress)
            tests[kind] = score_system(ds, d["test_split"], folder, float(cfg["report"]["mask_threshold"]), [])

    phases.start("report")
    results = {
        "dataset": dataset_info(cfg, ds, data_path, d["test_split"]),
        "seed": int(cfg["seed"]),
        "scale": scale,
        "kinds": kinds,
        "classifier": None if cls_ckpt is None else str(cls_ckpt),
        "classifier_run": cls_run,
        "cam_masks": cam_manifest,
        "target_agreement": agreement,
        "validation": validation,
        "training": runs,
        "test": {k: _test_summary(v) for k, v in tests.items()},
        "config": cfg,
    }
    results["wall_minutes"] = round((time.time() - phases.started) / 60, 2)
    write_json(out / "targets.json", results)
    write_text(out / "targets.md", targets_report(results))
    phases.note(f"wrote {out / 'targets.md'}")
    return results


def _test_summary(scored: dict) -> dict:
    """The numbers of a fused test run that the targets table shows (full metrics stay in its folder)."""
    m = scored.get("metrics") or {}
    seg = scored.get("segmentation") or {}
    tri = scored.get("triage") or {}
    return {
        "accuracy": m.get("accuracy"), "explainability_auc": m.get("explainability_auc"),
        "model_score": m.get("model_score"), "froc": m.get("froc"),
        "test_dice": seg.get("dice"), "test_rand_error": seg.get("rand_error"),
        "image_auc": tri.get("roc_auc"),
        "outputs": scored.get("outputs"),
    }


def targets_report(results: dict) -> str:
    """``targets.md``: one row per target kind."""
    def f(v: Any, digits: int = 3) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "–"
        return f"{float(v):.{digits}f}"

    ds = results["dataset"]
    kinds, agree, val, runs, test = (results[k] for k in ("kinds", "target_agreement", "validation", "training", "test"))
    lines = [
        f"# Segmentation targets compared — {ds['name']}",
        "",
        f"Data `{ds['path']}`, classes {', '.join(ds['classes'])}; splits "
        f"{', '.join(f'{k} {v}' for k, v in ds['splits'].items())} (seed {ds['split_seed']}). The same U-Net, "
        f"seed {results['seed']} and budget trained once per target kind.",
        "",
        "| targets | target Dice vs real masks (train) | val Dice | val IoU | val adapted Rand error | train min | epochs |"
        + (" test accuracy (FROC) | test explainability AUC | test model score |" if test else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|---|" if test else ""),
    ]
    for k in kinds:
        a, v, r = agree.get(k) or {}, val[k], runs[k]
        row = (f"| {KIND_LABELS[k]} | {f(a.get('dice'))} | {f(v.get('val_dice'))} | {f(v.get('val_iou'))} | "
               f"{f(v.get('val_rand_error'))} | {f(r.get('minutes'), 2)} | {r.get('epochs')} |")
        if test:
            s = test.get(k, {})
            row += f" {f(s.get('accuracy'))} | {f(s.get('explainability_auc'))} | {f(s.get('model_score'))} |"
        lines.append(row)
    lines += [
        "",
        f"- Target Dice: each kind's training targets against the real masks, pooled over the train split's pixels at "
        f"the training scale ({results['scale']:g}); real masks are 1 by definition.",
        "- Val Dice / IoU / Rand error: the best checkpoint of each run against the **real** masks of the validation "
        "split (the segmentation stage's validator, threshold and tiles), whatever it was trained on.",
    ]
    cam = results.get("cam_masks")
    if cam:
        lines.append(f"- CAM pseudo-masks: Grad-CAM of each box's most specific class from `{results['classifier']}`, "
                     f"threshold {cam['threshold']} of the box's maximum, largest component, clipped to the box "
                     f"(stride {cam['stride'] or 'last'}); {cam['n_empty_boxes']} of {cam['n_boxes']} boxes gave no evidence "
                     "and stay background.")
    if test:
        lines.append(f"- Test: the fused pipeline (U-Net of that row + the same classifier) on split {ds['split']} "
                     f"({ds['n_images']} images, {ds['n_boxes']} boxes), scored with the challenge metric "
                     "(experiments.evaluate); model score = 0.8 accuracy + 0.2 explainability.")
    lines.append(f"- Wall time of this run: {results['wall_minutes']:.1f} min (finished stages are reused on a rerun).")
    return "\n".join(lines) + "\n"
