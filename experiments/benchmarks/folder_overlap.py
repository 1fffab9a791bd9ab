"""Fused inference of a folder with and without overlapping read / networks / write (``cytocore.runfolder``).

    python -m experiments.benchmarks.folder_overlap [--images 4] [--size 2048] [--backend onnxruntime]
        [--prefetch-tiles 0 2] [--rounds 2] [--json OUT.json]

Writes ``--images`` synthetic fields of ``--size``² (``cytosynth``) to a temporary folder, makes
untrained checkpoints of the default architectures (exported to ONNX first when the backend is
ONNX Runtime), then runs ``Pipeline.run_folder`` into fresh output folders, alternating serial and
overlapped runs (``--rounds`` each), and, for each ``--prefetch-tiles`` value, tile batches prepared
on a background thread inside the U-Net's sliding window. Prints seconds per image (median) and the
per-image time split the run records (segment / classify / write). Never asserts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .output import emit, run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "mindspore"])
    parser.add_argument("--prefetch-tiles", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seg", default=None, metavar="CKPT", help="trained segmentation checkpoint (copied; default untrained)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from cytocore import runfolder
    from cytosynth.scene import render_image
    from experiments.commands_export import export_checkpoint
    from fusion.pipeline import Pipeline

    from .infer_speed import _untrained_checkpoints

    results: dict[str, list[float]] = {}
    splits: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cytofuse-overlap-") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for k in range(args.images):
            Image.fromarray(render_image(rng, args.size, args.size, healthy=False)[0]).save(images / f"field_{k}.png")
        seg, cls = _untrained_checkpoints(tmp, 0.5)
        if args.seg:  # a trained U-Net finds a realistic number of cells (an untrained one finds blobs)
            seg = Path(shutil.copy(args.seg, tmp / "seg_given.ckpt"))
        if args.backend == "onnxruntime":
            for ckpt in (seg, cls):
                export_checkpoint(ckpt)
        configs = [(overlap, depth) for depth in args.prefetch_tiles for overlap in (False, True)]
        pipelines = {depth: Pipeline(seg, cls, overrides=[f"runtime.threads={args.threads}", f"runtime.backend={args.backend}",
                                                          f"segmentation.predict.prefetch={depth}"])
                     for depth in args.prefetch_tiles}
        warm = tmp / "warm"
        warm.mkdir()
        Image.fromarray(render_image(rng, 512, 512, healthy=False)[0]).save(warm / "warm.png")
        for depth, pipeline in pipelines.items():  # graph compile (MindSpore), session warm-up (ONNX Runtime)
            pipeline.run_folder(warm, tmp / f"warm_out_{depth}", progress=False)
        for r in range(args.rounds):
            for overlap, depth in configs:
                name = f"overlap={'on' if overlap else 'off'},prefetch_tiles={depth}"
                runfolder.OVERLAP = overlap
                t0 = time.perf_counter()
                summary = pipelines[depth].run_folder(images, tmp / f"out_{r}_{name}", progress=False)
                results.setdefault(name, []).append((time.perf_counter() - t0) / args.images)
                timings = summary.get("timings") or {}
                parts = {}
                for t in timings.values():
                    for k, v in t.items():
                        parts.setdefault(k, []).append(v)
                splits[name] = {k: round(statistics.median(v), 3) for k, v in parts.items()}
    base = statistics.median(results[f"overlap=off,prefetch_tiles={args.prefetch_tiles[0]}"])
    out = {
        "command": "python -m experiments.benchmarks.folder_overlap " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": args.backend, "images": args.images, "size": args.size, "threads": args.threads,
        "load_average_at_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "seconds_per_image_median": {k: round(statistics.median(v), 3) for k, v in results.items()},
        "seconds_per_image_all_rounds": {k: [round(x, 3) for x in v] for k, v in results.items()},
        "speedup_vs_serial": {k: round(base / statistics.median(v), 2) for k, v in results.items()},
        "per_image_split_of_last_round": splits,
    }
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
