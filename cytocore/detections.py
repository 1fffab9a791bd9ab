"""What a detector says about one image, as arrays: candidates before fusion, detections after it.

The types every stage passes along the main path, so each hop keeps one shape:

* a :class:`CandidateSource` (the two-stage networks, the single-stage U-Net, the segmentation stage
  alone) turns one image into :class:`Candidates`;
* the fusion step (``fusion.pipeline``) scores, selects and labels them into :class:`Detections`;
* the run folder's writer turns :class:`Detections` into a table (:meth:`Detections.to_frame`) only
  when it writes a file.

Arrays, not DataFrames, until then: an image with no detection is simply arrays of length 0
(``(0, 4)`` boxes, ``(0, K)`` scores), which every step handles like any other image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd


@dataclass
class Candidates:
    """What the networks say about one image, before fusion: the stage boundary ``fuse fit`` caches.

    ``instances`` is the segmentation stage's own table (rows aligned with ``boxes``: label ids,
    class names of a multi-class U-Net...) and ``labels`` its H×W instance label plane (each
    object's ``label_id`` on its pixels), for outputs that want more than boxes and scores.
    """

    probability: np.ndarray  # (H, W) foreground probability (the saliency map): float in [0, 1], or uint8 0..255 for huge images
    boxes: np.ndarray  # (N, 4) pixel xyxy of the segmented objects
    seg_scores: np.ndarray  # (N,) segmentation score of each object
    object_area: np.ndarray  # (N,) pixels in each object
    cls_probs: np.ndarray  # (N, K) class probabilities (K = 0 for a segmentation-only source)
    instances: Optional[pd.DataFrame] = None
    labels: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)  # about the input: slide or not, µm/px, scale used, tissue share
    # (N, K) a K+1-class U-Net's own mean softmax of each class inside each object, in cls_probs' class
    # order; None when the U-Net only finds cells (binary). The semantic fusion rules read it.
    seg_class_probs: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(len(self.boxes))


@runtime_checkable
class CandidateSource(Protocol):
    """Anything that proposes candidates for one image: the seam between the networks and a run.

    ``identity()`` is what made the candidates (checkpoint paths, sha256 and metadata; resolved
    settings): it goes into ``run.json``, and its fingerprint decides whether a finished image of an
    earlier run in the same folder may be reused.
    """

    class_names: list[str]

    def candidates(self, image: np.ndarray, timings: Optional[dict[str, float]] = None) -> Candidates:
        """Candidates of one RGB uint8 image; adds seconds per step to ``timings`` when given."""
        ...

    def identity(self) -> dict:
        """JSON-able description of the models (``checkpoints``: path, sha256, meta) and ``settings``."""
        ...


def identity_fingerprint(identity: dict) -> str:
    """The resume fingerprint of a source's identity: checkpoint hashes and settings, not paths or metadata.

    Moving a checkpoint keeps finished images; another checkpoint or setting redoes them.
    """
    from .hashing import fingerprint

    checkpoints = identity.get("checkpoints") or {}
    hashes = {name: (info or {}).get("sha256") for name, info in checkpoints.items()}
    rest = {k: v for k, v in identity.items() if k != "checkpoints"}
    return fingerprint({"checkpoints": hashes, **rest})


@dataclass
class Detections:
    """One image's final detections: pixel boxes, per-class scores, and the class each is shown as.

    ``labels`` is decided once, by whoever made the detections (the fused pipeline prefers a
    sub-type on a tie, the baseline its single-label answer), never recomputed when written.
    """

    image_id: str
    width: int
    height: int
    class_names: list[str]
    boxes: np.ndarray  # (N, 4) pixel xyxy, clipped to the image
    scores: np.ndarray  # (N, K) fused class scores in [0, 1]
    labels: np.ndarray  # (N,) class name shown for each detection
    seg_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) segmentation score
    object_area: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) pixels of the segmented object
    label_ids: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) the cell's id in the label plane (NaN: none)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 4)
        n, k = len(self.boxes), len(self.class_names)
        self.scores = np.asarray(self.scores, np.float64).reshape(n, k)
        self.labels = np.asarray(self.labels, dtype=object).reshape(n)
        self.seg_scores = _column(self.seg_scores, n)
        self.object_area = _column(self.object_area, n)
        self.label_ids = _column(self.label_ids, n)

    def __len__(self) -> int:
        return int(len(self.boxes))

    @property
    def malignancy(self) -> float:
        """The image-level triage score: the highest class score of any detection (0 if none)."""
        return float(self.scores.max()) if self.scores.size else 0.0

    def to_frame(self) -> pd.DataFrame:
        """The canonical detections table (:func:`cytocore.writers.detections_frame`) plus ``object_area``."""
        from .writers import detections_frame

        frame = detections_frame(self.image_id, self.boxes, self.scores, self.class_names, (self.width, self.height),
                                 seg_scores=self.seg_scores, labels=self.labels)
        frame["object_area"] = self.object_area
        if np.isfinite(self.label_ids).any():  # links each detection to its cell in labels/<id>.tif
            frame["label_id"] = self.label_ids
        return frame


def _column(values: Any, n: int) -> np.ndarray:
    """A per-detection float column; missing values (length 0 for n > 0) become NaN."""
    arr = np.asarray(values, np.float64).reshape(-1)
    if len(arr) == n:
        return arr
    if len(arr) == 0:
        return np.full(n, np.nan)
    raise ValueError(f"{len(arr)} values for {n} detections")


def empty_scores(class_names: Sequence[str]) -> np.ndarray:
    """``(0, K)`` scores: what a source returns for an image without any object."""
    return np.zeros((0, len(class_names)), np.float64)
