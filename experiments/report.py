"""The comparison report: one table, FROC curves and overlays that let a user judge the design.

``results.json`` holds everything measured; ``report.md`` is what a person reads (with the budget
text and notes of :func:`budget_text` and :func:`report_notes`, and the classifier-only run's
:func:`classifier_report`). Both are built from a plain results dict so the builder is testable
without training anything:

    {"dataset": {...}, "seed": 0, "budget": "...",
     "systems": {name: {"metrics": <experiments.evaluate output>, "triage": {...}, "segmentation": {...},
                        "infer_seconds_per_image": s, "train_minutes": m, "overlays": {image_id: path}}}}
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from cytocore.atomic import write_json, write_text, write_with
from cytocore.false_positives import KINDS

from .runkit import ENSEMBLE, SINGLE_STAGE, TWO_STAGE

PathLike = Union[str, Path]


def best_f1(curve: dict, n_gt: int, n_images: int) -> Optional[float]:
    """Best F1 over the FROC curve's thresholds (IoP > 0.5 matching; ignored duplicates excluded).

    The curve gives recall and FP per image at each threshold, i.e. TP = recall·n_gt and
    FP = fp·N, so F1 = 2TP / (2TP + FP + FN) needs no second matching pass.
    """
    if not n_gt or not curve:
        return None
    recall = np.asarray(curve.get("recall", []), np.float64)
    fp = np.asarray(curve.get("fp_per_image", []), np.float64)
    if recall.size == 0:
        return 0.0
    tp = recall * n_gt
    f1 = 2 * tp / np.maximum(2 * tp + fp * n_images + (n_gt - tp), 1e-12)
    return float(f1.max())


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _mean(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def summary_rows(results: dict) -> list[dict]:
    """One row of headline numbers per system (what the table and the terminal show)."""
    rows = []
    for name, sysres in results["systems"].items():
        m = sysres.get("metrics", {})
        classes = list(m.get("froc", {}))
        n_images = m.get("n_images", 0)
        f1 = {c: best_f1(m.get("froc_curves", {}).get(c, {}), m.get("n_gt", {}).get(c, 0), n_images) for c in classes}
        tri = sysres.get("triage", {}) or {}
        seg = sysres.get("segmentation", {}) or {}
        rows.append(
            {
                "system": name,
                **{f"FROC {c}": m["froc"][c] for c in classes},
                "accuracy": m.get("accuracy"),
                "explainability AUC": m.get("explainability_auc"),
                "model score": m.get("model_score"),
                "mean AP50": _mean(list(m.get("ap50", {}).values())),
                "mean best F1": _mean(list(f1.values())),
                "image AUC": tri.get("roc_auc"),
                "sens@95%spec": tri.get("sensitivity_at_95_specificity"),
                "Dice": seg.get("dice"),
                "Rand error": seg.get("rand_error"),
                "infer s/image": sysres.get("infer_seconds_per_image"),
                "train min": sysres.get("train_minutes"),
                "_f1": f1,
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = [k for k in rows[0] if not k.startswith("_")] if rows else []
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) if c == "system" else _fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def per_class_table(results: dict) -> str:
    """FROC, AP50 and best F1 per class and system."""
    lines = ["| class | system | FROC | AP50 | best F1 | GT boxes |", "|---|---|---|---|---|---|"]
    rows = {r["system"]: r for r in summary_rows(results)}
    for name, sysres in results["systems"].items():
        m = sysres.get("metrics", {})
        for c in m.get("froc", {}):
            lines.append(
                f"| {c} | {name} | {_fmt(m['froc'][c])} | {_fmt(m.get('ap50', {}).get(c))} | "
                f"{_fmt(rows[name]['_f1'].get(c))} | {_fmt(m.get('n_gt', {}).get(c))} |"
            )
    return "\n".join(lines)


def ceiling_table(results: dict) -> Optional[str]:
    """Each system's accuracy and mean AP50 beside the same boxes ranked perfectly (``metrics["ceiling"]``)."""
    lines = ["| system | accuracy | ranked perfectly | mean AP50 | ranked perfectly |", "|---|---|---|---|---|"]
    for name, sysres in results["systems"].items():
        m = sysres.get("metrics", {})
        best = m.get("ceiling")
        if not best:
            continue
        lines.append(f"| {name} | {_fmt(m.get('accuracy'))} | {_fmt(best.get('accuracy'))} | "
                     f"{_fmt(_mean(list(m.get('ap50', {}).values())))} | {_fmt(_mean(list(best.get('ap50', {}).values())))} |")
    return "\n".join(lines) if len(lines) > 2 else None


def box_kinds_table(results: dict) -> Optional[str]:
    """What each system's top-ranked boxes are per class and hit test (``metrics["box_kinds"]``)."""
    lines = ["| system | class | hit test | " + " | ".join(k.replace("_", " ") for k in KINDS) + " |",
             "|---|---|---|" + "---|" * len(KINDS)]
    for name, sysres in results["systems"].items():
        for hit, per_class in sysres.get("metrics", {}).get("box_kinds", {}).items():
            test = {"iop": "IoP > 0.5", "iou": "IoU > 0.5"}.get(hit, hit)
            lines += [f"| {name} | {c} | {test} | " + " | ".join(str(counts.get(k, 0)) for k in KINDS) + " |"
                      for c, counts in per_class.items()]
    return "\n".join(lines) if len(lines) > 2 else None


def plot_froc_curves(results: dict, out_dir: PathLike) -> list[Path]:
    """One PNG per class with every system's FROC curve and the six operating points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    classes: list[str] = []
    for sysres in results["systems"].values():
        classes += [c for c in sysres.get("metrics", {}).get("froc", {}) if c not in classes]
    written = []
    for c in classes:
        fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=110)
        for name, sysres in results["systems"].items():
            curve = sysres.get("metrics", {}).get("froc_curves", {}).get(c)
            if not curve:
                continue
            fp = np.asarray(curve["fp_per_image"], float)
            rec = np.asarray(curve["recall"], float)
            ax.step(np.maximum(fp, 1 / 16), rec, where="post", label=f"{name} (FROC {_fmt(sysres['metrics']['froc'][c])})")
        for x in (0.25, 0.5, 1, 2, 4, 8):
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log", base=2)
        ax.set_xlim(1 / 16, 16)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positives per image")
        ax.set_ylabel("recall")
        ax.set_title(f"FROC — {c}")
        if ax.get_legend_handles_labels()[0]:  # a class no system has a curve for gets an empty plot, no legend
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"froc_{c}.png"
        write_with(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def side_by_side(results: dict, out_dir: PathLike, limit: int = 4) -> list[Path]:
    """Put each system's overlay of the same image next to each other, labelled (systems that draw
    none, such as the ensemble, are left out)."""
    from PIL import Image, ImageDraw

    names = [n for n, sysres in results["systems"].items() if sysres.get("overlays")]
    common = None
    for n in names:
        ids = set((results["systems"][n].get("overlays") or {}).keys())
        common = ids if common is None else common & ids
    written = []
    for image_id in sorted(common or [])[:limit]:
        tiles = [Image.open(results["systems"][n]["overlays"][image_id]).convert("RGB") for n in names]
        h = max(t.height for t in tiles)
        canvas = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), h + 22), "white")
        draw = ImageDraw.Draw(canvas)
        x = 0
        for n, t in zip(names, tiles):
            canvas.paste(t, (x, 22))
            draw.text((x + 4, 4), n, fill=(0, 0, 0))
            x += t.width + 8
        path = Path(out_dir) / f"overlay_{image_id}.png"
        write_with(path, lambda tmp, c=canvas: c.save(tmp, format="PNG"))
        written.append(path)
    return written


def build_report(results: dict, out_dir: PathLike) -> Path:
    """Write ``results.json``, ``report.md``, FROC curve PNGs and side-by-side overlays; return report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_froc_curves(results, out)
    overlays = side_by_side(results, out)
    ds = results.get("dataset", {})
    lines = [
        f"# CytoFuse comparison — {ds.get('name', 'data set')}",
        "",
        f"Data set: `{ds.get('path', '?')}`, split **{ds.get('split', '?')}** "
        f"({ds.get('n_images', '?')} images, {ds.get('n_boxes', '?')} boxes). Seed {results.get('seed', '?')}.",
    ]
    if results.get("budget"):
        lines.append(f"Compute budget: {results['budget']}.")
    lines += ["", "## Summary", "", markdown_table(summary_rows(results)), ""]
    lines += [
        "Accuracy = mean per-class FROC at IoP > 0.5 (FP/image 1/4 … 8); model score = 0.8 × accuracy + "
        "0.2 × explainability AUC (the challenge's official score). AP50 uses pycocotools at IoU 0.5; "
        "image AUC and sensitivity at 95% specificity judge healthy vs cancer images by the highest detection score.",
        "",
        "## Per class",
        "",
        per_class_table(results),
        "",
    ]
    ceiling = ceiling_table(results)
    if ceiling:
        lines += [
            "## Boxes or ranking?",
            "",
            ceiling,
            "",
            "\"Ranked perfectly\" scores each system's own boxes as a perfect classifier would: for each class, every "
            "box that hits a cell of that class (IoP > 0.5 for accuracy, IoU > 0.5 for AP50) above every box that "
            "does not (cytocore/ranking_ceiling.py). The gap from it to 1 is the boxes' (missed, merged or loose "
            "cells); the gap from the real figure to it is the ranking's (classifier and fusion).",
            "",
        ]
    kinds = box_kinds_table(results)
    if kinds:
        lines += [
            "## What the top-ranked boxes are",
            "",
            kinds,
            "",
            "For each class its N highest-scored boxes, N being its annotated cells, matched in score order with "
            "the metric's hit test (cytocore/false_positives.py): a duplicate hits a cell a higher box took; a piece "
            "lies mostly inside a cell, a loose box holds most of one; no cell touches no annotated cell (background, "
            "or a cell nobody annotated).",
            "",
        ]
    if curves:
        lines += ["## FROC curves", ""] + [f"![{p.stem}]({p.name})" for p in curves] + [""]
    if overlays:
        lines += ["## Overlays (same image, each system)", ""] + [f"![{p.stem}]({p.name})" for p in overlays] + [""]
    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    write_json(out / "results.json", results)
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    return report


# ------------------------------------------------------------------------------ report text


def budget_text(runs: Mapping[str, dict], systems: Sequence[str], where: Optional[str] = None) -> str:
    """The compute each system got, in wall-clock minutes and samples seen; ``where`` says on what
    (default: this process's MindSpore threads)."""
    from cytocore import runtime

    parts = []
    if TWO_STAGE in systems:
        s, c = runs["seg"], runs["cls"]
        parts.append(f"two-stage = segmentation {s['minutes']:.1f} min ({s['epochs']} epochs, {s['samples']} patches) + "
                     f"classifier {c['minutes']:.1f} min ({c['epochs']} epochs, {c['samples']} crops) = "
                     f"{s['minutes'] + c['minutes']:.1f} min")
    if SINGLE_STAGE in systems:
        b = runs["baseline"]
        budget = "none" if b.get("budget_minutes") is None else f"{b['budget_minutes']:.1f} min"
        parts.append(f"single-stage budget {budget}, used {b['minutes']:.1f} min ({b['epochs']} epochs, {b['samples']} patches)")
    if where is None:
        threads = runtime.runtime_info().get("threads") if "mindspore" in sys.modules else None
        where = f" on {threads} CPU thread(s)" if threads else ""
    return "; ".join(parts) + f". Training wall-clock{where}; a stage stops when its budget is used up (one validation pass may follow)"


def report_notes(results: Mapping[str, Any], runs: Mapping[str, dict], systems: Sequence[str], cfg: Mapping[str, Any]) -> list[str]:
    notes = []
    ds = results["dataset"]
    notes.append(f"Split: {', '.join(f'{k} {v}' for k, v in ds['splits'].items())} images (seed {ds['split_seed']}, "
                 "fixed in splits.csv); every system trained on the train split, chose its checkpoint on val "
                 f"and is scored on {ds['split']} ({ds['n_healthy']} healthy image(s) included).")
    if ds.get("n_problems"):
        notes.append(f"Data: {ds['n_problems']} annotation problem(s) skipped while reading (first: {ds['problems'][0]}).")
    if TWO_STAGE in systems:
        fusion = results["systems"][TWO_STAGE].get("fusion")
        how = (f"chosen on val by `cytofuse fuse fit` for {cfg.get('fusion_metric') or 'accuracy'}" if cfg.get("fusion_fit")
               else "from the config, not tuned")
        notes.append(f"Two-stage fusion rule: {fusion} ({how}).")
    if SINGLE_STAGE in systems:
        notes.append("Single-stage: the segmentation stage's U-Net with K+1 outputs (class-index targets); a box's class "
                     "probabilities are the mean softmax inside its component, a parent class (NSCLC) gets its "
                     "sub-types' mass (the targets paint SCC+NSCLC boxes as SCC); saliency = 1 − p(background).")
    ensemble = results["systems"].get(ENSEMBLE)
    if ensemble:
        notes.append(f"Ensemble: {ensemble.get('fusion')} (`cytofuse ensemble`; its inference runs both systems, its "
                     "train min is theirs together).")
    notes.append("infer s/image: median per test image of segmentation + classification + fusion (graph compile and "
                 "file writing excluded by the median and the timer); Dice and Rand error: saliency ≥ "
                 f"{cfg['report']['mask_threshold']} against the masks, pooled over test images with a mask.")
    for system, sysres in results["systems"].items():
        for w in (sysres.get("metrics") or {}).get("warnings", [])[:3]:
            notes.append(f"{system}: {w}")
        if sysres.get("n_failed"):
            notes.append(f"{system}: {sysres['n_failed']} test image(s) failed in inference (see {sysres['outputs']}/run.json).")
    return notes


def classifier_report(results: Mapping[str, Any]) -> str:
    """A short markdown report of a classifier-only run (the detection report's table does not apply)."""
    m, ds, tr = results["metrics"], results["dataset"], results["training"]

    def f(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"

    lines = [
        f"# CytoFuse classifier — {ds['name']}",
        "",
        f"Data set: `{ds['path']}`, evaluated on split **{ds['split']}** ({m['n_items']} items; splits "
        f"{', '.join(f'{k} {v}' for k, v in ds['splits'].items())}). Seed {results['seed']}.",
        f"Training: {tr['minutes']:.1f} min, {tr['epochs']} epochs, {tr['samples']} crops seen "
        f"(budget {tr['budget_minutes']} min). Weights: the final epoch's ({Path(m['checkpoint']).name}), so the "
        "evaluated split chose nothing.",
        "",
        "| class | ROC AUC | AP | balanced accuracy (one-vs-rest, p ≥ 0.5) | items |",
        "|---|---|---|---|---|",
    ]
    for c in ds["classes"]:
        lines.append(f"| {c} | {f(m.get(f'auc_{c}'))} | {f(m.get(f'ap_{c}'))} | {f(m.get(f'bacc_{c}'))} | {m['n_per_class'][c]} |")
    lines.append(f"| **mean** | {f(m.get('mean_auc'))} | {f(m.get('mean_ap'))} | {f(m.get('mean_bacc'))} | {m['n_items']} |")
    lines.append("")
    if "argmax_accuracy" in m:
        lines.append(f"Arg-max class: accuracy {f(m['argmax_accuracy'])}, balanced accuracy (mean per-class recall) "
                     f"{f(m['argmax_balanced_accuracy'])}.")
    lines.append(f"Inference: {1000 * m['infer_seconds_per_item']:.1f} ms per item (batched, graph compile included).")
    return "\n".join(lines) + "\n"
