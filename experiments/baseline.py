"""The single-stage baseline: one K+1-class U-Net that finds *and* classifies cells.

The question the two-stage design must answer is whether a second network earns its cost. The
honest rival is the same U-Net, trained with the same loop on the same data for the same compute,
asked to do both jobs at once: K+1 output channels (background + one per class), class-index targets
(``segmentation/configs/baseline.yaml``, ``targets.mode: classes``). Nothing here re-implements a
stage: training is :func:`segmentation.train.build_task` + :func:`cytocore.trainloop.train`, decoding
is the segmentation stage's multi-class decoder (per-class components → boxes whose class
probabilities are the mean softmax inside the component; saliency = 1 − p_background), and the
outputs are written by the fusion stage's :class:`fusion.pipeline.Pipeline` machinery, so
``cytofuse evaluate`` scores both systems from identical files.

One decision is the baseline's own: the class-index targets paint a multi-label box (SCC + NSCLC)
with its first class in header order (SCC), so the softmax never learns "NSCLC" for SCC and AC cells.
Under that encoding the probability that a cell *is* NSCLC in the multi-hot sense is the softmax
mass of NSCLC-NOS plus its sub-types; :func:`label_marginals` adds the children's probabilities to
the parent (the fusion hierarchy, ``NSCLC: [SCC, AC]`` by default). Without it the baseline would
score near zero on the NSCLC column by construction, which would flatter the two-stage system.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from cytocore.config import load_config, merge
from cytocore.errors import CheckpointError, CytoFuseError
from cytocore.records import Dataset
from cytocore.hashing import fingerprint, sha256_file
from fusion.pipeline import Candidates, DetectSettings, Pipeline, load_fusion_config
from fusion.rules import FusionRule, resolve_hierarchy

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
SYSTEM_NAME = "single-stage"


# ------------------------------------------------------------------------------------------ training


def baseline_config_path() -> Path:
    from segmentation.train import CONFIG_DIR

    return CONFIG_DIR / "baseline.yaml"


def load_baseline_config(path: Optional[PathLike] = None, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """Segmentation defaults ← ``segmentation/configs/baseline.yaml`` (or ``path``) ← ``overrides``.

    The result must describe a K+1-class U-Net (``targets.mode: classes``): anything else is not
    the single-stage baseline and is refused with a one-line error.
    """
    from segmentation.train import DEFAULT_CONFIG

    source = Path(path) if path is not None else baseline_config_path()
    cfg = load_config(DEFAULT_CONFIG, source)
    if overrides:
        cfg = merge(cfg, dict(overrides), "baseline overrides")
    if cfg["targets"]["mode"] != "classes":
        raise CytoFuseError(f"{source}: the single-stage baseline needs targets.mode: classes (K+1 output channels), "
                            f"not {cfg['targets']['mode']!r}")
    return cfg


def train_unet(cfg: dict, dataset: Dataset, out: PathLike, resume: bool = True, progress: bool = True):
    """Train a U-Net of the segmentation stage on an already split ``dataset``; returns the TrainResult.

    Used for both the two-stage system's binary U-Net and the baseline's K+1-class one, so they
    differ only by their config. The data set is passed in (not re-read from ``data.path``) so a
    split made once by the caller is the split every system trains and is tested on.
    """
    from cytocore import runtime
    from cytocore.trainloop import train
    from segmentation.train import build_task

    setup = build_task(cfg, dataset, progress=progress)
    log.info(
        "U-Net (%s): %d train / %d val images, %s %s, scale %.2f, %d output channel(s)",
        setup.meta["mode"], len(setup.train_samples), len(setup.val_samples), setup.meta["model"]["name"],
        f"depth {setup.meta['model']['depth']} width {setup.meta['model']['base_width']}", setup.meta["scale"],
        setup.meta["model"]["out_channels"],
    )
    setup.task.meta["runtime"] = runtime.runtime_info()
    return train(setup.task, setup.loop, out, resume=resume, config_snapshot=cfg)


# ------------------------------------------------------------------------------------------ decoding


def label_marginals(probs: np.ndarray, class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Multi-hot class probabilities from a single-label softmax: each parent gains its children's mass.

    ``probs`` is ``(N, K)`` mean softmax per component; the result is clipped to [0, 1] (the sum
    can only exceed 1 by rounding, since the K+1 softmax channels sum to 1).
    """
    out = np.array(probs, np.float64, copy=True).reshape(-1, len(class_names))
    index = {c: i for i, c in enumerate(class_names)}
    source = out.copy()
    for parent, children in hierarchy.items():
        kids = [index[c] for c in children if c in index]
        if parent in index and kids:
            out[:, index[parent]] = source[:, index[parent]] + source[:, kids].sum(axis=1)
    return np.clip(out, 0.0, 1.0)


def candidates_from_segmentation(result: Any, class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]],
                                 seg_score: str = "mean"):
    """A multi-class :class:`segmentation.predict.SegmentationResult` as fusion ``Candidates``.

    The "classifier probabilities" of a candidate are the mean softmax of each class inside its
    component (after :func:`label_marginals`); its seg score is the mean (or max) of 1 − p_background.
    """
    if result.class_probs is None:
        raise CytoFuseError("the single-stage baseline needs a K+1-class U-Net; this one has a single output channel")
    inst = result.instances
    missing = [c for c in class_names if c not in result.class_probs.columns]
    if missing:
        raise CytoFuseError(f"the U-Net's class maps lack class(es) {', '.join(missing)}")
    boxes = inst[["x0", "y0", "x1", "y1"]].to_numpy(np.float64).reshape(-1, 4)
    probs = result.class_probs[list(class_names)].to_numpy(np.float64).reshape(len(boxes), len(class_names))
    column = "seg_max" if seg_score == "max" else "seg_mean"
    return Candidates(
        probability=np.asarray(result.probability, np.float32),
        boxes=boxes,
        seg_scores=inst[column].to_numpy(np.float64).reshape(-1),
        object_area=inst["area"].to_numpy(np.float64).reshape(-1),
        cls_probs=label_marginals(probs, class_names, hierarchy),
    )


def single_label_names(marginal: np.ndarray, class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]]) -> np.ndarray:
    """The most probable class of each row *before* :func:`label_marginals`: the name to show.

    After the marginals a parent always outscores its children, so the arg-max of the reported
    scores would call every SCC cell "NSCLC"; the U-Net's own answer is the more specific class.
    """
    raw = np.array(marginal, np.float64, copy=True).reshape(-1, len(class_names))
    index = {c: i for i, c in enumerate(class_names)}
    for parent, children in hierarchy.items():
        kids = [index[c] for c in children if c in index]
        if parent in index and kids:
            raw[:, index[parent]] -= raw[:, kids].sum(axis=1)
    names = np.asarray(list(class_names), dtype=object)
    return names[raw.argmax(axis=1)] if len(raw) else np.zeros(0, dtype=object)


def detections_from_class_candidates(image_id: str, candidates: Candidates, width: int, height: int,
                                     class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]],
                                     settings: DetectSettings):
    """The fused pipeline's selection (floor, NMS, cap, shrink) with class probabilities as scores,
    labelled with the U-Net's own (single-label) class."""
    from fusion.pipeline import detections_from_candidates

    rule = MeanSoftmaxRule(name="classifier", weight=0.5, hierarchy={k: list(v) for k, v in hierarchy.items()})
    frame = detections_from_candidates(image_id, candidates, width, height, class_names, rule, settings)
    if len(frame):
        frame["label"] = single_label_names(frame[[f"p_{c}" for c in class_names]].to_numpy(np.float64), class_names, hierarchy)
    return frame


class MeanSoftmaxRule(FusionRule):
    """The fusion "classifier" rule (score = class probability), described as what it is here."""

    def describe(self) -> str:
        return "single-stage: mean softmax per component (no fusion)"


# ------------------------------------------------------------------------------------------ inference


class BaselinePipeline(Pipeline):
    """The fused pipeline's folder runner, outputs and resume, driven by one K+1-class U-Net.

    Only what produces candidates differs from :class:`fusion.pipeline.Pipeline`: there is no
    classifier checkpoint, and the class probabilities come from the U-Net's own softmax. The config
    is the fusion stage's (floor, NMS, cap, overlays, outputs, segmentation predict/postprocess
    options); its fusion rule is ignored, its ``fusion.hierarchy`` is used by :func:`label_marginals`.
    """

    def __init__(self, seg_checkpoint: PathLike, config: Union[None, PathLike, Mapping[str, Any]] = None,
                 overrides: Sequence[str] = ()) -> None:
        from cytocore import runtime
        from segmentation.model_io import load_segmenter

        self.config = load_fusion_config(config, overrides)
        rt = self.config.get("runtime") or {}
        runtime.setup(seed=rt.get("seed", 0), threads=rt.get("threads"))
        self.seg_path = Path(seg_checkpoint)
        self.cls_path = None
        self.classifier = None
        self.segmenter = load_segmenter(self.seg_path)
        if self.segmenter.mode != "classes" or self.segmenter.out_channels < 2:
            raise CheckpointError(
                f"{self.seg_path}: a binary U-Net ({self.segmenter.out_channels} output channel); the single-stage "
                "baseline needs a K+1-class one (train it with segmentation/configs/baseline.yaml)"
            )
        self.class_names = list(self.segmenter.class_names)
        try:
            hierarchy = resolve_hierarchy((self.config.get("fusion") or {}).get("hierarchy", "auto"), self.class_names)
            self.rule = MeanSoftmaxRule(name="classifier", weight=0.5, hierarchy=hierarchy)
            self.settings = DetectSettings.from_config(self.config, self.class_names)
        except ValueError as exc:
            raise CytoFuseError(f"config: {exc}") from None
        self._seg_options = self._segmentation_options()
        self._hashes: dict[str, str] = {}

    def _candidates(self, image: np.ndarray, timings: dict[str, float]) -> Candidates:
        from segmentation.predict import segment_image

        t0 = time.perf_counter()
        predict_cfg, post_cfg = self._seg_options
        seg = segment_image(image, self.segmenter, predict_cfg, post_cfg)
        cand = candidates_from_segmentation(seg, self.class_names, self.rule.hierarchy,
                                            str(self.config.get("seg_score", "mean")))
        timings["segment"] = timings.get("segment", 0.0) + (time.perf_counter() - t0)
        timings["classify"] = timings.get("classify", 0.0)
        return cand

    def detect(self, image_id: str, candidates: Candidates, width: int, height: int, rule: Any = None,
               settings: Optional[DetectSettings] = None):
        return detections_from_class_candidates(image_id, candidates, width, height, self.class_names,
                                                (rule or self.rule).hierarchy, settings or self.settings)

    def checkpoint_info(self) -> dict:
        if not self._hashes:
            self._hashes = {"seg": sha256_file(self.seg_path)}
        meta = json.loads(json.dumps(getattr(self.segmenter, "meta", {}) or {}, default=str))
        return {"seg": {"path": str(self.seg_path), "sha256": self._hashes["seg"], "meta": meta}}

    def fingerprint(self) -> str:
        info = self.checkpoint_info()
        cfg = {k: v for k, v in self.config.items() if k not in ("runtime", "fusion_source")}
        return fingerprint({"system": SYSTEM_NAME, "seg": info["seg"]["sha256"], "config": cfg,
                            "classes": self.class_names, "hierarchy": self.rule.hierarchy})


def run_baseline_folder(seg_ckpt: PathLike, images_dir: PathLike, out_dir: PathLike,
                        cfg: Union[None, PathLike, Mapping[str, Any]] = None, progress: bool = True) -> dict:
    """Run the single-stage baseline on a folder: the same files as ``cytofuse infer`` writes.

    ``predictions.csv``, ``detections.csv``, ``images.csv`` (per-image malignancy = highest class
    score), ``saliency/`` (1 − p_background), ``overlays/``, GeoJSON, COCO json and ``run.json``;
    resumable exactly like the fused pipeline. ``cfg`` is a fusion-stage config (dict or YAML path).
    Returns the ``run.json`` summary.
    """
    summary = BaselinePipeline(seg_ckpt, cfg).run_folder(images_dir, out_dir, progress=progress)
    summary["system"] = SYSTEM_NAME
    return summary


def images_seen(history: Iterable[Mapping[str, Any]]) -> int:
    """Training samples (patches or crops) seen over a run's epochs, from the loop's history rows."""
    return int(sum(int(row.get("samples", 0) or 0) for row in history))
