"""Subcommands of the classification stage: ``cytofuse cls train`` and ``cytofuse cls predict``.

MindSpore and mindcv are imported inside the handlers, so ``cytofuse --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging

from cytocore.onnx_backend import add_backend_argument

log = logging.getLogger("cytofuse")

FORMATS = ["auto", "challenge", "voc", "coco", "folders"]


def register(sub: argparse._SubParsersAction) -> None:
    cls = sub.add_parser("cls", help="crop classifier (EfficientNet): train, predict")
    cls_sub = cls.add_subparsers(dest="cls_command", metavar="ACTION", required=True)

    t = cls_sub.add_parser("train", help="train the crop classifier on boxes (or folder-per-class tiles)")
    t.add_argument("--config", default=None, help="YAML config (defaults: classification/configs/default.yaml)")
    t.add_argument("--data", default=None, help="data set folder (overrides data.path)")
    t.add_argument("--format", choices=FORMATS, default=None, help="data set layout (default: data.format, auto)")
    t.add_argument("--out", default="runs/classification", help="run folder (default runs/classification)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    t.add_argument("--proposals", default=None, metavar="CSV",
                   help="instances.csv of `cytofuse seg predict` on the training images: also train on the segmenter's "
                        "proposals, labelled by IoP match (or IoU: proposals.match) with merged, fragment and "
                        "unmatched ones as negatives")
    t.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="training time budget (overrides train.time_budget_minutes; more time, more epochs)")
    t.add_argument("--init-checkpoint", default=None, metavar="PATH",
                   help="start from these weights (e.g. mindcv ImageNet weights); tensors of another shape are skipped")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (train.progress: false)")
    t.add_argument("--workers", type=int, default=1, metavar="N",
                   help="data-parallel workers on this machine, started with msrun (default 1: one process; "
                        "sampling.batch_size stays the global batch)")
    t.set_defaults(handler=_train)

    p = cls_sub.add_parser("predict", help="classify crops, or boxes of images, with a trained classifier")
    p.add_argument("--checkpoint", required=True, help="best.ckpt of a `cytofuse cls train` run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--crops", default=None, help="folder of crop images (each file is one crop)")
    src.add_argument("--images", default=None, help="folder of images; use with --boxes")
    p.add_argument("--boxes", default=None, help="CSV image_id,x0,y0,x1,y1 (pixels) of the boxes to classify")
    p.add_argument("--out", required=True, help="CSV to write (inputs plus p_<class> columns)")
    p.add_argument("--attribution", default=None, metavar="DIR", help="also write a Grad-CAM heat map PNG per crop here")
    p.add_argument("--cam-stride", type=int, choices=[8, 16, 32], default=None,
                   help="feature map for the heat maps: 32 (default, the last: most class-specific) or 16/8 (finer)")
    p.add_argument("--batch-size", type=int, default=32)
    add_backend_argument(p)
    p.set_defaults(handler=_predict, parser=p)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cytocore import distributed

    from .train import load_cls_config, train_classifier

    cfg = load_cls_config(args.config, args.overrides)
    if args.workers > 1:
        return distributed.relaunch(args.workers, Path(args.out) / "msrun_logs", args.argv)
    if args.data is not None:
        cfg["data"]["path"] = args.data
    if args.format is not None:
        cfg["data"]["format"] = args.format
    if args.proposals is not None:
        cfg["proposals"]["csv"] = args.proposals
    if args.no_progress:
        cfg["train"]["progress"] = False
    if args.budget_minutes is not None:
        cfg["train"]["time_budget_minutes"] = float(args.budget_minutes)
        cfg["train"]["epochs"] = max(int(cfg["train"]["epochs"]), 1000)  # the budget, not the epoch count, ends the run
    result = train_classifier(cfg, args.out, resume=args.resume, init_checkpoint=args.init_checkpoint)
    if not distributed.is_main():
        return 0
    best = f"{result.best_value:.4f}" if result.best_value is not None else "n/a"
    print(f"best {cfg['train']['monitor']} = {best}; checkpoints in {args.out} ({result.minutes:.1f} min)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.images is not None and args.boxes is None:
        args.parser.error("--images needs --boxes CSV")
    if args.crops is not None and args.boxes is not None:
        args.parser.error("--boxes goes with --images, not --crops")
    from .model_io import load_classifier
    from .predict import predict_crop_folder, predict_image_boxes

    backend = args.backend
    if args.attribution and backend != "mindspore":
        log.info("Grad-CAM (--attribution) needs the MindSpore network: classifying with --backend mindspore")
        backend = "mindspore"
    classifier = load_classifier(args.checkpoint, backend=backend)
    if args.crops is not None:
        frame = predict_crop_folder(args.crops, classifier, args.out, args.attribution, args.batch_size,
                                    cam_stride=args.cam_stride)
    else:
        frame = predict_image_boxes(args.images, args.boxes, classifier, args.out, args.attribution, args.batch_size,
                                    cam_stride=args.cam_stride)
    extra = f", heat maps in {args.attribution}" if args.attribution else ""
    print(f"classified {len(frame)} crops into {args.out}{extra}")
    return 0
