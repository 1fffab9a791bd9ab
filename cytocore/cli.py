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


def _summary(args: argparse.Namespace) -> int:
    import json

    from .readers import load_dataset
    from .summary import format_summary, summarise

    ds = load_dataset(args.path, format=args.format, decode=not args.quick, check_masks=not args.quick)
    info = summarise(ds)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0
