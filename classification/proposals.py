"""Training crops from the segmentation stage's own proposals, labelled by matching them to the annotations.

At inference the classifier sees the U-Net's components, not the annotator's boxes: cells cut in two
(fragments), neighbours merged into one box, benign look-alikes and debris. A classifier trained on
ground-truth boxes only has never seen those and scores them like the cells they resemble. So the
segmenter is run over the training images (``cytofuse seg predict`` → ``instances.csv``) and each
proposal is labelled the way the official metric would judge it, with the metric's IoP
(intersection over the *proposal's* area):

- **matched**: IoP > ``iop`` with one annotated cell that it covers well → that cell's classes;
- **merged**: it covers more than ``merge_coverage`` of two or more annotated cells → negative;
- **fragment**: IoP > ``iop`` but it covers less than ``fragment_coverage`` of that cell → negative;
- **unmatched**: no annotated cell with IoP > ``iop`` → negative.

A data set judged by detection AP at IoU > 0.5 (BCCD) is stricter: a box drawn inside a cell is a false
positive there, and a classifier that learnt to call half a white cell "white cell" ranks the half as
high as the whole. ``match: iou`` labels a proposal matched only at IoU > ``iou`` with its cell; a box
mostly inside a cell (IoP > ``iop``) that misses that is a fragment.

Negatives are all-zero labels ("no class here"), which the sigmoid head learns and the fused score
then uses to push the segmenter's false positives down the ranking.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd

from cytocore.errors import CytoFuseError, DataError
from cytocore.froc import iop_matrix, iou_from_overlaps
from cytocore.records import Dataset

PathLike = Union[str, Path]
KINDS = ("matched", "merged", "fragment", "unmatched")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass
class ProposalConfig:
    """The ``proposals:`` block: how proposals are labelled and how much of a batch they fill."""

    csv: Optional[str] = None  # instances.csv of `cytofuse seg predict` on the training images (pixels)
    share: float = 0.5  # fraction of each training batch made of proposal crops
    negative_share: float = 0.4  # fraction of the proposal crops that are negatives (merged/fragment/unmatched)
    iop: float = 0.5  # the metric's hit test: intersection / proposal area
    merge_coverage: float = 0.5  # a proposal covering more than this of 2+ cells is a merge
    fragment_coverage: float = 0.25  # a hit covering less than this of its cell is a fragment
    match: str = "iop"  # iop: the challenge's hit test | iou: IoU > ``iou`` (data sets judged by AP50)
    iou: float = 0.5

    def __post_init__(self) -> None:
        if self.match not in ("iop", "iou"):
            raise CytoFuseError(f"proposals.match must be iop or iou, not {self.match!r}")
        for name in ("share", "negative_share", "iop", "merge_coverage", "fragment_coverage", "iou"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise CytoFuseError(f"proposals.{name} must be in [0, 1], not {value}")
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ProposalConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CytoFuseError(f"unknown proposals option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _overlaps(proposals: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P, G)`` intersection over proposal area (IoP) and over ground-truth area (coverage)."""
    return iop_matrix(proposals, gt), iop_matrix(gt, proposals).T


def label_proposals(
    proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, cfg: Optional[ProposalConfig] = None,
    num_classes: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (P, K) float32, kinds (P,) str)`` of proposal boxes against one image's annotations.

    Every box is pixel xyxy. ``kinds`` holds one of :data:`KINDS`; only ``matched`` rows carry classes.
    """
    cfg = cfg or ProposalConfig()
    p = np.asarray(proposals, np.float64).reshape(-1, 4)
    g = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    k = int(num_classes if num_classes is not None else np.asarray(gt_labels).reshape(len(g), -1).shape[1])
    y = np.asarray(gt_labels, np.float32).reshape(len(g), k) if len(g) else np.zeros((0, k), np.float32)
    labels = np.zeros((len(p), k), np.float32)
    kinds = np.full(len(p), "unmatched", dtype=object)
    if not len(p) or not len(g):
        return labels, kinds.astype(str)
    iop, cover = _overlaps(p, g)
    merged = (cover > cfg.merge_coverage).sum(axis=1) >= 2
    rows = np.arange(len(p))
    best = iop.argmax(axis=1)
    hit = iop[rows, best] > cfg.iop
    if cfg.match == "iou":
        iou = iou_from_overlaps(iop, cover)  # the overlaps above, not computed again
        best = iou.argmax(axis=1)
        matched = (iou[rows, best] > cfg.iou) & ~merged
        fragment = hit & ~matched & ~merged
    else:
        fragment = hit & (cover[rows, best] < cfg.fragment_coverage) & ~merged
        matched = hit & ~merged & ~fragment
    kinds[merged] = "merged"
    kinds[fragment] = "fragment"
    kinds[matched] = "matched"
    labels[matched] = y[best[matched]]
    return labels, kinds.astype(str)


def read_proposals(path: PathLike) -> dict[str, np.ndarray]:
    """Proposal boxes per image id from a CSV ``image_id,x0,y0,x1,y1,...`` (pixels; ``seg predict``'s
    ``instances.csv``). A bad row is one error naming the file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such proposals file (run `cytofuse seg predict` on the training images)")
    try:
        table = pd.read_csv(path, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in ("image_id",) + BOX_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected image_id,x0,y0,x1,y1 in pixels)")
    boxes = table[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: row {row + 2}: box {table.loc[row, list(BOX_COLUMNS)].tolist()} is not a "
                        "finite box with x1 > x0 and y1 > y0")
    out: dict[str, np.ndarray] = {}
    for image_id, idx in table.groupby("image_id", sort=False).indices.items():
        out[str(image_id)] = boxes[idx].astype(np.float32)
    return out


@dataclass
class ProposalPool:
    """Labelled proposals of a data set: ``index`` into its records, pixel ``boxes``, ``labels``, ``kinds``."""

    index: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray

    def __len__(self) -> int:
        return int(len(self.index))

    def counts(self) -> dict[str, int]:
        return {kind: int((self.kinds == kind).sum()) for kind in KINDS}

    @property
    def positive(self) -> np.ndarray:
        return self.labels.max(axis=1) > 0 if len(self) else np.zeros(0, bool)


def proposal_pool(dataset: Dataset, proposals: Mapping[str, np.ndarray], cfg: Optional[ProposalConfig] = None) -> ProposalPool:
    """Label every proposal of every record that has some (images without proposals contribute none)."""
    cfg = cfg or ProposalConfig()
    k = dataset.num_classes
    idx, boxes, labels, kinds = [], [], [], []
    for i, r in enumerate(dataset.records):
        b = proposals.get(r.image_id)
        if b is None or not len(b):
            continue
        lab, kind = label_proposals(b, r.boxes, r.labels if r.n_boxes else np.zeros((0, k)), cfg, num_classes=k)
        idx.append(np.full(len(b), i))
        boxes.append(np.asarray(b, np.float32))
        labels.append(lab)
        kinds.append(kind)
    if not idx:
        return ProposalPool(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, k), np.float32), np.zeros(0, str))
    return ProposalPool(np.concatenate(idx), np.concatenate(boxes), np.concatenate(labels), np.concatenate(kinds))


__all__ = ["ProposalConfig", "ProposalPool", "KINDS", "label_proposals", "read_proposals", "proposal_pool"]
