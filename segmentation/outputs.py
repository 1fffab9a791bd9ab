"""The run folder of ``cytofuse seg predict``: what goes where, per image and combined.

    OUT/saliency/<id>.png     the probability map (8-bit, image size)
    OUT/instances/<id>.csv    the image's instances (pixel boxes, area, seg scores, p_<class>...)
    OUT/parts/<id>.json       the record that marks the image as done (written last by the runner)
    OUT/instances.csv         every finished image's instances, ``image_id`` first

The runner (:func:`cytocore.runfolder.run_images`) decides what to compute and keeps the folder
free of stale files; this writer only knows the layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from cytocore.atomic import write_with
from cytocore.detections import Candidates
from cytocore.runfolder import SALIENCY_DIR, ImageSource, write_saliency

from .postprocess import INSTANCE_COLUMNS

INSTANCES_DIR = "instances"


class SegmentationRunWriter:
    """Writes one segmented image's map and instances, and the combined ``instances.csv``."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def image_files(self, image_id: str) -> list[Path]:
        return [self.out / SALIENCY_DIR / f"{image_id}.png", self.out / INSTANCES_DIR / f"{image_id}.csv"]

    def required_files(self, image_id: str) -> list[Path]:
        return self.image_files(image_id)

    def write_image(self, source: ImageSource, image: np.ndarray, result: Candidates) -> dict:
        rows = result.instances if result.instances is not None else pd.DataFrame(columns=INSTANCE_COLUMNS)
        saliency, table = self.image_files(source.image_id)
        write_with(table, lambda tmp: rows.to_csv(tmp, index=False))
        write_saliency(saliency, result.probability)
        return {"image_id": source.image_id, "file": source.name, "width": int(image.shape[1]),
                "height": int(image.shape[0]), "n_instances": int(len(rows))}

    def write_combined(self, records: Mapping[str, dict]) -> pd.DataFrame:
        tables = [_read_instances(self.out / INSTANCES_DIR / f"{i}.csv", i) for i in records]
        nonempty = [t for t in tables if not t.empty]
        if nonempty:
            table = pd.concat(nonempty, ignore_index=True)
        elif tables:
            table = tables[0]
        else:
            table = pd.DataFrame(columns=["image_id"] + INSTANCE_COLUMNS)
        write_with(self.out / "instances.csv", lambda tmp: table.to_csv(tmp, index=False))
        return table


def _read_instances(path: Path, image_id: str) -> pd.DataFrame:
    df = pd.read_csv(path)
    df.insert(0, "image_id", image_id)
    return df
