"""Train/val/test splits: a deterministic stratified split by image, and the ``splits.csv`` file.

Splitting is by image, never by box, because boxes of one image share stain, focus and patient, and a
box-level split leaks them into validation. Images are stratified by which classes they contain
(their class-presence signature), healthy images being a stratum of their own, so the rare classes
and the healthy images that drive the metric's FP/N denominator land in every split.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .atomic import write_with
from .errors import DataError, ProblemLog
from .records import Dataset
from .tables import read_csv_table

PathLike = Union[str, Path]

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def signature(labels: np.ndarray) -> tuple[int, ...]:
    """Indices of the classes present in an image's labels (``()`` for a healthy image)."""
    if labels.size == 0:
        return ()
    return tuple(int(i) for i in np.flatnonzero(labels.any(axis=0)))


def assign_splits(
    ds: Dataset,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    names: Sequence[str] = SPLIT_NAMES,
    overwrite: bool = False,
) -> Dataset:
    """A copy of ``ds`` whose unsplit images (all of them with ``overwrite``) get a split.

    Deterministic for a given seed and set of image ids, whatever the record order. Within each
    stratum the images are shuffled, then each goes to the split lagging furthest behind its target
    share, counted over all images handled so far: every stratum is split in proportion, and the
    totals still match the fractions when strata are tiny (a stratum of one image does not always
    go to train).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) != len(names):
        raise ValueError(f"{len(fractions)} fractions for {len(names)} split names {list(names)}")
    if (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative with a positive sum, not {fractions.tolist()}")
    share = fractions / fractions.sum()

    todo = [r for r in ds.records if overwrite or r.split is None]
    strata: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for r in todo:
        strata[signature(r.labels)].append(r.image_id)

    rng = np.random.default_rng(seed)
    counts = np.zeros(len(names), np.int64)
    chosen: dict[str, str] = {}
    # Biggest strata first so the rare ones fill whichever split is short at the end; ties by key.
    for key in sorted(strata, key=lambda k: (-len(strata[k]), k)):
        ids = sorted(strata[key])
        for idx in rng.permutation(len(ids)):
            deficit = share * (counts.sum() + 1) - counts
            k = int(np.argmax(deficit))
            counts[k] += 1
            chosen[ids[idx]] = names[k]

    records = [replace(r, split=chosen.get(r.image_id, r.split)) for r in ds.records]
    return replace(ds, records=records, problems=list(ds.problems))


def apply_splits(ds: Dataset, mapping: Mapping[str, str], overwrite: bool = True) -> Dataset:
    """A copy of ``ds`` with the splits of ``mapping`` (image id → split); ids not in it are unchanged."""
    records = [
        replace(r, split=mapping[r.image_id]) if r.image_id in mapping and (overwrite or r.split is None) else r
        for r in ds.records
    ]
    return replace(ds, records=records, problems=list(ds.problems))


def load_split_file(path: PathLike, problems: Optional[ProblemLog] = None) -> dict[str, str]:
    """Read ``splits.csv`` (``image_id,split``) into a mapping.

    Empty cells and an id listed twice with different splits are reported (the first row wins);
    without a ``problems`` log they raise :class:`DataError`, since a silently wrong split leaks test
    images into training.
    """
    path = Path(path)
    df = read_csv_table(path, required=("image_id", "split"), text=("image_id", "split"))
    log = problems if problems is not None else ProblemLog()
    n_before = len(log)
    mapping: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, image_id, split in zip(df.index, df["image_id"], df["split"]):
        if not image_id or not split:
            log.error(path, int(line), "empty image_id or split, row skipped")
        elif image_id in mapping and mapping[image_id] != split:
            log.error(path, int(line), f"image {image_id!r} is in split {split!r} here but {mapping[image_id]!r} "
                      f"at line {first_line[image_id]}; keeping {mapping[image_id]!r}")
        elif image_id not in mapping:
            mapping[image_id] = split
            first_line[image_id] = int(line)
    if problems is None and len(log) > n_before:
        raise DataError(str(log.items[n_before]).split(": ", 1)[1])
    return mapping


def write_split_file(path: PathLike, splits: Union[Dataset, Mapping[str, Optional[str]]]) -> None:
    """Write ``splits.csv`` atomically from a data set or an id → split mapping (unsplit ids left out)."""
    mapping = {r.image_id: r.split for r in splits.records} if isinstance(splits, Dataset) else dict(splits)
    rows = [(i, s) for i, s in mapping.items() if s is not None]
    frame = pd.DataFrame(rows, columns=["image_id", "split"])
    write_with(path, lambda tmp: frame.to_csv(tmp, index=False))
