"""``cytofuse compare`` without training: config checks, data and split handling, budgets, stage reuse,
and the scoring → report wiring on hand-made system outputs whose numbers are known."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytocore.errors import CytoFuseError, DataError
from cytocore.records import Dataset, ImageRecord
from experiments import compare as cmp
from experiments import report as rep
from experiments import runkit, stages

NAMES = ["A", "B"]


# --------------------------------------------------------------------------------------------- config


def _cfg(tmp_path=None, **data) -> dict:
    cfg = cmp.load_compare_config(None)
    cfg["data"].update(data)
    cfg["progress"] = False
    return cfg


def test_single_stage_infer_overlays_infer_for_the_baseline_only():
    cfg = cmp.load_compare_config(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "bccd.yaml")
    two = stages.infer_config(cfg)
    one = stages.infer_config(cfg, single_stage=True)
    assert two["segmentation"]["postprocess"]["hypotheses"] == [{"min_distance": 20}, {"min_distance": 80},
                                                               {"multiclass": "per_class"},
                                                               {"multiclass": "per_class", "min_distance": 14},
                                                               {"multiclass": "per_class", "box_shape": "disc"}]
    assert two["nms"]["containment"] is None
    assert one["segmentation"]["postprocess"]["hypotheses"] == [] and one["nms"]["containment"] == 0.8
    assert one["nms"]["iou"] == two["nms"]["iou"] and one["score_floor"] == two["score_floor"]
    plain = _cfg()
    assert stages.infer_config(plain, single_stage=True) == stages.infer_config(plain)


def test_proposals_infer_overlays_infer_for_the_classifiers_training_proposals_only():
    """The classifier may learn from proposals made without a hypothesis that inference still offers."""
    bccd = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "bccd.yaml"
    cfg = cmp.load_compare_config(bccd)  # bccd.yaml sets proposals_infer: the four readings without the discs
    made_with = stages.infer_config(cfg, proposals=True)
    assert {"multiclass": "per_class", "box_shape": "disc"} not in made_with["segmentation"]["postprocess"]["hypotheses"]
    assert len(made_with["segmentation"]["postprocess"]["hypotheses"]) == 4
    assert {"multiclass": "per_class", "box_shape": "disc"} in stages.infer_config(cfg)["segmentation"]["postprocess"]["hypotheses"]
    assert made_with["nms"] == stages.infer_config(cfg)["nms"]  # the rest of `infer` is kept
    plain = dict(cfg, proposals_infer={})
    assert stages.infer_config(plain, proposals=True) == stages.infer_config(plain)


def test_config_rejects_unknown_keys_and_systems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: {seg_minuts: 3}\n")
    with pytest.raises(CytoFuseError, match="seg_minuts"):
        cmp.load_compare_config(bad)
    bad.write_text("systems: [two-stage, yolo]\n")
    with pytest.raises(CytoFuseError, match="systems"):
        cmp.load_compare_config(bad)
    bad.write_text("systems: [classifier, single-stage]\n")
    with pytest.raises(CytoFuseError, match="classifier-only"):
        cmp.load_compare_config(bad)
    bad.write_text("fusion_metric: map\n")
    with pytest.raises(CytoFuseError, match="fusion_metric must be one of accuracy, ap50"):
        cmp.load_compare_config(bad)


@pytest.mark.parametrize("name, key", [("seg", "seg_minutes"), ("cls", "cls_minutes"), ("baseline", "baseline_minutes")])
def test_a_stage_budget_of_its_own_is_refused_not_overwritten(name, key):
    """compare sets every stage's minutes from ``budget:``; ``--set cls.train.time_budget_minutes=30``
    used to be overwritten silently, so the run trained for another time than the user asked."""
    with pytest.raises(CytoFuseError, match=f"{name}.train.time_budget_minutes .*budget.{key}"):
        cmp.load_compare_config(None, [f"{name}.train.time_budget_minutes=30"])
    assert cmp.load_compare_config(None, [f"{name}.train.seed=3"])[name]["train"]["seed"] == 3


def test_config_paths_are_relative_to_the_repo():
    assert stages.repo_path("../shared/datasets/x") == (stages.REPO_ROOT.parent / "shared" / "datasets" / "x").resolve()
    assert stages.repo_path("/abs/path") == Path("/abs/path")


def test_missing_data_set_is_one_clear_line(tmp_path):
    cfg = _cfg(path="../shared/datasets/no_such_set_here")
    with pytest.raises(DataError) as info:
        runkit.prepare_data(cfg, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and "no_such_set_here" in message and "not found" in message


def test_stage_configs_share_data_seed_budget_and_the_unet(tmp_path):
    cfg = _cfg()
    cfg["seed"] = 7
    cfg["seg"] = {"model": {"name": "unet_tiny"}, "train": {"steps_per_epoch": 5}}
    cfg["baseline"] = {"train": {"steps_per_epoch": 6}}
    seg = stages.seg_stage_config(cfg, tmp_path, 2.5)
    assert seg["train"]["seed"] == 7 and seg["train"]["time_budget_minutes"] == 2.5
    assert seg["targets"]["mode"] == "binary" and seg["data"]["path"] == str(tmp_path)
    base = stages.baseline_stage_config(cfg, tmp_path, 4.0, epochs=9)
    # Same U-Net as the segmentation stage, the single-stage targets, its own overrides and budget.
    assert base["model"]["name"] == "unet_tiny" and base["targets"]["mode"] == "classes"
    assert base["train"]["steps_per_epoch"] == 6 and base["train"]["epochs"] == 9
    assert base["train"]["time_budget_minutes"] == 4.0
    cls = stages.cls_stage_config(cfg, tmp_path, 1.0)
    assert cls["train"]["seed"] == 7 and cls["data"]["val_split"] == "val"
    cfg["seg"] = {"model": {"nmae": "x"}}
    with pytest.raises(CytoFuseError, match="nmae"):
        stages.seg_stage_config(cfg, tmp_path, 1.0)


def test_a_stage_seed_of_its_own_wins_over_the_experiment_seed(tmp_path):
    """``--set cls.train.seed=1`` retrains the classifier with another seed; the experiment's seed used
    to overwrite it silently. The other stages keep the experiment's seed, so their runs are reused."""
    cfg = _cfg()
    cfg["seed"] = 7
    cfg["cls"] = {"train": {"seed": 1}}
    cfg["baseline"] = {"train": {"seed": 3}}
    assert stages.cls_stage_config(cfg, tmp_path, 1.0)["train"]["seed"] == 1
    assert stages.seg_stage_config(cfg, tmp_path, 1.0)["train"]["seed"] == 7
    assert stages.baseline_stage_config(cfg, tmp_path, 1.0)["train"]["seed"] == 3


@pytest.mark.parametrize("name", ["demo.yaml", "demo_tiny.yaml", "bccd.yaml", "monusac.yaml", "lc25000.yaml"])
def test_shipped_compare_configs_resolve_every_stage(tmp_path, name):
    """A shipped config whose stage sections do not merge (an option its seg config does not know...)
    would fail only after minutes of work; every stage's config is built here instead."""
    cfg = cmp.load_compare_config(Path(__file__).resolve().parents[1] / "experiments" / "configs" / name)
    seg = stages.seg_stage_config(cfg, tmp_path, 1.0)
    assert stages.cls_stage_config(cfg, tmp_path, 1.0)["data"]["path"] == str(tmp_path)
    base = stages.baseline_stage_config(cfg, tmp_path, 1.0)
    assert base["targets"]["mode"] == "classes" and base["model"] == seg["model"]


def test_the_monusac_class_map_variant_resolves():
    """The README's MoNuSAC row with a K+1-class two-stage U-Net (semantic_shape fusion) is the shipped
    config with one --set: its U-Net has class maps decoded by the whole foreground."""
    repo = Path(__file__).resolve().parents[1]
    cfg = cmp.load_compare_config(repo / "experiments" / "configs" / "monusac.yaml",
                                  ["seg.config=experiments/configs/seg_monusac_classes.yaml"])
    seg = stages.seg_stage_config(cfg, Path("data"), 1.0)
    assert seg["targets"]["mode"] == "classes" and seg["postprocess"]["multiclass"] == "foreground"
    assert seg["data"]["scale"] == 0.75 and seg["loss"]["class_weights"] == "auto"


def test_a_seg_override_may_set_a_postprocess_key_its_seg_config_left_out(tmp_path):
    """``seg_monusac.yaml`` fills ``postprocess`` with two keys; a compare ``--set`` of a third one is a
    valid option (checked by the post-processing itself), not an unknown key."""
    repo = Path(__file__).resolve().parents[1]
    cfg = cmp.load_compare_config(repo / "experiments" / "configs" / "monusac.yaml", ["seg.postprocess.threshold=0.4"])
    seg = stages.seg_stage_config(cfg, tmp_path, 1.0)
    assert seg["postprocess"]["threshold"] == 0.4 and seg["postprocess"]["min_area"] == 12
    assert stages.baseline_stage_config(cfg, tmp_path, 1.0)["postprocess"]["threshold"] == 0.4


def test_stage_configs_are_read_once_when_the_comparison_starts(tmp_path):
    """Editing a stage's YAML while a comparison runs must not change the stages that start later."""
    seg_file, base_file = tmp_path / "seg.yaml", tmp_path / "single.yaml"
    seg_file.write_text("model: {name: unet_tiny}\ntrain: {steps_per_epoch: 5}\n")
    base_file.write_text("targets: {mode: classes}\ntrain: {steps_per_epoch: 6}\n")
    cfg = _cfg()
    cfg["seg"] = {"config": str(seg_file), "train": {"epochs": 3}}
    cfg["baseline"] = {"config": str(base_file)}
    cfg["infer"] = {"box_shrink": 0.9}
    before = (stages.seg_stage_config(cfg, tmp_path, 2.0), stages.baseline_stage_config(cfg, tmp_path, 2.0),
              stages.cls_stage_config(cfg, tmp_path, 1.0), stages.infer_config(cfg))
    frozen = stages.freeze_stage_configs(cfg)
    seg_file.write_text("model: {name: unet_small}\ntrain: {steps_per_epoch: 50}\n")
    base_file.write_text("targets: {mode: binary}\n")
    after = (stages.seg_stage_config(frozen, tmp_path, 2.0), stages.baseline_stage_config(frozen, tmp_path, 2.0),
             stages.cls_stage_config(frozen, tmp_path, 1.0), stages.infer_config(frozen))
    assert after == before
    assert after[0]["model"]["name"] == "unet_tiny" and after[0]["train"]["epochs"] == 3
    assert after[1]["train"]["steps_per_epoch"] == 6 and after[3]["box_shrink"] == 0.9
    assert stages.freeze_stage_configs(frozen) == frozen  # a worker reading compare_config.yaml changes nothing
    # Fingerprints match, so a run folder trained before freezing existed is still reused on resume.
    assert stages.config_hash(after[0]) == stages.config_hash(before[0])
    assert stages.seg_stage_config(cfg, tmp_path, 2.0)["model"]["name"] == "unet_small"  # unfrozen: reads the file


def test_an_option_added_later_keeps_old_runs_resumable_at_its_old_behaviour(tmp_path):
    cls = stages.cls_stage_config(_cfg(), tmp_path, 1.0)
    assert cls["proposals"]["match"] == "iop"
    older = copy.deepcopy(cls)
    del older["proposals"]["match"], older["proposals"]["iou"]  # a classifier trained before the option
    assert stages.config_hash(cls) == stages.config_hash(older)
    cls["proposals"]["match"] = "iou"
    assert stages.config_hash(cls) != stages.config_hash(older)


def test_baseline_budget_is_both_stages_minutes():
    cfg = _cfg()
    seg, cls = {"minutes": 2.0, "epochs": 4}, {"minutes": 1.0, "epochs": 3}
    assert cmp.baseline_budget(cfg, seg, cls) == (3.0, 9)  # 1.5 x 4 epochs x 3/2 minutes
    cfg["budget"]["baseline_minutes"], cfg["budget"]["baseline_epochs"] = 5, 10
    assert cmp.baseline_budget(cfg, seg, cls) == (5.0, 10)
    cfg["budget"]["baseline_minutes"] = "auto"
    with pytest.raises(CytoFuseError, match="two-stage"):
        cmp.baseline_budget(cfg, None, None)


def test_phase_names():
    assert cmp.phase_names(["two-stage", "single-stage"], True) == [
        "data", "train segmentation", "train classifier", "fit fusion", "infer two-stage",
        "train single-stage", "infer single-stage", "evaluate", "report"]
    assert cmp.phase_names(["two-stage", "single-stage"], False, side_by_side=True) == [
        "data", "train and infer side by side", "evaluate", "report"]
    assert cmp.phase_names(["classifier"], False)[1] == "train classifier"
    assert cmp.phase_names(["two-stage", "single-stage"], False, side_by_side=True, ensemble=True) == [
        "data", "train and infer side by side", "ensemble", "evaluate", "report"]


def test_the_ensemble_needs_both_systems():
    with pytest.raises(CytoFuseError, match="ensemble: true needs both systems"):
        cmp.load_compare_config(None, ["ensemble=true", "systems=[two-stage]"])
    assert cmp.load_compare_config(None, ["ensemble=true"])["ensemble"] is True


# --------------------------------------------------------------------------------------------- data


def _records(root: Path) -> list[ImageRecord]:
    """Five 32x32 images with masks: three with one class-A box each, two healthy."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    records = []
    for i in range(5):
        img = np.full((32, 32, 3), 220, np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        boxes, labels = np.zeros((0, 4)), np.zeros((0, 2))
        if i < 3:
            img[8:16, 8:16] = 60
            mask[8:16, 8:16] = 255
            boxes, labels = np.array([[8, 8, 16, 16]]), np.array([[1, 0]])
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
        records.append(ImageRecord(f"im{i}", root / "images" / f"im{i}.png", 32, 32, boxes, labels,
                                   mask_path=root / "masks" / f"im{i}.png"))
    return records


def test_split_is_made_once_written_and_reused(tmp_path):
    from cytocore.writers import write_challenge_dataset

    data = tmp_path / "data"
    write_challenge_dataset(Dataset(_records(tmp_path / "src"), NAMES), data)
    out = tmp_path / "out"
    cfg = _cfg(path=str(data), split_seed=3)
    ds, path = runkit.prepare_data(cfg, out)
    assert path == data and all(r.split in ("train", "val", "test") for r in ds.records)
    first = pd.read_csv(out / "splits.csv")
    assert len(first) == 5
    # Another seed later does not move images between splits: the written split wins.
    cfg["data"]["split_seed"] = 99
    ds2, _ = runkit.prepare_data(cfg, out)
    assert {r.image_id: r.split for r in ds2.records} == {r.image_id: r.split for r in ds.records}


def test_test_images_are_linked_by_image_id(tmp_path):
    records = _records(tmp_path / "src")
    for r, split in zip(records, ["train", "test", "test", "val", "test"]):
        r.split = split
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "stale.png").write_bytes(b"x")
    runkit.link_split_images(Dataset(records, NAMES), "test", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["im1.png", "im2.png", "im4.png"]
    assert (folder / "im1.png").resolve() == (tmp_path / "src" / "images" / "im1.png").resolve()
    with pytest.raises(DataError, match="holdout"):
        runkit.link_split_images(Dataset(records, NAMES), "holdout", folder)


# --------------------------------------------------------------------------------------------- stages


def test_finished_stage_is_reused_and_a_changed_config_refused(tmp_path):
    cfg = {"train": {"monitor": "val_dice", "time_budget_minutes": 3, "epochs": 4, "progress": True}, "model": {"depth": 3}}
    folder = tmp_path / "seg"
    folder.mkdir()
    (folder / "best.ckpt").write_bytes(b"weights")
    done = {"stage": "segmentation", "best_checkpoint": str(folder / "best.ckpt"), "minutes": 1.0, "epochs": 2,
            "config_hash": stages.config_hash(cfg)}
    (folder / "done.json").write_text(json.dumps(done))

    def must_not_train():
        raise AssertionError("a finished stage was trained again")

    # Progress bars and the budget do not change what a finished run learned.
    same = {**cfg, "train": {**cfg["train"], "progress": False, "time_budget_minutes": 9}}
    assert stages.run_stage("segmentation", folder, same, must_not_train)["minutes"] == 1.0
    other = {**cfg, "model": {"depth": 4}}
    with pytest.raises(CytoFuseError, match="another config"):
        stages.run_stage("segmentation", folder, other, must_not_train)


def test_a_derived_epoch_cap_does_not_refuse_a_finished_baseline(tmp_path):
    """The baseline's auto epoch cap follows the two stages' measured minutes: retraining the
    classifier alone changes it, and the finished baseline must still be reused."""
    cfg = {"train": {"monitor": "val_dice", "time_budget_minutes": 20, "epochs": 90}, "model": {"depth": 4}}
    folder = tmp_path / "baseline"
    folder.mkdir()
    (folder / "best.ckpt").write_bytes(b"weights")

    def trained():
        return SimpleNamespace(best_checkpoint=folder / "best.ckpt", last_checkpoint=folder / "best.ckpt",
                               minutes=20.0, history=[], best_value=0.5)

    def must_not_train():
        raise AssertionError("a finished baseline was trained again")

    derived = [("train", "epochs")]
    stages.run_stage("single-stage", folder, cfg, trained, derived=derived)
    later = {**cfg, "train": {**cfg["train"], "epochs": 120, "time_budget_minutes": 26}}
    assert stages.run_stage("single-stage", folder, later, must_not_train, derived=derived)["minutes"] == 20.0
    # without the key named as derived, the same change is another config
    with pytest.raises(CytoFuseError, match="another config"):
        stages.run_stage("single-stage", folder, later, must_not_train)
    # and what the baseline learns is still fingerprinted
    with pytest.raises(CytoFuseError, match="another config"):
        stages.run_stage("single-stage", folder, {**later, "model": {"depth": 3}}, must_not_train, derived=derived)


def test_a_baseline_finished_before_derived_keys_is_still_reused(tmp_path):
    cfg = {"train": {"monitor": "val_dice", "time_budget_minutes": 20, "epochs": 90}, "model": {"depth": 4}}
    folder = tmp_path / "baseline"
    folder.mkdir()
    (folder / "best.ckpt").write_bytes(b"weights")
    done = {"stage": "single-stage", "best_checkpoint": str(folder / "best.ckpt"), "minutes": 20.0, "epochs": 9,
            "config_hash": stages.config_hash(cfg)}  # written when the epoch cap was fingerprinted
    (folder / "done.json").write_text(json.dumps(done))
    reused = stages.run_stage("single-stage", folder, cfg, lambda: None, derived=[("train", "epochs")])
    assert reused["epochs"] == 9


def test_a_moved_run_folder_reuses_its_own_stages(tmp_path):
    import shutil

    run = tmp_path / "run"
    folder = run / "cls"
    folder.mkdir(parents=True)
    (folder / "best.ckpt").write_bytes(b"weights")
    cfg = {"train": {"monitor": "val_auc", "time_budget_minutes": 3, "epochs": 4},
           "proposals": {"csv": str(run / "proposals" / "instances.csv")}}

    def trained():
        return SimpleNamespace(best_checkpoint=folder / "best.ckpt", last_checkpoint=folder / "best.ckpt",
                               minutes=1.0, history=[], best_value=0.5)

    stages.run_stage("classifier", folder, cfg, trained)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    (folder / "best.ckpt").write_bytes(b"another run's weights")  # the old place lives on, changed

    def must_not_train():
        raise AssertionError("a moved run folder trained its finished stage again")

    moved_cfg = {**cfg, "proposals": {"csv": str(moved / "proposals" / "instances.csv")}}
    done = stages.run_stage("classifier", moved / "cls", moved_cfg, must_not_train)
    assert Path(done["best_checkpoint"]) == moved / "cls" / "best.ckpt"
    # a path outside the run folder is still part of what the stage learned from
    elsewhere = {**cfg, "proposals": {"csv": str(tmp_path / "other.csv")}}
    with pytest.raises(CytoFuseError, match="another config"):
        stages.run_stage("classifier", moved / "cls", elsewhere, must_not_train)


def test_a_classifier_is_not_reused_after_the_proposals_it_learned_from_changed(tmp_path, caplog):
    """The config names the proposals table by path; new post-processing hypotheses re-make it under the
    same name, so its hash is kept and checked. An older ``done.json`` without one is reused with a warning."""
    run = tmp_path / "run"
    folder = run / "cls"
    folder.mkdir(parents=True)
    csv = run / "proposals" / "instances.csv"
    csv.parent.mkdir()
    csv.write_text("image_id,x0\nim1,3\n")
    cfg = {"train": {"monitor": "val_auc", "time_budget_minutes": 3, "epochs": 4}, "proposals": {"csv": str(csv)}}

    def trained():
        (folder / "best.ckpt").write_bytes(b"weights")
        return SimpleNamespace(best_checkpoint=folder / "best.ckpt", last_checkpoint=folder / "best.ckpt",
                               minutes=1.0, history=[], best_value=0.5)

    def must_not_train():
        raise AssertionError("a finished classifier was trained again")

    stages.run_stage("classifier", folder, cfg, trained, inputs={"proposals": csv})
    assert stages.run_stage("classifier", folder, cfg, must_not_train, inputs={"proposals": csv})["minutes"] == 1.0
    csv.write_text("image_id,x0\nim1,3\nim1,9\n")
    with pytest.raises(CytoFuseError, match="another proposals"):
        stages.run_stage("classifier", folder, cfg, must_not_train, inputs={"proposals": csv})
    done = json.loads((folder / "done.json").read_text())
    del done["inputs"]
    (folder / "done.json").write_text(json.dumps(done))
    assert stages.run_stage("classifier", folder, cfg, must_not_train, inputs={"proposals": csv})["minutes"] == 1.0
    assert "records no proposals hash" in caplog.text


# --------------------------------------------------------------------------------------------- scoring


def _system(folder: Path, records, det_rows, malignancy, seconds, saliency):
    """Write what a pipeline writes: predictions.csv, images.csv, run.json, saliency/, overlays/."""
    from cytocore.writers import detections_frame, write_predictions_csv

    folder.mkdir(parents=True)
    frames = [detections_frame(i, np.array([box]), np.array([p]), NAMES, (32, 32)) for i, box, p in det_rows]
    write_predictions_csv(folder / "predictions.csv", pd.concat(frames, ignore_index=True), NAMES)
    pd.DataFrame({"image_id": [r.image_id for r in records], "width": 32, "height": 32, "n_detections": 1,
                  "malignancy": [malignancy[r.image_id] for r in records], "seconds": 0.0}).to_csv(folder / "images.csv", index=False)
    timings = {r.image_id: {"segment": seconds[r.image_id], "classify": 0.0, "fuse": 0.0, "write": 5.0} for r in records}
    (folder / "run.json").write_text(json.dumps({"timings": timings, "n_failed": 0, "fusion": {"description": "geometric(w=0.5)"}}))
    (folder / "saliency").mkdir()
    (folder / "overlays").mkdir()
    for r in records:
        Image.fromarray(saliency(r)).save(folder / "saliency" / f"{r.image_id}.png")
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(folder / "overlays" / f"{r.image_id}.png")


def test_scores_and_report_on_a_tiny_fixture(tmp_path):
    from experiments.report import build_report

    records = _records(tmp_path / "data")
    for r, split in zip(records, ["train", "test", "test", "val", "test"]):
        r.split = split
    ds = Dataset(records, NAMES)
    test = ds.subset(split="test").records  # im1 (box), im2 (box), im4 (healthy)
    assert [r.image_id for r in test] == ["im1", "im2", "im4"]

    def wide(r):  # saliency on rows 8..15, cols 8..19: 96 px over a 64 px mask (healthy: all zero)
        s = np.zeros((32, 32), np.uint8)
        if r.n_boxes:
            s[8:16, 8:20] = 255
        return s

    # System "good": both cells found (A), healthy image scored low; median time 2 s.
    _system(tmp_path / "good", test, [("im1", [8, 8, 16, 16], [0.9, 0.1]), ("im2", [8, 8, 16, 16], [0.8, 0.1])],
            {"im1": 0.9, "im2": 0.8, "im4": 0.1}, {"im1": 9.0, "im2": 2.0, "im4": 1.0}, wide)
    # System "poor": one false positive, the healthy image scored highest.
    _system(tmp_path / "poor", test, [("im4", [0, 0, 6, 6], [0.7, 0.2])],
            {"im1": 0.0, "im2": 0.0, "im4": 0.7}, {"im1": 1.0, "im2": 1.0, "im4": 1.0}, lambda r: np.zeros((32, 32), np.uint8))

    overlays = runkit.pick_overlays(test, 2)
    assert overlays == ["im1", "im4"]  # the image with most boxes (ties by id), then one healthy image
    good = runkit.score_system(ds, "test", tmp_path / "good", 0.5, overlays)
    poor = runkit.score_system(ds, "test", tmp_path / "poor", 0.5, overlays)

    assert good["metrics"]["froc"]["A"] == pytest.approx(1.0) and good["metrics"]["n_images"] == 3
    assert poor["metrics"]["froc"]["A"] == pytest.approx(0.0)
    assert good["triage"]["roc_auc"] == pytest.approx(1.0) and poor["triage"]["roc_auc"] == pytest.approx(0.0)
    # Pooled over the two masked cancer images: Dice = 2·64 / (96 + 64) each; healthy adds nothing.
    assert good["segmentation"]["dice"] == pytest.approx(2 * 128 / (192 + 128))
    assert good["segmentation"]["iou"] == pytest.approx(128 / 192)
    assert good["infer_seconds_per_image"] == pytest.approx(2.0)  # median, file writing excluded
    assert set(good["overlays"]) == {"im1", "im4"}
    assert (tmp_path / "good" / "metrics.json").is_file()

    results = {"dataset": {"name": "tiny", "path": "x", "split": "test", "n_images": 3, "n_boxes": 2},
               "seed": 0, "budget": "test budget", "systems": {"good": {**good, "train_minutes": 1.0},
                                                               "poor": {**poor, "train_minutes": 1.0}}}
    report = build_report(results, tmp_path / "report")
    text = report.read_text()
    assert "| good |" in text and "| poor |" in text and "test budget" in text
    assert (tmp_path / "report" / "overlay_im1.png").is_file() and (tmp_path / "report" / "froc_A.png").is_file()
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["systems"]["good"]["segmentation"]["dice"] == pytest.approx(0.8)


def test_classifier_report_lists_every_class():
    metrics = {"auc_A": 0.9, "ap_A": 0.8, "bacc_A": 0.75, "auc_B": float("nan"), "ap_B": 0.5, "bacc_B": 0.5,
               "mean_auc": 0.9, "mean_ap": 0.65, "mean_bacc": 0.625, "argmax_accuracy": 0.7,
               "argmax_balanced_accuracy": 0.65, "n_items": 10, "n_per_class": {"A": 6, "B": 4},
               "infer_seconds_per_item": 0.01, "checkpoint": "/x/last.ckpt"}
    results = {"dataset": {"name": "tiles", "path": "p", "split": "val", "splits": {"train": 20, "val": 10},
                           "classes": NAMES}, "seed": 0, "metrics": metrics,
               "training": {"minutes": 1.5, "epochs": 3, "samples": 96, "budget_minutes": 2}}
    text = rep.classifier_report(results)
    assert "| A | 0.900 | 0.800 | 0.750 | 6 |" in text and "| B | – | 0.500 | 0.500 | 4 |" in text
    assert "accuracy 0.700" in text and "last.ckpt" in text


def test_commands_register():
    from experiments import commands_compare

    parser = argparse.ArgumentParser()
    commands_compare.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--config", "c.yaml", "--out", "o", "--set", "seed=1", "--no-progress"])
    assert args.overrides == ["seed=1"] and args.no_progress and callable(args.handler)
    args = parser.parse_args(["demo", "--quick"])
    assert args.out == "demo_out" and args.quick


def test_dataset_info_and_notes_name_the_split_and_skipped_rows(tmp_path):
    from cytocore.errors import Problem

    records = _records(tmp_path / "data")
    for r, split in zip(records, ["train", "test", "test", "val", "test"]):
        r.split = split
    ds = Dataset(records, NAMES, problems=[Problem("a.xml", 4, "degenerate box, skipped", "error"),
                                          Problem("b.xml", None, "size read from image", "warning")])
    cfg = _cfg(path="../shared/datasets/tiny")
    info = runkit.dataset_info(cfg, ds, tmp_path / "data", "test")
    assert (info["name"], info["split"], info["n_images"], info["n_boxes"], info["n_healthy"]) == ("data", "test", 3, 2, 1)
    assert info["splits"] == {"test": 3, "train": 1, "val": 1} and info["n_problems"] == 1
    notes = rep.report_notes({"dataset": info, "systems": {}}, {}, [], cfg)
    assert any("test 3, train 1, val 1" in n for n in notes)
    assert any("1 annotation problem" in n and "a.xml" in n for n in notes)


# --------------------------------------------------------------------------------------------- side by side


def test_side_by_side_needs_both_systems_two_cores_and_budgets(monkeypatch):
    from cytocore import runtime
    from experiments import side_by_side

    cfg = _cfg()
    monkeypatch.setattr(runtime, "default_threads", lambda: 3)
    assert side_by_side.threads_each(cfg) == 1  # equal threads each; the odd core is shared
    monkeypatch.setattr(runtime, "default_threads", lambda: 4)
    assert side_by_side.threads_each(cfg) == 2
    cfg["parallel"] = False
    assert side_by_side.threads_each(cfg) is None
    cfg["parallel"] = True
    cfg["budget"]["cls_minutes"] = None  # the baseline's auto budget cannot be known before the stages run
    with pytest.raises(CytoFuseError, match="cls_minutes"):
        side_by_side.threads_each(cfg)
    cfg["budget"]["baseline_minutes"] = 5
    assert side_by_side.threads_each(cfg) == 2
    cfg["systems"] = ["two-stage"]
    with pytest.raises(CytoFuseError, match="one system"):
        side_by_side.threads_each(cfg)
    cfg["parallel"] = "auto"
    assert side_by_side.threads_each(cfg) is None
    cfg["systems"], cfg["parallel"] = ["two-stage", "single-stage"], True
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)
    with pytest.raises(CytoFuseError, match="1 core"):
        side_by_side.threads_each(cfg)
    cfg["parallel"] = "yes"
    with pytest.raises(CytoFuseError, match="auto, true or false"):
        side_by_side.threads_each(cfg)


def test_side_by_side_baseline_gets_the_planned_budgets(tmp_path):
    cfg = _cfg()
    cfg["budget"].update(seg_minutes=10, cls_minutes=4)
    cfg["seg"] = {"train": {"epochs": 20}}
    seg, cls = cmp.planned_stage_budgets(cfg, tmp_path)
    assert seg == {"minutes": 10, "epochs": 20} and cls["minutes"] == 4
    assert cmp.baseline_budget(cfg, seg, cls) == (14.0, 42)  # 1.5 x 20 epochs x 14/10 minutes


def test_failed_workers_are_one_line_naming_their_logs(tmp_path, monkeypatch):
    """Workers are real processes; a broken run folder fails both, and the error says where to look."""
    from experiments import side_by_side

    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "compare_config.yaml").write_text("not: [a, valid\n")
    with pytest.raises(CytoFuseError) as info:
        side_by_side.run_systems(["two-stage", "single-stage"], 1, out)
    message = str(info.value)
    assert "\n" not in message and "two-stage failed" in message and "single-stage failed" in message
    assert str(out / "logs" / "two-stage.log") in message and "run the same command again" in message
    assert "yaml" in (out / "logs" / "two-stage.log").read_text().lower()


def test_a_fitted_fusion_is_reused_only_for_candidates_made_the_same_way(tmp_path, monkeypatch):
    """``fusion.json`` is refitted when the inference post-processing (its hypotheses) changes: the rule
    was chosen and fitted on other candidates. Same checkpoints and settings: reused."""
    import experiments.fuse_fit as ff
    from experiments.compare import fit_fusion_file
    from fusion.pipeline import load_fusion_config
    from tests.test_ensemble import INFER, NAMES, _checkpoints, _records

    records = _records(tmp_path / "src")
    for r in records:
        r.split = "val"
    ds = Dataset(records, NAMES)
    run = tmp_path / "R"
    _checkpoints(run)
    calls = []
    real = ff.fit_fusion
    monkeypatch.setattr(ff, "fit_fusion", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = run / "fusion.json"
    fit = lambda icfg: fit_fusion_file(run / "seg" / "best.ckpt", run / "cls" / "best.ckpt",  # noqa: E731
                                       load_fusion_config(icfg), ds, "val", path, progress=False, metric="ap50")
    fit(INFER)
    fit(INFER)
    assert len(calls) == 1
    other = copy.deepcopy(INFER)
    other["segmentation"]["postprocess"]["hypotheses"] = [{"box_shape": "disc"}]
    fit(other)
    assert len(calls) == 2 and json.loads(path.read_text())["candidates_fingerprint"]
    fit(other)
    assert len(calls) == 2
    older = json.loads(path.read_text())  # a fit from before each class had its own box factor
    del older["box_shrink_by_class"]
    path.write_text(json.dumps(older))
    fit(other)
    assert len(calls) == 3 and "box_shrink_by_class" in json.loads(path.read_text())
