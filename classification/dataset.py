"""Training and validation crops: class-balanced positives, negatives, albumentations, an image cache.

Each training batch is drawn afresh from the loop's per-epoch RNG: which boxes (class-balanced, as
the challenge's SCC boxes are 4% of all), how they are jittered, where negatives sit, and the
augmentation seed. Nothing else is random, so an epoch's batches are the same whether or not the
process was restarted before it (the shared loop's exact resume depends on that).

Negatives are crops of regions that hold no annotated box — background glass, benign cells, debris —
labelled all-zero. They teach the sigmoid head to say "no cancer here", which is what lets the fused
score suppress the U-Net's false positives. Folder-per-class data sets (whole tiles) have no such
regions; there the classes themselves (e.g. LC25000's benign ``lung_n``) play that part.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from cytocore.errors import CytoFuseError, DataError
from cytocore.imageio import read_image
from cytocore.preprocess import to_network_input
from cytocore.records import Dataset, ImageRecord

from .crops import (
    CropConfig,
    JitterConfig,
    NegativeConfig,
    background_colour,
    box_sides,
    extract_crops,
    jitter_boxes,
    object_points,
    sample_negative_boxes,
    zoom_boxes,
)
from .proposals import ProposalPool

log = logging.getLogger("cytofuse")

SAMPLING_MODES = ("balanced", "sqrt", "uniform")


def _from_dict(cls, d: Optional[dict], section: str):
    d = dict(d or {})
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise CytoFuseError(f"unknown {section} option(s): {', '.join(sorted(unknown))}")
    return cls(**d)


@dataclass
class SamplingConfig:
    """Which boxes a batch holds (the ``sampling:`` block)."""

    batch_size: int = 32
    mode: str = "balanced"  # balanced: each class equally often | sqrt: ∝ sqrt(boxes) | uniform: ∝ boxes
    jitter: JitterConfig = field(default_factory=JitterConfig)
    tile_zoom: float = 1.0  # whole-tile sets: train on random windows of this fraction of the tile's side

    def __post_init__(self) -> None:
        if not 0.1 <= float(self.tile_zoom) <= 1.0:
            raise CytoFuseError(f"sampling.tile_zoom must be in [0.1, 1], not {self.tile_zoom}")
        self.tile_zoom = float(self.tile_zoom)
        if isinstance(self.jitter, dict):
            self.jitter = _from_dict(JitterConfig, self.jitter, "sampling.jitter")
        if self.mode not in SAMPLING_MODES:
            raise CytoFuseError(f"sampling.mode must be one of {', '.join(SAMPLING_MODES)}, not {self.mode!r}")
        if int(self.batch_size) < 1:
            raise CytoFuseError("sampling.batch_size must be at least 1")
        self.batch_size = int(self.batch_size)


@dataclass
class AugmentConfig:
    """albumentations settings (the ``augment:`` block); probabilities are per crop."""

    enabled: bool = True
    flips: bool = True
    rotate90: bool = True
    color_p: float = 0.6  # stain variation between labs and slides
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.2
    hue: float = 0.04
    blur_p: float = 0.15  # slightly out-of-focus cells
    scale: float = 0.1  # zoom by up to ±10%
    scale_p: float = 0.3


def build_augment(cfg: AugmentConfig):
    """The albumentations pipeline, or None when disabled. Reseeded per batch by the sampler."""
    if not cfg.enabled:
        return None
    import albumentations as A
    import cv2

    steps = []
    if cfg.flips:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if cfg.rotate90:
        steps.append(A.RandomRotate90(p=1.0))
    if cfg.scale > 0 and cfg.scale_p > 0:
        steps.append(A.Affine(scale=(1 - cfg.scale, 1 + cfg.scale), border_mode=cv2.BORDER_REFLECT_101, p=cfg.scale_p))
    if cfg.color_p > 0:
        steps.append(A.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
                                   hue=cfg.hue, p=cfg.color_p))
    if cfg.blur_p > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.2), p=cfg.blur_p))
    return A.Compose(steps, seed=0) if steps else None


class ImageCache:
    """Decoded images (with background colour and stained-pixel points), least recently used out.

    Crops come from a few hundred images again and again; decoding a JPEG per crop would dominate
    the step time on a CPU, and keeping every image of a large set would not fit in memory.
    """

    def __init__(self, max_mb: float = 1024.0) -> None:
        self.max_bytes = int(max_mb * 1e6)
        self.items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.points: dict[str, np.ndarray] = {}
        self.bytes = 0

    def get(self, record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
        """``(image, background colour)`` of a record."""
        key = str(record.path)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        image = read_image(record.path)
        if image.shape[1] != record.width or image.shape[0] != record.height:
            # Boxes are in the annotation's pixel frame; a mismatching file would give wrong crops.
            raise DataError(f"{record.path}: image is {image.shape[1]}x{image.shape[0]} but its annotation says "
                            f"{record.width}x{record.height}")
        item = (image, background_colour(image))
        self.items[key] = item
        self.bytes += image.nbytes
        while self.bytes > self.max_bytes and len(self.items) > 1:
            old_key, (old, _) = self.items.popitem(last=False)
            self.bytes -= old.nbytes
        return item

    def object_points(self, record: ImageRecord) -> np.ndarray:
        key = str(record.path)
        if key not in self.points:
            image, bg = self.get(record)
            self.points[key] = object_points(image, bg)
        return self.points[key]


def positive_pool(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(record index, box xyxy, multi-hot label)`` of every box with at least one class."""
    idx, boxes, labels = [], [], []
    for i, r in enumerate(dataset.records):
        if r.n_boxes == 0:
            continue
        keep = r.labels.any(axis=1)
        idx.append(np.full(int(keep.sum()), i))
        boxes.append(r.boxes[keep])
        labels.append(r.labels[keep])
    k = dataset.num_classes
    if not idx:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, k), np.float32)
    return np.concatenate(idx), np.concatenate(boxes).astype(np.float32), np.concatenate(labels).astype(np.float32)


def sampling_weights(labels: np.ndarray, mode: str) -> np.ndarray:
    """Probability of drawing each box so classes appear as ``mode`` asks.

    A class c gets share q_c (equal for "balanced", ∝ sqrt(n_c) for "sqrt") and passes it evenly to
    its n_c boxes; a multi-hot box collects the shares of all its classes. "uniform" draws boxes
    as they come.
    """
    n = len(labels)
    if n == 0:
        return np.zeros(0)
    if mode == "uniform":
        return np.full(n, 1.0 / n)
    counts = labels.sum(axis=0)
    present = counts > 0
    q = np.where(present, 1.0 if mode == "balanced" else np.sqrt(counts), 0.0)
    q = q / q.sum()
    per_box = labels @ np.where(present, q / np.maximum(counts, 1), 0.0)
    return per_box / per_box.sum()


class CropSampler:
    """Training batches ``(inputs (B, 3, S, S) float32, labels (B, K) float32)`` from a data set."""

    def __init__(
        self,
        dataset: Dataset,
        crop: CropConfig,
        sampling: SamplingConfig,
        negatives: NegativeConfig,
        augment: Optional[AugmentConfig] = None,
        whole_image: bool = False,
        cache: Optional[ImageCache] = None,
        proposals: Optional[ProposalPool] = None,
        proposal_share: float = 0.5,
        proposal_negative_share: float = 0.4,
    ) -> None:
        self.dataset = dataset
        self.crop = crop
        self.sampling = sampling
        self.negatives = negatives
        self.whole_image = whole_image
        self.margin = 0.0 if whole_image else crop.margin
        self.cache = cache or ImageCache()
        self.augment = build_augment(augment) if augment is not None else None
        self.pool_index, self.pool_boxes, self.pool_labels = positive_pool(dataset)
        if len(self.pool_index) == 0:
            raise DataError(f"{dataset.root}: no labelled boxes to train the classifier on")
        self.weights = sampling_weights(self.pool_labels, sampling.mode)
        self.sides = box_sides(self.pool_boxes)
        self.negative_ratio = 0.0 if whole_image else float(negatives.ratio)
        self.proposals = proposals if proposals is not None and len(proposals) and not whole_image else None
        self.n_proposal_positive, self.n_proposal_negative = self._proposal_counts(proposal_share, proposal_negative_share)
        if self.proposals is not None:
            pos = self.proposals.positive
            self.proposal_positive = np.flatnonzero(pos)
            self.proposal_negative = np.flatnonzero(~pos)
            self.proposal_weights = sampling_weights(self.proposals.labels[pos], sampling.mode)

    def _proposal_counts(self, share: float, negative_share: float) -> tuple[int, int]:
        """Proposal crops per batch: ``(positives, negatives)``, each only if the pool holds some."""
        if self.proposals is None:
            return 0, 0
        n = int(round(self.sampling.batch_size * share))
        has_pos, has_neg = bool(self.proposals.positive.any()), bool((~self.proposals.positive).any())
        n_neg = int(round(n * negative_share)) if has_pos else n
        n_neg = n_neg if has_neg else 0
        n_pos = n - n_neg if has_pos else 0
        return n_pos, n_neg

    @property
    def n_ground_truth(self) -> int:
        """Crops per batch from annotated boxes and random negatives (the rest are proposals)."""
        return self.sampling.batch_size - self.n_proposal_positive - self.n_proposal_negative

    @property
    def n_negative(self) -> int:
        return int(round(self.n_ground_truth * self.negative_ratio))

    def expected_frequency(self) -> np.ndarray:
        """Expected share of crops positive for each class (what ``pos_weight: auto`` balances)."""
        b = self.sampling.batch_size
        freq = (self.n_ground_truth - self.n_negative) / b * (self.weights @ self.pool_labels)
        if self.n_proposal_positive:
            freq = freq + self.n_proposal_positive / b * (self.proposal_weights @ self.proposals.labels[self.proposal_positive])
        return freq

    def batches(self, epoch: int, rng: np.random.Generator, steps: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(steps):
            yield self.batch(rng)

    def batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        crops, labels = self.batch_crops(rng)
        return to_network_input(crops), labels

    def batch_crops(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Augmented uint8 crops and their labels: annotated boxes, random negatives, then proposals
        (class-balanced positives, then merged/fragment/unmatched negatives)."""
        neg_items = self._negative_items(rng, self.n_negative)
        pick = rng.choice(len(self.pool_index), self.n_ground_truth - len(neg_items), p=self.weights)
        boxes = self.pool_boxes[pick]
        if self.whole_image and self.sampling.tile_zoom < 1.0:
            boxes = zoom_boxes(boxes, self.sampling.tile_zoom, rng)
        boxes = jitter_boxes(boxes, rng, self.sampling.jitter)
        items = [(int(i), box) for i, box in zip(self.pool_index[pick], boxes)] + neg_items
        labels = [self.pool_labels[pick], np.zeros((len(neg_items), self.dataset.num_classes), np.float32)]
        if self.proposals is not None:
            chosen = np.concatenate([
                self.proposal_positive[rng.choice(len(self.proposal_positive), self.n_proposal_positive, p=self.proposal_weights)]
                if self.n_proposal_positive else np.zeros(0, np.int64),
                rng.choice(self.proposal_negative, self.n_proposal_negative) if self.n_proposal_negative else np.zeros(0, np.int64),
            ]).astype(np.int64)
            items += [(int(self.proposals.index[j]), self.proposals.boxes[j]) for j in chosen]
            labels.append(self.proposals.labels[chosen])
        labels = np.concatenate(labels).astype(np.float32)
        crops = self._crops(items)
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(0, 2**31 - 1)))
            crops = np.stack([self.augment(image=c)["image"] for c in crops])
        return crops, labels

    def _negative_items(self, rng: np.random.Generator, n: int) -> list[tuple[int, np.ndarray]]:
        items: list[tuple[int, np.ndarray]] = []
        records = self.dataset.records
        attempts = 0
        while len(items) < n and attempts < 4 * n:
            attempts += 1
            i = int(rng.integers(0, len(records)))
            r = records[i]
            points = self.cache.object_points(r) if self.negatives.on_objects > 0 else None
            found = sample_negative_boxes(rng, r.width, r.height, r.boxes, 1, self.sides, self.negatives, points)
            if len(found):
                items.append((i, found[0]))
        return items

    def _crops(self, items: list[tuple[int, np.ndarray]]) -> np.ndarray:
        s = self.crop.size
        out = np.empty((len(items), s, s, 3), np.uint8)
        by_image: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(items):
            by_image.setdefault(i, []).append(j)
        for i, js in by_image.items():
            image, bg = self.cache.get(self.dataset.records[i])
            boxes = np.stack([items[j][1] for j in js])
            out[js] = extract_crops(image, boxes, self.crop, background=bg, margin=self.margin)
        return out


def validation_crops(
    dataset: Dataset,
    crop: CropConfig,
    negatives: NegativeConfig,
    whole_image: bool = False,
    max_crops: Optional[int] = 2000,
    seed: int = 0,
    cache: Optional[ImageCache] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation crops ``(uint8 (N, S, S, 3), labels (N, K))``: every box unjittered, plus negatives.

    Negatives make up ``negatives.ratio`` of the set (none for whole-tile data sets), drawn once with
    ``seed`` so every epoch is scored on the same crops. Above ``max_crops`` a fixed random subset is kept.
    """
    rng = np.random.default_rng([seed, 7919])
    idx, boxes, labels = positive_pool(dataset)
    ratio = 0.0 if whole_image else float(negatives.ratio)
    n_neg = int(round(len(idx) * ratio / (1 - ratio))) if 0 < ratio < 1 and len(dataset) else 0
    neg_per_image = np.bincount(rng.integers(0, len(dataset), n_neg), minlength=len(dataset)) if n_neg else np.zeros(len(dataset), int)
    sides = box_sides(boxes)
    cache = cache or ImageCache(max_mb=256)
    margin = 0.0 if whole_image else crop.margin
    crops, labs = [], []
    for i, r in enumerate(dataset.records):
        own = idx == i
        n = int(neg_per_image[i])
        if not own.any() and n == 0:
            continue
        image, bg = cache.get(r)
        if own.any():
            crops.append(extract_crops(image, boxes[own], crop, background=bg, margin=margin))
            labs.append(labels[own])
        if n:
            found = sample_negative_boxes(rng, r.width, r.height, r.boxes, n, sides, negatives, object_points(image, bg))
            crops.append(extract_crops(image, found, crop, background=bg, margin=margin))
            labs.append(np.zeros((len(found), dataset.num_classes), np.float32))
    if not crops:
        return np.zeros((0, crop.size, crop.size, 3), np.uint8), np.zeros((0, dataset.num_classes), np.float32)
    all_crops, all_labels = np.concatenate(crops), np.concatenate(labs).astype(np.float32)
    if max_crops is not None and len(all_crops) > max_crops:
        keep = np.sort(rng.choice(len(all_crops), int(max_crops), replace=False))
        all_crops, all_labels = all_crops[keep], all_labels[keep]
    return all_crops, all_labels
