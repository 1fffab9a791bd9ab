"""Subcommand of the shared core: ``cytofuse data summary``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect a data set")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = data_sub.add_parser("summary", help="images, boxes per class, healthy images and problems found")
    s.add_argument("path", help="data set folder (challenge layout, Pascal VOC, COCO JSON or folder per class)")
    s.add_argument("--format", choices=["auto", "challenge", "voc", "coco", "folders"], default="auto")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--quick", action="store_true",
                   help="read image headers only: faster, but truncated or corrupt image files go unnoticed")
    s.set_defaults(handler=_summary)
    c = data_sub.add_parser("coco", help="write the data set's boxes as a COCO ground-truth JSON (for COCOeval and --coco-gt)")
    c.add_argument("path", help="data set folder (challenge layout, Pascal VOC or COCO JSON)")
    c.add_argument("--out", required=True, help="COCO JSON file to write")
    c.add_argument("--format", choices=["auto", "challenge", "voc", "coco"], default="auto")
    c.add_argument("--split", default=None, help="only the images of this split (splits.csv / ImageSets)")
    c.set_defaults(handler=_coco)


def _summary(args: argparse.Namespace) -> int:
    import json

    from .readers import load_dataset
    from .summary import format_summary, summarise

    ds = load_dataset(args.path, format=args.format, decode=not args.quick, check_masks=not args.quick)
    info = summarise(ds)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _coco(args: argparse.Namespace) -> int:
    from .coco_export import write_dataset_coco
    from .errors import CytoFuseError
    from .readers import load_dataset

    ds = load_dataset(args.path, format=args.format)
    if args.split is not None:
        known = ds.splits()
        ds = ds.subset(args.split)
        if not len(ds):
            raise CytoFuseError(f"{args.path}: no images in split {args.split!r} (splits: {', '.join(known) or 'none'})")
    data = write_dataset_coco(ds, args.out)
    print(f"wrote {args.out}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
          f"{len(data['categories'])} categories")
    return 0
