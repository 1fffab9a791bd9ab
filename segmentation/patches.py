"""Training data for the U-Net: images held in memory at training scale, a cell-oversampling patch
sampler, the albumentations pipeline, and a fixed tiling of the validation images.

Why sample patches around boxes: cancer cells cover a few percent of a brushing, so uniform patches
are mostly empty glass and benign cells. A share ``cell_fraction`` of the patches is centred (with
jitter) on a box drawn with probability proportional to the inverse frequency of its class, so rare
tumour types are seen about as often as common ones; the rest are uniform, so the network still sees
enough background, healthy images and benign mimics to learn what is *not* cancer.

Determinism: every draw comes from the ``rng`` the train loop passes for the epoch, and the
albumentations pipeline is re-seeded from that same rng at the start of each epoch, so an epoch's
batches are identical whether or not the process was restarted before it (exact ``--resume``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from cytocore.imageio import read_image
from cytocore.preprocess import to_network_input
from cytocore.records import ImageRecord

from .targets import RefineOptions, make_targets, rescale_image, scale_boxes


@dataclass
class SegSample:
    """One image at training scale with its target; ``image``/``target`` may be padded beyond ``size``."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    target: np.ndarray  # (H, W) uint8: 0/1, or class indices
    boxes: np.ndarray  # (N, 4) pixel xyxy at training scale
    labels: np.ndarray  # (N, K) multi-hot
    size: tuple[int, int]  # (height, width) before padding
    head: Optional[np.ndarray] = None  # (H, W) uint8 instance-head target (0..255 = 0..1), padded like target
    full_size: Optional[tuple[int, int]] = None  # (height, width) of the original image
    full_boxes: Optional[np.ndarray] = None  # (N, 4) pixel xyxy in the original image


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour: the glass of a brushing, used to pad so padding looks like empty slide."""
    return np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)


def pad_to(image: np.ndarray, target: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad at the bottom/right to at least ``height`` × ``width`` (background colour, target 0)."""
    h, w = target.shape
    if h >= height and w >= width:
        return image, target
    H, W = max(h, height), max(w, width)
    img = np.empty((H, W, 3), np.uint8)
    img[:] = background_colour(image)
    img[:h, :w] = image
    return img, pad_zeros(target, H, W)


def pad_zeros(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D plane padded with zeros at the bottom/right to at least ``height`` × ``width``."""
    h, w = plane.shape
    if h >= height and w >= width:
        return plane
    out = np.zeros((max(h, height), max(w, width)), plane.dtype)
    out[:h, :w] = plane
    return out


def load_samples(
    records: Sequence[ImageRecord],
    scale: float = 1.0,
    mode: str = "binary",
    kind: str = "auto",
    num_classes: int = 0,
    refine: RefineOptions = RefineOptions(),
    min_size: int = 0,
    progress: bool = False,
    desc: str = "loading",
    head: Optional[str] = None,
) -> list[SegSample]:
    """Read, rescale and build targets (and the instance ``head``'s, if any) for ``records``;
    pad each image to at least ``min_size``."""
    from tqdm.auto import tqdm

    out = []
    for r in tqdm(records, desc=desc, unit="img", disable=not progress, leave=False):
        image = rescale_image(read_image(r.path), scale)
        target, head_target = make_targets(r, image, mode, kind, num_classes, refine, head)
        h, w = target.shape
        boxes = scale_boxes(r.boxes, (r.width, r.height), (w, h))
        image, target = pad_to(image, target, min_size, min_size)
        if head_target is not None:
            head_target = pad_zeros(head_target, *target.shape)
        out.append(SegSample(r.image_id, image, target, boxes, r.labels, (h, w), head_target,
                             (int(r.height), int(r.width)), np.asarray(r.boxes, np.float64).reshape(-1, 4)))
    return out


def box_weights(samples: Sequence[SegSample], balance: bool = True) -> np.ndarray:
    """Sampling weight of every box (all samples concatenated), summing to 1.

    With ``balance``, a box weighs ``1 / count`` of its rarest class (a multi-hot SCC+NSCLC box counts
    as SCC when SCC is rarer); boxes without a class weigh like the commonest class.
    """
    labels = [s.labels for s in samples if len(s.boxes)]
    if not labels:
        return np.zeros(0)
    all_labels = np.concatenate(labels, axis=0)
    n = len(all_labels)
    if not balance or all_labels.shape[1] == 0:
        return np.full(n, 1.0 / n)
    counts = all_labels.sum(axis=0).astype(np.float64)
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    fallback = 1.0 / counts.max() if counts.max() > 0 else 1.0
    w = np.where(all_labels.any(axis=1), (all_labels * inv).max(axis=1), fallback)
    return w / w.sum()


class PatchSampler:
    """Draws patch positions ``(sample index, y0, x0)``: around weighted boxes or uniformly."""

    def __init__(self, samples: Sequence[SegSample], patch_size: int, cell_fraction: float = 0.7,
                 jitter: float = 0.35, balance: bool = True) -> None:
        if not samples:
            raise ValueError("no training images")
        self.samples = list(samples)
        self.patch = int(patch_size)
        self.cell_fraction = float(cell_fraction)
        self.jitter = float(jitter)
        # Every box of every sample, in the order box_weights() uses: (owning sample, index in it).
        self.box_owner = np.concatenate([np.full(len(s.boxes), i, np.int64) for i, s in enumerate(self.samples)])
        self.box_index = np.concatenate([np.arange(len(s.boxes), dtype=np.int64) for s in self.samples])
        self.weights = box_weights(self.samples, balance)

    def positions(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
        """``n`` patch positions; deterministic given the generator's state."""
        out = []
        for _ in range(n):
            if len(self.weights) and rng.random() < self.cell_fraction:
                j = int(rng.choice(len(self.weights), p=self.weights))
                i = int(self.box_owner[j])
                b = self.samples[i].boxes[self.box_index[j]]
                cy = (b[1] + b[3]) / 2 + rng.uniform(-1, 1) * self.jitter * self.patch / 2
                cx = (b[0] + b[2]) / 2 + rng.uniform(-1, 1) * self.jitter * self.patch / 2
                y0, x0 = int(round(cy - self.patch / 2)), int(round(cx - self.patch / 2))
            else:
                i = int(rng.integers(len(self.samples)))
                h, w = self.samples[i].size
                y0 = int(rng.integers(0, max(1, h - self.patch + 1)))
                x0 = int(rng.integers(0, max(1, w - self.patch + 1)))
            H, W = self.samples[i].target.shape
            out.append((i, int(np.clip(y0, 0, H - self.patch)), int(np.clip(x0, 0, W - self.patch))))
        return out

    def crop(self, position: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Image, target and instance-head target (``None`` without a head) of one patch."""
        i, y0, x0 = position
        s, p = self.samples[i], self.patch
        head = s.head[y0:y0 + p, x0:x0 + p] if s.head is not None else None
        return s.image[y0:y0 + p, x0:x0 + p], s.target[y0:y0 + p, x0:x0 + p], head


# ---------------------------------------------------------------------------------- augmentation


def build_augment(cfg: Optional[dict]) -> Optional[Any]:
    """The albumentations pipeline of the ``augment:`` block (``None`` when disabled).

    Geometric transforms move image and target together (nearest-neighbour for the target); colour,
    stain (HED) and blur only touch the image. Borders are reflected so no black wedges appear.
    """
    import albumentations as A
    import cv2

    cfg = dict(cfg or {})
    if not cfg.get("enabled", True):
        return None
    t = []
    if cfg.get("flip", 0) > 0:
        t += [A.HorizontalFlip(p=cfg["flip"]), A.VerticalFlip(p=cfg["flip"])]
    if cfg.get("rotate90", 0) > 0:
        t.append(A.RandomRotate90(p=cfg["rotate90"]))
    aff = cfg.get("affine") or {}
    if aff.get("p", 0) > 0:
        t.append(A.Affine(scale=tuple(aff.get("scale", (0.9, 1.1))), rotate=(-aff.get("rotate", 15), aff.get("rotate", 15)),
                          border_mode=cv2.BORDER_REFLECT_101, p=aff["p"]))
    el = cfg.get("elastic") or {}
    if el.get("p", 0) > 0:
        t.append(A.ElasticTransform(alpha=el.get("alpha", 20.0), sigma=el.get("sigma", 5.0),
                                    border_mode=cv2.BORDER_REFLECT_101, p=el["p"]))
    col = cfg.get("color") or {}
    if col.get("p", 0) > 0:
        t.append(A.RandomBrightnessContrast(brightness_limit=col.get("brightness", 0.1),
                                            contrast_limit=col.get("contrast", 0.1), p=col["p"]))
        t.append(A.HueSaturationValue(hue_shift_limit=col.get("hue", 5), sat_shift_limit=col.get("saturation", 10),
                                      val_shift_limit=0, p=col["p"]))
    st = cfg.get("stain") or {}
    if st.get("p", 0) > 0:
        s, sh = float(st.get("scale", 0.15)), float(st.get("shift", 0.05))
        t.append(A.HEStain(method="random_preset", intensity_scale_range=(1 - s, 1 + s),
                           intensity_shift_range=(-sh, sh), augment_background=False, p=st["p"]))
    bl = cfg.get("blur") or {}
    if bl.get("p", 0) > 0:
        t.append(A.GaussianBlur(blur_limit=0, sigma_limit=tuple(bl.get("sigma", (0.3, 1.2))), p=bl["p"]))
    return A.Compose(t, seed=0)


# ------------------------------------------------------------------------------------- batches


class PatchBatches:
    """The train loop's ``batches(epoch, rng)``: ``steps`` batches of ``(inputs, targets)``.

    Inputs are ``(B, 3, P, P)`` float32 (:func:`cytocore.preprocess.to_network_input`); targets are
    ``(B, 1, P, P)`` float32 for binary mode or ``(B, P, P)`` int32 class indices; with an instance
    head ``(B, 2, P, P)`` float32: the semantic target (0/1 or the class index) and the head's [0, 1]
    target (what :class:`segmentation.losses.WithInstanceHead` expects).
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, steps: int, mode: str = "binary",
                 augment: Optional[Any] = None) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.steps = int(steps)
        self.mode = mode
        self.augment = augment

    def __call__(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        for _ in range(self.steps):
            yield self.batch(rng)

    def batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        images, targets, heads = [], [], []
        for pos in self.sampler.positions(rng, self.batch_size):
            img, tgt, head = self.sampler.crop(pos)
            if self.augment is not None:
                masks = [tgt] if head is None else [tgt, head]
                out = self.augment(image=img, masks=masks)
                img, tgt = out["image"], out["masks"][0]
                head = None if head is None else out["masks"][1]
            images.append(img)
            targets.append(tgt)
            heads.append(head)
        x = to_network_input(np.stack(images))
        y = np.stack(targets)
        semantic = (y > 0).astype(np.float32) if self.mode == "binary" else y.astype(np.float32)
        if heads[0] is not None:
            from .instance_targets import TARGET_LEVELS

            head_y = np.stack(heads).astype(np.float32) / TARGET_LEVELS
            return x, np.stack([semantic, head_y], axis=1)
        if self.mode == "binary":
            return x, semantic[:, None]
        return x, y.astype(np.int32)


# ---------------------------------------------------------------------------------- validation


@dataclass
class TileGrid:
    """Non-overlapping ``tile``-sized tiles covering one image padded to a multiple of ``tile``."""

    sample: int
    origins: list[tuple[int, int]]
    padded: tuple[int, int]


def tile_samples(samples: Sequence[SegSample], tile: int) -> tuple[list[TileGrid], np.ndarray]:
    """Cut every sample into a fixed tile grid; return the grids and all tiles as network inputs.

    Validation runs on whole images this way with one input shape (one compiled graph), and the
    metric is computed only on each image's real pixels, not on the padding.
    """
    grids, tiles = [], []
    for i, s in enumerate(samples):
        h, w = s.size
        H, W = -(-h // tile) * tile, -(-w // tile) * tile
        img, _ = pad_to(s.image[:h, :w], s.target[:h, :w], H, W)
        origins = [(y, x) for y in range(0, H, tile) for x in range(0, W, tile)]
        tiles += [img[y:y + tile, x:x + tile] for y, x in origins]
        grids.append(TileGrid(i, origins, (H, W)))
    inputs = to_network_input(np.stack(tiles)) if tiles else np.zeros((0, 3, tile, tile), np.float32)
    return grids, inputs
