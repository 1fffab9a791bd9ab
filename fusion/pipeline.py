"""Fused inference: segment, classify the objects' boxes, fuse the scores, write what users open.

:class:`Pipeline` is a thin orchestrator. The work is done by the segmentation stage (tiled
probability map → objects with boxes and a seg score), the classification stage (class
probabilities of each box's crop), and the small network-free functions of this package (fusion
rules, NMS, box shrink, writers), each tested alone.

A folder run is resumable and safe to interrupt: each finished image leaves its per-image files and
``parts/<image_id>.csv`` (its detections) and then ``parts/<image_id>.json`` (its record, written
last, so it marks the image as done). A second run of the same command skips those images, and the
combined tables are always rebuilt from the parts at the end. The record holds a fingerprint of the
checkpoints and config, so changing either redoes the images instead of mixing two models' outputs.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from cytocore.atomic import write_json, write_with
from cytocore.config import load_config, merge, read_yaml
from cytocore.errors import CheckpointError, CytoFuseError, DataError
from cytocore.hashing import fingerprint, sha256_file
from cytocore.imageio import list_images, probability_to_uint8, read_image, write_png

from .geometry import box_areas, clip_boxes, shrink_boxes
from .nms import class_floors, select_detections
from .rules import FusionRule, fuse_scores
from .triage import TriageModel

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
PARTS_DIR = "parts"
#: Config sections that change speed but not results: left out of the resume fingerprint.
NOT_IN_FINGERPRINT = ("runtime",)


# ------------------------------------------------------------------------------------------- config


def default_config() -> dict:
    return read_yaml(DEFAULT_CONFIG)


def load_fusion_config(
    config: Union[None, PathLike, Mapping[str, Any]] = None,
    overrides: Sequence[str] = (),
    fusion_file: Optional[PathLike] = None,
) -> dict:
    """Defaults ← a YAML file or dict ← a ``fusion.json`` from ``fuse fit`` ← ``--set`` overrides.

    ``--set`` comes last so an explicit command-line value (say ``box_shrink=1``) wins over the
    fitted file, which is how its effect is measured.
    """
    if config is None or isinstance(config, (str, Path)):
        cfg = load_config(default_config(), config)
    else:
        cfg = merge(default_config(), dict(config), "config")
    if fusion_file is not None:
        cfg = apply_fusion_file(cfg, fusion_file)
    if overrides:
        source = cfg.pop("fusion_source", None)
        cfg = load_config(cfg, None, overrides)
        if source is not None:
            cfg["fusion_source"] = source
    return cfg


def read_fusion_file(path: PathLike) -> dict:
    """Read and check a ``fusion.json`` written by ``cytofuse fuse fit``."""
    path = Path(path)
    if not path.is_file():
        raise CytoFuseError(f"{path}: fusion file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CytoFuseError(f"{path}: not a JSON fusion file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("fusion"), dict) or "rule" not in data["fusion"]:
        raise CytoFuseError(f"{path}: not a fusion file from `cytofuse fuse fit` (needs a 'fusion' block with a 'rule')")
    return data


def apply_fusion_file(cfg: dict, path: PathLike) -> dict:
    """The config with its ``fusion`` block (and ``box_shrink``) taken from a ``fusion.json``."""
    data = read_fusion_file(path)
    out = copy.deepcopy(cfg)
    block = {k: v for k, v in data["fusion"].items() if k in ("rule", "weight", "hierarchy", "logistic", "specimen_k")}
    out["fusion"] = merge(out["fusion"], block, str(path))
    if data.get("triage"):
        out["triage"] = data["triage"]
    if "box_shrink" in data:
        out["box_shrink"] = float(data["box_shrink"])
    out["fusion_source"] = str(path)
    return out


# ---------------------------------------------------------------------------------- network-free core


@dataclass
class Candidates:
    """What the two networks say about one image, before fusion: the stage boundary ``fuse fit`` caches."""

    probability: np.ndarray  # (H, W) foreground probability (the saliency map): float in [0, 1], or uint8 0..255 for huge images
    boxes: np.ndarray  # (N, 4) pixel xyxy of the segmented objects
    seg_scores: np.ndarray  # (N,) segmentation score of each object
    object_area: np.ndarray  # (N,) pixels in each object
    cls_probs: np.ndarray  # (N, K) classifier probabilities

    def __len__(self) -> int:
        return int(len(self.boxes))


@dataclass
class DetectSettings:
    """The post-fusion selection and geometry options, read once from the config."""

    floors: np.ndarray
    iou: float = 0.5
    containment: Optional[float] = 0.8
    max_detections: Optional[int] = 300
    box_shrink: float = 1.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], class_names: Sequence[str]) -> "DetectSettings":
        nms_cfg = cfg.get("nms") or {}
        try:
            floors = class_floors(cfg.get("score_floor", 0.0), class_names)
        except ValueError as exc:
            raise CytoFuseError(f"config score_floor: {exc}") from None
        containment = nms_cfg.get("containment")
        max_det = cfg.get("max_detections")
        shrink = float(cfg.get("box_shrink", 1.0))
        if not 0.0 < shrink <= 2.0:
            raise CytoFuseError(f"config box_shrink: must be in (0, 2], got {shrink}")
        return cls(
            floors=floors,
            iou=float(nms_cfg.get("iou", 0.5)),
            containment=None if containment is None else float(containment),
            max_detections=None if max_det is None else int(max_det),
            box_shrink=shrink,
        )


def choose_labels(scores: np.ndarray, class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]]) -> np.ndarray:
    """The reported class of each detection: the best-scoring one, preferring a child on a tie.

    After the hierarchy rule NSCLC ties with its best sub-type by construction; the sub-type
    (SCC or AC) is the more informative name to show a pathologist.
    """
    s = np.asarray(scores, np.float64).reshape(-1, len(class_names))
    names = np.asarray(list(class_names), dtype=object)
    if not len(s):
        return np.zeros(0, dtype=object)
    parents = {class_names.index(p) for p in hierarchy}
    # A tiny penalty on parents breaks exact ties in favour of children without changing real order.
    adjusted = s - np.array([1e-12 if j in parents else 0.0 for j in range(len(class_names))])
    return names[adjusted.argmax(axis=1)]


def detections_from_candidates(
    image_id: str,
    candidates: Candidates,
    width: int,
    height: int,
    class_names: Sequence[str],
    rule: FusionRule,
    settings: DetectSettings,
) -> pd.DataFrame:
    """Fuse, select (floor, NMS, cap), shrink and tabulate one image's candidates.

    NMS runs on the boxes as segmented; the shrink is applied to the survivors only, since it is a
    reporting choice made for the metric, not a change of which object is which.
    """
    from cytocore.writers import detections_frame

    fused = fuse_scores(candidates.seg_scores, candidates.cls_probs, rule, class_names)
    keep = select_detections(
        candidates.boxes, fused, settings.floors, settings.iou, settings.containment, settings.max_detections
    )
    boxes = clip_boxes(shrink_boxes(np.asarray(candidates.boxes, np.float64)[keep], settings.box_shrink), width, height)
    valid = box_areas(boxes) > 0
    keep, boxes = keep[valid], boxes[valid]
    frame = detections_frame(
        image_id, boxes, fused[keep], class_names, (width, height), seg_scores=np.asarray(candidates.seg_scores)[keep]
    )
    frame["object_area"] = np.asarray(candidates.object_area, np.float64)[keep]
    frame["label"] = choose_labels(fused[keep], list(class_names), rule.hierarchy)
    return frame


@dataclass
class ImageResult:
    """One image's fused output."""

    image_id: str
    width: int
    height: int
    probability: np.ndarray
    detections: pd.DataFrame
    class_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))

    @property
    def malignancy(self) -> float:
        """The image-level triage score: the highest fused class score of any detection (0 if none)."""
        return malignancy_score(self.detections, self.class_names)


def malignancy_score(detections: pd.DataFrame, class_names: Sequence[str], triage: Optional[Mapping[str, Any]] = None) -> float:
    """The image's triage score: the fitted image-level model of ``fusion.json`` (``triage``) when
    there is one, else the highest fused class score of any detection (0 if none)."""
    scores = detections[[f"p_{c}" for c in class_names]].to_numpy(np.float64) if len(detections) else np.zeros((0, len(class_names)))
    model = TriageModel.from_dict(triage) if triage else None
    if model is not None:
        return model.score(scores)
    return float(scores.max()) if len(scores) else 0.0


# --------------------------------------------------------------------------------------- the pipeline


class Pipeline:
    """Segmentation + classification checkpoints and a config, ready to run on images.

    ``classes`` (optional) is the class list the user expects; a classifier trained on another list
    is refused with a one-line :class:`CheckpointError` instead of writing mislabelled columns.
    """

    def __init__(
        self,
        seg_checkpoint: PathLike,
        cls_checkpoint: PathLike,
        config: Union[None, PathLike, Mapping[str, Any]] = None,
        *,
        classes: Optional[Sequence[str]] = None,
        fusion_file: Optional[PathLike] = None,
        overrides: Sequence[str] = (),
    ) -> None:
        from cytocore import runtime

        self.config = load_fusion_config(config, overrides, fusion_file)
        rt = self.config.get("runtime") or {}
        runtime.setup(seed=rt.get("seed", 0), threads=rt.get("threads"))
        self.seg_path = Path(seg_checkpoint)
        self.cls_path = Path(cls_checkpoint)
        self.segmenter = _load_segmenter(self.seg_path)
        self.classifier = _load_classifier(self.cls_path)
        self.class_names: list[str] = list(self.classifier.class_names)
        if classes is not None:
            expected = [str(c) for c in classes]
            if sorted(expected) != sorted(self.class_names):
                raise CheckpointError(
                    f"{self.cls_path}: the classifier predicts classes {', '.join(self.class_names)} but "
                    f"{', '.join(expected)} were expected (--classes); use a classifier trained on those classes"
                )
        try:
            self.rule = FusionRule.from_config(self.config["fusion"], self.class_names)
            self.settings = DetectSettings.from_config(self.config, self.class_names)
        except ValueError as exc:
            source = self.config.get("fusion_source", "config")
            raise CytoFuseError(f"{source}: {exc}") from None
        self._seg_options = self._segmentation_options()
        self._hashes: dict[str, str] = {}

    # ---------------------------------------------------------------- one image

    def _segmentation_options(self) -> tuple[dict, dict]:
        """Prediction and post-processing options: segmentation defaults ← the checkpoint's training
        config and validated threshold ← this config's ``segmentation: {predict, postprocess}``."""
        from segmentation.postprocess import postprocess_config
        from segmentation.predict import predict_config, tuned_postprocess

        user = dict(self.config.get("segmentation") or {})
        unknown = sorted(set(user) - {"predict", "postprocess"})
        if unknown:
            raise CytoFuseError(f"config segmentation: unknown option(s) {', '.join(unknown)} (known: predict, postprocess)")
        saved = (getattr(self.segmenter, "meta", {}) or {}).get("config") or {}
        post_saved = {"threshold": float(getattr(self.segmenter, "threshold", 0.5)), **(saved.get("postprocess") or {}),
                      **tuned_postprocess(getattr(self.segmenter, "meta", None))}  # chosen on val by FROC
        try:
            predict = predict_config({**(saved.get("predict") or {}), **(user.get("predict") or {})})
            post = postprocess_config({**post_saved, **(user.get("postprocess") or {})})
        except (ValueError, CytoFuseError) as exc:
            raise CytoFuseError(f"config segmentation: {exc}") from None
        return predict, post

    def candidates(self, image: np.ndarray) -> Candidates:
        """Run both networks on one RGB uint8 image (any size): objects, seg scores, class probabilities."""
        return self._candidates(image, {})

    def _candidates(self, image: np.ndarray, timings: dict[str, float]) -> Candidates:
        from classification.predict import classify_boxes
        from segmentation.predict import segment_image

        t0 = time.perf_counter()
        predict_cfg, post_cfg = self._seg_options
        seg = segment_image(image, self.segmenter, predict_cfg, post_cfg)
        inst = seg.instances
        boxes = inst[["x0", "y0", "x1", "y1"]].to_numpy(np.float64).reshape(-1, 4)
        score_col = "seg_max" if str(self.config.get("seg_score", "mean")) == "max" else "seg_mean"
        seg_scores = inst[score_col].to_numpy(np.float64).reshape(-1)
        area = inst["area"].to_numpy(np.float64).reshape(-1) if "area" in inst else box_areas(boxes)
        t1 = time.perf_counter()
        batch = int((self.config.get("classification") or {}).get("batch_size", 32))
        if len(boxes):
            probs = np.asarray(classify_boxes(image, boxes, self.classifier, batch_size=batch), np.float64)
        else:
            probs = np.zeros((0, len(self.class_names)))
        t2 = time.perf_counter()
        timings["segment"] = timings.get("segment", 0.0) + (t1 - t0)
        timings["classify"] = timings.get("classify", 0.0) + (t2 - t1)
        return Candidates(seg.probability, boxes, seg_scores, area, probs.reshape(len(boxes), -1))

    def detect(self, image_id: str, candidates: Candidates, width: int, height: int, rule: Optional[FusionRule] = None,
               settings: Optional[DetectSettings] = None) -> pd.DataFrame:
        return detections_from_candidates(
            image_id, candidates, width, height, self.class_names, rule or self.rule, settings or self.settings
        )

    def run_image(self, image: np.ndarray, image_id: str) -> ImageResult:
        """Detections and the probability map of one RGB uint8 image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"image {image_id!r}: expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        timings: dict[str, float] = {}
        cand = self._candidates(image, timings)
        t0 = time.perf_counter()
        height, width = image.shape[:2]
        detections = self.detect(image_id, cand, width, height)
        timings["fuse"] = time.perf_counter() - t0
        return ImageResult(image_id, width, height, cand.probability, detections, list(self.class_names), timings)

    # ---------------------------------------------------------------- a folder

    def checkpoint_info(self) -> dict:
        """Paths, sha256 and metadata of both checkpoints (for ``run.json`` and the resume fingerprint)."""
        if not self._hashes:
            self._hashes = {"seg": sha256_file(self.seg_path), "cls": sha256_file(self.cls_path)}
        return {
            "seg": {"path": str(self.seg_path), "sha256": self._hashes["seg"], "meta": _json_safe(getattr(self.segmenter, "meta", {}))},
            "cls": {"path": str(self.cls_path), "sha256": self._hashes["cls"], "meta": _json_safe(getattr(self.classifier, "meta", {}))},
        }

    def fingerprint(self) -> str:
        info = self.checkpoint_info()
        cfg = {k: v for k, v in self.config.items() if k not in NOT_IN_FINGERPRINT and k != "fusion_source"}
        return fingerprint({"seg": info["seg"]["sha256"], "cls": info["cls"]["sha256"], "config": cfg,
                            "classes": self.class_names})

    def run_folder(self, images_dir: PathLike, out_dir: PathLike, progress: bool = True) -> dict:
        """Run every image of a folder into ``out_dir``; returns the summary also written to ``run.json``."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from cytocore import runtime

        started = time.time()
        out = Path(out_dir)
        paths = list_images(images_dir)
        if not paths:
            raise DataError(f"{images_dir}: no images (.bmp, .png, .jpg, .tif) in this folder")
        fingerprint = self.fingerprint()
        ids, failed = _assign_ids(paths)
        done: dict[str, dict] = {}
        todo: list[tuple[str, Path]] = []
        for image_id, path in ids.items():
            record = _read_part_record(out, image_id)
            if record is not None and record.get("fingerprint") == fingerprint and (out / PARTS_DIR / f"{image_id}.csv").is_file():
                done[image_id] = record
            else:
                todo.append((image_id, path))
        skipped = len(done)
        if skipped:
            log.info("%d of %d images already done in %s: skipped (delete %s/ to redo them)", skipped, len(ids), out, PARTS_DIR)
        with logging_redirect_tqdm():
            for image_id, path in tqdm(todo, desc="infer", unit="img", disable=not progress or not todo):
                try:
                    image = read_image(path, channel_order=str(self.config.get("channel_order", "RGB")),
                                       max_pixels=self.config.get("max_pixels"))
                    result = self.run_image(image, image_id)
                    done[image_id] = write_image_outputs(out, path.name, image, result, self.config, fingerprint)
                except KeyboardInterrupt:
                    raise
                except CytoFuseError as exc:
                    failed.append({"image": str(path), "error": str(exc)})
                    log.warning("skipped %s: %s", path.name, exc)
                except (MemoryError, ValueError, RuntimeError, OSError) as exc:
                    message = " ".join(str(exc).split())[:300] or exc.__class__.__name__
                    failed.append({"image": str(path), "error": f"{exc.__class__.__name__}: {message}"})
                    log.warning("skipped %s: %s: %s", path.name, exc.__class__.__name__, message)
                    log.debug("traceback", exc_info=True)
        order = [i for i in ids if i in done]
        table = write_combined_outputs(out, order, done, self.class_names, self.config, self.settings.floors)
        summary = {
            "images_dir": str(images_dir),
            "out_dir": str(out),
            "n_images": len(paths),
            "n_done": len(order),
            "n_processed_now": len(order) - skipped,
            "n_skipped_already_done": skipped,
            "n_failed": len(failed),
            "n_detections": int(len(table)),
            "failed": failed,
            "classes": self.class_names,
            "fusion": {**self.rule.to_dict(), "description": self.rule.describe(),
                       "source": self.config.get("fusion_source", "config")},
            "checkpoints": self.checkpoint_info(),
            "config": self.config,
            "versions": runtime.runtime_info(),
            "fingerprint": fingerprint,
            "timings": {i: done[i].get("timings", {}) for i in order},
            "seconds_total_this_run": round(time.time() - started, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out / "run.json", summary)
        return summary


# ------------------------------------------------------------------------------------------ outputs


def write_image_outputs(out: Path, file_name: str, image: np.ndarray, result: ImageResult, config: Mapping[str, Any],
                        fingerprint: str = "") -> dict:
    """One image's files, then its detections part, then the record that marks it done; returns the record."""
    from cytocore.writers import write_detections_csv

    from .writers import write_geojson, write_overlay

    out = Path(out)
    t0 = time.perf_counter()
    names = result.class_names
    plane = result.probability
    write_png(out / "saliency" / f"{result.image_id}.png", plane if plane.dtype == np.uint8 else probability_to_uint8(plane))
    overlay = config.get("overlay") or {}
    if overlay.get("enabled", True):
        write_overlay(
            out / "overlays" / f"{result.image_id}.png", image, result.probability, result.detections, names,
            min_score=float(overlay.get("min_score", 0.3)), heatmap_alpha=float(overlay.get("heatmap_alpha", 0.45)),
            colormap=str(overlay.get("colormap", "jet")), max_side=overlay.get("max_side", 4096),
        )
    if (config.get("outputs") or {}).get("geojson", True):
        write_geojson(out / "geojson" / f"{result.image_id}.geojson", result.detections, names)
    write_detections_csv(out / PARTS_DIR / f"{result.image_id}.csv", result.detections)
    timings = {k: round(v, 4) for k, v in {**result.timings, "write": time.perf_counter() - t0}.items()}
    record = {
        "image_id": result.image_id,
        "file": file_name,
        "width": result.width,
        "height": result.height,
        "n_detections": int(len(result.detections)),
        "malignancy": round(malignancy_score(result.detections, result.class_names, config.get("triage")), 6),
        "seconds": round(sum(timings.values()), 4),
        "timings": timings,
        "fingerprint": fingerprint,
    }
    write_json(out / PARTS_DIR / f"{result.image_id}.json", record)
    return record


IMAGES_COLUMNS = ["image_id", "width", "height", "n_detections", "malignancy", "seconds"]


def write_combined_outputs(out: Path, order: Sequence[str], records: Mapping[str, dict], class_names: Sequence[str],
                           config: Mapping[str, Any], floors: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Rebuild every combined output from the parts of the finished images ``order``; returns the table."""
    from cytocore.writers import detections_columns, write_detections_csv, write_predictions_csv

    from .writers import write_coco, write_geojson

    out = Path(out)
    frames = [read_part(out / PARTS_DIR / f"{i}.csv", class_names) for i in order]
    frames = [f for f in frames if len(f)]
    columns = detections_columns(class_names) + ["object_area"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns})
    write_predictions_csv(out / "predictions.csv", table, class_names)
    write_detections_csv(out / "detections.csv", table)
    images = pd.DataFrame([{k: records[i][k] for k in IMAGES_COLUMNS} for i in order], columns=IMAGES_COLUMNS)
    write_with(out / "images.csv", lambda tmp: images.to_csv(tmp, index=False))
    outputs = config.get("outputs") or {}
    if outputs.get("geojson", True):
        write_geojson(out / "detections.geojson", table, class_names)
    if outputs.get("coco", True):
        write_coco(out / "detections.coco.json", images, table, class_names, floors=floors,
                   file_names={i: records[i].get("file", i) for i in order})
    return table


# ------------------------------------------------------------------------------------------ helpers


def _load_segmenter(path: Path) -> Any:
    from segmentation.model_io import load_segmenter

    try:
        return load_segmenter(path)
    except CheckpointError as exc:
        raise CheckpointError(f"segmentation checkpoint (--seg): {exc}") from None


def _load_classifier(path: Path) -> Any:
    from classification.model_io import load_classifier

    try:
        return load_classifier(path)
    except CheckpointError as exc:
        raise CheckpointError(f"classifier checkpoint (--cls): {exc}") from None


def _assign_ids(paths: Sequence[Path]) -> tuple[dict[str, Path], list[dict]]:
    """Image id = file stem; a second file with the same stem is reported and skipped."""
    ids: dict[str, Path] = {}
    failed: list[dict] = []
    for path in paths:
        if path.stem in ids:
            message = f"image id {path.stem!r} is already used by {ids[path.stem].name}; rename one of them"
            failed.append({"image": str(path), "error": message})
            log.warning("skipped %s: %s", path.name, message)
            continue
        ids[path.stem] = path
    return ids, failed


def _read_part_record(out: Path, image_id: str) -> Optional[dict]:
    path = out / PARTS_DIR / f"{image_id}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None  # unreadable record: redo the image


def read_part(path: Path, class_names: Sequence[str]) -> pd.DataFrame:
    """Read one image's detections part back (ids and labels as text, everything else numeric)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in df.columns:
        if col not in ("image_id", "label"):
            df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="raise").astype(np.float64)
    missing = [f"p_{c}" for c in class_names if f"p_{c}" not in df.columns]
    if missing:
        raise DataError(f"{path}: part has no column(s) {', '.join(missing)}; delete the {PARTS_DIR}/ folder to redo it")
    return df


def _json_safe(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)
