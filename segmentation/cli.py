"""Subcommands of the segmentation stage: ``cytofuse seg train``, ``seg predict`` and ``seg ceiling``.

MindSpore and the stage's modules are imported inside the handlers, so ``cytofuse --help`` stays fast.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from cytocore.onnx_backend import add_backend_argument


def register(sub: argparse._SubParsersAction) -> None:
    seg = sub.add_parser("seg", help="segmentation stage: train the U-Net, predict probability maps and cells")
    seg_sub = seg.add_subparsers(dest="seg_command", metavar="ACTION", required=True)
    add_actions(seg_sub)


def add_actions(seg_sub: argparse._SubParsersAction) -> None:
    t = seg_sub.add_parser("train", help="train the U-Net on a data set (best.ckpt, last.ckpt, log.csv in --out)")
    t.add_argument("--config", default=None, help="YAML overriding segmentation/configs/default.yaml")
    t.add_argument("--data", default=None, help="data set folder (else data.path of the config)")
    t.add_argument("--format", choices=["auto", "challenge", "voc", "coco"], default=None, help="data set layout (default: the config's, auto)")
    t.add_argument("--out", default=None, help="run folder (else `out` of the config, runs/seg)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 --set data.scale=1 (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    t.add_argument("--workers", type=int, default=1, metavar="N",
                   help="data-parallel workers on this machine, started with msrun (default 1: one process; "
                        "patches.batch_size stays the global batch)")
    t.set_defaults(handler=_train)

    p = seg_sub.add_parser("predict", help="probability maps (saliency/<id>.png) and cell boxes (instances.csv) for a folder")
    p.add_argument("--checkpoint", required=True, help="segmentation checkpoint (best.ckpt of a seg train run)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None, help="YAML with optional `predict:` and `postprocess:` sections")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set predict.tta=flip --set postprocess.threshold=0.4 (repeatable)")
    add_backend_argument(p)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="only share I (0..N-1) of N of the images, into the same --out; the last share to finish "
                        "writes instances.csv (under msrun: rank/size, without this flag)")
    p.set_defaults(handler=_predict)

    c = seg_sub.add_parser("ceiling", help="metric ceiling: perfect network outputs from the annotations through the "
                                           "configured scale and post-processing")
    c.add_argument("--data", default=None, help="data set folder (else data.path of the config)")
    c.add_argument("--split", default=None, help="only this split (default: all images)")
    c.add_argument("--config", default=None, help="YAML overriding segmentation/configs/default.yaml (scale, targets, postprocess)")
    c.add_argument("--format", choices=["auto", "challenge", "voc", "coco"], default=None, help="data set layout")
    c.add_argument("--out", default=None, help="write the result as JSON here (e.g. ceiling.json)")
    c.add_argument("--blur", type=float, default=0.0,
                   help="Gaussian blur (px at network scale) of the perfect maps, to mimic a trained network (default 0)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.scale=0.75 --set postprocess.marker_threshold=0.4")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(handler=_ceiling)


def _train(args: argparse.Namespace) -> int:
    from .train import load_seg_config, train_segmentation

    from pathlib import Path

    from cytocore import distributed

    cfg = load_seg_config(args.config, args.overrides)
    if args.workers > 1:
        return distributed.relaunch(args.workers, Path(args.out or cfg["out"]) / "msrun_logs", args.argv)
    result = train_segmentation(cfg, data=args.data, out=args.out, resume=args.resume, fmt=args.format,
                                progress=False if args.no_progress else None)
    if not distributed.is_main():
        return 0
    last = result.history[-1] if result.history else {}
    shown = ", ".join(f"{k}={last[k]:.4f}" for k in ("val_dice", "val_iou", "val_rand_error") if k in last)
    best = f"{result.best_value:.4f}" if result.best_value is not None else "n/a"
    print(f"trained {len(result.history)} epoch(s) in {result.minutes:.1f} min; last: {shown or 'no epoch run'}; "
          f"best {cfg['train']['monitor']} {best}")
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


def predict_settings(config: Optional[str], overrides: Sequence[str]) -> tuple[dict, dict]:
    """The ``predict:`` and ``postprocess:`` sections of ``--config`` and ``--set`` (other sections of
    the file, e.g. a training config's, are ignored; other ``--set`` keys are an error)."""
    from cytocore.config import parse_overrides, read_yaml
    from cytocore.errors import CytoFuseError

    file_cfg = read_yaml(config) if config else {}
    sections = {name: dict(file_cfg.get(name) or {}) for name in ("predict", "postprocess")}
    for key, value in parse_overrides(overrides).items():
        if key not in sections or not isinstance(value, dict):
            raise CytoFuseError(f"--set {key}: only predict.* and postprocess.* options apply to seg predict")
        sections[key].update(value)
    return sections["predict"], sections["postprocess"]


def _predict(args: argparse.Namespace) -> int:
    from cytocore.shards import Shard, shard_from_env

    from .model_io import load_segmenter
    from .predict import segment_folder

    predict_cfg, post_cfg = predict_settings(args.config, args.overrides)
    shard = Shard.parse(args.shard) if args.shard else None
    segmenter = load_segmenter(args.checkpoint, backend=getattr(args, "backend", "mindspore"))
    shard = shard or shard_from_env()  # after loading: an msrun worker has joined its job by then
    run = segment_folder(segmenter, args.images, args.out, predict_cfg=predict_cfg or None,
                         post_cfg=post_cfg or None, progress=True, shard=shard)
    table = run.combined
    if table is None:
        print(f"shard {shard}: {run.n_done} of {run.n_images} images done, {len(run.failed)} failed; the last shard "
              f"to finish writes {args.out}/instances.csv (still running: {', '.join(run.extra['waiting_for'])})")
        return run.exit_code
    print(f"{run.n_done} of {run.n_images} images done ({run.n_processed_now} now, {run.n_skipped} already done), "
          f"{len(run.failed)} failed; wrote {args.out}/saliency/ and {args.out}/instances.csv ({len(table)} cells)")
    for item in run.failed:
        print(f"  failed: {item['image']}: {item['error']}")
    return run.exit_code


def _ceiling(args: argparse.Namespace) -> int:
    from cytocore.atomic import write_json

    from .ceiling import format_ceiling, run_ceiling
    from .train import load_seg_config

    cfg = load_seg_config(args.config, args.overrides)
    result = run_ceiling(cfg, data=args.data, split=args.split, fmt=args.format, blur=args.blur,
                         progress=not args.no_progress)
    print(format_ceiling(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def run_standalone(argv: Sequence[str]) -> int:
    """``python -m segmentation``: the ``seg`` actions without the full ``cytofuse`` CLI."""
    import logging
    import sys

    from cytocore.errors import CytoFuseError

    parser = argparse.ArgumentParser(prog="python -m segmentation")
    add_actions(parser.add_subparsers(dest="seg_command", required=True))
    args = parser.parse_args(list(argv))
    args.argv = ["seg", *argv]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except CytoFuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
