"""The run folder of a detection run (``cytofuse infer``, the single-stage baseline): what goes where.

    OUT/saliency/<id>.png        the probability map, 8-bit, image size
    OUT/overlays/<id>.png        heat map and labelled boxes (``overlay.enabled``)
    OUT/geojson/<id>.geojson     the image's detections for QuPath, cell outlines (``outputs.geojson``)
    OUT/labels/<id>.tif          uint32 instance label image (``outputs.labels``; sources with label planes)
    OUT/parts/<id>.csv           the image's detections table
    OUT/parts/<id>.json          its record, written last by the runner: the image is done
    OUT/predictions.csv, detections.csv, images.csv, detections.geojson, detections.coco.json,
    OUT/coco_results.json        rebuilt from the parts of every finished image at the end of a run

:class:`DetectionRunWriter` is the one place that knows this layout; the runner
(:func:`cytocore.runfolder.run_images`) decides what to compute and removes an image's files before
it is redone or when it fails. An image with no detection is a normal result: its saliency map, an
overlay, an empty FeatureCollection, a header-only part and an ``images.csv`` row (malignancy 0).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cytocore.atomic import write_json, write_with
from cytocore.errors import DataError
from cytocore.runfolder import PARTS_DIR, SALIENCY_DIR, ImageSource, write_saliency
from cytocore.writers import detections_columns, write_detections_csv, write_predictions_csv

from .cell_outputs import detection_outlines, overlay_view
from .coco_results import coco_results, ids_from_ground_truth, own_ids, write_coco_results
from .label_images import write_label_image
from .writers import write_coco, write_geojson, write_overlay

OVERLAYS_DIR = "overlays"
GEOJSON_DIR = "geojson"
LABELS_DIR = "labels"
IMAGES_COLUMNS = ["image_id", "width", "height", "n_detections", "malignancy", "seconds"]


class DetectionRunWriter:
    """Writes one image's files and record, and the combined tables, for a detection run.

    ``config`` is the fusion config (its ``overlay`` and ``outputs`` sections say which files to
    write); ``floors`` are the per-class score floors the COCO file applies.
    """

    def __init__(self, out: Path, class_names: Sequence[str], config: Mapping[str, Any],
                 floors: Optional[np.ndarray] = None, coco_gt: Optional[Path] = None) -> None:
        self.out = Path(out)
        self.class_names = list(class_names)
        self.overlay = dict(config.get("overlay") or {})
        self.outputs = dict(config.get("outputs") or {})
        self.floors = floors
        self.coco_gt = coco_gt  # number coco_results.json by this ground truth's ids (else our own)
        self.box_shrink = float(config.get("box_shrink", 1.0))
        self.class_shrink = dict(config.get("box_shrink_by_class") or {})
        self.threshold = float(((config.get("segmentation") or {}).get("postprocess") or {}).get("threshold", 0.5))

    @property
    def overlays_on(self) -> bool:
        return bool(self.overlay.get("enabled", True))

    @property
    def geojson_on(self) -> bool:
        return bool(self.outputs.get("geojson", True))

    def image_files(self, image_id: str) -> list[Path]:
        """Every per-image file of this layout (switched-off ones too, so an old run's are removed)."""
        return [self.out / SALIENCY_DIR / f"{image_id}.png", self.out / OVERLAYS_DIR / f"{image_id}.png",
                self.out / GEOJSON_DIR / f"{image_id}.geojson", self.part_path(image_id),
                self.out / LABELS_DIR / f"{image_id}.tif"]

    def required_files(self, image_id: str) -> list[Path]:
        """Files a finished image must have (the label image only exists when the source makes label planes)."""
        saliency, overlay, geojson, part, _labels = self.image_files(image_id)
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
        saliency, overlay, geojson, part, labels_path = self.image_files(image_id)
        write_saliency(saliency, result.probability)
        labels = getattr(result, "labels", None)
        info = dict(getattr(result, "info", None) or {})
        if self.overlays_on:
            o = self.overlay
            pixels, plane, drawn = overlay_view(image, result.probability, table)  # a slide: its thumbnail
            write_overlay(overlay, pixels, plane, drawn, names, min_score=float(o.get("min_score", 0.3)),
                          heatmap_alpha=float(o.get("heatmap_alpha", 0.45)), colormap=str(o.get("colormap", "jet")),
                          max_side=o.get("max_side", 4096))
        if self.geojson_on:
            outlines = detection_outlines(table, result.width, result.height, labels=labels,
                                          probability=result.probability, threshold=self.threshold,
                                          shrink=self.box_shrink, class_shrink=self.class_shrink)
            write_geojson(geojson, table, names, outlines=outlines, mpp=info.get("mpp"))
        if labels is not None and self.outputs.get("labels", True):
            write_label_image(labels_path, labels)
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
            **{k: info.get(k) for k in ("slide", "mpp", "scale", "tissue_fraction")},
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
        outlines = None
        if self.geojson_on:  # the per-image files hold the outlines: the combined file is their union
            features = [f for i in order for f in _features(self.out / GEOJSON_DIR / f"{i}.geojson")]
            write_json(self.out / "detections.geojson", {"type": "FeatureCollection", "features": features})
            outlines = _outlines_of(features, table)
        if self.outputs.get("coco", True):
            file_names = {i: records[i].get("file", i) for i in order}
            write_coco(self.out / "detections.coco.json", images, table, self.class_names, floors=self.floors,
                       file_names=file_names)
            ids = (ids_from_ground_truth(self.coco_gt, file_names, self.class_names) if self.coco_gt is not None
                   else own_ids(order, self.class_names))
            write_coco_results(self.out / "coco_results.json",
                               coco_results(table, self.class_names, ids, floors=self.floors, outlines=outlines))
        return table


def _features(path: Path) -> list[dict]:
    """The features of one image's GeoJSON (none if the file is missing)."""
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("features") or [])


def _outlines_of(features: list[dict], table: pd.DataFrame) -> Optional[list]:
    """Each table row's outline ring from the GeoJSON features (same images, same order), else None."""
    if len(features) != len(table):
        return None
    return [np.asarray(f["geometry"]["coordinates"][0], np.float64) for f in features]


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
