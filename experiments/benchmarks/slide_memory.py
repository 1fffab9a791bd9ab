"""Whole-slide inference against the same pixels as a plain image: detections and peak memory.

    python -m experiments.benchmarks.slide_memory [--side 4096] [--small 512] [--json OUT.json]

Builds a synthetic slide: synthetic brushing fields (``cytosynth.scene.render_image``, 1024 px) laid
on clean glass, written as a tiled pyramidal TIFF with tifffile (µm/px 0.5 in its resolution tags),
and the same pixels as a PNG. Untrained networks of the default architectures (seg checkpoint
recording training µm/px 0.5) run ``cytofuse infer`` three times, each in its own process:

1. a small image (``--small`` px) — the memory baseline;
2. the slide (tiffslide, tissue mask on: glass skipped);
3. the same pixels as a PNG, with ``tissue.enabled=true`` so both runs see the same pixels.

Prints each run's peak resident set size (``ru_maxrss`` of that child process), wall time and
detection count, whether slide and PNG gave identical detections, and the slide's peak RSS minus
the small image's. Prints figures; never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ["SCC", "AC", "SCLC", "NSCLC"]
MPP = 0.5


def _checkpoints(folder: Path) -> tuple[Path, Path]:
    from classification.crops import CropConfig
    from classification.model import ModelConfig, build_network
    from classification.classifier import checkpoint_meta
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=0, threads=2)
    model_cfg = resolve_model_config({"name": "unet_small"})
    seg_meta = {"stage": "segmentation", "model": model_cfg, "class_names": CLASSES, "mode": "binary", "scale": 0.5,
                "mpp": MPP, "input_multiple": 2 ** (model_cfg["depth"] - 1), "threshold": 0.5, "config": {}}
    seg = runtime.save_checkpoint(folder / "seg.ckpt", [create_unet(**model_cfg)], seg_meta)
    model = ModelConfig(width_mult=0.5, depth_mult=0.5)
    cls = runtime.save_checkpoint(folder / "cls.ckpt", [build_network(model, len(CLASSES))],
                                  checkpoint_meta(model, CLASSES, CropConfig(size=64)))
    return seg, cls


def synthetic_slide(side: int, field: int = 1024, seed: int = 0) -> np.ndarray:
    """Glass with synthetic brushing fields on about half of it (a checkerboard of fields)."""
    from cytosynth.scene import render_image

    img = np.full((side, side, 3), 246, np.uint8)  # clean glass
    rng = np.random.default_rng(seed)
    n = max(1, side // field)
    for i in range(n):
        for j in range(n):
            if (i + j) % 2:
                continue
            rgb = render_image(np.random.default_rng(int(rng.integers(1 << 31))), field, field, healthy=False)[0]
            img[i * field:(i + 1) * field, j * field:(j + 1) * field] = rgb
    return img


def write_pyramid(path: Path, image: np.ndarray, mpp: float, levels: int = 4, tile: int = 256) -> None:
    import tifffile
    from PIL import Image

    res = 1e4 / mpp
    opts = dict(tile=(tile, tile), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        tif.write(image, subifds=levels - 1, resolution=(res, res), resolutionunit="CENTIMETER", **opts)
        for k in range(1, levels):
            f = 2 ** k
            small = np.asarray(Image.fromarray(image).resize((image.shape[1] // f, image.shape[0] // f), Image.BOX))
            tif.write(small, subfiletype=1, resolution=(res / f, res / f), resolutionunit="CENTIMETER", **opts)


def run_infer(seg: Path, cls: Path, images: Path, out: Path, extra: list[str]) -> dict:
    """``cytofuse infer`` in a child process; its own peak RSS from ``wait4``."""
    cmd = [sys.executable, "-m", "experiments.cli", "infer", "--seg", str(seg), "--cls", str(cls), "--images", str(images),
           "--out", str(out), "--set", "runtime.threads=2", "--set", "overlay.enabled=false", *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(err[-2000:], file=sys.stderr)
    return {"exit": code, "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=4096, help="slide side in level-0 px (default 4096)")
    parser.add_argument("--small", type=int, default=512, help="side of the small baseline image (default 512)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="cytofuse-slide-") as tmp:
        root = Path(tmp)
        seg, cls = _checkpoints(root)
        pixels = synthetic_slide(args.side)
        for name in ("small", "slide", "plain"):
            (root / name).mkdir()
        write_pyramid(root / "slide" / "field.tif", pixels, MPP)
        Image.fromarray(pixels).save(root / "plain" / "field.png")
        Image.fromarray(pixels[: args.small, : args.small]).save(root / "small" / "small.png")
        del pixels
        figures = {"side": args.side, "small": args.small,
                   "small_run": run_infer(seg, cls, root / "small", root / "out_small", []),
                   "slide_run": run_infer(seg, cls, root / "slide", root / "out_slide", []),
                   "plain_run": run_infer(seg, cls, root / "plain", root / "out_plain", ["--set", "tissue.enabled=true"])}
        a = pd.read_csv(root / "out_slide" / "detections.csv")
        b = pd.read_csv(root / "out_plain" / "detections.csv")
        numeric = [c for c in a.columns if c not in ("image_id", "label")]
        same = (list(a.columns) == list(b.columns) and len(a) == len(b)
                and np.array_equal(a["label"].astype(str).to_numpy(), b["label"].astype(str).to_numpy())
                and np.allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), equal_nan=True))
        figures.update(n_detections_slide=len(a), n_detections_plain=len(b), identical_detections=bool(same),
                       rss_slide_minus_small_mb=round(figures["slide_run"]["peak_rss_mb"] - figures["small_run"]["peak_rss_mb"], 1))
        run = json.loads((root / "out_slide" / "run.json").read_text())
        figures["slide_record"] = {k: v for k, v in (run.get("inputs") or {}).items()}
    for key in ("small_run", "slide_run", "plain_run"):
        r = figures[key]
        print(f"{key:10s} exit {r['exit']}  peak RSS {r['peak_rss_mb']:8.1f} MB  {r['seconds']:7.1f} s")
    print(f"detections: slide {figures['n_detections_slide']}, plain {figures['n_detections_plain']}, "
          f"identical: {figures['identical_detections']}")
    print(f"slide peak RSS - small image peak RSS: {figures['rss_slide_minus_small_mb']} MB "
          f"({args.side}x{args.side} slide vs {args.small}x{args.small} image)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
