"""Shared test fixtures: where the real data sets live, and a small synthetic data set."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("CYTOFUSE_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """Path of a real data set in ../shared/datasets, or skip the test with the reason."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real data set {name!r} not found at {path} (set CYTOFUSE_SHARED_DATASETS)")
    return path


def cell_row(side: float, n: int = 20, name: str = "im", split: Optional[str] = None):
    """One wide image holding ``n`` square cells of ``side`` px: what the rules that follow cell size
    (``data.scale: auto``, marker spacings) read."""
    import numpy as np

    from cytocore.records import ImageRecord

    boxes = [[10 * i, 0, 10 * i + side, side] for i in range(n)]
    return ImageRecord(name, Path(f"{name}.png"), 4000, 400, boxes, np.ones((n, 1)), split=split)


def row_of_cells(side: float, n: int = 20) -> list:
    """:func:`cell_row` as a one-image record list."""
    return [cell_row(side, n)]


_exit_status: dict = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    """Leave without interpreter teardown, as the ``cytofuse`` command does.

    MindSpore's ``Cell.__del__`` raises hundreds of harmless AttributeErrors while Python tears its
    modules down, burying pytest's summary line; the summary is already printed when this runs.
    """
    if "code" in _exit_status and not hasattr(config, "workerinput"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
