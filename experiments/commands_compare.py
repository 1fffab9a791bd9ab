"""Subcommands ``cytofuse compare`` and ``cytofuse demo`` (experiments stage).

Heavy modules (MindSpore, the stages) are imported inside the handlers so ``cytofuse --help`` stays fast.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare",
        help="train the two-stage system and the single-stage baseline, test both, write report.md",
        description=(
            "Train (or reuse, when OUT already holds finished runs) the segmentation U-Net, the classifier and "
            "the single-stage baseline on one split, run both systems on the test split, score them with the "
            "challenge's metric and write OUT/report.md and OUT/results.json. Run it again to resume."
        ),
    )
    c.add_argument("--config", required=True, metavar="YAML",
                   help="comparison config, e.g. experiments/configs/monusac.yaml (schema: experiments/configs/compare_defaults.yaml)")
    c.add_argument("--out", required=True, metavar="DIR", help="run folder (reused on a second run)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set budget.seg_minutes=4 (repeatable)")
    c.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                   help="total training minutes of the two-stage system, shared between its stages as the config's "
                        "budget does (the baseline gets the same by default): more time, more accuracy")
    c.add_argument("--no-progress", action="store_true", help="no tqdm bars (phase log lines stay)")
    c.set_defaults(handler=_compare)

    e = sub.add_parser(
        "ensemble",
        help="per-class ensemble of a compare run's two systems, chosen on its validation split",
        description=(
            "In a `cytofuse compare` run folder that holds both systems: run both on the validation split, keep "
            "for each class the detections of the system with the higher validation figure (the run's fusion_metric: "
            "FROC or AP50) and the explanation map (either system's or their mean) with the higher validation AUC, "
            "write RUN/ensemble.json and RUN/ensemble/ (predictions.csv, saliency/, metrics.json on the test split) "
            "and print the three systems' test figures. Nothing of the test split enters the choice."
        ),
    )
    e.add_argument("--run", required=True, metavar="DIR", help="the compare run folder (its compare_config.yaml and checkpoints)")
    e.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    e.set_defaults(handler=_ensemble)

    d = sub.add_parser(
        "demo",
        help="everything on synthetic data in one folder: train, compare, report (about 18-19 min on 2 CPU cores)",
        description=(
            "Generate the synthetic lung-cytology set, train the two-stage system and the single-stage baseline, "
            "run and score both on the test split, print the table and write OUT/README.md saying what to open."
        ),
    )
    d.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default demo_out; reused on a second run)")
    d.add_argument("--quick", action="store_true", help="a one-minute wiring check on tiny images (numbers meaningless)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of experiments/configs/demo.yaml (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no tqdm bars (phase log lines stay)")
    d.set_defaults(handler=_demo)


def _no_progress(args: argparse.Namespace) -> list[str]:
    return list(args.overrides) + (["progress=false"] if args.no_progress else [])


def _compare(args: argparse.Namespace) -> int:
    from .compare import load_compare_config, run_compare
    from .demo import summary_text

    extra = [f"budget.total_minutes={args.budget_minutes}"] if args.budget_minutes is not None else []
    cfg = load_compare_config(args.config, _no_progress(args) + extra)
    results = run_compare(cfg, args.out)
    if "systems" in results and isinstance(results["systems"], dict):
        print(summary_text(results))
    else:
        print(open(results["report"], encoding="utf-8").read())
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cytocore.config import read_yaml
    from cytocore.errors import CytoFuseError

    from .ensemble import SYSTEM, run_ensemble, score_table
    from .runkit import prepare_data, score_system

    run = Path(args.run)
    if not (run / "compare_config.yaml").is_file():
        raise CytoFuseError(f"{run}: not a compare run folder (no compare_config.yaml)")
    cfg = read_yaml(run / "compare_config.yaml")
    ds, _ = prepare_data(cfg, run)
    folder = run_ensemble(cfg, ds, run, progress=not args.no_progress)
    score_system(ds, cfg["data"]["test_split"], folder, float(cfg["report"]["mask_threshold"]), [])
    print(score_table(run))
    print(f"wrote {folder} and {run / 'ensemble.json'} ({SYSTEM} chosen on split {cfg['data']['val_split']})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, summary_text

    results = run_demo(args.out, quick=args.quick, overrides=_no_progress(args))
    print(summary_text(results))
    print(f"Start with {args.out}/README.md")
    return 0
