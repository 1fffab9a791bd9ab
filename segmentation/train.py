"""Train the segmentation U-Net (``cytofuse seg train``): config → data → TrainTask → the shared loop.

This module only describes *what* to train; :mod:`cytocore.trainloop` does the training, checkpoints,
resume, CSV log and config snapshot. The checkpoint's metadata holds everything prediction needs
(architecture, mode, classes, scale, full config), see :mod:`segmentation.model_io`.

Usable as ``python -m segmentation train --config YAML [--data DIR] [--out RUN] [--resume]`` too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from cytocore.config import load_config
from cytocore.errors import CytoFuseError, DataError
from cytocore.records import Dataset

from .selection import BOX_METRICS

log = logging.getLogger("cytofuse")


def instance_head_kind(cfg: dict) -> Optional[str]:
    """The configured instance head (``targets.instance_head``), ``None`` for none."""
    kind = (cfg.get("targets") or {}).get("instance_head")
    return None if kind in (None, "none", False) else str(kind)

PathLike = Union[str, Path]
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def load_seg_config(path: Optional[PathLike] = None, overrides: Iterable[str] = ()) -> dict:
    """The stage's defaults ← the user's YAML ← ``--set`` overrides (unknown keys: one-line error)."""
    return load_config(DEFAULT_CONFIG, path, overrides)


# ----------------------------------------------------------------------------------------- data


def load_split_dataset(cfg: dict, data: Optional[PathLike] = None, fmt: Optional[str] = None) -> Dataset:
    """Read the data set and give every image a split (its own if it has one, else assign_splits)."""
    from cytocore.readers import load_dataset
    from cytocore.splits import assign_splits

    path = data or cfg["data"]["path"]
    if not path:
        raise CytoFuseError("no data set given: pass --data DIR or set data.path in the config")
    ds = load_dataset(path, format=fmt or cfg["data"]["format"], decode=True)  # a truncated file: skipped, not a crash
    if any(r.split is None for r in ds.records):
        ds = assign_splits(ds, seed=int(cfg["data"]["split_seed"]))
    return ds


def whole_splits(ds: Dataset, cfg: dict) -> tuple[list, list]:
    """The training images and every validation image (by id); an empty split is an error."""
    d = cfg["data"]
    train = [r for r in ds.records if r.split == d["train_split"]]
    val = sorted((r for r in ds.records if r.split == d["val_split"]), key=lambda r: r.image_id)
    where = ds.root or "data set"
    if not train:
        raise DataError(f"{where}: no images in split {d['train_split']!r} (splits found: {', '.join(ds.splits()) or 'none'})")
    if not val:
        raise DataError(f"{where}: no images in split {d['val_split']!r} (splits found: {', '.join(ds.splits()) or 'none'})")
    return train, val


def epoch_validation_subset(val: Sequence, cfg: dict) -> list:
    """The validation images every epoch is scored on: at most ``validation.max_images`` of ``val``."""
    limit = cfg["validation"]["max_images"]
    return covering_subset(val, int(limit)) if limit else list(val)


def split_records(ds: Dataset, cfg: dict) -> tuple[list, list]:
    """The training images and the validation images every epoch is scored on."""
    train, val = whole_splits(ds, cfg)
    return train, epoch_validation_subset(val, cfg)


def covering_subset(records: Sequence, limit: int) -> list:
    """At most ``limit`` of ``records`` (by id) taken in turns from each class's images and the images
    without boxes, so that every class the split has is in the subset.

    Checkpoints are ranked and post-processing values searched on these images after every epoch;
    the first N by id may miss a class or the healthy images (the demo's first 8 of 30 held no
    healthy image), and values tuned without them need not fit them.
    """
    records = sorted(records, key=lambda r: r.image_id)
    if len(records) <= limit:
        return records
    k = max((r.labels.reshape(r.n_boxes, -1).shape[1] for r in records if r.n_boxes), default=0)
    groups = [[r for r in records if r.n_boxes and r.labels.reshape(r.n_boxes, -1)[:, c].any()] for c in range(k)]
    groups.append([r for r in records if not r.n_boxes])
    chosen: dict = {}
    while len(chosen) < limit:
        before = len(chosen)
        for group in groups:
            rest = [r for r in group if r.image_id not in chosen]
            if rest and len(chosen) < limit:
                chosen[rest[0].image_id] = rest[0]
        if len(chosen) == before:
            break
    return sorted(chosen.values(), key=lambda r: r.image_id)


# ------------------------------------------------------------------------------------ validation


class Validator:
    """``TrainTask.validate``: predicts whole validation images tile by tile and scores them.

    Dice, IoU and Rand error of the semantic map are reported; with a :class:`FrocTuner`
    (``validation.froc``) also ``val_froc``, the class-agnostic challenge FROC of the post-processed
    boxes, and the post-processing values chosen for it (:mod:`segmentation.selection`).
    Every call uses the same tiles and the same input shape, so it compiles once and its numbers are
    comparable from epoch to epoch.
    """

    def __init__(self, samples: Sequence, tile: int, batch_size: int, mode: str, num_classes: int,
                 class_names: Sequence[str], threshold: float = 0.5, with_rand: bool = True,
                 instance_channels: int = 0, tuner: Any = None) -> None:
        from .patches import tile_samples

        self.samples = list(samples)
        self.tile = int(tile)
        self.batch_size = int(batch_size)
        self.mode = mode
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.threshold = float(threshold)
        self.with_rand = with_rand
        self.instance_channels = int(instance_channels)
        self.tuner = tuner
        self.grids, self.inputs = tile_samples(self.samples, self.tile)

    def predict_tiles(self, network: Any) -> np.ndarray:
        """Per-tile probabilities ``(T, C, tile, tile)``: sigmoid (binary) or softmax (classes) of the
        semantic channels, then the instance head's sigmoid."""
        import mindspore as ms

        from .predict import _activate

        out = []
        n, b = len(self.inputs), self.batch_size
        for start in range(0, n, b):
            chunk = self.inputs[start:start + b]
            real = len(chunk)
            if real < b:  # keep one input shape: one compiled graph
                chunk = np.concatenate([chunk, np.zeros((b - real, *chunk.shape[1:]), np.float32)])
            logits = network(ms.Tensor(chunk)).asnumpy()[:real]
            out.append(_activate(logits, "auto", self.instance_channels))
        return np.concatenate(out) if out else np.zeros((0, 1, self.tile, self.tile), np.float32)

    def image_maps(self, maps: np.ndarray) -> list[np.ndarray]:
        """The tiles stitched back into one ``(C, h, w)`` map per validation image."""
        out, k = [], 0
        for grid in self.grids:
            canvas = np.zeros((maps.shape[1], *grid.padded), maps.dtype)
            for y, x in grid.origins:
                canvas[:, y:y + self.tile, x:x + self.tile] = maps[k]
                k += 1
            h, w = self.samples[grid.sample].size
            out.append(canvas[:, :h, :w])
        return out

    def full_size(self, sample: Any, semantic: np.ndarray, head: Optional[np.ndarray]) -> Any:
        """One image's maps resized to its original size (as prediction does) with its boxes there."""
        from .predict import resize_plane
        from .selection import ValImage

        h, w = sample.full_size or sample.size
        boxes = sample.full_boxes if sample.full_boxes is not None else sample.boxes
        if self.mode == "binary":
            fg = resize_plane(semantic[0], (w, h))
        else:
            fg = np.stack([resize_plane(c, (w, h)) for c in semantic])
        return ValImage(fg, None if head is None else resize_plane(head, (w, h)), np.asarray(boxes, np.float64))

    def planes(self, maps: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """One image's ``(C, h, w)`` maps split into the semantic channels and the instance head (or None)."""
        semantic = maps[: maps.shape[0] - self.instance_channels]
        return semantic, maps[semantic.shape[0]] if self.instance_channels else None

    def tuning_images(self, network: Any) -> list:
        """Every validation image's maps at full size with its boxes: what the post-processing search scores."""
        return [self.full_size(s, *self.planes(m))
                for s, m in zip(self.samples, self.image_maps(self.predict_tiles(network)))]

    def __call__(self, network: Any) -> dict[str, float]:
        from .metrics import SegScores

        per_image = self.image_maps(self.predict_tiles(network))
        scores = SegScores(num_classes=0 if self.mode == "binary" else self.num_classes,
                           class_names=self.class_names, with_rand=self.with_rand)
        full = []
        for s, m in zip(self.samples, per_image):
            semantic, head = self.planes(m)
            h, w = s.size
            if self.mode == "binary":
                pred = semantic[0] > self.threshold
            else:
                pred = np.argmax(semantic, axis=0).astype(np.uint8)
            scores.add(pred, s.target[:h, :w])
            if self.tuner is not None:
                full.append(self.full_size(s, semantic, head))
        out = scores.summary("val_")
        if self.tuner is not None:
            out.update(self.tuner.metrics(full))
        return out


# ----------------------------------------------------------------------------------------- task


@dataclass
class SegSetup:
    """What :func:`build_task` made, for callers (tests, the baseline) that want to look inside."""

    task: Any
    loop: Any
    train_samples: list
    val_samples: list
    meta: dict
    validator: Any = None
    all_val_records: list = field(default_factory=list)  # the whole val split (val_samples may be a subset)
    sample_args: dict = field(default_factory=dict)  # how val_samples were loaded, to load the others alike


def _check_multiple(value: int, multiple: int, key: str) -> None:
    if value % multiple:
        raise CytoFuseError(f"{key}={value} must be a multiple of {multiple} (2**(model.depth-1))")


def resolve_model(cfg: dict, mode: str, num_classes: int) -> dict:
    """The full model block, with ``out_channels`` derived from the mode and checked against it."""
    from .unet import resolve_model_config

    model = resolve_model_config(cfg["model"])
    want = 1 if mode == "binary" else num_classes + 1
    given = cfg["model"].get("out_channels")
    if given is not None and int(given) != want:
        raise CytoFuseError(f"model.out_channels={given} does not fit targets.mode={mode!r} with {num_classes} "
                            f"classes (needs {want}); leave it null")
    model["out_channels"] = want
    heads = 1 if instance_head_kind(cfg) else 0
    given = cfg["model"].get("instance_channels")
    if given is not None and int(given) != heads:
        raise CytoFuseError(f"model.instance_channels={given} does not fit targets.instance_head="
                            f"{cfg['targets'].get('instance_head')!r} (needs {heads}); leave it null")
    model["instance_channels"] = heads
    return model


def check_config(cfg: dict) -> tuple[Any, dict]:
    """Validate the parts of the config that do not depend on the data, before any data is read.

    Returns the loop config and the model block (``out_channels`` still unresolved).
    """
    from cytocore.trainloop import LoopConfig

    from .instance_targets import HEAD_KINDS
    from .postprocess import postprocess_config
    from .targets import AUTO_SCALE, MODES, TARGET_KINDS, RefineOptions
    from .unet import resolve_model_config

    t, p, v = cfg["targets"], cfg["patches"], cfg["validation"]
    if t["mode"] not in MODES:
        raise CytoFuseError(f"targets.mode must be one of {', '.join(MODES)}, got {t['mode']!r}")
    if t["kind"] == "cam":  # needs the classifier, which this stage must not import
        raise CytoFuseError("targets.kind 'cam' is two steps: `cytofuse weak-masks --cls CKPT --data DIR --out MASKDIR`, "
                            "then train with --set targets.kind=mask --set targets.mask_dir=MASKDIR")
    if t["kind"] not in TARGET_KINDS:
        raise CytoFuseError(f"targets.kind must be one of {', '.join(TARGET_KINDS)}, got {t['kind']!r}")
    head = instance_head_kind(cfg)
    if head is not None and head not in HEAD_KINDS:
        raise CytoFuseError(f"targets.instance_head must be one of {', '.join(HEAD_KINDS)} or none, got {head!r}")
    try:
        postprocess_config(cfg.get("postprocess") or {})
    except ValueError as exc:
        raise CytoFuseError(f"postprocess: {exc}") from None
    if t.get("mask_dir") and t["kind"] not in ("mask", "auto"):
        raise CytoFuseError(f"targets.mask_dir is read only by targets.kind mask or auto, not {t['kind']!r}")
    try:
        RefineOptions(**t["refine"])
        loop = LoopConfig.from_dict(cfg["train"], cfg["optimizer"])
    except (TypeError, ValueError) as exc:
        raise CytoFuseError(f"config: {exc}") from None
    scale = cfg["data"]["scale"]
    if scale != AUTO_SCALE:
        try:
            ok = 0 < float(scale) <= 4
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CytoFuseError(f"data.scale must be auto or a number in (0, 4], got {scale!r}")
    spacing = (v.get("tune") or {}).get("min_distance")
    if spacing not in (None, AUTO_SCALE):
        try:
            ok = isinstance(spacing, (list, tuple)) and all(int(x) == float(x) and int(x) >= 1 for x in spacing)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CytoFuseError(f"validation.tune.min_distance must be auto or a list of whole pixels >= 1, got {spacing!r}")
    model = resolve_model_config(cfg["model"])
    multiple = 2 ** (int(model["depth"]) - 1)
    _check_multiple(int(p["size"]), multiple, "patches.size")
    _check_multiple(int(v["tile"]), multiple, "validation.tile")
    if int(p["batch_size"]) < 1 or int(v["batch_size"]) < 1:
        raise CytoFuseError("patches.batch_size and validation.batch_size must be at least 1")
    weights = cfg["loss"].get("class_weights")
    if weights is not None and weights != "auto" and not isinstance(weights, (list, tuple)):
        raise CytoFuseError(f"loss.class_weights must be null, auto or a list, got {weights!r}")
    box_monitor = loop.monitor in {f"val_{m}" for m in BOX_METRICS}
    if box_monitor and not v.get("froc", True):
        raise CytoFuseError(f"train.monitor is {loop.monitor} but validation.froc is false: enable it or monitor val_dice")
    box_metric = str(v.get("box_metric", "froc"))
    if box_metric not in BOX_METRICS:
        raise CytoFuseError(f"validation.box_metric must be one of {', '.join(BOX_METRICS)}, not {box_metric!r}")
    if box_monitor and loop.monitor != f"val_{box_metric}":
        raise CytoFuseError(f"train.monitor is {loop.monitor} but validation.box_metric is {box_metric}: "
                            f"monitor val_{box_metric}")
    return loop, model


def build_task(cfg: dict, ds: Dataset, progress: bool = True) -> SegSetup:
    """Targets, samplers, augmentation, network, loss and validator for one training run."""
    from cytocore import distributed, runtime
    from cytocore.mpp import training_mpp
    from cytocore.trainloop import TrainTask

    from .losses import class_weights_from_counts, make_loss
    from .patches import PatchBatches, PatchSampler, build_augment, load_samples
    from .targets import RefineOptions, data_scale
    from .unet import create_unet

    loop, _ = check_config(cfg)
    t, p, v = cfg["targets"], cfg["patches"], cfg["validation"]
    mode, kind = t["mode"], t["kind"]
    num_classes = ds.num_classes
    if mode == "classes" and num_classes == 0:
        raise CytoFuseError("targets.mode is 'classes' but the data set has no classes")
    model_cfg = resolve_model(cfg, mode, num_classes)
    multiple = 2 ** (int(model_cfg["depth"]) - 1)

    train_recs, all_val = whole_splits(ds, cfg)
    val_recs = epoch_validation_subset(all_val, cfg)
    scale = data_scale(cfg["data"]["scale"], train_recs)
    if t.get("mask_dir"):
        from .targets import records_with_mask_dir

        train_recs = records_with_mask_dir(train_recs, t["mask_dir"])
        val_recs = records_with_mask_dir(val_recs, t["mask_dir"])
        all_val = records_with_mask_dir(all_val, t["mask_dir"])
    refine = RefineOptions(**t["refine"])
    head = instance_head_kind(cfg)
    common = dict(scale=scale, mode=mode, kind=kind, num_classes=num_classes, refine=refine, progress=progress, head=head)
    train_samples = load_samples(train_recs, min_size=int(p["size"]), desc="train images", **common)
    val_samples = load_samples(val_recs, desc="val images", **common)

    runtime.setup(seed=loop.seed, threads=cfg["runtime"]["threads"], mode=cfg["runtime"]["mode"])
    network = create_unet(**model_cfg)

    weights = cfg["loss"].get("class_weights")
    if mode == "classes" and weights == "auto":
        counts = np.zeros(num_classes + 1, np.int64)
        for s in train_samples:
            h, w = s.size
            counts += np.bincount(s.target[:h, :w].ravel(), minlength=num_classes + 1)[: num_classes + 1]
        weights = class_weights_from_counts(counts)
        log.info("class weights (background first): %s", ", ".join(f"{x:.2f}" for x in weights))
    loss = make_loss(mode, model_cfg["out_channels"], cfg["loss"], weights if mode == "classes" else None,
                     model_cfg["instance_channels"])

    sampler = PatchSampler(train_samples, int(p["size"]), float(p["cell_fraction"]), float(p["jitter"]),
                           bool(p["class_balance"]))
    # patches.batch_size is the global batch: under msrun each worker draws its share of it
    batch = distributed.per_worker_batch(int(p["batch_size"]), "patches.batch_size")
    batches = PatchBatches(sampler, batch, loop.steps_per_epoch, mode, build_augment(cfg["augment"]))
    tuner = None
    if v.get("froc", True):
        from .selection import FrocTuner, spacing_search

        tune, post = spacing_search(v.get("tune"), cfg.get("postprocess"), train_recs)
        tuner = FrocTuner(post, tune, head is not None, multiclass=mode == "classes",
                          metric=str(v.get("box_metric", "froc")))
    validator = Validator(val_samples, int(v["tile"]), int(v["batch_size"]), mode, num_classes, ds.class_names,
                          float(v["threshold"]), bool(v["rand_error"]), model_cfg["instance_channels"], tuner)
    meta = {
        "stage": "segmentation",
        "model": model_cfg,
        "class_names": list(ds.class_names),
        "mode": mode,
        "scale": scale,
        "mpp": training_mpp(cfg["data"].get("mpp"), ds.root),  # µm/px of the training images (None: unknown)
        "input_multiple": multiple,
        "threshold": float(v["threshold"]),
        "instance_head": head,
        "config": cfg,
    }
    task = TrainTask(network=network, loss_fn=loss, batches=batches, validate=validator, meta=meta)
    return SegSetup(task, loop, train_samples, val_samples, meta, validator, all_val, {**common, "progress": False})


def retune_best_checkpoint(setup: SegSetup, best_path: PathLike) -> Optional[dict]:
    """Search the post-processing values of the chosen checkpoint again, on every validation image.

    Each epoch is scored on at most ``validation.max_images`` images: enough to rank checkpoints in
    seconds, too few to fix thresholds. A demo U-Net tuned on 8 images kept marker threshold 0.5, which
    left a test image's SCLC chain as one box (SCLC FROC 0.11) while 0.35 split it. So once training
    is over the chosen weights are scored on the whole split (two coordinate passes from the epoch's
    values) and the values written into ``best.ckpt``. Runs once (a resumed run finds it done), on
    rank 0, and only when the split has more images than the epochs saw. Returns the new metrics.
    """
    from cytocore import distributed, runtime

    from .patches import load_samples
    from .postprocess import TUNED_KEYS, decode_tuned, encode_tuned

    validator, path = setup.validator, Path(best_path)
    tuner = getattr(validator, "tuner", None)
    if tuner is None or not distributed.is_main() or not path.is_file() or len(setup.all_val_records) <= len(setup.val_samples):
        return None
    params, meta = runtime.load_checkpoint(path)
    metrics = dict(meta.get("metrics") or {})
    if "tuned_on_images" in metrics or not all(f"tuned_{k}" in metrics for k in TUNED_KEYS):
        return None
    network = setup.task.network
    runtime.load_into(network, params, path, strict=True)
    network.set_train(False)
    samples = load_samples(setup.all_val_records, desc="val images", **setup.sample_args)
    whole = Validator(samples, validator.tile, validator.batch_size, validator.mode, validator.num_classes,
                      validator.class_names, validator.threshold, False, validator.instance_channels, tuner)
    images = whole.tuning_images(network)
    tuner.current = {k: decode_tuned(k, metrics[f"tuned_{k}"]) for k in TUNED_KEYS}
    before = tuner.froc(images, tuner.current)
    scored = {tuner.key(tuner.current): before}  # the second pass scores only values the first did not
    for _ in range(2):
        best, _ = tuner.search(images, known=scored)
    name = f"val_{tuner.metric}"
    metrics.update({f"tuned_{k}": encode_tuned(k, v) for k, v in tuner.current.items()})
    metrics.update({f"{name}_all": float(best), f"{name}_all_epoch_values": float(before),
                    "tuned_on_images": float(len(images))})
    runtime.save_checkpoint(path, [network], {**meta, "metrics": metrics})
    log.info("post-processing of %s re-tuned on all %d validation images: %s %.4f -> %.4f (%s)", path.name,
             len(images), name, before, best, ", ".join(f"{k}={v}" for k, v in tuner.current.items()))
    return metrics


def train_segmentation(cfg: dict, data: Optional[PathLike] = None, out: Optional[PathLike] = None,
                       resume: bool = False, fmt: Optional[str] = None, progress: Optional[bool] = None):
    """Run a whole training; returns :class:`cytocore.trainloop.TrainResult`."""
    if progress is not None:
        cfg = {**cfg, "train": {**cfg["train"], "progress": bool(progress)}}
    if data is not None:
        cfg = {**cfg, "data": {**cfg["data"], "path": str(data)}}
    if fmt is not None:
        cfg = {**cfg, "data": {**cfg["data"], "format": fmt}}
    out_dir = Path(out or cfg["out"])
    cfg = {**cfg, "out": str(out_dir)}
    check_config(cfg)
    ds = load_split_dataset(cfg)
    setup = build_task(cfg, ds, progress=bool(cfg["train"]["progress"]))
    log.info(
        "segmentation: %d train / %d val images, mode %s, scale %.2f, model %s (depth %d, width %d)",
        len(setup.train_samples), len(setup.val_samples), setup.meta["mode"], setup.meta["scale"],
        setup.meta["model"]["name"], setup.meta["model"]["depth"], setup.meta["model"]["base_width"],
    )
    return train_and_retune(setup, out_dir, resume, cfg)


def train_and_retune(setup: SegSetup, out: PathLike, resume: bool, cfg: dict):
    """Train a built U-Net, then re-tune its chosen checkpoint on the whole validation split.

    What ``cytofuse seg train`` and both U-Nets of ``cytofuse compare`` run; returns the TrainResult.
    """
    from cytocore import runtime
    from cytocore.trainloop import train

    setup.task.meta["runtime"] = runtime.runtime_info()
    result = train(setup.task, setup.loop, out, resume=resume, config_snapshot=cfg)
    retune_best_checkpoint(setup, result.best_checkpoint)
    return result

