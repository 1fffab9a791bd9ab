"""Subcommand ``cytofuse synth``: write the synthetic data set (generation is imported in the handler)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate the synthetic lung-cytology data set (challenge layout, with masks)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="typical image side in pixels (sizes vary around it)")
    p.set_defaults(handler=_synth)


def _synth(args: argparse.Namespace) -> int:
    from .scene import generate

    generate(args.out, n_images=args.images, seed=args.seed, size=args.size, progress=True)
    print(f"wrote {args.images} images to {args.out}")
    return 0
