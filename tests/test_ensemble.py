"""The per-class ensemble of a comparison's two systems: chosen on val, each class's rows exactly the
chosen system's, the mean map, and the command on a run folder of tiny untrained networks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cytocore.errors import CytoFuseError
from cytocore.imageio import read_mask
from cytocore.records import Dataset, ImageRecord
from experiments import ensemble as ens
from experiments.explain_auc import explainability_auc
from experiments.runkit import SINGLE_STAGE, TWO_STAGE, score_system

NAMES = ["A", "B"]


def test_each_class_goes_to_the_system_that_wins_it_on_val():
    figures = {TWO_STAGE: {"A": 0.6, "B": 0.2, "C": 0.5, "D": None},
               SINGLE_STAGE: {"A": 0.3, "B": 0.4, "C": 0.5, "D": 0.9}}
    choice = ens.choose(figures, ["A", "B", "C", "D"], {TWO_STAGE: 0.90, SINGLE_STAGE: 0.91, ens.MEAN_MAP: 0.93})
    # a tie, or a class val cannot judge for one system, stays with the two-stage system
    assert choice.classes == {"A": TWO_STAGE, "B": SINGLE_STAGE, "C": TWO_STAGE, "D": TWO_STAGE}
    assert choice.saliency == ens.MEAN_MAP
    no_masks = ens.choose(figures, ["A"], {TWO_STAGE: None, SINGLE_STAGE: None, ens.MEAN_MAP: None})
    assert no_masks.saliency == TWO_STAGE
    assert ens.choose(figures, ["A"], {TWO_STAGE: 0.9, SINGLE_STAGE: 0.9, ens.MEAN_MAP: 0.8}).saliency == TWO_STAGE


CELLS = np.array([[4, 4, 12, 12], [20, 20, 28, 28]])  # an A cell top left, a B cell bottom right


def _records(root: Path) -> list[ImageRecord]:
    """Four identical 32x32 images holding the two :data:`CELLS`, with masks."""
    img = np.full((32, 32, 3), 220, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    for x0, y0, x1, y1 in CELLS:
        img[y0:y1, x0:x1], mask[y0:y1, x0:x1] = 60, 255
    paths = {"images": img, "masks": mask}
    for folder, arr in paths.items():
        (root / folder).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(arr).save(root / folder / f"im{i}.png")
    return [ImageRecord(f"im{i}", root / "images" / f"im{i}.png", 32, 32, CELLS.copy(), np.eye(2),
                        mask_path=root / "masks" / f"im{i}.png", split="test") for i in range(4)]


def _outputs(folder: Path, records, finds: str, level: int) -> None:
    """What a system writes. It finds its own class's cell; for the other class it ranks a false
    box (an empty corner) above the true cell. Its map is ``level`` everywhere but the cells (255)."""
    folder.mkdir(parents=True)
    rows = []
    for r in records:
        own, other = ([4, 4, 12, 12], [20, 20, 28, 28]) if finds == "A" else ([20, 20, 28, 28], [4, 4, 12, 12])
        k = NAMES.index(finds)
        hit = [0.0, 0.0]
        hit[k] = 0.9
        false = [0.0, 0.0]
        false[1 - k] = 0.8
        weak = [0.0, 0.0]
        weak[1 - k] = 0.3
        for box, p in ((own, hit), ([24, 0, 31, 7], false), (other, weak)):
            rows.append({"image_id": r.image_id, "xmin": box[0] / 32, "ymin": box[1] / 32, "xmax": box[2] / 32,
                         "ymax": box[3] / 32, "p_A": p[0], "p_B": p[1]})
        sal = np.full((32, 32), level, np.uint8)
        sal[4:12, 4:12] = sal[20:28, 20:28] = 255
        (folder / "saliency").mkdir(exist_ok=True)
        Image.fromarray(sal).save(folder / "saliency" / f"{r.image_id}.png")
    pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)
    pd.DataFrame({"image_id": [r.image_id for r in records], "malignancy": 0.5}).to_csv(folder / "images.csv", index=False)
    timings = {r.image_id: {"segment": 1.0, "classify": 2.0, "fuse": 0.0} for r in records}
    (folder / "run.json").write_text(json.dumps({"timings": timings, "n_failed": 0}))


def test_each_class_scores_exactly_as_the_system_chosen_for_it(tmp_path):
    ds = Dataset(_records(tmp_path / "data"), NAMES)
    folders = {TWO_STAGE: tmp_path / "R" / TWO_STAGE, SINGLE_STAGE: tmp_path / "R" / SINGLE_STAGE}
    _outputs(folders[TWO_STAGE], ds.records, "A", level=0)
    _outputs(folders[SINGLE_STAGE], ds.records, "B", level=100)
    figures = {s: ens.per_class_figures(ds, "test", f, "accuracy") for s, f in folders.items()}
    assert figures[TWO_STAGE]["A"] == pytest.approx(1.0) and figures[TWO_STAGE]["B"] < 1.0
    assert figures[SINGLE_STAGE]["B"] == pytest.approx(1.0) and figures[SINGLE_STAGE]["A"] < 1.0
    choice = ens.choose(figures, NAMES, ens.map_aucs(ds.records, folders))
    assert choice.classes == {"A": TWO_STAGE, "B": SINGLE_STAGE}
    # the two-stage map is 0 off the cells, the mean 50: both separate the cells perfectly; the earlier wins
    assert choice.saliency == TWO_STAGE

    out = ens.write_ensemble(folders, ens.EnsembleChoice(choice.classes, ens.MEAN_MAP), NAMES,
                             [r.image_id for r in ds.records], tmp_path / "R" / ens.SYSTEM)
    scored = score_system(ds, "test", out, 0.5, [])
    assert scored["metrics"]["froc"] == pytest.approx({"A": 1.0, "B": 1.0})
    rows = pd.read_csv(out / "predictions.csv")
    assert len(rows) == 8  # per image the two hits; each system's other rows score only the class it lost
    sal = np.asarray(Image.open(out / "saliency" / "im0.png"))
    assert sal[0, 31] == 50 and sal[5, 5] == 255  # (0 + 100 + 1) // 2, (255 + 255 + 1) // 2
    run = json.loads((out / "run.json").read_text())
    assert run["choice"]["classes"] == {"A": TWO_STAGE, "B": SINGLE_STAGE} and run["timings"]["im0"]["classify"] == 4.0


def test_a_run_without_both_systems_is_one_clear_error(tmp_path):
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "best.ckpt").write_bytes(b"x")
    with pytest.raises(CytoFuseError, match=r"baseline/best.ckpt"):
        ens.checkpoints(tmp_path)


def test_the_command_refuses_a_folder_that_is_no_compare_run(tmp_path, capsys):
    from experiments.cli import run

    assert run(["ensemble", "--run", str(tmp_path), "--no-progress"]) == 2
    assert "not a compare run folder" in capsys.readouterr().err


# ------------------------------------------------------------------ the command on tiny untrained networks

INFER = {"segmentation": {"predict": {"tile": 32, "context": 4, "batch_size": 2},
                          "postprocess": {"threshold": 0.05, "min_area": 2}},
         "score_floor": 0.0, "classification": {"batch_size": 8}, "runtime": {"threads": 2}}


def _checkpoints(run: Path) -> None:
    from classification.classifier import checkpoint_meta
    from classification.crops import CropConfig
    from classification.model import ModelConfig, build_network
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=0, threads=2)
    for stage, channels, mode in (("seg", 1, "binary"), ("baseline", len(NAMES) + 1, "classes")):
        (run / stage).mkdir(parents=True)
        model_cfg = resolve_model_config({"name": "unet_tiny", "out_channels": channels})
        meta = {"stage": "segmentation", "model": model_cfg, "class_names": NAMES, "mode": mode, "scale": 1.0,
                "input_multiple": 4, "threshold": 0.5, "config": {}}
        runtime.save_checkpoint(run / stage / "best.ckpt", [create_unet(**model_cfg)], meta)
    (run / "cls").mkdir()
    model = ModelConfig(name="efficientnet_b0", width_mult=0.25, depth_mult=0.25, drop_rate=0.0, drop_path_rate=0.0)
    runtime.save_checkpoint(run / "cls" / "best.ckpt", [build_network(model, len(NAMES))],
                            checkpoint_meta(model, NAMES, CropConfig(size=32)))


def test_the_command_on_a_run_folder_writes_the_choice_and_the_test_outputs(tmp_path, capsys):
    from cytocore.config import dump_yaml
    from cytocore.writers import read_predictions_csv, write_challenge_dataset
    from experiments.baseline import run_baseline_folder
    from experiments.cli import run as cli
    from experiments.compare import load_compare_config
    from experiments.runkit import link_split_images, prepare_data
    from experiments.stages import infer_config
    from fusion.pipeline import Pipeline

    records = _records(tmp_path / "src")
    for r, split in zip(records, ["train", "val", "val", "test"]):
        r.split = split
    write_challenge_dataset(Dataset(records, NAMES), tmp_path / "data")
    run = tmp_path / "R"
    run.mkdir()
    cfg = load_compare_config(None, [f"data.path={tmp_path / 'data'}", "progress=false"])
    cfg["infer"] = INFER
    (run / "compare_config.yaml").write_text(dump_yaml(cfg))
    pd.DataFrame({"image_id": [r.image_id for r in records], "split": [r.split for r in records]}).to_csv(
        run / "splits.csv", index=False)
    _checkpoints(run)
    # the test outputs `cytofuse compare` leaves
    ds, _ = prepare_data(cfg, run)
    images = link_split_images(ds, "test", run / "test_images")
    Pipeline(run / "seg" / "best.ckpt", run / "cls" / "best.ckpt", infer_config(cfg), classes=NAMES).run_folder(
        images, run / TWO_STAGE, progress=False)
    run_baseline_folder(run / "baseline" / "best.ckpt", images, run / SINGLE_STAGE, infer_config(cfg, True), progress=False)

    assert cli(["ensemble", "--run", str(run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| ensemble |" in printed and "| two-stage |" not in printed  # compare's own scoring not run here
    saved = json.loads((run / "ensemble.json").read_text())
    assert set(saved["classes"]) == set(NAMES) and saved["split"] == "val"
    assert set(saved["validation"]["map_auc"]) == set(ens.MAPS)
    assert sorted(p.name for p in (run / "val" / TWO_STAGE / "saliency").iterdir()) == ["im1.png", "im2.png"]
    merged = read_predictions_csv(run / ens.SYSTEM / "predictions.csv", NAMES)
    assert len(merged) > 0  # the untrained networks do find objects at this threshold
    for c in NAMES:  # each class's scores are the chosen system's, row for row
        mine = merged.loc[merged[f"p_{c}"] > 0, f"p_{c}"].sort_values().to_numpy()
        theirs = read_predictions_csv(run / saved["classes"][c] / "predictions.csv", NAMES)
        assert np.allclose(mine, theirs.loc[theirs[f"p_{c}"] > 0, f"p_{c}"].sort_values().to_numpy(), atol=1e-6)
    assert (run / ens.SYSTEM / "metrics.json").is_file() and (run / ens.SYSTEM / "saliency" / "im3.png").is_file()
    assert yaml.safe_load((run / "compare_config.yaml").read_text())["data"]["path"] == str(tmp_path / "data")


def test_the_report_shows_the_ensemble_row_and_keeps_the_overlays_of_the_systems_that_draw_them(tmp_path):
    from experiments.report import build_report, report_notes

    ds = Dataset(_records(tmp_path / "data"), NAMES)
    folders = {TWO_STAGE: tmp_path / "R" / TWO_STAGE, SINGLE_STAGE: tmp_path / "R" / SINGLE_STAGE}
    _outputs(folders[TWO_STAGE], ds.records, "A", level=0)
    _outputs(folders[SINGLE_STAGE], ds.records, "B", level=100)
    for f in folders.values():
        (f / "overlays").mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f / "overlays" / "im0.png")
    choice = ens.EnsembleChoice({"A": TWO_STAGE, "B": SINGLE_STAGE}, ens.MEAN_MAP)
    ens.write_ensemble(folders, choice, NAMES, [r.image_id for r in ds.records], tmp_path / "R" / ens.SYSTEM)
    systems = {s: {**score_system(ds, "test", tmp_path / "R" / s, 0.5, ["im0"]), "train_minutes": 1.0}
               for s in (TWO_STAGE, SINGLE_STAGE, ens.SYSTEM)}
    assert systems[ens.SYSTEM]["overlays"] == {} and systems[ens.SYSTEM]["fusion"] == choice.describe()
    results = {"dataset": {"name": "tiny", "path": "x", "split": "test", "n_images": 4, "n_boxes": 8, "n_healthy": 0,
                           "splits": {"test": 4}, "split_seed": 0},
               "seed": 0, "budget": "b", "systems": systems}
    notes = report_notes(results, {}, [TWO_STAGE, SINGLE_STAGE], {"report": {"mask_threshold": 0.5}})
    assert any(n.startswith("Ensemble: per-class ensemble chosen on val: A from two-stage, B from single-stage") for n in notes)
    text = build_report(results, tmp_path / "report").read_text()
    assert "| ensemble |" in text
    assert (tmp_path / "report" / "overlay_im0.png").is_file()  # the two systems' overlays, side by side


def test_without_masks_the_choice_is_by_ap50_and_the_two_stage_map_is_kept(tmp_path):
    """BCCD-like data: boxes only, judged by AP50; no map can be scored, so the design's own is written."""
    records = _records(tmp_path / "data")
    for r in records:
        r.mask_path = None
    ds = Dataset(records, NAMES)
    folders = {TWO_STAGE: tmp_path / "R" / TWO_STAGE, SINGLE_STAGE: tmp_path / "R" / SINGLE_STAGE}
    _outputs(folders[TWO_STAGE], ds.records, "A", level=0)
    _outputs(folders[SINGLE_STAGE], ds.records, "B", level=100)
    figures = {s: ens.per_class_figures(ds, "test", f, "ap50") for s, f in folders.items()}
    assert figures[TWO_STAGE]["A"] > figures[SINGLE_STAGE]["A"] and figures[SINGLE_STAGE]["B"] > figures[TWO_STAGE]["B"]
    aucs = ens.map_aucs(ds.records, folders)
    assert aucs == {m: None for m in ens.MAPS}
    choice = ens.choose(figures, NAMES, aucs)
    assert choice == ens.EnsembleChoice({"A": TWO_STAGE, "B": SINGLE_STAGE}, TWO_STAGE)
    out = ens.write_ensemble(folders, choice, NAMES, [r.image_id for r in ds.records], tmp_path / "R" / ens.SYSTEM)
    scored = score_system(ds, "test", out, 0.5, [])
    assert scored["segmentation"] is None and scored["metrics"]["explainability_auc"] is None
    assert np.array_equal(np.asarray(Image.open(out / "saliency" / "im0.png")),
                          np.asarray(Image.open(folders[TWO_STAGE] / "saliency" / "im0.png")))


def test_missing_test_outputs_are_reported_before_any_validation_inference(tmp_path):
    ds = Dataset(_records(tmp_path / "data"), NAMES)
    cfg = {"data": {"val_split": "val", "test_split": "test"}}
    with pytest.raises(CytoFuseError, match=r"two-stage system has no finished test outputs"):
        ens.run_ensemble(cfg, ds, tmp_path / "R", progress=False)
    assert not (tmp_path / "R" / "val_images").exists() and not (tmp_path / "R" / "val").exists()


def test_map_aucs_are_the_official_per_image_mean_of_each_candidate_map(tmp_path):
    ds = Dataset(_records(tmp_path / "data"), NAMES)
    folders = {TWO_STAGE: tmp_path / "R" / TWO_STAGE, SINGLE_STAGE: tmp_path / "R" / SINGLE_STAGE}
    _outputs(folders[TWO_STAGE], ds.records, "A", level=0)
    _outputs(folders[SINGLE_STAGE], ds.records, "B", level=100)
    rng = np.random.default_rng(0)
    for system, folder in folders.items():  # noisy maps, a different quality per system and image
        for r in ds.records:
            sal = rng.integers(0, 256, (32, 32)).astype(np.uint8)
            sal[4:12, 4:12] = np.maximum(sal[4:12, 4:12], 120 if system == TWO_STAGE else 60)
            Image.fromarray(sal).save(folder / "saliency" / f"{r.image_id}.png")
    ds.records[3].mask_path = None  # an image without a mask is left out, not scored as empty
    aucs = ens.map_aucs(ds.records, folders)
    for m in ens.MAPS:
        pairs = [(r.image_id, read_mask(r.mask_path, max_pixels=None), ens.map_of(m, folders, r.image_id))
                 for r in ds.records[:3]]
        assert aucs[m] == pytest.approx(explainability_auc(pairs).auc)
    assert len({round(v, 6) for v in aucs.values()}) == 3
