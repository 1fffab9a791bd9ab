"""What ``cytofuse data summary`` prints: counts that tell whether a data set is fit to train on.

The numbers chosen are the ones that bite later: healthy images (the metric's FP/N denominator),
boxes per class (a class without boxes is skipped by the metric), per-split counts (a rare class
missing from validation), box sizes (the classifier's crop size) and the problems found on reading.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .records import Dataset

#: Problem lines kept in the summary; the full list stays in ``Dataset.problems`` and the log.
MAX_PROBLEM_LINES = 20
NO_SPLIT = "(none)"


def _class_totals(records: list, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes per class (a multi-hot box counts for each class) and images containing each class."""
    boxes = np.zeros(n_classes, np.int64)
    images = np.zeros(n_classes, np.int64)
    for r in records:
        if r.n_boxes:
            per_class = r.labels.astype(np.int64).sum(axis=0)
            boxes += per_class
            images += per_class > 0
    return boxes, images


def _median(values: list) -> Optional[float]:
    return float(np.median(values)) if values else None


def summarise(ds: Dataset) -> dict[str, Any]:
    """The summary as plain JSON-ready values (``cytofuse data summary --json`` prints it as is)."""
    records = ds.records
    n_boxes = [r.n_boxes for r in records]
    boxes, images = _class_totals(records, ds.num_classes)
    widths = [r.width for r in records]
    heights = [r.height for r in records]
    all_boxes = np.concatenate([r.boxes for r in records if r.n_boxes]) if any(n_boxes) else np.zeros((0, 4))

    splits: dict[str, dict[str, int]] = {}
    for name in ds.splits() + ([NO_SPLIT] if any(r.split is None for r in records) else []):
        part = [r for r in records if (r.split or NO_SPLIT) == name]
        part_boxes, _ = _class_totals(part, ds.num_classes)
        splits[name] = {
            "images": len(part),
            "healthy": sum(r.is_healthy for r in part),
            "boxes": sum(r.n_boxes for r in part),
            "boxes_per_class": {c: int(n) for c, n in zip(ds.class_names, part_boxes)},
        }

    severities: dict[str, int] = {"error": 0, "warning": 0}
    for p in ds.problems:
        severities[p.severity] = severities.get(p.severity, 0) + 1
    return {
        "format": ds.format,
        "root": str(ds.root) if ds.root is not None else None,
        "n_images": len(records),
        "n_healthy": sum(r.is_healthy for r in records),
        "n_boxes": int(sum(n_boxes)),
        "classes": list(ds.class_names),
        "boxes_per_class": {c: int(n) for c, n in zip(ds.class_names, boxes)},
        "images_per_class": {c: int(n) for c, n in zip(ds.class_names, images)},
        "boxes_per_image": {"mean": float(np.mean(n_boxes)) if records else 0.0, "max": int(max(n_boxes, default=0))},
        "multi_label_boxes": int(sum(int((r.labels.sum(axis=1) > 1).sum()) for r in records if r.n_boxes)),
        "splits": splits,
        "image_size": {
            "min_width": int(min(widths, default=0)), "max_width": int(max(widths, default=0)),
            "min_height": int(min(heights, default=0)), "max_height": int(max(heights, default=0)),
        },
        "box_size": {
            "median_width": _median((all_boxes[:, 2] - all_boxes[:, 0]).tolist()),
            "median_height": _median((all_boxes[:, 3] - all_boxes[:, 1]).tolist()),
        },
        "masks": {"present": ds.has_masks, "images_with_mask": sum(r.mask_path is not None for r in records)},
        "problems": severities,
        "problem_lines": [str(p) for p in ds.problems[:MAX_PROBLEM_LINES]],
    }


def _table(header: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        text = "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths)))
        lines.append(indent + text.rstrip())
        if j == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return lines


def format_summary(info: dict[str, Any]) -> str:
    """The summary as a short text report with a class table and a split table."""
    size = info["image_size"]
    bsize = info["box_size"]
    lines = [
        f"data set    {info['root']}  ({info['format']})",
        f"images      {info['n_images']}  ({info['n_healthy']} healthy, no boxes)",
        f"boxes       {info['n_boxes']}  (mean {info['boxes_per_image']['mean']:.1f}, max {info['boxes_per_image']['max']} "
        f"per image; {info['multi_label_boxes']} with more than one class)",
        f"image size  width {size['min_width']}..{size['max_width']}, height {size['min_height']}..{size['max_height']} px",
    ]
    if bsize["median_width"] is not None:
        lines.append(f"box size    median {bsize['median_width']:.1f} x {bsize['median_height']:.1f} px")
    masks = info["masks"]
    lines.append(f"masks       {masks['images_with_mask']} of {info['n_images']} images" if masks["present"] else "masks       none")
    lines.append("")
    lines.append("classes")
    lines += _table(["class", "boxes", "images"],
                    [[c, info["boxes_per_class"][c], info["images_per_class"][c]] for c in info["classes"]])
    if info["splits"]:
        lines.append("")
        lines.append("splits")
        classes = info["classes"]
        lines += _table(["split", "images", "healthy", "boxes", *classes],
                        [[name, s["images"], s["healthy"], s["boxes"], *(s["boxes_per_class"][c] for c in classes)]
                         for name, s in info["splits"].items()])
    probs = info["problems"]
    lines.append("")
    total = sum(probs.values())
    lines.append(f"problems    {probs.get('error', 0)} error(s), {probs.get('warning', 0)} warning(s)")
    for line in info["problem_lines"]:
        lines.append(f"  {line}")
    if total > len(info["problem_lines"]):
        lines.append(f"  ... and {total - len(info['problem_lines'])} more")
    return "\n".join(lines)
