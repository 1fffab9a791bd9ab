"""Shared test fixtures: where the real data sets live, and a small synthetic data set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("CYTOFUSE_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """Path of a real data set in ../shared/datasets, or skip the test with the reason."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real data set {name!r} not found at {path} (set CYTOFUSE_SHARED_DATASETS)")
    return path
