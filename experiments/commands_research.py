"""Research subcommands: ``cytofuse sweep``, ``cytofuse weak-masks`` and ``cytofuse targets-compare``.

Heavy modules (MindSpore, the stages) are imported inside the handlers so ``cytofuse --help`` stays fast.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sweep",
        help="one short segmentation training per value of a config option; table and plot of Dice and Rand error",
        description=(
            "Train the segmentation U-Net once per value of PARAM (any dotted config option) into OUT/<param>=<value>/ "
            "and write OUT/sweep.csv, sweep.md and sweep.png (best val Dice, IoU, adapted Rand error, losses, minutes). "
            "Finished runs are reused and killed ones resumed: run the same command again to continue."
        ),
    )
    s.add_argument("--config", default=None, metavar="YAML", help="segmentation config (over segmentation/configs/default.yaml)")
    s.add_argument("--param", required=True, metavar="KEY", help="dotted option to sweep, e.g. optimizer.lr or model.base_width")
    s.add_argument("--values", required=True, metavar="V1,V2,...", help="comma-separated values, e.g. 1e-2,1e-3,1e-4,1e-5")
    s.add_argument("--out", required=True, metavar="DIR", help="sweep folder (one run folder per value inside)")
    s.add_argument("--data", default=None, metavar="DIR", help="data set folder (else data.path of the config)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run, e.g. --set train.epochs=6 (repeatable)")
    s.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="training minutes per run (train.time_budget_minutes; the cosine schedule follows it)")
    s.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    s.set_defaults(handler=_sweep)

    w = sub.add_parser(
        "weak-masks",
        help="CAM pseudo-masks from boxes alone: MASKDIR/<image_id>.png for training the U-Net without drawn masks",
        description=(
            "For every box of the data set, the classifier's Grad-CAM of the box's class, thresholded at a fraction of "
            "its maximum inside the box, largest component, clipped to the box; each image's boxes united into "
            "MASKDIR/<image_id>.png (0/255). Then train on them: cytofuse seg train --data DIR "
            "--set targets.kind=mask --set targets.mask_dir=MASKDIR"
        ),
    )
    w.add_argument("--cls", required=True, metavar="CKPT", help="classifier checkpoint (best.ckpt of `cytofuse cls train`)")
    w.add_argument("--data", required=True, metavar="DIR", help="data set with boxes")
    w.add_argument("--format", choices=["auto", "challenge", "voc", "coco"], default="auto", help="data set layout")
    w.add_argument("--out", required=True, metavar="MASKDIR", help="folder to write the pseudo-masks to")
    w.add_argument("--threshold", type=float, default=0.5, help="fraction of the box's strongest CAM value kept (default 0.5)")
    w.add_argument("--stride", type=int, choices=[8, 16, 32], default=None,
                   help="classifier feature map for the CAM (default: its last, coarsest; 16 or 8 are finer)")
    w.add_argument("--batch-size", type=int, default=32)
    w.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    w.set_defaults(handler=_weak_masks)

    t = sub.add_parser(
        "targets-compare",
        help="train the U-Net on real masks, box ellipses and CAM pseudo-masks with one budget; targets.md",
        description=(
            "Train the segmentation stage once per target kind (real masks, ellipses inscribed in the boxes, CAM "
            "pseudo-masks from a classifier), score each kind's targets and trained model against the real masks, "
            "and optionally the fused pipeline on the test split. Writes OUT/targets.md and OUT/targets.json; "
            "finished stages are reused on a rerun."
        ),
    )
    t.add_argument("--config", required=True, metavar="YAML",
                   help="e.g. experiments/configs/targets_monusac.yaml (schema: compare_defaults.yaml + targets_defaults.yaml)")
    t.add_argument("--out", required=True, metavar="DIR", help="run folder (reused on a second run)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set budget.seg_minutes=1 (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars (phase log lines stay)")
    t.set_defaults(handler=_targets_compare)


def _sweep(args: argparse.Namespace) -> int:
    from segmentation.train import load_seg_config

    from .sweep import markdown_table, parse_values, run_sweep

    cfg = load_seg_config(args.config, args.overrides)
    table = run_sweep(cfg, args.param, parse_values(args.values), args.out, data=args.data,
                      budget_minutes=args.budget_minutes, progress=not args.no_progress)
    print(markdown_table(table, args.param))
    print(f"wrote {args.out}/sweep.csv, sweep.md and sweep.png")
    return 0


def _weak_masks(args: argparse.Namespace) -> int:
    from cytocore.readers import load_dataset
    from segmentation.pseudo_masks import pseudo_mask_dice

    from .weak_supervision import CamMaskOptions, make_cam_masks

    options = CamMaskOptions(threshold=args.threshold, stride=args.stride, batch_size=args.batch_size)
    ds = load_dataset(args.data, format=args.format)
    manifest = make_cam_masks(args.cls, ds, args.out, options, progress=not args.no_progress)
    print(f"wrote {manifest['n_images']} pseudo-masks to {args.out} ({manifest['n_boxes']} boxes, "
          f"{manifest['n_empty_boxes']} without CAM evidence)")
    agreement = pseudo_mask_dice(ds, args.out)
    if agreement is not None:
        print(f"against the data set's own masks ({agreement['n_images']} images): Dice {agreement['dice']:.4f}, "
              f"IoU {agreement['iou']:.4f}, mean per-image Dice {agreement['dice_image']:.4f}")
    print(f"train on them: cytofuse seg train --data {args.data} --set targets.kind=mask --set targets.mask_dir={args.out}")
    return 0


def _targets_compare(args: argparse.Namespace) -> int:
    from .weak_supervision import load_targets_config, run_targets_compare

    overrides = list(args.overrides) + (["progress=false"] if args.no_progress else [])
    cfg = load_targets_config(args.config, overrides)
    results = run_targets_compare(cfg, args.out)
    print(open(f"{args.out}/targets.md", encoding="utf-8").read())
    print(f"wrote {args.out}/targets.md and targets.json ({results['wall_minutes']:.1f} min)")
    return 0
