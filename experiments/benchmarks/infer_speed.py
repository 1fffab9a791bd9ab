"""Fused inference speed: seconds per 1024×1024 image and peak memory, on 2 CPU threads.

    python -m experiments.benchmarks.infer_speed [--seg SEG.ckpt --cls CLS.ckpt] [--images 4] [--threads 2]
    python -m experiments.benchmarks.infer_speed --sizes 2048 8192 [--images 1]   # memory vs image size

Images are synthetic brushing fields (``cytosynth.scene.render_image``) at 1024×1024, so the
segmenter finds a realistic number of cells for the classifier; larger sizes repeat one rendered
1024×1024 field (the renderer's own memory would otherwise be measured), and only one image is in
memory at a time. ``--sizes`` runs each size in its own process (peak RSS only grows within one)
and prints peak RSS and seconds per image side by side: memory must not grow with the image beyond
the image itself (issue 13: 8192² within 0.3 GB of 2048²). Without checkpoints, untrained
networks of the default architectures (U-Net ``unet_small``, EfficientNet-B0) are timed: speed
does not depend on the weights, only the object count does, which a trained model sets. The first
image is a warm-up (graph compilation) and is reported separately. Peak memory is the process's
maximum resident set size (MindSpore allocates outside Python, so ``tracemalloc`` would miss it).
Prints figures; never asserts.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .output import emit, run_main

CLASSES = ["SCC", "AC", "SCLC", "NSCLC"]


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0


def _untrained_checkpoints(folder: Path, seg_scale: float) -> tuple[Path, Path]:
    from classification.crops import CropConfig
    from classification.model import ModelConfig, build_network
    from classification.classifier import checkpoint_meta
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    model_cfg = resolve_model_config({"name": "unet_small"})
    seg_meta = {"stage": "segmentation", "model": model_cfg, "class_names": CLASSES, "mode": "binary",
                "scale": seg_scale, "input_multiple": 2 ** (model_cfg["depth"] - 1), "threshold": 0.5, "config": {}}
    seg = runtime.save_checkpoint(folder / "seg.ckpt", [create_unet(**model_cfg)], seg_meta)
    model = ModelConfig()
    cls = runtime.save_checkpoint(folder / "cls.ckpt", [build_network(model, len(CLASSES))],
                                  checkpoint_meta(model, CLASSES, CropConfig()))
    return seg, cls


def _frame(rng, size: int):
    """One synthetic field of ``size``×``size``: rendered at up to 1024 px, tiled beyond."""
    import numpy as np

    from cytosynth.scene import render_image

    side = min(size, 1024)
    base = render_image(rng, side, side, healthy=False)[0]
    if side == size:
        return base
    reps = -(-size // side)
    return np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:size, :size])


def _stub_classifier(num_classes: int):
    """Stands in for the EfficientNet (a NumPy callable, as the ONNX backend is): a score from each
    crop's mean, so the crops are still cut, batched and normalised."""
    import numpy as np

    def run(batch):
        return np.repeat(-np.asarray(batch).mean(axis=(1, 2, 3))[:, None], num_classes, axis=1).astype(np.float32)

    return run


class _StubSegmenter:
    """Stands in for the U-Net with its checkpoint's settings: logits high where the stain is dark."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def network(batch):
        import numpy as np

        return (-4.0 * batch.mean(axis=1, keepdims=True)).astype(np.float32)


def _stub_networks(pipeline) -> None:
    source = pipeline.source
    source.segmenter = _StubSegmenter(source.segmenter)
    source.classifier.network = _stub_classifier(len(source.class_names))


def _compare_sizes(sizes: list[int], passthrough: list[str]) -> int:
    """Run this benchmark once per size, each in a fresh process, and print the figures side by side."""
    import subprocess

    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "figures.json"
            cmd = [sys.executable, "-m", "experiments.benchmarks.infer_speed", "--size", str(size), "--json", str(out),
                   *passthrough]
            print("$ " + " ".join(cmd[1:]), flush=True)
            code = subprocess.call(cmd, stdout=subprocess.DEVNULL)
            if code != 0 or not out.is_file():
                print(f"size {size}: benchmark failed (exit {code})")
                return code or 1
            rows.append(json.loads(out.read_text()))
    print(f"{'image':>11}  {'s/image':>8}  {'peak RSS MB':>11}  {'RSS after setup MB':>18}  {'detections':>10}")
    for r in rows:
        print(f"{r['image_size']:>11}  {r['seconds_per_image_median']:>8.2f}  {r['peak_rss_mb']:>11.1f}  "
              f"{r['peak_rss_after_setup_mb']:>18.1f}  {r['detections_per_image_median']:>10}")
    if len(rows) > 1:
        print(f"peak RSS growth {rows[0]['image_size']} -> {rows[-1]['image_size']}: "
              f"{(rows[-1]['peak_rss_mb'] - rows[0]['peak_rss_mb']) / 1024:.3f} GB")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seg", default=None, help="segmentation checkpoint (default: untrained unet_small)")
    parser.add_argument("--cls", default=None, help="classifier checkpoint (default: untrained efficientnet_b0)")
    parser.add_argument("--images", type=int, default=4, help="timed images after the warm-up (default 4)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seg-scale", type=float, default=0.5, help="scale of the untrained segmenter (as trained by default)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="fusion config override")
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "mindspore"], default="mindspore",
                        help="inference engine of both networks (onnxruntime: exported first, not timed)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--stub-networks", action="store_true",
                        help="replace both networks by NumPy stand-ins (dark pixels are cells; a fixed class score): "
                             "measures the memory and time of everything around them in minutes on a busy machine")
    parser.add_argument("--write", action="store_true",
                        help="also write each image's outputs as `cytofuse infer` does (in the timing and the peak)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="compare these image sizes, each in its own process (e.g. 2048 8192)")
    parser.add_argument("--warmup-size", type=int, default=1024,
                        help="side of the untimed first image that compiles the graphs (default 1024)")
    args = parser.parse_args(argv)
    if args.sizes:
        passthrough = ["--images", str(args.images), "--threads", str(args.threads), "--seg-scale", str(args.seg_scale),
                       "--warmup-size", str(args.warmup_size)]
        passthrough += [x for flag, value in (("--seg", args.seg), ("--cls", args.cls)) if value for x in (flag, value)]
        passthrough += [x for o in args.overrides for x in ("--set", o)] + (["--stub-networks"] if args.stub_networks else []) + (["--write"] if args.write else [])
        return _compare_sizes(args.sizes, passthrough)

    import numpy as np

    from cytocore import runtime
    from fusion.pipeline import Pipeline

    seg, cls = (args.seg, args.cls)
    if args.backend == "mindspore" or seg is None or cls is None:
        runtime.setup(seed=0, threads=args.threads)  # ONNX Runtime on given checkpoints never imports MindSpore
    rss_start = _peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        trained = seg is not None and cls is not None
        if not trained:
            seg, cls = _untrained_checkpoints(Path(tmp), args.seg_scale)
        pipeline = Pipeline(seg, cls, overrides=[*args.overrides, f"runtime.threads={args.threads}",
                                                  f"runtime.backend={args.backend}"])
        if args.stub_networks:
            _stub_networks(pipeline)
        writer = None
        if args.write:  # what `cytofuse infer` writes per image: saliency PNG, overlay, GeoJSON, part
            from cytocore.runfolder import ImageSource
            from fusion.outputs import DetectionRunWriter

            writer = DetectionRunWriter(Path(tmp) / "out", pipeline.class_names, pipeline.config, pipeline.settings.floors)
        rng = np.random.default_rng(0)
        rss_loaded = _peak_rss_mb()
        timings, objects = [], []
        warm = None
        for k in range(args.images + 1):
            image = _frame(rng, min(args.size, args.warmup_size) if k == 0 else args.size)
            t0 = time.perf_counter()
            result = pipeline.run_image(image, f"bench_{k}")
            if writer is not None:
                writer.write_image(ImageSource(f"bench_{k}", Path(f"bench_{k}.png")), image, result)
            seconds = time.perf_counter() - t0
            if k == 0:
                warm = seconds
                continue
            timings.append(result.timings | {"total": seconds})
            objects.append(len(result.detections))
            del image, result
    per_image = [t["total"] for t in timings]
    figures = {
        "image_size": f"{args.size}x{args.size}",
        "threads": args.threads,
        "backend": args.backend,
        "checkpoints": "given" if trained else "untrained unet_small (scale %.2f) + efficientnet_b0" % args.seg_scale,
        "networks": "NumPy stand-ins (--stub-networks)" if args.stub_networks else "the checkpoints'",
        "outputs_written": bool(args.write),
        "images_timed": len(per_image),
        "seconds_per_image_median": round(statistics.median(per_image), 3),
        "seconds_per_image_mean": round(statistics.fmean(per_image), 3),
        "seconds_first_image_with_compile": round(warm or 0.0, 3),
        "seconds_segment_median": round(statistics.median(t.get("segment", 0.0) for t in timings), 3),
        "seconds_classify_median": round(statistics.median(t.get("classify", 0.0) for t in timings), 3),
        "detections_per_image_median": statistics.median(objects),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_after_setup_mb": round(rss_loaded, 1),
        "peak_rss_at_start_mb": round(rss_start, 1),
        "versions": runtime.runtime_info(),
    }
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
