"""``--budget-minutes``: a total shared between the stages in the config's ratio."""
from __future__ import annotations

import pytest

from cytocore.errors import CytoFuseError
from experiments.compare import load_compare_config


def test_total_budget_is_shared_in_the_configured_ratio():
    cfg = load_compare_config(None, ["budget.seg_minutes=8", "budget.cls_minutes=4", "budget.total_minutes=30"])
    assert (cfg["budget"]["seg_minutes"], cfg["budget"]["cls_minutes"]) == (20.0, 10.0)
    assert cfg["budget"]["baseline_minutes"] == "auto"  # follows the two stages' minutes actually used
    cls_only = load_compare_config(None, ["systems=[classifier]", "budget.total_minutes=12"])
    assert cls_only["budget"]["cls_minutes"] == 12.0
    step_limited = load_compare_config(None, ["systems=[classifier]", "budget.cls_minutes=null", "budget.total_minutes=9"])
    assert step_limited["budget"]["cls_minutes"] == 9.0
    untouched = load_compare_config(None, ["budget.seg_minutes=8"])
    assert untouched["budget"]["seg_minutes"] == 8
    with pytest.raises(CytoFuseError, match="total_minutes"):
        load_compare_config(None, ["budget.total_minutes=0"])


def test_compare_and_cls_train_accept_budget_minutes():
    from experiments.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["compare", "--config", "x.yaml", "--out", "o", "--budget-minutes", "45"])
    assert args.budget_minutes == 45.0
    args = parser.parse_args(["cls", "train", "--budget-minutes", "20", "--proposals", "instances.csv"])
    assert (args.budget_minutes, args.proposals) == (20.0, "instances.csv")
