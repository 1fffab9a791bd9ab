"""Train the crop classifier with the shared loop (``cytocore.trainloop``): data, network, loss, metrics.

This module only describes the classification task — crops from boxes or whole tiles, the network,
the head's loss, validation metrics and checkpoint metadata — and hands it to the one training
loop every stage uses, which owns checkpoints, resume, logging and progress.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from cytocore import distributed, runtime
from cytocore.config import load_config
from cytocore.errors import CheckpointError, CytoFuseError, DataError
from cytocore.records import Dataset
from cytocore.trainloop import LoopConfig, TrainResult, TrainTask, train

from .crops import CropConfig, JitterConfig, NegativeConfig, tile_crop
from .dataset import AugmentConfig, CropSampler, ImageCache, SamplingConfig, validation_crops
from .metrics import classification_metrics, format_metrics
from .model import ModelConfig, build_network, count_parameters, make_loss, probabilities
from cytocore.mpp import training_mpp

from .classifier import Classifier, checkpoint_meta, tta_views
from .model_io import load_initial_weights
from .proposals import ProposalConfig, ProposalPool, proposal_pool, read_proposals

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
DEFAULTS = Path(__file__).resolve().parent / "configs" / "default.yaml"


def load_cls_config(path: Optional[PathLike] = None, overrides: Sequence[str] = ()) -> dict:
    """The classifier's defaults ← the user's YAML ← ``--set`` overrides."""
    return load_config(DEFAULTS, path, overrides)


@dataclass
class ClassificationSetup:
    """Everything built from a config before training: inspectable by tests and benchmarks."""

    config: dict
    train_set: Dataset
    val_set: Dataset
    whole_image: bool
    model: ModelConfig
    crop: CropConfig
    sampler: CropSampler
    val_crops: np.ndarray
    val_labels: np.ndarray
    network: Any
    loss: Any
    loop: LoopConfig

    @property
    def class_names(self) -> list[str]:
        return list(self.train_set.class_names)


# ---------------------------------------------------------------------------------------- data


def load_data(cfg: dict, dataset: Optional[Dataset] = None) -> tuple[Dataset, Dataset, bool]:
    """``(train set, val set, whole_image)`` from ``cfg["data"]`` (or a Dataset given in code)."""
    from cytocore.splits import assign_splits

    d = cfg["data"]
    if dataset is None:
        if not d.get("path"):
            raise CytoFuseError("no data set given: pass --data DIR or set data.path in the config")
        from cytocore.readers import load_dataset

        dataset = load_dataset(d["path"], format=d.get("format", "auto"), decode=True)  # skip truncated files
    if any(r.split is None for r in dataset.records):
        dataset = assign_splits(dataset, fractions=tuple(d["split_fractions"]), seed=int(d["split_seed"]))
    train_set, val_set = dataset.subset(d["train_split"]), dataset.subset(d["val_split"])
    where = dataset.root or "the data set"
    for name, part in ((d["train_split"], train_set), (d["val_split"], val_set)):
        if len(part) == 0:
            raise DataError(f"{where}: split {name!r} has no images (splits present: {', '.join(dataset.splits()) or 'none'})")
    whole = d.get("whole_image", "auto")
    whole_image = dataset.format == "folders" if whole in ("auto", None) else bool(whole)
    return train_set, val_set, whole_image


def load_proposal_pool(cfg: dict, train_set: Dataset, whole_image: bool) -> Optional[ProposalPool]:
    """The segmenter's labelled proposals on the training images (``proposals.csv``), or None."""
    try:
        pcfg = ProposalConfig.from_dict(cfg.get("proposals"))
    except (TypeError, ValueError) as exc:
        raise CytoFuseError(f"config: {exc}") from None
    if not pcfg.csv:
        return None
    if whole_image:
        raise CytoFuseError("proposals.csv: a whole-tile (folder-per-class) data set has no cells to propose")
    pool = proposal_pool(train_set, read_proposals(pcfg.csv), pcfg)
    if not len(pool):
        raise DataError(f"{pcfg.csv}: no proposal belongs to a training image (image ids must match the data set's)")
    covered = len(set(pool.index.tolist()))
    log.info("proposals from %s on %d of %d training images: %s", pcfg.csv, covered, len(train_set),
             ", ".join(f"{k}={v}" for k, v in pool.counts().items()))
    return pool


def _check_head(head: str, train_set: Dataset, negative_ratio: float, whole_image: bool, proposals: bool = False) -> None:
    if head != "softmax":
        return
    multi = sum(int((r.labels.sum(axis=1) > 1).sum()) for r in train_set.records if r.n_boxes)
    if multi:
        raise DataError(f"{train_set.root}: the softmax head needs one class per box, but {multi} boxes carry several "
                        "(e.g. SCC and NSCLC); use model.head: sigmoid")
    if (negative_ratio > 0 or proposals) and not whole_image:
        raise CytoFuseError("the softmax head cannot learn all-zero negative crops; set negatives.ratio: 0 "
                            "or use model.head: sigmoid")


def _pos_weight(setting: Any, sampler: CropSampler, class_names: list[str]) -> Optional[list[float]]:
    if setting in (None, "none", "null", False):
        return None
    if setting == "auto":
        f = np.clip(sampler.expected_frequency(), 1e-6, 1 - 1e-6)
        w = np.clip((1 - f) / f, 0.1, 100.0)
        log.info("pos_weight (auto): %s", ", ".join(f"{n}={v:.2f}" for n, v in zip(class_names, w)))
        return [float(v) for v in w]
    if isinstance(setting, (list, tuple)) and len(setting) == len(class_names):
        return [float(v) for v in setting]
    raise CytoFuseError(f"loss.pos_weight must be null, auto or a list of {len(class_names)} numbers "
                        f"({', '.join(class_names)}), not {setting!r}")


# --------------------------------------------------------------------------------------- setup


def build_setup(cfg: dict, dataset: Optional[Dataset] = None) -> ClassificationSetup:
    """Read the data, build the sampler, the validation crops, the network and the loss."""
    loop = LoopConfig.from_dict(cfg["train"], cfg["optimizer"])
    model_cfg = ModelConfig.from_dict(cfg["model"])
    try:
        crop = CropConfig.from_dict(cfg["crop"])
        negatives = NegativeConfig(**cfg["negatives"])
        augment = AugmentConfig(**cfg["augment"])
    except (TypeError, ValueError) as exc:
        raise CytoFuseError(f"config: {exc}") from None
    # sampling.batch_size is the global batch: under msrun each worker draws its share of it
    share = distributed.per_worker_batch(int(cfg["sampling"]["batch_size"]), "sampling.batch_size")
    sampling = SamplingConfig(**{**cfg["sampling"], "batch_size": share, "jitter": JitterConfig(**cfg["sampling"]["jitter"])})
    train_set, val_set, whole_image = load_data(cfg, dataset)
    if whole_image and negatives.ratio > 0:
        log.info("whole-tile data set: no negative crops (its classes, e.g. a benign one, play that part)")
    _check_head(model_cfg.head, train_set, negatives.ratio, whole_image, bool((cfg.get("proposals") or {}).get("csv")))

    cache = ImageCache(float(cfg["data"]["cache_mb"]))
    proposals = load_proposal_pool(cfg, train_set, whole_image)
    sampler = CropSampler(train_set, crop, sampling, negatives, augment, whole_image, cache, proposals,
                          float(cfg["proposals"]["share"]), float(cfg["proposals"]["negative_share"]))
    val_crop = tile_crop(crop, sampling.tile_zoom) if whole_image else crop
    val_crops, val_labels = validation_crops(
        val_set, val_crop, negatives, whole_image, cfg["val"]["max_crops"], seed=loop.seed, cache=ImageCache(256)
    )
    if len(val_crops) == 0 or not (val_labels.sum(axis=0) > 0).any():
        raise DataError(f"{val_set.root}: split {cfg['data']['val_split']!r} has no labelled boxes to validate on")
    counts = train_set.box_counts()
    log.info("classes: %s | train boxes: %s | val crops: %d (%d negatives)", ", ".join(train_set.class_names),
             ", ".join(f"{k}={v}" for k, v in counts.items()), len(val_crops), int((val_labels.max(axis=1) == 0).sum()))

    runtime.setup(seed=loop.seed)
    network = build_network(model_cfg, train_set.num_classes)
    log.info("model %s (%s head): %.2f M parameters, crops %d px", model_cfg.name, model_cfg.head,
             count_parameters(network) / 1e6, crop.size)
    loss = make_loss(model_cfg.head, _pos_weight(cfg["loss"]["pos_weight"], sampler, train_set.class_names),
                     float(cfg["loss"].get("label_smoothing", 0.0)))
    return ClassificationSetup(cfg, train_set, val_set, whole_image, model_cfg, crop, sampler,
                               val_crops, val_labels, network, loss, loop)


def _val_loss(logits: np.ndarray, labels: np.ndarray, head: str) -> float:
    z = logits.astype(np.float64)
    if head == "softmax":
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(labels * logp).sum(axis=1).mean())
    return float(np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))))


def make_task(setup: ClassificationSetup) -> TrainTask:
    """The :class:`TrainTask` the shared loop runs."""
    cfg = setup.config
    steps = setup.loop.steps_per_epoch
    names = setup.class_names
    scorer = Classifier(setup.network, names, setup.model.head, setup.crop, setup.model, meta={"config": cfg})
    val_batch = int(cfg["val"]["batch_size"])
    threshold = float(cfg["val"]["threshold"])

    def batches(epoch: int, rng: np.random.Generator):
        return setup.sampler.batches(epoch, rng, steps)

    def validate(network: Any) -> dict[str, float]:
        # Scored as predictions will be made (with the run's test-time flips); the loss on plain crops.
        views = [scorer.logits(v, val_batch) for v in tta_views(setup.val_crops, scorer.tta)]
        logits = views[0]
        probs = np.mean([probabilities(z, setup.model.head) for z in views], axis=0)
        metrics = classification_metrics(setup.val_labels, probs, names, setup.model.head, threshold, prefix="val_")
        metrics["val_loss"] = _val_loss(logits, setup.val_labels, setup.model.head)
        log.debug("validation:\n%s", format_metrics(metrics, names, prefix="val_"))
        return metrics

    meta = checkpoint_meta(setup.model, names, setup.crop, cfg)
    # µm/px of the training images (crops are scale-free, but the record tells users what the model saw)
    meta["mpp"] = training_mpp(cfg["data"].get("mpp"), setup.train_set.root)
    return TrainTask(setup.network, setup.loss, batches, validate, meta=meta)


# ------------------------------------------------------------------------------------- training


def train_classifier(
    cfg: dict,
    out_dir: PathLike,
    resume: bool = False,
    init_checkpoint: Optional[PathLike] = None,
    dataset: Optional[Dataset] = None,
) -> TrainResult:
    """Train from a full config (see ``configs/default.yaml``); writes best/last.ckpt, log.csv, config.yaml."""
    out = Path(out_dir)
    if not resume and (out / "last.ckpt").exists():
        raise CheckpointError(f"{out}: already holds a run (last.ckpt); pass --resume to continue it or choose another --out")
    setup = build_setup(cfg, dataset)
    if init_checkpoint is not None:
        if resume and (out / "last.ckpt").exists():
            log.info("resuming %s: its last.ckpt replaces --init-checkpoint %s", out, init_checkpoint)
        else:
            load_initial_weights(setup.network, init_checkpoint)
    task = make_task(setup)
    result = train(task, setup.loop, out, resume=resume, config_snapshot=cfg)
    if result.history:
        last = result.history[-1]
        log.info("finished: %d epochs in %.1f min; last epoch:\n%s", len(result.history), result.minutes,
                 format_metrics(last, setup.class_names, prefix="val_"))
    return result


# ------------------------------------------------------------------------------------ evaluation


def evaluate_checkpoint(
    checkpoint: PathLike,
    data: Union[PathLike, Dataset],
    split: Optional[str] = "test",
    data_format: str = "auto",
    max_crops: Optional[int] = None,
    batch_size: int = 32,
    tta: Optional[str] = None,
) -> dict[str, float]:
    """Metrics of a trained classifier on one split (e.g. the held-out test images).

    Crops are made exactly as for validation during training — every box unjittered plus the
    run's share of negatives — with the checkpoint's own crop geometry, class order and test-time
    flips (``tta`` overrides them).
    """
    from cytocore.readers import load_dataset

    from .model_io import load_classifier

    clf = load_classifier(checkpoint)
    if tta is not None:  # e.g. "none" to measure what the test-time flips add
        clf.tta = tta
    ds = data if isinstance(data, Dataset) else load_dataset(data, format=data_format, class_names=clf.class_names)
    if ds.class_names != clf.class_names:
        raise DataError(f"{ds.root}: classes {ds.class_names} differ from the checkpoint's {clf.class_names}")
    part = ds.subset(split) if split else ds
    if len(part) == 0:
        raise DataError(f"{ds.root}: split {split!r} has no images (splits present: {', '.join(ds.splits()) or 'none'})")
    run_cfg = clf.meta.get("config") or {}
    negatives = NegativeConfig(**run_cfg.get("negatives", {}))
    whole = run_cfg.get("data", {}).get("whole_image", "auto")
    whole_image = ds.format == "folders" if whole in ("auto", None) else bool(whole)
    seed = int(run_cfg.get("train", {}).get("seed", 0))
    crops, labels = validation_crops(part, clf.tile_crop if whole_image else clf.crop, negatives, whole_image, max_crops, seed=seed)
    probs = clf.predict_crops(crops, batch_size)
    metrics = classification_metrics(labels, probs, clf.class_names, clf.head)
    metrics["crops"] = float(len(crops))
    metrics["negatives"] = float(int((labels.max(axis=1) == 0).sum())) if len(labels) else 0.0
    return metrics
