"""The comparison report builder on a tiny hand-made results fixture."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments.report import best_f1, build_report, summary_rows


def _metrics(froc_a: float, auc: float) -> dict:
    return {
        "froc": {"A": froc_a, "B": 0.2},
        "accuracy": (froc_a + 0.2) / 2,
        "explainability_auc": auc,
        "model_score": 0.8 * (froc_a + 0.2) / 2 + 0.2 * auc,
        "ap50": {"A": 0.5, "B": None},
        "n_images": 4,
        "n_gt": {"A": 4, "B": 2},
        "froc_curves": {
            "A": {"fp_per_image": [0.0, 0.25, 1.0], "recall": [0.5, 0.75, 1.0]},
            "B": {"fp_per_image": [0.5], "recall": [0.5]},
        },
    }


def _results(tmp_path) -> dict:
    overlays = {}
    for name, colour in (("two-stage", (255, 0, 0)), ("single-stage", (0, 0, 255))):
        p = tmp_path / f"{name}.png"
        Image.fromarray(np.full((20, 30, 3), colour, np.uint8)).save(p)
        overlays[name] = {"img1": str(p)}
    return {
        "dataset": {"name": "tiny", "path": "x", "split": "test", "n_images": 4, "n_boxes": 6},
        "seed": 0,
        "systems": {
            "two-stage": {"metrics": _metrics(0.8, 0.9), "infer_seconds_per_image": 1.5, "train_minutes": 3.0,
                          "overlays": overlays["two-stage"], "triage": {"roc_auc": 0.75}},
            "single-stage": {"metrics": _metrics(0.4, 0.7), "infer_seconds_per_image": 0.5, "train_minutes": 3.0,
                             "overlays": overlays["single-stage"]},
        },
    }


def test_best_f1_from_curve():
    # threshold 2: TP=3, FP=1 (0.25 × 4 images), FN=1 → F1 = 6/8; threshold 3: TP=4, FP=4 → 8/12.
    assert best_f1({"fp_per_image": [0.0, 0.25, 1.0], "recall": [0.5, 0.75, 1.0]}, 4, 4) == pytest.approx(0.75)
    assert best_f1({}, 0, 4) is None


def test_summary_rows_order_and_values(tmp_path):
    rows = summary_rows(_results(tmp_path))
    assert [r["system"] for r in rows] == ["two-stage", "single-stage"]
    assert rows[0]["FROC A"] == 0.8 and rows[0]["mean AP50"] == 0.5
    assert rows[0]["image AUC"] == 0.75 and rows[1]["image AUC"] is None


def test_build_report_writes_everything(tmp_path):
    out = tmp_path / "report"
    report = build_report(_results(tmp_path), out)
    text = report.read_text()
    assert "| two-stage |" in text and "| single-stage |" in text
    assert "0.800" in text and "split **test**" in text
    assert (out / "froc_A.png").is_file() and (out / "froc_B.png").is_file()
    side = Image.open(out / "overlay_img1.png")
    assert side.width == 30 + 30 + 8
    saved = json.loads((out / "results.json").read_text())
    assert saved["systems"]["two-stage"]["metrics"]["froc"]["A"] == 0.8
    assert not list(out.glob("*.part*"))
    assert "Boxes or ranking?" not in text  # no ceiling in these metrics: no section


def test_report_shows_each_system_beside_its_perfectly_ranked_boxes(tmp_path):
    results = _results(tmp_path)
    results["systems"]["two-stage"]["metrics"]["ceiling"] = {"accuracy": 0.93, "froc": {"A": 1.0, "B": 0.86},
                                                             "ap50": {"A": 0.71, "B": None}}
    text = build_report(results, tmp_path / "report").read_text()
    assert "## Boxes or ranking?" in text
    assert "| two-stage | 0.500 | 0.930 | 0.500 | 0.710 |" in text
    assert "| single-stage |" not in text.split("## Boxes or ranking?")[1].split("## ")[0]


def test_report_says_what_the_top_ranked_boxes_are(tmp_path):
    results = _results(tmp_path)
    counts = {"hit": 5, "duplicate": 1, "other_class": 0, "piece": 2, "loose": 1, "partial": 0, "no_cell": 3}
    results["systems"]["two-stage"]["metrics"]["box_kinds"] = {"iou": {"A": counts}}
    text = build_report(results, tmp_path / "report").read_text()
    section = text.split("## What the top-ranked boxes are")[1].split("## ")[0]
    assert "| two-stage | A | IoU > 0.5 | 5 | 1 | 0 | 2 | 1 | 0 | 3 |" in section
    assert "| single-stage |" not in section
    assert "What the top-ranked boxes are" not in build_report(_results(tmp_path), tmp_path / "plain").read_text()
