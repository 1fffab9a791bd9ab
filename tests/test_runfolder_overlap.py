"""The folder runner gives the same records, files and failures whether or not reading, processing
and writing of consecutive images overlap (background read-ahead and writes)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from cytocore.errors import DataError
from cytocore.runfolder import ImageSource, run_images


class FakeWriter:
    """Writes ``<id>.txt`` holding the processed value; a source named ``bad_write`` fails to write."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.threads: set[str] = set()

    def image_files(self, image_id):
        return [self.out / f"{image_id}.txt"]

    def required_files(self, image_id):
        return self.image_files(image_id)

    def write_image(self, source, image, result):
        self.threads.add(threading.current_thread().name)
        if source.image_id == "bad_write":
            raise OSError("disk full")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{source.image_id}.txt").write_text(str(result))
        return {"image_id": source.image_id, "value": int(result)}

    def write_combined(self, records):
        return list(records)


def _sources(tmp_path):
    names = ["a", "bad_read", "b", "bad_process", "bad_write", "c"]
    return [ImageSource(n, tmp_path / f"{n}.png") for n in names]


def _read(source):
    if source.image_id == "bad_read":
        raise DataError(f"{source.path}: not an image")
    return np.full((4, 4, 3), len(source.image_id), np.uint8)


def _process(image, source):
    if source.image_id == "bad_process":
        raise ValueError("network failed")
    return int(image.sum())


@pytest.mark.parametrize("overlap", [False, True])
def test_same_results_with_and_without_overlap(tmp_path, overlap):
    out = tmp_path / "out"
    writer = FakeWriter(out)
    report = run_images(_sources(tmp_path), _process, writer, "fp1", read=_read, progress=False, overlap=overlap)
    assert list(report.records) == ["a", "b", "c"]
    assert [r["value"] for r in report.records.values()] == [48, 48, 48]
    assert [Path(f["image"]).stem for f in report.failed] == ["bad_read", "bad_process", "bad_write"]
    assert "disk full" in report.failed[2]["error"]
    assert not (out / "bad_write.txt").exists() and not (out / "parts" / "bad_write.json").exists()
    assert json.loads((out / "parts" / "c.json").read_text())["fingerprint"] == "fp1"
    assert any(name.startswith("cytofuse-write") for name in writer.threads) == overlap
    again = run_images(_sources(tmp_path), _process, FakeWriter(out), "fp1", read=_read, progress=False, overlap=overlap)
    assert again.n_skipped == 3 and list(again.records) == ["a", "b", "c"]
