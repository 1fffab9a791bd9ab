"""``cytofuse sweep``: values, run folders, the table and plot, resume, and errors before any training."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from cytocore.errors import CytoFuseError
from experiments.sweep import COLUMNS, SweepValue, markdown_table, numeric_axis, parse_values, run_name, summarise_run

TINY = [
    "model.name=unet_tiny", "model.base_width=4", "model.depth=2", "patches.size=32", "patches.batch_size=2",
    "validation.tile=64", "validation.batch_size=2", "validation.max_images=2", "train.epochs=2",
    "train.steps_per_epoch=2", "train.time_budget_minutes=null", "data.scale=0.5", "optimizer.warmup_epochs=0",
]


def test_values_are_parsed_like_set_overrides():
    values = parse_values("1e-2, 1e-3,3")
    assert [v.text for v in values] == ["1e-2", "1e-3", "3"]
    assert values[0].value == pytest.approx(0.01) and isinstance(values[0].value, float)
    assert values[2].value == 3
    assert parse_values("unet_tiny,unet_small")[1].value == "unet_small"
    for bad in ("1e-2,,1e-3", "", "1,1"):
        with pytest.raises(CytoFuseError):
            parse_values(bad)
    assert run_name("optimizer.lr", SweepValue("1e-3", 1e-3)) == "optimizer.lr=1e-3"
    assert run_name("x", SweepValue("a/b c", "a/b c")) == "x=a_b_c"


def test_axis_is_logarithmic_for_learning_rates_and_wide_ranges():
    assert numeric_axis([1e-2, 1e-3], "optimizer.lr")[1]
    assert numeric_axis([2e-3, 3e-3], "optimizer.lr")[1]  # by name
    assert not numeric_axis([8, 16], "model.base_width")[1]
    assert numeric_axis([1, 100], "model.base_width")[1]
    assert numeric_axis(["unet_tiny", "unet_small"], "model.name") == (None, False)
    assert numeric_axis([True, False], "augment.enabled") == (None, False)


def test_row_takes_iou_and_rand_error_at_the_best_dice_epoch(tmp_path):
    import json

    history = [
        {"epoch": 1, "train_loss": 0.9, "val_dice": 0.5, "val_iou": 0.33, "val_rand_error": 0.6},
        {"epoch": 2, "train_loss": 0.7, "val_dice": 0.7, "val_iou": 0.54, "val_rand_error": 0.4},
        {"epoch": 3, "train_loss": 0.6, "val_dice": 0.6, "val_iou": 0.43, "val_rand_error": 0.5},
    ]
    (tmp_path / "state.json").write_text(json.dumps({"history": history}))
    row = summarise_run("optimizer.lr", SweepValue("1e-3", 1e-3), tmp_path, {"minutes": 1.25})
    assert row["best_val_dice"] == 0.7 and row["best_epoch"] == 2 and row["val_iou"] == 0.54
    assert row["val_rand_error"] == 0.4 and row["final_train_loss"] == 0.6 and math.isnan(row["final_val_loss"])
    assert row["epochs"] == 3 and row["minutes"] == 1.25
    table = pd.DataFrame([row, {**row, "value": "1e-2", "best_val_dice": 0.2}], columns=COLUMNS)
    md = markdown_table(table, "optimizer.lr")
    assert "| 1e-3 | **0.7000** | 0.5400 | 0.4000 | – |" in md and "| 1e-2 | 0.2000 |" in md


def test_bad_param_or_missing_data_fails_before_training(tmp_path):
    from segmentation.train import load_seg_config
    from experiments.sweep import run_sweep

    cfg = load_seg_config(None, TINY)
    with pytest.raises(CytoFuseError, match="unknown option 'optimizer.lrr'"):
        run_sweep(cfg, "optimizer.lrr", parse_values("1e-3"), tmp_path / "s", data=tmp_path)
    with pytest.raises(CytoFuseError, match="no data set"):
        run_sweep(cfg, "optimizer.lr", parse_values("1e-3"), tmp_path / "s")
    with pytest.raises(CytoFuseError, match="patches.size=33 must be a multiple"):  # checked for every value first
        run_sweep(cfg, "patches.size", parse_values("32,33"), tmp_path / "s", data=tmp_path)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_writes_one_row_per_value_and_reuses_finished_runs(tmp_path, capsys):
    from cytosynth.scene import generate
    from experiments.cli import run

    data = generate(tmp_path / "data", n_images=8, seed=0, size=96)
    out = tmp_path / "sweep"
    args = ["sweep", "--param", "optimizer.lr", "--values", "1e-2,1e-4", "--out", str(out), "--data", str(data),
            "--no-progress"] + [a for kv in TINY for a in ("--set", kv)]
    assert run(args) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "sweep.csv", dtype={"value": str})
    assert list(table["value"]) == ["1e-2", "1e-4"] and list(table["param"]) == ["optimizer.lr"] * 2
    assert table["best_val_dice"].between(0, 1).all() and table["val_rand_error"].notna().all()
    assert (table["epochs"] == 2).all()
    md = (out / "sweep.md").read_text()
    assert md.count("\n| 1e-") == 2 and "| 1e-2 |" in printed
    assert (out / "sweep.png").stat().st_size > 1000
    for name in ("optimizer.lr=1e-2", "optimizer.lr=1e-4"):
        assert (out / name / "best.ckpt").is_file() and (out / name / "done.json").is_file()
    # the two runs really used their own learning rate
    import yaml

    lrs = [yaml.safe_load((out / n / "config.yaml").read_text())["optimizer"]["lr"] for n in ("optimizer.lr=1e-2", "optimizer.lr=1e-4")]
    assert lrs == [0.01, 0.0001]
    # rerun with one more value: the two finished runs are reused, only the new one trains
    stamps = {n: (out / n / "last.ckpt").stat().st_mtime_ns for n in ("optimizer.lr=1e-2", "optimizer.lr=1e-4")}
    args[args.index("1e-2,1e-4")] = "1e-2,1e-4,1e-3"
    assert run(args) == 0
    assert {n: (out / n / "last.ckpt").stat().st_mtime_ns for n in stamps} == stamps
    table2 = pd.read_csv(out / "sweep.csv", dtype={"value": str})
    assert list(table2["value"]) == ["1e-2", "1e-4", "1e-3"]
    assert table2["best_val_dice"].iloc[:2].tolist() == pytest.approx(table["best_val_dice"].tolist())
