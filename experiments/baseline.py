"""The single-stage baseline: one K+1-class U-Net that finds *and* classifies cells.

The question the two-stage design must answer is whether a second network earns its cost. The
honest rival is the same U-Net, trained with the same loop on the same data for the same compute,
asked to do both jobs at once: K+1 output channels (background + one per class), class-index targets
(``segmentation/configs/baseline.yaml``, ``targets.mode: classes``). Nothing here re-implements a
stage: training is :func:`segmentation.train.build_task` + :func:`cytocore.trainloop.train`, decoding
is the segmentation stage's multi-class decoder (per-class components → boxes whose class
probabilities are the mean softmax inside the component; saliency = 1 − p_background), offered as a
candidate source (:class:`SingleStageSource`) to the fusion stage's
:class:`fusion.pipeline.DetectionSystem`, whose folder runner and writer produce the same files as
``cytofuse infer``, so ``cytofuse evaluate`` scores both systems from identical files.

One decision is the baseline's own: the class-index targets paint a multi-label box (SCC + NSCLC)
with its first class in header order (SCC), so the softmax never learns "NSCLC" for SCC and AC cells.
Under that encoding the probability that a cell *is* NSCLC in the multi-hot sense is the softmax
mass of NSCLC-NOS plus its sub-types; :func:`label_marginals` adds the children's probabilities to
the parent (the fusion hierarchy, ``NSCLC: [SCC, AC]`` by default). Without it the baseline would
score near zero on the NSCLC column by construction, which would flatter the two-stage system.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from cytocore.config import load_config, merge
from cytocore.detections import Candidates
from cytocore.errors import CheckpointError, CytoFuseError
from cytocore.records import Dataset
from fusion.pipeline import DetectionSystem, DetectSettings, detections_from_candidates, load_fusion_config, setup_runtime
from fusion.rules import FusionRule, label_marginals, resolve_hierarchy

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
    from segmentation.train import build_task, train_and_retune

    setup = build_task(cfg, dataset, progress=progress)
    log.info(
        "U-Net (%s): %d train / %d val images, %s %s, scale %.2f, %d output channel(s) + %d instance (%s)",
        setup.meta["mode"], len(setup.train_samples), len(setup.val_samples), setup.meta["model"]["name"],
        f"depth {setup.meta['model']['depth']} width {setup.meta['model']['base_width']}", setup.meta["scale"],
        setup.meta["model"]["out_channels"], setup.meta["model"]["instance_channels"], setup.meta["instance_head"] or "none",
    )
    return train_and_retune(setup, out, resume, cfg)


# ------------------------------------------------------------------------------------------ decoding


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
    boxes = result.boxes()
    probs = result.class_probs[list(class_names)].to_numpy(np.float64).reshape(len(boxes), len(class_names))
    return Candidates(
        probability=np.asarray(result.probability, np.float32),
        boxes=boxes,
        seg_scores=result.scores(seg_score),
        object_area=result.areas(),
        cls_probs=label_marginals(probs, class_names, hierarchy),
        instances=inst,
        labels=result.labels,
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
    return detections_from_candidates(image_id, candidates, width, height, class_names, baseline_rule(hierarchy),
                                      settings, single_label_names)


def baseline_rule(hierarchy: Mapping[str, Sequence[str]]) -> "MeanSoftmaxRule":
    """The fusion "classifier" rule (score = class probability) with the baseline's hierarchy."""
    return MeanSoftmaxRule(name="classifier", weight=0.5, hierarchy={k: list(v) for k, v in hierarchy.items()})


class MeanSoftmaxRule(FusionRule):
    """The fusion "classifier" rule (score = class probability), described as what it is here."""

    def describe(self) -> str:
        return "single-stage: mean softmax per component (no fusion)"


# ------------------------------------------------------------------------------------------ inference


class SingleStageSource:
    """The K+1-class U-Net as a candidate source: its components, their mean softmax as class scores.

    There is no classifier: the class probabilities are the U-Net's own softmax (after
    :func:`label_marginals` with ``hierarchy``).
    """

    def __init__(self, seg_path: PathLike, segmenter: Any, seg_settings: Any, hierarchy: Mapping[str, Sequence[str]],
                 seg_score: str = "mean") -> None:
        self.seg_path = Path(seg_path)
        self.segmenter = segmenter
        self.seg_settings = seg_settings
        self.hierarchy = {k: list(v) for k, v in hierarchy.items()}
        self.seg_score = seg_score
        self.class_names: list[str] = list(segmenter.class_names)
        self._checkpoints: Optional[dict] = None

    @classmethod
    def load(cls, seg_checkpoint: PathLike, config: Mapping[str, Any]) -> "SingleStageSource":
        from fusion.sources import load_segmenter
        from segmentation.predict import resolve_settings

        segmenter = load_segmenter(seg_checkpoint)
        if segmenter.mode != "classes" or segmenter.out_channels < 2:
            raise CheckpointError(
                f"{seg_checkpoint}: a binary U-Net ({segmenter.out_channels} output channel); the single-stage "
                "baseline needs a K+1-class one (train it with segmentation/configs/baseline.yaml)"
            )
        names = list(segmenter.class_names)
        try:
            hierarchy = resolve_hierarchy((config.get("fusion") or {}).get("hierarchy", "auto"), names)
        except ValueError as exc:
            raise CytoFuseError(f"config: {exc}") from None
        settings = resolve_settings(segmenter, config.get("segmentation"), "config segmentation")
        return cls(seg_checkpoint, segmenter, settings, hierarchy, str(config.get("seg_score", "mean")))

    def candidates(self, image: np.ndarray, timings: Optional[dict[str, float]] = None) -> Candidates:
        from segmentation.predict import segment_image

        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        seg = segment_image(image, self.segmenter, settings=self.seg_settings)
        cand = candidates_from_segmentation(seg, self.class_names, self.hierarchy, self.seg_score)
        timings["segment"] = timings.get("segment", 0.0) + (time.perf_counter() - t0)
        timings["classify"] = timings.get("classify", 0.0)
        return cand

    def identity(self) -> dict:
        from fusion.sources import checkpoint_identity

        if self._checkpoints is None:
            self._checkpoints = {"seg": checkpoint_identity(self.seg_path, self.segmenter)}
        return {"system": SYSTEM_NAME, "checkpoints": self._checkpoints, "classes": self.class_names,
                "hierarchy": self.hierarchy, "segmentation": self.seg_settings.to_dict(), "seg_score": self.seg_score}


class BaselinePipeline(DetectionSystem):
    """The single-stage system: one K+1-class U-Net, the fused pipeline's selection, runner and outputs.

    The config is the fusion stage's (floor, NMS, cap, overlays, outputs, segmentation predict/postprocess
    options); its fusion rule is ignored, its ``fusion.hierarchy`` is used by :func:`label_marginals`.
    """

    def __init__(self, seg_checkpoint: PathLike, config: Union[None, PathLike, Mapping[str, Any]] = None,
                 overrides: Sequence[str] = ()) -> None:
        config = load_fusion_config(config, overrides)
        setup_runtime(config)
        source = SingleStageSource.load(seg_checkpoint, config)
        super().__init__(source, config, baseline_rule(source.hierarchy), label=single_label_names, system=SYSTEM_NAME)


def run_baseline_folder(seg_ckpt: PathLike, images_dir: PathLike, out_dir: PathLike,
                        cfg: Union[None, PathLike, Mapping[str, Any]] = None, progress: bool = True) -> dict:
    """Run the single-stage baseline on a folder: the same files as ``cytofuse infer`` writes.

    ``predictions.csv``, ``detections.csv``, ``images.csv`` (per-image malignancy = highest class
    score), ``saliency/`` (1 − p_background), ``overlays/``, GeoJSON, COCO json and ``run.json``;
    resumable exactly like the fused pipeline. ``cfg`` is a fusion-stage config (dict or YAML path).
    Returns the ``run.json`` summary.
    """
    return BaselinePipeline(seg_ckpt, cfg).run_folder(images_dir, out_dir, progress=progress)


def images_seen(history: Iterable[Mapping[str, Any]]) -> int:
    """Training samples (patches or crops) seen over a run's epochs, from the loop's history rows."""
    return int(sum(int(row.get("samples", 0) or 0) for row in history))
