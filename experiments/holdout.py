"""Choose classifier settings on a held-out part of the training split, never on the reported split.

LC25000's ``val/`` is the split the README reports, so settings (resolution, width, augmentation,
label smoothing, learning rate, budget) are compared here on a part of ``train/`` held out by
near-duplicate cluster: LC25000 grew 250 originals per class into 5000 tiles by rotations and
flips, so a tile's rotated copy must sit on the same side as the tile itself or the held-out score
would be a memory test. Clusters are found by correlating 16×16 grey thumbnails under all eight
rotations/mirrors.

    python -m experiments.holdout --config experiments/configs/cls_lc25000.yaml --out runs/ho_a \\
        --set crop.size=128 --holdout 0.2

trains on ``train`` minus the held-out clusters, validates on them every epoch and prints the
held-out metrics of the final weights; ``holdout.json`` in ``--out`` keeps them with the settings.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cytocore.errors import DataError
from cytocore.records import Dataset

log = logging.getLogger("cytofuse")

HOLDOUT = "holdout"


def dihedral_thumbnails(image: np.ndarray, side: int = 16) -> np.ndarray:
    """``(8, side²)`` standardised grey thumbnails of an image under the eight rotations/mirrors."""
    import cv2

    grey = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    t = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).astype(np.float64)
    views = []
    for k in range(4):
        r = np.rot90(t, k)
        views += [r, r[:, ::-1]]
    out = np.stack([v.ravel() for v in views])
    out -= out.mean(axis=1, keepdims=True)
    return out / (out.std(axis=1, keepdims=True) + 1e-6)


def near_duplicate_clusters(thumbs: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """Cluster id per image: images whose best dihedral thumbnail correlation exceeds ``threshold``
    are joined (transitively, union-find)."""
    n = len(thumbs)
    base = thumbs[:, 0, :]
    corr = np.einsum("id,jkd->ijk", base, thumbs).max(axis=2) / thumbs.shape[-1]
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in zip(*np.nonzero(np.triu(corr, 1) > threshold)):
        parent[root(i)] = root(j)
    roots = np.array([root(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def holdout_split(dataset: Dataset, fraction: float = 0.2, seed: int = 0, split: str = "train",
                  threshold: float = 0.8) -> Dataset:
    """A copy of ``dataset`` whose ``split`` images are partly moved to ``holdout`` by whole clusters,
    about ``fraction`` of each class (a cluster's class is its first image's)."""
    from cytocore.imageio import read_image

    if not 0 < fraction < 1:
        raise DataError(f"--holdout must be between 0 and 1, not {fraction}")
    part = [i for i, r in enumerate(dataset.records) if r.split == split]
    if not part:
        raise DataError(f"{dataset.root}: no images in split {split!r}")
    thumbs = np.stack([dihedral_thumbnails(read_image(dataset.records[i].path)) for i in part])
    cluster = near_duplicate_clusters(thumbs, threshold)
    rng = np.random.default_rng(seed)
    label = np.array([int(dataset.records[i].labels.argmax()) if dataset.records[i].n_boxes else -1 for i in part])
    chosen: set[int] = set()
    for k in np.unique(label):
        ids = np.unique(cluster[label == k])
        target = fraction * int((label == k).sum())
        taken = 0
        for c in rng.permutation(ids):
            if taken >= target:
                break
            chosen.add(int(c))
            taken += int((cluster == c).sum())
    records = list(dataset.records)
    for j, i in enumerate(part):
        if int(cluster[j]) in chosen:
            records[i] = replace(records[i], split=HOLDOUT)
    log.info("held out %d of %d %s images (%d near-duplicate clusters in all)", sum(int(c) in chosen for c in cluster),
             len(part), split, int(cluster.max()) + 1)
    return replace(dataset, records=records)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cytocore.atomic import write_json
    from cytocore.readers import load_dataset

    from classification.train import evaluate_checkpoint, load_cls_config, train_classifier

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="data set folder (overrides data.path)")
    p.add_argument("--holdout", type=float, default=0.2, help="share of train/ held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="which clusters are held out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_cls_config(args.config, args.overrides)
    if args.data:
        cfg["data"]["path"] = args.data
    dataset = load_dataset(cfg["data"]["path"], format=cfg["data"].get("format", "auto"))
    dataset = holdout_split(dataset, args.holdout, args.seed, split=cfg["data"]["train_split"])
    dataset = dataset.subset(ids=[r.image_id for r in dataset.records if r.split in (cfg["data"]["train_split"], HOLDOUT)])
    cfg["data"]["val_split"] = HOLDOUT
    result = train_classifier(cfg, args.out, dataset=dataset)
    metrics = evaluate_checkpoint(Path(args.out) / "last.ckpt", dataset, split=HOLDOUT)
    plain = evaluate_checkpoint(Path(args.out) / "last.ckpt", dataset, split=HOLDOUT, tta="none")
    write_json(Path(args.out) / "holdout.json", {"settings": list(args.overrides), "config": args.config,
                                                 "holdout": args.holdout, "seed": args.seed,
                                                 "minutes": result.minutes, "epochs": len(result.history),
                                                 "metrics": metrics, "metrics_without_tta": plain})
    print(f"holdout balanced_accuracy {metrics.get('balanced_accuracy', float('nan')):.4f} "
          f"(without test-time flips {plain.get('balanced_accuracy', float('nan')):.4f}) "
          f"mean_auc {metrics['mean_auc']:.4f} ({len(result.history)} epochs, {result.minutes:.1f} min) {args.overrides}")
    return 0


if __name__ == "__main__":
    import os
    import sys

    code = main()
    sys.stdout.flush()
    os._exit(code)
