"""The demo: every shipped comparison config is valid, and the whole pipeline runs end to end on the
tiny config (tiny models really trained, both systems run, evaluated and reported), then resumes."""
from __future__ import annotations

import json
import logging
import os

import pytest

from experiments import compare as cmp
from experiments.demo import QUICK_CONFIG, demo_config, summary_text, terminal_table
from experiments.stages import CONFIG_DIR
from segmentation.train import check_config

#: Stage and target-comparison configs live in experiments/configs too; they are not comparison configs.
STAGE_CONFIGS = ("seg_", "cls_", "targets_")


def _comparison_configs():
    return sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith(STAGE_CONFIGS))


@pytest.mark.parametrize("path", _comparison_configs(), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, tmp_path):
    """Every key of every config is known to compare and to the stage it overrides (typos fail here)."""
    cfg = cmp.load_compare_config(path)
    assert cfg["data"]["path"] or cfg["data"]["synth"] or path.name == "compare_defaults.yaml"
    if cfg["data"]["path"]:
        assert cfg["data"]["path"].startswith("../shared/datasets/"), "real data is read from ../shared/datasets"
    cls = cmp.cls_stage_config(cfg, tmp_path, 1.0)
    assert cls["train"]["seed"] == cfg["seed"]
    if cfg["systems"] != ["classifier"]:
        seg = cmp.seg_stage_config(cfg, tmp_path, 1.0)
        base = cmp.baseline_stage_config(cfg, tmp_path, 2.0, epochs=3)
        # the two-stage U-Net may have K+1 class maps too (bccd.yaml); the baseline must have them
        assert seg["targets"]["mode"] in ("binary", "classes") and base["targets"]["mode"] == "classes"
        assert base["model"] == seg["model"], "the baseline must be the segmentation stage's U-Net"
        for stage in (seg, base):  # monitor, box metric, sizes: what seg train would refuse after minutes of setup
            check_config(stage)
        cmp.infer_config(cfg)


def test_demo_is_compare_on_the_demo_config():
    full, quick = demo_config(), demo_config(quick=True)
    assert full["data"]["synth"] and quick["data"]["synth"]
    assert full["systems"] == quick["systems"] == ["two-stage", "single-stage"]
    assert quick["data"]["synth"]["images"] < full["data"]["synth"]["images"]
    assert demo_config(overrides=["seed=5"])["seed"] == 5


def test_terminal_table_turns_rows_into_columns():
    results = {"systems": {
        "two-stage": {"metrics": {"froc": {"A": 0.5}, "accuracy": 0.5, "n_images": 2}, "train_minutes": 3.0},
        "single-stage": {"metrics": {"froc": {"A": 0.25}, "accuracy": 0.25, "n_images": 2}, "train_minutes": 2.5},
    }}
    lines = terminal_table(results).splitlines()
    assert lines[0].split() == ["two-stage", "single-stage"]
    assert lines[1].split() == ["FROC", "A", "0.500", "0.250"]
    assert any(line.split() == ["train", "min", "3.000", "2.500"] for line in lines)


@pytest.mark.slow
def test_quick_demo_trains_runs_evaluates_reports_and_resumes(tmp_path, caplog):
    from experiments.demo import run_demo

    out = tmp_path / "demo"
    caplog.set_level(logging.INFO, logger="cytofuse")
    results = run_demo(out, quick=True)

    for stage in ("seg", "cls", "baseline"):
        done = json.loads((out / stage / "done.json").read_text())
        assert (out / stage / "best.ckpt").is_file() and done["epochs"] >= 1 and done["samples"] > 0
    # Side by side (2 cores, as in CI): each system in its own process with one thread, the baseline with
    # the two stages' budgets in full; both workers' logs are kept and echoed with their names.
    assert len(os.sched_getaffinity(0)) >= 2, "this test expects at least 2 cores, as the README's machine has"
    budget = results["config"]["budget"]
    baseline = json.loads((out / "baseline" / "done.json").read_text())
    assert baseline["budget_minutes"] == pytest.approx(budget["seg_minutes"] + budget["cls_minutes"])
    assert "[two-stage] [1/3 train segmentation]" in caplog.text and "[single-stage] [1/2 train single-stage]" in caplog.text
    assert "side by side, each in its own process with 1 CPU thread" in results["budget"]
    assert {p.name for p in (out / "logs").iterdir()} >= {"two-stage.log", "single-stage.log"}

    n_test = results["dataset"]["n_images"]
    assert n_test == len(list((out / "test_images").iterdir())) > 0
    for system in ("two-stage", "single-stage"):
        folder = out / system
        for name in ("predictions.csv", "detections.csv", "images.csv", "metrics.json", "detections.geojson"):
            assert (folder / name).is_file(), f"{system}/{name}"
        assert len(list((folder / "saliency").glob("*.png"))) == n_test
        assert len(list((folder / "overlays").glob("*.png"))) == n_test
        sysres = results["systems"][system]
        assert sysres["metrics"]["n_images"] == n_test and sysres["metrics"]["accuracy"] is not None
        assert sysres["segmentation"]["dice"] is not None and sysres["train_minutes"] > 0

    report = (out / "report.md").read_text()
    assert "| two-stage |" in report and "| single-stage |" in report and "split **test**" in report
    assert list(out.glob("froc_*.png")) and list(out.glob("overlay_*.png"))
    assert "report.md" in (out / "README.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["systems"]) == {"two-stage", "single-stage"}
    assert "two-stage" in summary_text(results)

    # A second run reuses the data, the three trained stages and every prediction.
    caplog.clear()
    before = {s: (out / s / "best.ckpt").stat().st_mtime_ns for s in ("seg", "cls", "baseline")}
    again = run_demo(out, quick=True)
    text = caplog.text
    assert "reusing the synthetic data set" in text
    assert text.count("reusing the finished") == 3
    assert text.count("already done") == 2
    assert {s: (out / s / "best.ckpt").stat().st_mtime_ns for s in ("seg", "cls", "baseline")} == before
    assert again["systems"]["two-stage"]["metrics"]["froc"] == results["systems"]["two-stage"]["metrics"]["froc"]


@pytest.mark.slow
def test_without_parallel_the_baseline_trains_after_the_two_stages_on_their_measured_minutes(tmp_path, caplog):
    from experiments.demo import run_demo

    out = tmp_path / "demo"
    caplog.set_level(logging.INFO, logger="cytofuse")
    results = run_demo(out, quick=True, overrides=["parallel=false"])
    seg, cls, baseline = (json.loads((out / s / "done.json").read_text()) for s in ("seg", "cls", "baseline"))
    assert baseline["budget_minutes"] == pytest.approx(seg["minutes"] + cls["minutes"], abs=1e-3)
    assert "[5/8 train single-stage]" in caplog.text and "[two-stage]" not in caplog.text and not (out / "logs").exists()
    assert results["systems"]["single-stage"]["metrics"]["accuracy"] is not None


def test_quick_config_is_small():
    cfg = cmp.load_compare_config(QUICK_CONFIG)
    assert cfg["data"]["synth"]["images"] <= 16 and cfg["budget"]["seg_minutes"] <= 0.5
