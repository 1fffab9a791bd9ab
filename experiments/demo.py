"""``cytofuse demo`` / ``make demo``: everything on a fresh machine, in one folder, in minutes.

The demo is :func:`experiments.compare.run_compare` with ``experiments/configs/demo.yaml``: generate
the synthetic data set, train the segmentation U-Net, the classifier and the single-stage baseline,
run both systems on the test split, score them with the challenge's metric and write the report.
What it adds is for a first-time user: a table printed in the terminal and a ``README.md`` in the
output folder saying which files to open. ``--quick`` runs ``demo_tiny.yaml`` (seconds of training,
tiny images) to check that everything is wired, not to measure anything.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from cytocore.atomic import write_text

from .compare import load_compare_config, run_compare
from .runkit import SINGLE_STAGE, TWO_STAGE
from .stages import CONFIG_DIR

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
QUICK_CONFIG = CONFIG_DIR / "demo_tiny.yaml"
DEFAULT_OUT = "demo_out"


def demo_config(quick: bool = False, overrides: Iterable[str] = ()) -> dict:
    return load_compare_config(QUICK_CONFIG if quick else DEMO_CONFIG, overrides)


def run_demo(out: PathLike = DEFAULT_OUT, quick: bool = False, overrides: Iterable[str] = ()) -> dict:
    """Run the demo into ``out``; returns the comparison results (also in ``out/results.json``)."""
    cfg = demo_config(quick, overrides)
    log.info("CytoFuse demo%s: synthetic data → segmentation + classifier + single-stage baseline → test → report, in %s",
             " (quick wiring check)" if quick else "", out)
    results = run_compare(cfg, out)
    write_readme(results, Path(out), quick)
    return results


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return str(v) if isinstance(v, str) else f"{float(v):.3f}"


def terminal_table(results: Mapping[str, Any]) -> str:
    """The report's summary rows turned on their side (one column per system) to fit a terminal."""
    from .report import summary_rows

    rows = summary_rows(results)
    if not rows:
        return "(no system was evaluated)"
    keys = [k for k in rows[0] if k != "system" and not k.startswith("_") and any(r.get(k) is not None for r in rows)]
    names = [r["system"] for r in rows]
    width = max(len(k) for k in keys)
    cols = [max(12, len(n)) for n in names]
    lines = [" " * width + "  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols))]
    for k in keys:
        lines.append(f"{k:<{width}}  " + "  ".join(f"{_fmt(r.get(k)):>{c}}" for r, c in zip(rows, cols)))
    return "\n".join(lines)


def summary_text(results: Mapping[str, Any]) -> str:
    """What the terminal shows at the end: data, budget, the table and where the report is."""
    ds = results["dataset"]
    lines = [
        f"Data: {ds['name']}, split {ds['split']}: {ds['n_images']} test images ({ds['n_healthy']} healthy), {ds['n_boxes']} boxes.",
        f"Budget: {results.get('budget', '?')}.",
        "",
        terminal_table(results),
        "",
        f"Report: {results.get('report')}   (wall time {results.get('wall_minutes', '?')} min)",
    ]
    return "\n".join(lines)


def write_readme(results: Mapping[str, Any], out: Path, quick: bool = False) -> Path:
    """``out/README.md``: what was done and which files to open."""
    from .report import markdown_table, summary_rows

    ds = results["dataset"]
    warning = ("\n> **Quick wiring check** (`--quick`): tiny images, seconds of training. The numbers below mean "
               "nothing; run `cytofuse demo` without `--quick` for a real comparison.\n" if quick else "")
    text = f"""# CytoFuse demo

Made by `cytofuse demo{' --quick' if quick else ''}` in {results.get('wall_minutes', '?')} minutes: a synthetic lung-cytology data set
was generated, the two-stage system (U-Net segmentation + EfficientNet classifier, fused) and the
single-stage baseline (one U-Net with a channel per class) were trained on its train split, and both were
run and scored with the challenge's metric on the {ds['n_images']} images of its **{ds['split']}** split
({ds['n_healthy']} healthy, {ds['n_boxes']} boxed cancer cells).
{warning}
## Open these

- [`report.md`](report.md) — the comparison: table, per-class FROC, FROC curves, overlays side by side.
- [`{TWO_STAGE}/overlays/`]({TWO_STAGE}/overlays) — every test image with the saliency heat map and class-coloured boxes.
- [`{TWO_STAGE}/detections.geojson`]({TWO_STAGE}/detections.geojson) — all detections as QuPath objects; the
  per-image files in [`{TWO_STAGE}/geojson/`]({TWO_STAGE}/geojson) can be dragged onto the open image in QuPath.
- [`{TWO_STAGE}/predictions.csv`]({TWO_STAGE}/predictions.csv) — the challenge's submission rows
  (`image_id,xmin,ymin,xmax,ymax,p_<class>…`, normalised); `detections.csv` has pixel boxes and scores,
  `images.csv` a malignancy score per image, `saliency/` the probability maps.
- [`{SINGLE_STAGE}/`]({SINGLE_STAGE}) — the same files from the single-stage baseline.
- `seg/`, `cls/`, `baseline/` — training runs (`best.ckpt`, `log.csv`, `config.yaml`); `data/` — the data set.

## Results ({ds['split']} split)

{markdown_table(summary_rows(results))}

Budget: {results.get('budget', '?')}.

## Use the trained models on your own images

    cytofuse infer --seg {out / 'seg' / 'best.ckpt'} --cls {out / 'cls' / 'best.ckpt'} --images YOUR_IMAGES --out YOUR_OUT
    cytofuse evaluate --data YOUR_DATA --predictions YOUR_OUT/predictions.csv --saliency YOUR_OUT/saliency --out metrics.json

Run the demo again with the same `--out` to reuse what is finished (trained models, predictions).
"""
    path = out / "README.md"
    write_text(path, text)
    return path
