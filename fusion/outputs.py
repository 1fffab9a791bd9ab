"""The run folder of a detection run (``cytofuse infer``, the single-stage baseline): what goes where.

    OUT/saliency/<id>.png        the probability map, 8-bit, image size
    OUT/overlays/<id>.png        heat map and labelled boxes (``overlay.enabled``)
    OUT/geojson/<id>.geojson     the image's detections for QuPath (``outputs.geojson``)
    OUT/parts/<id>.csv           the image's detections table
    OUT/parts/<id>.json          its record, written last by the runner: the image is done
    OUT/predictions.csv, detections.csv, images.csv, detections.geojson, detections.coco.json
                                 rebuilt from the parts of every finished image at the end of a run

:class:`DetectionRunWriter` is the one place that knows this layout; the runner
(:func:`cytocore.runfolder.run_images`) decides what to compute and removes an image's files before
it is redone or when it fails. An image with no detection is a normal result: its saliency map, an
overlay, an empty FeatureCollection, a header-only part and an ``images.csv`` row (malignancy 0).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cytocore.atomic import write_with
from cytocore.errors import DataError
from cytocore.runfolder import PARTS_DIR, SALIENCY_DIR, ImageSource, write_saliency
from cytocore.writers import detections_columns, write_detections_csv, write_predictions_csv

from .writers import write_coco, write_geojson, write_overlay

OVERLAYS_DIR = "overlays"
GEOJSON_DIR = "geojson"
IMAGES_COLUMNS = ["image_id", "width", "height", "n_detections", "malignancy", "seconds"]


class DetectionRunWriter:
    """Writes one image's files and record, and the combined tables, for a detection run.

    ``config`` is the fusion config (its ``overlay`` and ``outputs`` sections say which files to
    write); ``floors`` are the per-class score floors the COCO file applies.
    """

    def __init__(self, out: Path, class_names: Sequence[str], config: Mapping[str, Any],
                 floors: Optional[np.ndarray] = None) -> None:
        self.out = Path(out)
        self.class_names = list(class_names)
        self.overlay = dict(config.get("overlay") or {})
        self.outputs = dict(config.get("outputs") or {})
        self.floors = floors

    @property
    def overlays_on(self) -> bool:
        return bool(self.overlay.get("enabled", True))

    @property
    def geojson_on(self) -> bool:
        return bool(self.outputs.get("geojson", True))

    def image_files(self, image_id: str) -> list[Path]:
        """Every per-image file of this layout (switched-off ones too, so an old run's are removed)."""
        return [self.out / SALIENCY_DIR / f"{image_id}.png", self.out / OVERLAYS_DIR / f"{image_id}.png",
                self.out / GEOJSON_DIR / f"{image_id}.geojson", self.part_path(image_id)]

    def required_files(self, image_id: str) -> list[Path]:
        saliency, overlay, geojson, part = self.image_files(image_id)
        return [saliency, part] + ([overlay] if self.overlays_on else []) + ([geojson] if self.geojson_on else [])

    def part_path(self, image_id: str) -> Path:
        return self.out / PARTS_DIR / f"{image_id}.csv"

    def write_image(self, source: ImageSource, image: np.ndarray, result: Any) -> dict:
        """One image's files, then its detections part; returns the record (the runner writes it last).

        ``result`` is a :class:`fusion.pipeline.ImageResult`.
        """
        t0 = time.perf_counter()
        image_id, names = result.image_id, result.class_names
        table = result.detections.to_frame()
        saliency, overlay, geojson, part = self.image_files(image_id)
        write_saliency(saliency, result.probability)
        if self.overlays_on:
            o = self.overlay
            write_overlay(overlay, image, result.probability, table, names, min_score=float(o.get("min_score", 0.3)),
                          heatmap_alpha=float(o.get("heatmap_alpha", 0.45)), colormap=str(o.get("colormap", "jet")),
                          max_side=o.get("max_side", 4096))
        if self.geojson_on:
            write_geojson(geojson, table, names)
        write_detections_csv(part, table)
        timings = {k: round(v, 4) for k, v in {**result.timings, "write": time.perf_counter() - t0}.items()}
        return {
            "image_id": image_id,
            "file": source.name,
            "width": result.width,
            "height": result.height,
            "n_detections": int(len(result.detections)),
            "malignancy": round(result.malignancy, 6),
            "seconds": round(sum(timings.values()), 4),
            "timings": timings,
        }

    def write_combined(self, records: Mapping[str, dict]) -> pd.DataFrame:
        """Rebuild every combined output from the parts of the finished images; returns the detections table."""
        order = list(records)
        frames = [read_part(self.part_path(i), self.class_names) for i in order]
        frames = [f for f in frames if len(f)]
        columns = detections_columns(self.class_names) + ["object_area"]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in columns})
        write_predictions_csv(self.out / "predictions.csv", table, self.class_names)
        write_detections_csv(self.out / "detections.csv", table)
        images = pd.DataFrame([{k: records[i][k] for k in IMAGES_COLUMNS} for i in order], columns=IMAGES_COLUMNS)
        write_with(self.out / "images.csv", lambda tmp: images.to_csv(tmp, index=False))
        if self.geojson_on:
            write_geojson(self.out / "detections.geojson", table, self.class_names)
        if self.outputs.get("coco", True):
            write_coco(self.out / "detections.coco.json", images, table, self.class_names, floors=self.floors,
                       file_names={i: records[i].get("file", i) for i in order})
        return table


def read_part(path: Path, class_names: Sequence[str]) -> pd.DataFrame:
    """Read one image's detections part back (ids and labels as text, everything else numeric)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in df.columns:
        if col not in ("image_id", "label"):
            df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="raise").astype(np.float64)
    missing = [f"p_{c}" for c in class_names if f"p_{c}" not in df.columns]
    if missing:
        raise DataError(f"{path}: part has no column(s) {', '.join(missing)}; delete the {PARTS_DIR}/ folder to redo it")
    return df
