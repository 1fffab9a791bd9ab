"""Fused inference: candidates from a source, fused, selected and labelled into detections; folders.

The data flow of ``cytofuse infer``, one hand-over per line:

* the config is resolved once here (:func:`load_fusion_config`, :class:`DetectSettings`,
  :class:`~fusion.rules.FusionRule`, the segmentation settings inside the source);
* a :class:`~cytocore.detections.CandidateSource` (:class:`fusion.sources.TwoStageSource` here, the
  single-stage U-Net in ``experiments.baseline``) turns an image into ``Candidates``;
* :func:`detections_from_candidates` fuses, selects (floor, NMS, cap), shrinks and labels them into
  one :class:`~cytocore.detections.Detections` (arrays);
* :meth:`DetectionSystem.run_folder` hands the images, this per-image step and a
  :class:`fusion.outputs.DetectionRunWriter` to the project's one folder runner
  (:func:`cytocore.runfolder.run_images`): resumable with the fingerprint of checkpoints and
  config, nothing stale left, the tables rebuilt from the finished images' parts at the end.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from cytocore.atomic import write_json
from cytocore.config import load_config, merge, read_yaml
from cytocore.detections import Candidates, CandidateSource, Detections, identity_fingerprint
from cytocore.errors import CytoFuseError, DataError
from cytocore.runfolder import ImageSource, RunReport, folder_sources
from cytocore.shards import Shard, run_share

from .geometry import box_areas, cell_geometry, clip_boxes, shrink_boxes
from .nms import SOFT_OVERLAPS, class_floors, select_detections, soft_decay
from .rules import SEMANTIC_RULES, SHAPE_RULES, FusionRule, apply_hierarchy, fuse_scores
from .triage import TriageModel

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
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
    """The config with its ``fusion`` block (and ``box_shrink``, ``box_shrink_by_class`` and ``nms.soft``)
    taken from a ``fusion.json``."""
    data = read_fusion_file(path)
    out = copy.deepcopy(cfg)
    block = {k: v for k, v in data["fusion"].items() if k in ("rule", "weight", "hierarchy", "logistic", "specimen_k")}
    out["fusion"] = merge(out["fusion"], block, str(path))
    if data.get("triage"):
        out["triage"] = data["triage"]
    if "box_shrink" in data:
        out["box_shrink"] = float(data["box_shrink"])
        # fitted with the global one: a fit without it (older, or none better) leaves each class at the global
        out["box_shrink_by_class"] = dict(data.get("box_shrink_by_class") or {})
    if "soft_nms" in data:  # fitted alongside the rule: null (off) replaces the config's own setting too
        out["nms"] = {**(out.get("nms") or {}), "soft": data["soft_nms"]}
    out["fusion_source"] = str(path)
    return out


# ---------------------------------------------------------------------------------- network-free core

__all__ = ["Candidates", "Detections", "DetectSettings", "ImageResult", "DetectionSystem", "Pipeline",
           "detections_from_candidates", "load_fusion_config"]


#: ``DetectSettings.with_choices``: leave this setting as it is.
_KEEP = object()


@dataclass
class DetectSettings:
    """The post-fusion selection and geometry options, read once from the config."""

    floors: np.ndarray
    iou: float = 0.5
    containment: Optional[float] = 0.8
    max_detections: Optional[int] = 300
    box_shrink: float = 1.0
    #: a class's own factor for the boxes labelled with it (else ``box_shrink``): annotators box white
    #: cells loosely and platelets tightly, and one factor for both fits neither
    class_shrink: dict[str, float] = field(default_factory=dict)
    soft_sigma: Optional[float] = None  # Gaussian soft-NMS after the hard one (fusion.nms.soft_decay); None = off
    soft_overlap: str = "iou"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], class_names: Sequence[str]) -> "DetectSettings":
        nms_cfg = cfg.get("nms") or {}
        try:
            floors = class_floors(cfg.get("score_floor", 0.0), class_names)
        except ValueError as exc:
            raise CytoFuseError(f"config score_floor: {exc}") from None
        containment = nms_cfg.get("containment")
        max_det = cfg.get("max_detections")
        shrink = box_factor(cfg.get("box_shrink", 1.0), "box_shrink")
        sigma, overlap = soft_nms_setting(nms_cfg.get("soft"))
        return cls(
            floors=floors,
            iou=float(nms_cfg.get("iou", 0.5)),
            containment=None if containment is None else float(containment),
            max_detections=None if max_det is None else int(max_det),
            box_shrink=shrink,
            class_shrink=class_shrink_setting(cfg.get("box_shrink_by_class"), class_names),
            soft_sigma=sigma,
            soft_overlap=overlap,
        )

    @property
    def soft_nms(self) -> Optional[dict]:
        """The soft-NMS setting as the config's ``nms.soft`` and fusion.json's ``soft_nms`` write it (None = off)."""
        return None if self.soft_sigma is None else {"sigma": float(self.soft_sigma), "overlap": self.soft_overlap}

    def shrink_factors(self, labels: Sequence[str]) -> np.ndarray:
        """Each detection's box factor, by its reported class."""
        return np.array([self.class_shrink.get(str(c), self.box_shrink) for c in labels], np.float64)

    def with_choices(self, box_shrink: Optional[float] = None, soft: Any = _KEEP,
                     class_shrink: Optional[Mapping[str, float]] = None) -> "DetectSettings":
        """A copy with the box shrink, the per-class factors and/or the soft-NMS setting
        (``{"sigma", "overlap"}``, None = off) replaced: what ``fuse fit`` tries."""
        out = replace(self, class_shrink=dict(self.class_shrink))
        if box_shrink is not None:
            out.box_shrink = float(box_shrink)
        if class_shrink is not None:
            out.class_shrink = {str(k): float(v) for k, v in class_shrink.items()}
        if soft is not _KEEP:
            out.soft_sigma, out.soft_overlap = soft_nms_setting(soft or None)
        return out


def class_shrink_setting(block: Any, class_names: Sequence[str]) -> dict[str, float]:
    """``{class: factor}`` from a config's ``box_shrink_by_class`` (or fusion.json's); null = none."""
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise CytoFuseError(f"config box_shrink_by_class: expected {{class: factor}} or null, got {block!r}")
    out = {}
    for name, value in block.items():
        if str(name) not in class_names:
            raise CytoFuseError(f"config box_shrink_by_class: unknown class {name!r} (classes: {', '.join(class_names)})")
        out[str(name)] = box_factor(value, f"box_shrink_by_class.{name}")
    return out


def box_factor(value: Any, key: str) -> float:
    """A box scale factor from the config's ``key``: a number in (0, 2], else one clear error line."""
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = float("nan")
    if not 0.0 < factor <= 2.0:
        raise CytoFuseError(f"config {key}: must be in (0, 2], got {value!r}")
    return factor


def soft_nms_setting(block: Any) -> tuple[Optional[float], str]:
    """``(sigma, overlap)`` from a config's ``nms.soft`` block (or fusion.json's ``soft_nms``); null = off."""
    if block is None:
        return None, "iou"
    if not isinstance(block, Mapping):
        raise CytoFuseError(f"config nms.soft: expected {{sigma: S, overlap: iou|containment}} or null, got {block!r}")
    unknown = set(block) - {"sigma", "overlap"}
    if unknown:
        raise CytoFuseError(f"config nms.soft: unknown key(s) {', '.join(sorted(map(str, unknown)))}; it takes sigma and overlap")
    try:
        sigma = float(block.get("sigma"))
    except (TypeError, ValueError):
        raise CytoFuseError(f"config nms.soft.sigma: expected a positive number, got {block.get('sigma')!r}") from None
    overlap = str(block.get("overlap", "iou"))
    if not sigma > 0 or not np.isfinite(sigma):
        raise CytoFuseError(f"config nms.soft.sigma: expected a positive number, got {block.get('sigma')!r}")
    if overlap not in SOFT_OVERLAPS:
        raise CytoFuseError(f"config nms.soft.overlap: expected one of {', '.join(SOFT_OVERLAPS)}, got {overlap!r}")
    return sigma, overlap


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


#: How a detector names each detection's class from its scores (default: :func:`choose_labels`).
LabelChooser = Callable[[np.ndarray, Sequence[str], Mapping[str, Sequence[str]]], np.ndarray]


def detections_from_candidates(
    image_id: str,
    candidates: Candidates,
    width: int,
    height: int,
    class_names: Sequence[str],
    rule: FusionRule,
    settings: DetectSettings,
    label: LabelChooser = choose_labels,
) -> Detections:
    """Fuse, select (floor, NMS, cap), shrink and label one image's candidates.

    NMS (and soft-NMS, when set) runs on the boxes as segmented; the shrink is applied to the survivors
    only, since it is a reporting choice made for the metric, not a change of which object is which.
    ``label`` names each detection's class, once.
    """
    geometry = (cell_geometry(candidates.boxes, candidates.object_area, width, height)
                if rule.name in SHAPE_RULES else None)
    fused = fuse_scores(candidates.seg_scores, candidates.cls_probs, rule, class_names, geometry, candidates.seg_class_probs)
    keep = select_detections(
        candidates.boxes, fused, settings.floors, settings.iou, settings.containment, settings.max_detections
    )
    segmented = np.asarray(candidates.boxes, np.float64).reshape(-1, 4)[keep]
    scores = np.asarray(fused, np.float64).reshape(-1, len(class_names))[keep]
    if settings.soft_sigma is not None and len(keep):
        decayed = soft_decay(segmented, scores, settings.soft_sigma, settings.soft_overlap)
        scores = apply_hierarchy(decayed, class_names, rule.hierarchy)  # a parent stays at least its children
    labels = label(scores, list(class_names), rule.hierarchy)
    boxes = clip_boxes(shrink_boxes(segmented, settings.shrink_factors(labels)), width, height)
    valid = box_areas(boxes) > 0
    keep, boxes, scores, labels = keep[valid], boxes[valid], scores[valid], labels[valid]
    inst = candidates.instances
    ids = (inst["label_id"].to_numpy(np.float64)[keep] if inst is not None and "label_id" in inst
           and len(inst) == len(candidates) else np.zeros(0))
    return Detections(
        image_id=image_id, width=int(width), height=int(height), class_names=list(class_names), boxes=boxes,
        scores=scores, labels=labels,
        seg_scores=np.asarray(candidates.seg_scores, np.float64)[keep],
        object_area=np.asarray(candidates.object_area, np.float64)[keep], label_ids=ids,
    )


@dataclass
class ImageResult:
    """One image's fused output."""

    image_id: str
    width: int
    height: int
    probability: np.ndarray
    detections: Detections
    class_names: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    triage: Optional[float] = None  # the fitted image-level triage model's score, when there is one
    labels: Optional[np.ndarray] = None  # H×W instance label plane (``label_id`` of each cell), when the source has one
    info: dict = field(default_factory=dict)  # about the input: slide, µm/px, scale, tissue share

    @property
    def seconds(self) -> float:
        return float(sum(self.timings.values()))

    @property
    def malignancy(self) -> float:
        """The image's triage score: the fitted image-level model of ``fusion.json`` (``triage``) when
        there is one, else the highest fused class score of any detection (0 if none)."""
        return self.detections.malignancy if self.triage is None else float(self.triage)


# ------------------------------------------------------------------------------------- the detector


def setup_runtime(config: Mapping[str, Any]) -> None:
    """MindSpore's device, threads and seed from the config's ``runtime`` section.

    With ``runtime.backend`` ONNX Runtime MindSpore is not even imported (about 450 MB of resident
    memory): the sessions get their threads from the same section, and an export that must run
    first sets MindSpore up itself.
    """
    from cytocore import runtime
    from cytocore.onnx_backend import resolve_backend

    rt = config.get("runtime") or {}
    if resolve_backend(rt.get("backend") or "mindspore") == "onnxruntime":
        return
    runtime.setup(seed=rt.get("seed", 0), threads=rt.get("threads"))


class DetectionSystem:
    """A candidate source and the fusion step: images in, detections and run folders out.

    ``source`` proposes candidates; ``rule`` fuses their seg score and class probabilities;
    ``config`` (resolved) gives the selection (:class:`DetectSettings`), outputs and reading
    options; ``label`` names each detection's class. ``system`` names it in ``run.json``.
    """

    def __init__(self, source: CandidateSource, config: Mapping[str, Any], rule: FusionRule,
                 label: LabelChooser = choose_labels, system: str = "two-stage") -> None:
        self.source = source
        self.config = dict(config)
        self.rule = rule
        self.label = label
        self.system = system
        self.class_names: list[str] = list(source.class_names)
        try:
            self.settings = DetectSettings.from_config(self.config, self.class_names)
        except ValueError as exc:
            raise CytoFuseError(f"{self.config.get('fusion_source', 'config')}: {exc}") from None
        self.triage = TriageModel.from_dict(self.config.get("triage")) if self.config.get("triage") else None
        from .inputs import tissue_settings

        tissue_settings(self.config)  # a bad tissue option is a usage error now, not one per image
        self.coco_gt: Optional[Path] = None  # --coco-gt: number coco_results.json by this ground truth's ids
        self.anonymise_key: Optional[Path] = None  # --anonymise: key file of the salted-hash image ids

    # ---------------------------------------------------------------- one image

    def candidates(self, image: np.ndarray, timings: Optional[dict[str, float]] = None) -> Candidates:
        """The source's candidates for one RGB uint8 image (any size)."""
        return self.source.candidates(image, timings)

    def detect(self, image_id: str, candidates: Candidates, width: int, height: int,
               rule: Optional[FusionRule] = None, settings: Optional[DetectSettings] = None) -> Detections:
        return detections_from_candidates(image_id, candidates, width, height, self.class_names, rule or self.rule,
                                          settings or self.settings, self.label)

    def run_image(self, image: np.ndarray, image_id: str) -> ImageResult:
        """Detections and the probability map of one RGB uint8 image (or a lazily read slide)."""
        if not getattr(image, "lazy_rgb", False):  # a slide (cytocore.slides.LazyRGB) is read region by region
            image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"image {image_id!r}: expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
        timings: dict[str, float] = {}
        cand = self.candidates(image, timings)
        t0 = time.perf_counter()
        height, width = image.shape[:2]
        detections = self.detect(image_id, cand, width, height)
        triage = self.triage.score(detections.scores) if self.triage is not None else None
        timings["fuse"] = time.perf_counter() - t0
        return ImageResult(image_id, width, height, cand.probability, detections, list(self.class_names), timings, triage,
                           labels=cand.labels, info=dict(cand.info))

    # ---------------------------------------------------------------- a folder

    def checkpoint_info(self) -> dict:
        """Path, sha256 and metadata of each checkpoint (for ``run.json`` and the resume fingerprint)."""
        return dict(self.source.identity().get("checkpoints") or {})

    def fingerprint(self) -> str:
        """What a finished image must have been made with to be reused: the source and the config."""
        cfg = {k: v for k, v in self.config.items() if k not in NOT_IN_FINGERPRINT and k != "fusion_source"}
        return identity_fingerprint({**self.source.identity(), "config": cfg, "hierarchy": self.rule.hierarchy})

    def read(self, source: ImageSource) -> np.ndarray:
        """A plain image decoded, or a whole slide opened for region reads (:class:`fusion.inputs.InputReader`)."""
        from .inputs import InputReader

        return InputReader(self.config).read(source.path)

    def run_sources(self, sources: Iterable[ImageSource], out_dir: PathLike, progress: bool = True,
                    failed: Sequence[dict] = (), shard: Optional[Shard] = None) -> RunReport:
        """Run these images into ``out_dir`` (layout: :class:`fusion.outputs.DetectionRunWriter`).

        With a ``shard``, only its share; the last shard to finish writes the combined outputs
        (:mod:`cytocore.shards`).
        """
        from .outputs import DetectionRunWriter

        writer = DetectionRunWriter(Path(out_dir), self.class_names, self.config, self.settings.floors,
                                    coco_gt=self.coco_gt)
        return run_share(sources, lambda image, src: self.run_image(image, src.image_id), writer, self.fingerprint(),
                         shard, read=self.read, failed=failed, progress=progress, desc="infer")

    def run_folder(self, images_dir: PathLike, out_dir: PathLike, progress: bool = True,
                   shard: Optional[Shard] = None) -> dict:
        """Run every image of a folder (or a shard's share) into ``out_dir``; returns the summary.

        ``run.json`` holds the summary of the whole run; a shard that is not the last to finish only
        returns its own (``waiting_for`` names the shards still running).
        """
        from cytocore import runtime

        from .inputs import list_inputs

        sources, duplicates = folder_sources(images_dir, lister=list_inputs)
        anonymiser = None
        if self.anonymise_key is not None:  # every shard keys the whole folder: the key files agree
            from .anonymous import anonymous_sources

            sources, duplicates, anonymiser = anonymous_sources(sources, duplicates, self.anonymise_key)
        run = self.run_sources(sources, out_dir, progress, duplicates, shard)
        if anonymiser is not None:
            from .anonymous import scrub_failures

            run.failed = scrub_failures(run.failed, anonymiser)
        if run.combined is None:
            return {**run.summary(), "shard": str(shard), "waiting_for": run.extra.get("waiting_for", []),
                    "n_detections": sum(int(r.get("n_detections", 0)) for r in run.records.values())}
        summary = {
            "system": self.system,
            "images_dir": None if anonymiser is not None else str(images_dir),
            "anonymised": anonymiser is not None,
            "out_dir": str(out_dir),
            **run.summary(),
            "n_detections": int(len(run.combined)),
            "classes": self.class_names,
            "fusion": {**self.rule.to_dict(), "description": self.rule.describe(),
                       "source": self.config.get("fusion_source", "config")},
            "checkpoints": self.checkpoint_info(),
            "config": self.config,
            "versions": runtime.runtime_info(),
            "fingerprint": self.fingerprint(),
            "timings": {i: r.get("timings", {}) for i, r in run.records.items()},
            "inputs": {i: {k: r.get(k) for k in ("slide", "mpp", "scale", "tissue_fraction")} for i, r in run.records.items()},
            "seconds_total_this_run": run.seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(Path(out_dir) / "run.json", summary)
        return summary


class Pipeline(DetectionSystem):
    """The two-stage system: segmentation + classification checkpoints and a fusion config.

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
        from .sources import TwoStageSource

        config = load_fusion_config(config, overrides, fusion_file)
        setup_runtime(config)
        source = TwoStageSource.load(seg_checkpoint, cls_checkpoint, config, classes)
        try:
            rule = FusionRule.from_config(config["fusion"], source.class_names)
        except ValueError as exc:
            raise CytoFuseError(f"{config.get('fusion_source', 'config')}: {exc}") from None
        if rule.name in SEMANTIC_RULES and not source.semantic:
            raise CytoFuseError(f"{config.get('fusion_source', 'config')}: the {rule.name} fusion rule needs a K+1-class "
                                f"segmentation U-Net (targets.mode: classes), but {seg_checkpoint} finds cells only")
        super().__init__(source, config, rule)
