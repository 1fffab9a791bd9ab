"""Subcommands of the experiments stage: ``cytofuse evaluate``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions with the challenge metric (FROC per class, accuracy, explainability AUC, AP50)",
    )
    p.add_argument("--data", required=True, help="data set folder with the ground truth")
    p.add_argument("--predictions", required=True, help="predictions.csv (image_id,xmin,ymin,xmax,ymax,p_<class>..., in [0,1])")
    p.add_argument("--saliency", default=None, help="folder of saliency/<image_id>.png for the explainability AUC")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--format", choices=["auto", "challenge", "voc", "coco"], default="auto", help="data set layout")
    p.add_argument("--split", default=None, help="evaluate only this split (e.g. test); N = its images")
    p.add_argument(
        "--thresholds", type=_thresholds, default="distinct",
        help="'distinct' (every distinct score, official) or a comma list such as 0.9,0.7,0.5",
    )
    p.add_argument("--pooled-auc", action="store_true", help="explainability AUC over all pixels instead of per image")
    p.set_defaults(handler=_evaluate)


def _thresholds(text: str):
    if text.strip().lower() == "distinct":
        return "distinct"
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'distinct' or numbers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("no threshold given")
    return values


def _evaluate(args: argparse.Namespace) -> int:
    from cytocore.atomic import write_json
    from cytocore.readers import load_dataset
    from cytocore.writers import read_predictions_csv

    from .evaluate import evaluate, format_table

    dataset = load_dataset(args.data, format=args.format)
    predictions = read_predictions_csv(args.predictions, dataset.class_names)
    metrics = evaluate(
        dataset, predictions, saliency_dir=args.saliency, thresholds=args.thresholds,
        pooled=args.pooled_auc, split=args.split, predictions_path=args.predictions, ceiling=True,
    )
    write_json(args.out, metrics)
    print(format_table(metrics))
    print(f"wrote {args.out}")
    return 0
