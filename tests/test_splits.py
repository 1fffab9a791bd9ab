"""The stratified split helper and splits.csv."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cytocore.errors import DataError, ProblemLog
from cytocore.records import Dataset, ImageRecord
from cytocore.splits import apply_splits, assign_splits, load_split_file, write_split_file


def record(image_id: str, classes: list[int], n_classes: int = 2, split=None) -> ImageRecord:
    labels = np.zeros((len(classes), n_classes), np.uint8)
    labels[np.arange(len(classes)), classes] = 1
    boxes = np.tile([[0, 0, 4, 4]], (len(classes), 1))
    return ImageRecord(image_id, Path(f"{image_id}.png"), 8, 8, boxes=boxes, labels=labels, split=split)


def dataset() -> Dataset:
    """40 images with class 0, 20 with both classes, 20 healthy: three strata."""
    recs = [record(f"a{i:02d}", [0]) for i in range(40)]
    recs += [record(f"b{i:02d}", [0, 1]) for i in range(20)]
    recs += [record(f"h{i:02d}", []) for i in range(20)]
    return Dataset(recs, ["x", "y"])


def splits_of(ds: Dataset) -> dict[str, str]:
    return {r.image_id: r.split for r in ds}


def test_assign_splits_is_deterministic_and_order_independent():
    ds = dataset()
    first = splits_of(assign_splits(ds, seed=3))
    again = splits_of(assign_splits(ds, seed=3))
    shuffled = Dataset(list(reversed(ds.records)), ds.class_names)
    assert first == again == splits_of(assign_splits(shuffled, seed=3))
    assert first != splits_of(assign_splits(ds, seed=4))
    assert all(r.split is None for r in ds)  # the input is not modified


def test_assign_splits_stratifies_by_class_signature():
    out = assign_splits(dataset(), fractions=(0.5, 0.25, 0.25), seed=0)
    total = Counter(r.split for r in out)
    assert total == {"train": 40, "val": 20, "test": 20}
    for prefix, n in (("a", 40), ("b", 20), ("h", 20)):
        stratum = Counter(r.split for r in out if r.image_id.startswith(prefix))
        for name, share in (("train", 0.5), ("val", 0.25), ("test", 0.25)):
            assert abs(stratum[name] - share * n) <= 1, (prefix, stratum)


def test_tiny_strata_do_not_all_go_to_train():
    recs = [record(f"r{i}", [i % 2]) for i in range(2)] + [record(f"big{i}", [0, 1]) for i in range(18)]
    out = assign_splits(Dataset(recs, ["x", "y"]), fractions=(0.6, 0.2, 0.2))
    assert Counter(r.split for r in out) == {"train": 12, "val": 4, "test": 4}


def test_existing_splits_are_kept_unless_overwrite():
    ds = dataset()
    ds.records[0].split = "test"
    ds.records[1].split = "custom"
    kept = splits_of(assign_splits(ds))
    assert kept["a00"] == "test" and kept["a01"] == "custom"
    assert all(s is not None for s in kept.values())
    redone = splits_of(assign_splits(ds, overwrite=True))
    assert redone["a01"] in ("train", "val", "test")


def test_fractions_are_checked():
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(dataset(), fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        assign_splits(dataset(), fractions=(1.0, -0.5, 0.5))
    two = assign_splits(dataset(), fractions=(3, 1), names=("train", "val"))
    assert Counter(r.split for r in two) == {"train": 60, "val": 20}


def test_split_file_round_trip_and_validation(tmp_path):
    ds = assign_splits(dataset(), seed=1)
    path = tmp_path / "splits.csv"
    write_split_file(path, ds)
    mapping = load_split_file(path)
    assert mapping == splits_of(ds)
    assert splits_of(apply_splits(dataset(), mapping)) == splits_of(ds)

    path.write_text("image_id,split\na,train\nb,\na,val\n")
    with pytest.raises(DataError, match=r"splits\.csv:3: empty image_id or split"):
        load_split_file(path)
    log = ProblemLog()
    assert load_split_file(path, log) == {"a": "train"}
    assert [(p.row, p.severity) for p in log] == [(3, "error"), (4, "error")]
    assert "'val' here but 'train' at line 2" in log.items[1].message

    path.write_text("image_id,fold\na,1\n")
    with pytest.raises(DataError, match="missing column"):
        load_split_file(path)
