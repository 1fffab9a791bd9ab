"""The two-stage candidate source: the U-Net's objects, each classified by the crop classifier.

One of the three :class:`cytocore.detections.CandidateSource` implementations (the others: the
single-stage U-Net in ``experiments.baseline`` and the segmentation stage alone in
``segmentation.predict``). The fusion step (``fusion.pipeline``) does not care which one it is given.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from cytocore.detections import Candidates, empty_scores
from cytocore.errors import CheckpointError, CytoFuseError
from cytocore.hashing import sha256_file

PathLike = Union[str, Path]


def two_stage_postprocess(postprocess: Mapping[str, Any]) -> dict:
    """The post-processing the two-stage system decodes a U-Net with: a K+1-class one by its whole
    foreground (splitting a cell where the U-Net's class changes would cut it); a binary one ignores it.
    The classifier's training proposals (``experiments.proposals_stage``) use it too, so it learns the
    objects inference will show it. A hypothesis may still read the class maps ``per_class``."""
    return {**dict(postprocess or {}), "multiclass": "foreground"}


def checkpoint_identity(path: Path, model: Any) -> dict:
    """Path, sha256 and metadata of one loaded checkpoint (for ``run.json`` and the resume fingerprint)."""
    return {"path": str(path), "sha256": sha256_file(path), "meta": _json_safe(getattr(model, "meta", {}))}


def load_segmenter(path: PathLike, option: str = "--seg", backend: str = "mindspore", threads: Optional[int] = None) -> Any:
    """A segmentation checkpoint (run by ``backend``), with a load error naming the command-line option it came from."""
    from segmentation.model_io import load_segmenter as load

    try:
        return load(path, threads=threads, backend=backend)
    except CheckpointError as exc:
        raise CheckpointError(f"segmentation checkpoint ({option}): {exc}") from None


def load_classifier(path: PathLike, option: str = "--cls", backend: str = "mindspore", threads: Optional[int] = None) -> Any:
    from classification.model_io import load_classifier as load

    try:
        return load(path, backend=backend, threads=threads)
    except CheckpointError as exc:
        raise CheckpointError(f"classifier checkpoint ({option}): {exc}") from None


class TwoStageSource:
    """Segment, then classify each object's crop: candidates with a seg score and class probabilities.

    ``seg_settings`` are the segmentation stage's resolved settings
    (:func:`segmentation.predict.resolve_settings`); ``seg_score`` is "mean" or "max" of the map
    inside the object; ``batch_size`` is the classifier's crops per call.

    A K+1-class U-Net (``targets.mode: classes``) is used the same way: its objects are the components
    of the whole foreground (``1 − p_background``; ``postprocess.multiclass`` is set to ``foreground``,
    since splitting a cell where the U-Net's class changes would cut it), and its own mean class
    probabilities inside each object ride along as ``Candidates.seg_class_probs`` (multi-hot under
    ``hierarchy``) for the semantic fusion rules.
    """

    def __init__(self, seg_path: PathLike, segmenter: Any, cls_path: PathLike, classifier: Any, seg_settings: Any,
                 seg_score: str = "mean", batch_size: int = 32, scale_config: Optional[Mapping[str, Any]] = None,
                 hierarchy: Union[None, str, Mapping[str, Sequence[str]]] = None) -> None:
        self.seg_path, self.cls_path = Path(seg_path), Path(cls_path)
        self.segmenter, self.classifier = segmenter, classifier
        self.class_names: list[str] = list(classifier.class_names)
        self.semantic = getattr(segmenter, "mode", "binary") == "classes"
        if self.semantic:
            missing = [c for c in self.class_names if c not in getattr(segmenter, "class_names", [])]
            if missing:
                raise CheckpointError(f"{seg_path}: the U-Net's classes lack {', '.join(missing)}, which the classifier "
                                      f"{cls_path} predicts; use a U-Net trained on the classifier's classes")
            seg_settings = dataclasses.replace(seg_settings, postprocess=two_stage_postprocess(seg_settings.postprocess))
        self.seg_settings = seg_settings
        # only a K+1-class U-Net's probabilities are made multi-hot: a binary one leaves the hierarchy to the rule
        self.hierarchy = self._hierarchy(hierarchy) if self.semantic else {}
        self.seg_score = seg_score
        self.batch_size = int(batch_size)
        self._checkpoints: Optional[dict] = None
        # --mpp and a user-chosen scale (fusion config): with the input's µm/px they set each input's scale
        self.scale_config = dict(scale_config or {})

    @classmethod
    def load(cls, seg_checkpoint: PathLike, cls_checkpoint: PathLike, config: Mapping[str, Any],
             classes: Optional[Sequence[str]] = None) -> "TwoStageSource":
        """Both checkpoints, checked against the expected ``classes``, with the config's settings resolved;
        run by the config's ``runtime.backend`` (ONNX Runtime: the models exported beside the checkpoints)."""
        from segmentation.predict import resolve_settings

        rt = config.get("runtime") or {}
        backend, threads = str(rt.get("backend") or "mindspore"), rt.get("threads")
        segmenter = load_segmenter(seg_checkpoint, backend=backend, threads=threads)
        classifier = load_classifier(cls_checkpoint, backend=backend, threads=threads)
        names = list(classifier.class_names)
        if classes is not None:
            expected = [str(c) for c in classes]
            if sorted(expected) != sorted(names):
                raise CheckpointError(
                    f"{cls_checkpoint}: the classifier predicts classes {', '.join(names)} but "
                    f"{', '.join(expected)} were expected (--classes); use a classifier trained on those classes"
                )
        settings = resolve_settings(segmenter, config.get("segmentation"), "config segmentation")
        return cls(seg_checkpoint, segmenter, cls_checkpoint, classifier, settings,
                   hierarchy=(config.get("fusion") or {}).get("hierarchy", "auto"),
                   seg_score=str(config.get("seg_score", "mean")),
                   batch_size=int((config.get("classification") or {}).get("batch_size", 32)),
                   scale_config={"mpp": config.get("mpp"), "scale": config.get("scale"),
                                 "segmentation": config.get("segmentation") or {}})

    def candidates(self, image: np.ndarray, timings: Optional[dict[str, float]] = None) -> Candidates:
        from classification.predict import classify_boxes
        from segmentation.predict import segment_image

        from .inputs import input_record, scale_for, segmentation_model_for

        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        # the input's own scale (µm/px of a slide or --mpp vs the training µm/px), glass tiles skipped
        choice = scale_for(image, self.segmenter, self.seg_settings.predict, self.scale_config,
                           getattr(image, "name", "image"))
        model, predict = segmentation_model_for(image, self.segmenter, self.seg_settings.predict, choice)
        seg = segment_image(image, model, settings=dataclasses.replace(self.seg_settings, predict=predict))
        boxes = seg.boxes()
        t1 = time.perf_counter()
        if len(boxes):
            probs = np.asarray(classify_boxes(image, boxes, self.classifier, batch_size=self.batch_size), np.float64)
            probs = probs.reshape(len(boxes), len(self.class_names))
        else:
            probs = empty_scores(self.class_names)
        t2 = time.perf_counter()
        timings["segment"] = timings.get("segment", 0.0) + (t1 - t0)
        timings["classify"] = timings.get("classify", 0.0) + (t2 - t1)
        return Candidates(seg.probability, boxes, seg.scores(self.seg_score), seg.areas(), probs, instances=seg.instances,
                          labels=seg.labels, info=input_record(image, choice), seg_class_probs=self.unet_class_probs(seg))

    def _hierarchy(self, spec: Union[None, str, Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
        from .rules import resolve_hierarchy

        try:
            return resolve_hierarchy(spec, self.class_names)
        except ValueError as exc:
            raise CytoFuseError(f"config fusion.hierarchy: {exc}") from None

    def unet_class_probs(self, seg: Any) -> Optional[np.ndarray]:
        """``(N, K)`` the U-Net's own mean class probabilities per object, in the classifier's class order
        and multi-hot under the hierarchy; None for a binary U-Net."""
        from .rules import label_marginals

        if seg.class_probs is None:
            return None
        probs = seg.class_probs[self.class_names].to_numpy(np.float64).reshape(len(seg.instances), len(self.class_names))
        return label_marginals(probs, self.class_names, self.hierarchy)

    def checkpoints(self) -> dict:
        if self._checkpoints is None:
            self._checkpoints = {"seg": checkpoint_identity(self.seg_path, self.segmenter),
                                 "cls": checkpoint_identity(self.cls_path, self.classifier)}
        return self._checkpoints

    def identity(self) -> dict:
        return {"system": "two-stage", "checkpoints": self.checkpoints(), "classes": self.class_names,
                "segmentation": self.seg_settings.to_dict(), "seg_score": self.seg_score,
                **({"unet_class_hierarchy": self.hierarchy} if self.semantic else {})}


def _json_safe(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return str(obj)
