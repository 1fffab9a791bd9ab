"""Data records shared by every stage: an image with its boxes, and a data set of them.

Boxes are kept in pixel ``xyxy`` float coordinates (x to the right, y down, ``xmax``/``ymax`` exclusive
edges as in the challenge's normalised CSV times the image size) with one multi-hot row per box,
because the challenge's labels are multi-label (SCC and AC are NSCLC too).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import DataError, Problem

#: The challenge's class names, in its column order.
CHALLENGE_CLASSES: tuple[str, ...] = ("SCC", "AC", "SCLC", "NSCLC")


@dataclass
class ImageRecord:
    """One image and its annotations.

    ``boxes`` is ``(N, 4)`` float32 pixel xyxy; ``labels`` is ``(N, K)`` uint8 multi-hot in the data
    set's class order. An image with ``N == 0`` is healthy and is kept: healthy images count in the
    metric's FP/N denominator.
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    mask_path: Optional[Path] = None
    split: Optional[str] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.uint8)
        if self.labels.ndim == 1:
            self.labels = self.labels.reshape(len(self.boxes), -1)
        if len(self.labels) != len(self.boxes):
            raise DataError(
                f"{self.path}: image {self.image_id!r} has {len(self.boxes)} boxes but {len(self.labels)} label rows"
            )

    @property
    def n_boxes(self) -> int:
        return int(len(self.boxes))

    @property
    def is_healthy(self) -> bool:
        return self.n_boxes == 0

    def normalised_boxes(self) -> np.ndarray:
        """Boxes divided by image size: the challenge CSV's coordinates."""
        scale = np.array([self.width, self.height, self.width, self.height], np.float32)
        return self.boxes / scale


@dataclass
class Dataset:
    """Records plus the class names (from the annotation header, never assumed) and what was wrong."""

    records: list[ImageRecord]
    class_names: list[str]
    root: Optional[Path] = None
    format: str = "unknown"
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return any(r.mask_path is not None for r in self.records)

    def by_id(self) -> dict[str, ImageRecord]:
        return {r.image_id: r for r in self.records}

    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records if r.split is not None})

    def subset(self, split: Optional[str] = None, ids: Optional[Sequence[str]] = None) -> "Dataset":
        """Records of one split, or with the given ids, as a new data set sharing class names."""
        keep = self.records
        if split is not None:
            keep = [r for r in keep if r.split == split]
        if ids is not None:
            wanted = set(ids)
            keep = [r for r in keep if r.image_id in wanted]
        return replace(self, records=list(keep), problems=list(self.problems))

    def box_counts(self) -> dict[str, int]:
        """Boxes per class (a multi-hot box counts once for each of its classes)."""
        if not self.records:
            return {c: 0 for c in self.class_names}
        totals = np.zeros(self.num_classes, np.int64)
        for r in self.records:
            if r.n_boxes:
                totals += r.labels.sum(axis=0, dtype=np.int64)
        return {c: int(n) for c, n in zip(self.class_names, totals)}
