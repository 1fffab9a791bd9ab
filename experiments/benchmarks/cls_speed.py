"""Crop classifier speed: training and inference crops per second, per model and crop size.

Training throughput is measured through the shared train loop itself (crop sampling, albumentations
and the compiled step together), on its second epoch so graph compilation is not counted. Inference
is ``Classifier.predict_crops`` after a warm-up call, ``classify_boxes`` on a whole image (crop
extraction included), and Grad-CAM. Prints a table; asserts nothing (timings depend on the machine).

    .venv/bin/python -m experiments.benchmarks.cls_speed [--models efficientnet_b0 mobilenet_v3_small_100]
        [--size 96] [--batch 32] [--steps 6] [--data DIR] [--threads N]

``--threads 1`` beside a second copy of the command is what a system gets in ``parallel: true`` compares;
alone, it shows what one thread itself costs, apart from two processes sharing the machine.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .output import run_main

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _parse_model(spec: str) -> list[str]:
    """``efficientnet_b0`` or ``efficientnet_b0@0.5`` (width and depth multiplier) → config overrides."""
    name, _, mult = spec.partition("@")
    sets = [f"model.name={name}"]
    if mult:
        sets += [f"model.width_mult={float(mult)}", f"model.depth_mult={float(mult)}"]
    return sets


def measure(spec: str, data: Path, size: int, batch: int, steps: int, out: Path) -> dict:
    from classification.attribution import gradcam
    from classification.model import count_parameters
    from classification.classifier import Classifier
    from classification.predict import classify_boxes
    from classification.train import build_setup, load_cls_config, make_task
    from cytocore.imageio import read_image
    from cytocore.trainloop import train

    cfg = load_cls_config(None, _parse_model(spec) + [
        f"data.path={data}", f"crop.size={size}", f"sampling.batch_size={batch}", "val.max_crops=64",
        f"val.batch_size={batch}", "train.epochs=2", f"train.steps_per_epoch={steps}", "train.progress=false",
    ])
    setup = build_setup(cfg)
    t0 = time.time()
    result = train(make_task(setup), setup.loop, out / spec.replace("@", "_"))
    train_total = time.time() - t0
    row = {"model": spec, "params_M": count_parameters(setup.network) / 1e6, "crop": size,
           "train_crops_s": result.history[-1]["samples_per_s"], "first_epoch_s": result.history[0]["seconds"],
           "train_total_s": train_total}

    sampler_t = time.time()
    rng = np.random.default_rng(0)
    for _ in range(steps):
        setup.sampler.batch(rng)
    row["sampling_crops_s"] = steps * batch / (time.time() - sampler_t)

    clf = Classifier(setup.network, setup.class_names, setup.model.head, setup.crop, setup.model)
    crops = np.concatenate([setup.val_crops] * (1 + (4 * batch) // max(1, len(setup.val_crops))))[: 4 * batch]
    clf.predict_crops(crops[:batch], batch)  # compile
    t = time.time()
    clf.predict_crops(crops, batch)
    row["infer_crops_s"] = len(crops) / (time.time() - t)

    rec = max(setup.val_set.records, key=lambda r: r.n_boxes)
    image = read_image(rec.path)
    boxes = np.concatenate([rec.boxes] * (1 + (2 * batch) // max(1, rec.n_boxes)))[: 2 * batch]
    classify_boxes(image, boxes[:1], clf, batch)
    t = time.time()
    classify_boxes(image, boxes, clf, batch)
    row["boxes_s"] = len(boxes) / (time.time() - t)

    try:
        gradcam(clf, crops[:batch], 0, batch_size=batch)  # compile
        t = time.time()
        gradcam(clf, crops, 0, batch_size=batch)
        row["gradcam_crops_s"] = len(crops) / (time.time() - t)
    except Exception as exc:  # a model family without Grad-CAM support still gets its other numbers
        row["gradcam_crops_s"] = float("nan")
        logging.getLogger("cytofuse").warning("gradcam not measured for %s: %s", spec, exc)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "efficientnet_b0@0.5", "mobilenet_v3_small_100"],
                        help="mindcv names; name@m scales EfficientNet-B width and depth by m")
    parser.add_argument("--size", type=int, default=96, help="crop side in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="training steps per measured epoch")
    parser.add_argument("--data", default=None, help="data set (default: a small synthetic set made here)")
    parser.add_argument("--threads", type=int, default=None, help="MindSpore CPU threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from cytocore import runtime

    runtime.setup(seed=0, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="cls_speed_") as tmp:
        data = Path(args.data) if args.data else None
        if data is None:
            from cytosynth.scene import generate

            data = Path(tmp) / "synth"
            generate(data, n_images=16, seed=0, size=384)
        rows = []
        for spec in args.models:
            rows.append(measure(spec, data, args.size, args.batch, args.steps, Path(tmp) / "runs"))
            print(_format([rows[-1]], header=len(rows) == 1), flush=True)
    info = runtime.runtime_info()
    print(f"(MindSpore {info['mindspore']}, {info['threads']} threads, batch {args.batch}, crops {args.size} px; "
          "train = sampling + augmentation + step, 2nd epoch; infer = network only; boxes = crop extraction + network)")
    return 0


def _format(rows: list[dict], header: bool = True) -> str:
    cols = ["model", "params_M", "crop", "train_crops_s", "sampling_crops_s", "infer_crops_s", "boxes_s",
            "gradcam_crops_s", "first_epoch_s"]
    lines = [" | ".join(f"{c:>16}" for c in cols)] if header else []
    for r in rows:
        lines.append(" | ".join(f"{r[c]:>16.2f}" if isinstance(r[c], float) else f"{str(r[c]):>16}" for c in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
