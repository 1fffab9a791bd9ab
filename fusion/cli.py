"""Subcommand of the fusion stage: ``cytofuse infer`` (fused inference over a folder of images)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cytocore.errors import CytoFuseError
from cytocore.onnx_backend import add_backend_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="find and classify cells in a folder of images with a segmentation and a classifier checkpoint",
        description=(
            "Segment, classify and fuse: writes predictions.csv (challenge rows), detections.csv, saliency/, "
            "overlays/, detections.geojson + geojson/ (QuPath), detections.coco.json, images.csv and run.json "
            "to OUT. Re-running the same command skips images already done with the same checkpoints and config; "
            "exit status 3 when some images failed (the others are finished)."
        ),
    )
    p.add_argument("--seg", required=True, metavar="CKPT", help="segmentation checkpoint (best.ckpt of `cytofuse seg train`)")
    p.add_argument("--cls", required=True, metavar="CKPT", help="classifier checkpoint (best.ckpt of `cytofuse cls train`)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (.bmp, .png, .jpg, .tif) and/or whole slides (.svs, .ndpi, .scn, .bif, "
                        "pyramidal .tif; .mrxs with the [openslide] extra)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--config", default=None, metavar="YAML", help="fusion config overriding fusion/configs/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config value, e.g. --set box_shrink=0.9 (repeatable)")
    p.add_argument("--fusion", default=None, metavar="JSON", help="fusion.json from `cytofuse fuse fit` (rule and box shrink)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class names you expect (comma-separated); a classifier trained on others is refused")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the networks (default: all available cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only share I (0..N-1) of N of the images into the same --out; the last share to finish "
                        "writes the combined outputs (under msrun: rank/size, without this flag)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N shards as parallel processes on this machine (default 1)")
    add_backend_argument(p)
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="µm per pixel of the inputs (overrides a slide's own); with the checkpoint's training µm/px "
                        "it sets the U-Net's scale")
    p.add_argument("--scale", type=float, default=None, metavar="S",
                   help="resize factor before the U-Net, chosen yourself (instead of the µm/px rule)")
    p.add_argument("--coco-gt", default=None, metavar="JSON",
                   help="COCO ground truth whose image and category ids coco_results.json uses (matched by file "
                        "name and category name)")
    p.add_argument("--anonymise", action="store_true",
                   help="name every output by a salted hash of the image id; the key goes to --anonymise-key")
    p.add_argument("--anonymise-key", default=None, metavar="CSV",
                   help="key file of --anonymise (default: OUT.anonymise-key.csv beside the output folder)")
    p.set_defaults(handler=_infer)


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    return names or None


def _print_merged(out: Path, workers: int) -> None:
    """After ``--workers N``: the whole run's counts, from the ``run.json`` the last shard wrote."""
    import json

    summary = json.loads((out / "run.json").read_text(encoding="utf-8"))
    print(f"{workers} workers: {summary['n_done']} of {summary['n_images']} images done, {summary['n_failed']} failed, "
          f"{summary['n_detections']} detections; wrote {out}")


def _infer(args: argparse.Namespace) -> int:
    from cytocore import distributed
    from cytocore.runfolder import EXIT_SOME_FAILED
    from cytocore.shards import Shard, shard_from_env

    from .pipeline import Pipeline

    if args.workers > 1:
        if args.shard:
            raise CytoFuseError("--workers N runs the shards itself; leave out --shard")
        if args.anonymise or args.anonymise_key:  # one salt for all workers, made before they start
            from cytocore.anonymise import Anonymiser, default_key_path

            Anonymiser(args.anonymise_key or default_key_path(args.out)).save()
        code = distributed.run_local_shards(args.workers, Path(args.out) / "shard_logs", args.argv)
        if code in (0, EXIT_SOME_FAILED):
            _print_merged(Path(args.out), args.workers)
        return code
    shard = Shard.parse(args.shard) if args.shard else None
    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"runtime.threads={int(args.threads)}")
    overrides.append(f"runtime.backend={args.backend}")
    if args.mpp is not None:
        overrides.append(f"mpp={float(args.mpp)}")
    if args.scale is not None:
        overrides.append(f"scale={float(args.scale)}")
    pipeline = Pipeline(args.seg, args.cls, args.config, classes=parse_classes(args.classes),
                        fusion_file=args.fusion, overrides=overrides)
    if args.coco_gt is not None:
        from cytocore.readers.coco import load_coco_json

        load_coco_json(args.coco_gt)  # a wrong file is a usage error before any image is processed
        pipeline.coco_gt = Path(args.coco_gt)
    if args.anonymise or args.anonymise_key:
        from cytocore.anonymise import default_key_path

        pipeline.anonymise_key = args.anonymise_key or default_key_path(args.out)
    shard = shard or shard_from_env()  # after the models load: an msrun worker has joined its job by then
    summary = pipeline.run_folder(args.images, args.out, progress=not args.no_progress, shard=shard)
    done, failed = summary["n_done"], summary["n_failed"]
    if "waiting_for" in summary:
        print(f"shard {shard}: {done} of {summary['n_images']} images done ({summary['n_processed_now']} now), "
              f"{failed} failed, {summary['n_detections']} detections; the last shard to finish writes the "
              f"combined outputs to {args.out} (still running: {', '.join(summary['waiting_for'])})")
        return EXIT_SOME_FAILED if failed else 0
    print(
        f"{done} of {summary['n_images']} images done ({summary['n_processed_now']} now, "
        f"{summary['n_skipped_already_done']} already done), {failed} failed, {summary['n_detections']} detections; "
        f"fusion {summary['fusion']['description']}; wrote {args.out}"
    )
    for item in summary["failed"]:
        print(f"  failed: {item['image']}: {item['error']}")
    return EXIT_SOME_FAILED if failed else 0
