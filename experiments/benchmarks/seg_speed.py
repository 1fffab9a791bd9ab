"""Segmentation-stage speed and memory on a CPU: training patches/s, tiled inference MP/s, peak memory.

    python -m experiments.benchmarks.seg_speed [--checkpoint SEG.ckpt] [--threads 2] [--big 8000]
        [--big-scale 0.5] [--speed-size 1024] [--tile 256] [--batch 8] [--train-steps 8] [--json OUT.json]

Three measurements, in this order (``ru_maxrss`` only grows, so the memory figure comes first):

1. **Peak memory** of ``segmentation.predict.predict_probability`` on a ``--big``² image at
   ``--big-scale`` (the default trained models' scale; the network then sees ``big × scale`` pixels a
   side), written into an in-memory uint8 plane: the process's resident-set growth (``ru_maxrss``,
   which includes MindSpore's own allocations) and the NumPy/Python peak (``tracemalloc``), next to
   the sizes of the input image and of one float32 plane for comparison.
2. **Inference** megapixels per second on a ``--speed-size``² image at scale 1 (network pixels per
   second, including tile overlap, context and batch padding), after a warm-up image that compiles
   the graph, plus the same with flip TTA.
3. **Training** patches per second: ``cytocore.trainloop``'s compiled train step with the stage's
   loss (``segmentation.losses.make_loss``) and AdamW, on random ``--patch``² batches of
   ``--train-batch`` (speed does not depend on the data), after two warm-up steps.

Without ``--checkpoint`` an untrained ``unet_small`` (width 16, depth 4) is used: speed and memory do
not depend on the weights. Images are synthetic brushing fields (``cytosynth.scene.render_image``),
tiled to the big size. Prints figures (JSON); never asserts.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
import tracemalloc
from typing import Any

from .output import emit, run_main


def _rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0


def _network(checkpoint: str | None) -> tuple[Any, dict, str]:
    """(model for predict, its ``model:`` block, description)."""
    if checkpoint:
        from segmentation.model_io import load_segmenter

        seg = load_segmenter(checkpoint)
        return seg, dict(seg.meta.get("model") or {}), f"checkpoint {checkpoint}"
    from segmentation.unet import create_unet, resolve_model_config

    model_cfg = resolve_model_config({"name": "unet_small"})
    model_cfg["out_channels"] = 1
    return create_unet(**model_cfg), model_cfg, "untrained unet_small"


def _field(size: int, seed: int = 0):
    """A synthetic brushing field of ``size``² (one rendered 1024² field, tiled)."""
    import numpy as np

    from cytosynth.scene import render_image

    base = render_image(np.random.default_rng(seed), min(size, 1024), min(size, 1024), healthy=False)[0]
    reps = -(-size // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:size, :size])


def _network_pixels(shape: tuple[int, int], cfg: dict) -> int:
    """Pixels the network actually processes for an image (tiles × tile area, batch padding included)."""
    from cytocore.tiling import tile_grid
    from segmentation.predict import padded_batch_size

    grid = tile_grid(shape, int(cfg["tile"]), float(cfg["overlap"]), int(cfg["context"]))
    n, b = len(grid), int(cfg["batch_size"])
    sent = (n // b) * b + (padded_batch_size(n % b, b, cfg["pad_batch"]) if n % b else 0)
    return sent * int(cfg["tile"]) ** 2


def measure_memory(model: Any, args: argparse.Namespace, cfg: dict) -> dict:
    from segmentation.predict import predict_probability, scaled_shape

    predict_probability(_field(300), model, {**cfg, "scale": args.big_scale})  # compile before measuring
    image = _field(args.big)
    gc.collect()
    rss_before = _rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    plane = predict_probability(image, model, {**cfg, "scale": args.big_scale, "dtype": "uint8"}).saliency
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = _rss_mb()
    net_shape = scaled_shape(image.shape[:2], args.big_scale)
    return {
        "image": f"{args.big}x{args.big} RGB uint8 ({image.nbytes / 2**20:.0f} MB)",
        "scale": args.big_scale,
        "network_image": f"{net_shape[0]}x{net_shape[1]}",
        "output_plane": f"uint8 {plane.shape[0]}x{plane.shape[1]} ({plane.nbytes / 2**20:.0f} MB)",
        "one_float32_plane_mb": round(plane.size * 4 / 2**20, 1),
        "seconds": round(seconds, 1),
        "image_mp_per_s": round(image.shape[0] * image.shape[1] / seconds / 1e6, 3),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "python_numpy_peak_mb": round(py_peak / 2**20, 1),
        "note": "rss_growth includes the output plane and MindSpore's buffers for one tile batch; "
        "python_numpy_peak is tracemalloc's peak (NumPy arrays and Python objects, output plane included)",
    }


def measure_inference(model: Any, args: argparse.Namespace, cfg: dict) -> dict:
    from segmentation.predict import predict_probability

    image = _field(args.speed_size, seed=1)
    out: dict[str, Any] = {"image": f"{args.speed_size}x{args.speed_size}", "scale": 1.0}
    for tta in ("none", "flip"):
        run_cfg = {**cfg, "scale": 1.0, "tta": tta}
        t0 = time.perf_counter()
        predict_probability(image[:512, :512], model, run_cfg)  # warm-up: graph compile for this shape
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict_probability(image, model, run_cfg)
        seconds = time.perf_counter() - t0
        mp = args.speed_size**2 / 1e6
        passes = 1 if tta == "none" else 3
        out[f"tta_{tta}"] = {
            "seconds": round(seconds, 2),
            "image_mp_per_s": round(mp / seconds, 3),
            "network_mp_per_s": round(_network_pixels(image.shape[:2], cfg) * passes / seconds / 1e6, 3),
            "warmup_seconds_512px": round(warm, 2),
        }
    out["network_pixels_per_image_pixel"] = round(_network_pixels(image.shape[:2], cfg) / args.speed_size**2, 2)
    return out


def measure_training(model_cfg: dict, args: argparse.Namespace) -> dict:
    import numpy as np

    import mindspore as ms
    from cytocore.trainloop import LoopConfig, make_train_step, make_optimizer
    from segmentation.losses import make_loss
    from segmentation.train import load_seg_config
    from segmentation.unet import create_unet

    seg_cfg = load_seg_config()
    net = create_unet(**{**model_cfg, "out_channels": 1})
    net.set_train(True)
    loop = LoopConfig.from_dict({"epochs": 1, "steps_per_epoch": args.train_steps + 2}, seg_cfg["optimizer"])
    step = make_train_step(net, make_loss("binary", 1, seg_cfg["loss"]), make_optimizer(net.trainable_params(), loop))
    rng = np.random.default_rng(0)
    b, p = args.train_batch, args.patch
    x = ms.Tensor(rng.standard_normal((b, 3, p, p)).astype(np.float32))
    y = ms.Tensor((rng.random((b, 1, p, p)) > 0.7).astype(np.float32))
    lr = ms.Tensor(np.float32(loop.optimizer.lr))
    t0 = time.perf_counter()
    for _ in range(2):
        float(step(lr, x, y).asnumpy())
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        float(step(lr, x, y).asnumpy())
    seconds = time.perf_counter() - t0
    return {
        "patch": f"{p}x{p}",
        "batch": b,
        "steps": args.train_steps,
        "patches_per_s": round(b * args.train_steps / seconds, 2),
        "seconds_per_step": round(seconds / args.train_steps, 3),
        "warmup_seconds_2_steps": round(warm, 1),
        "what": "cytocore.trainloop compiled step (forward, BCE+Dice loss, backward, AdamW); no data loading",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="segmentation checkpoint (default: untrained unet_small)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--big", type=int, default=8000, help="side of the memory-test image (default 8000)")
    parser.add_argument("--big-scale", type=float, default=0.5, help="model scale for the memory test (default 0.5)")
    parser.add_argument("--speed-size", type=int, default=1024, help="side of the speed-test image (default 1024)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="tiles per network call")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--skip", action="append", default=[], choices=["memory", "inference", "training"])
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from cytocore import runtime
    from segmentation.predict import predict_config

    runtime.setup(seed=0, threads=args.threads)
    model, model_cfg, what = _network(args.checkpoint)
    cfg = predict_config({"tile": args.tile, "batch_size": args.batch})
    figures: dict[str, Any] = {
        "model": what,
        "architecture": {k: model_cfg.get(k) for k in ("depth", "base_width", "norm", "upsample")},
        "threads": args.threads,
        "predict": {k: cfg[k] for k in ("tile", "context", "overlap", "batch_size", "pad_batch")},
        "command": "python -m experiments.benchmarks.seg_speed " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if "memory" not in args.skip:
        figures["memory"] = measure_memory(model, args, cfg)
        print(json.dumps({"memory": figures["memory"]}, indent=2), flush=True)
    if "inference" not in args.skip:
        figures["inference"] = measure_inference(model, args, cfg)
        print(json.dumps({"inference": figures["inference"]}, indent=2), flush=True)
    if "training" not in args.skip:
        figures["training"] = measure_training(model_cfg, args)
        print(json.dumps({"training": figures["training"]}, indent=2), flush=True)
    figures["versions"] = runtime.runtime_info()
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
