"""The shared run toolkit of the experiment commands: data, progress, test images and scoring.

What ``cytofuse compare``, ``targets-compare`` and the demo all do around the training stages
(:mod:`experiments.stages`): read or generate the data set and fix its split (``splits.csv``),
announce the phases, link the test images into one folder, and score a system's inference folder
with the official metric (``metrics.json``) plus Dice, Rand error, triage and speed.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cytocore.atomic import write_json
from cytocore.errors import CytoFuseError, DataError
from cytocore.records import Dataset

from .stages import repo_path

log = logging.getLogger("cytofuse")

#: The systems an experiment can train and score.
TWO_STAGE, SINGLE_STAGE, CLASSIFIER = "two-stage", "single-stage", "classifier"
SYSTEMS = (TWO_STAGE, SINGLE_STAGE, CLASSIFIER)
#: The per-class ensemble of the first two (experiments/ensemble.py): scored beside them, not trained.
ENSEMBLE = "ensemble"
SYNTH_DEFAULTS = {"images": 100, "seed": 0, "size": 512}


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
                       predictions_path=predictions_path, ceiling=True)
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
