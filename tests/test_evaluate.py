"""``evaluate()`` on data sets built in code, and ``cytofuse evaluate`` end to end."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytocore.errors import DataError
from cytocore.froc import class_froc
from cytocore.imageio import write_png
from cytocore.records import Dataset, ImageRecord
from experiments.evaluate import evaluate, format_table
from experiments.explain_auc import roc_auc_uint8

SIZE = 400
REQUIRED_KEYS = {"froc", "accuracy", "explainability_auc", "model_score", "ap50", "n_images"}


def record(image_id, boxes=(), labels=(), k=2, split=None, mask_path=None, size=(SIZE, SIZE)):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.uint8).reshape(len(boxes), k)
    return ImageRecord(image_id, Path(f"images/{image_id}.png"), size[0], size[1], boxes, labels,
                       mask_path=mask_path, split=split)


def predictions(rows, classes=("tumour", "other")):
    """Rows of (image_id, pixel box, scores...) → the challenge's normalised predictions table."""
    cols = ["image_id", "xmin", "ymin", "xmax", "ymax", *[f"p_{c}" for c in classes]]
    data = [[i, *(np.asarray(b, float) / SIZE), *s] for i, b, *s in rows]
    return pd.DataFrame(data, columns=cols)


def worked_example(extra_healthy: int = 0) -> tuple[Dataset, pd.DataFrame]:
    """The organisers' example: class ``tumour`` has the 5 boxes; class ``other`` has none."""
    one = [1, 0]
    recs = [
        record("a", [[0, 0, 10, 10], [100, 100, 110, 110]], [one, one]),
        record("b", [[0, 0, 10, 10], [50, 50, 60, 60]], [one, one]),
        record("c", [[0, 0, 10, 10]], [one]),
    ] + [record(f"healthy{i}") for i in range(extra_healthy)]
    preds = predictions([
        ("a", [1, 1, 9, 9], 0.99, 0.1),
        ("b", [200, 200, 210, 210], 0.97, 0.1),
        ("a", [102, 100, 112, 110], 0.81, 0.1),
        ("a", [0, 0, 10, 12], 0.72, 0.1),
        ("c", [300, 300, 310, 310], 0.58, 0.1),
    ])
    return Dataset(recs, ["tumour", "other"]), preds


def test_worked_example_both_threshold_modes(caplog):
    ds, preds = worked_example()
    with caplog.at_level(logging.WARNING, logger="cytofuse"):
        grid = evaluate(ds, preds, thresholds=[0.9, 0.7, 0.5])
    assert REQUIRED_KEYS <= set(grid)
    assert grid["froc"]["tumour"] == pytest.approx(0.383333, abs=5e-7)
    assert grid["froc"]["other"] is None
    assert grid["accuracy"] == pytest.approx(grid["froc"]["tumour"])  # the class without GT is not averaged
    assert grid["n_images"] == 3 and grid["n_gt"] == {"tumour": 5, "other": 0}
    assert any("'other'" in w for w in grid["warnings"])
    assert "'other'" in caplog.text
    assert grid["explainability_auc"] is None and grid["model_score"] is None
    distinct = evaluate(ds, preds)
    assert distinct["froc"]["tumour"] == pytest.approx(0.391667, abs=5e-7)
    np.testing.assert_allclose(distinct["froc_curves"]["tumour"]["recall"], [0.2, 0.4, 0.4])
    json.dumps(distinct)  # the result is plain JSON


def test_healthy_images_count_in_the_denominator():
    ds, preds = worked_example(extra_healthy=3)
    res = evaluate(ds, preds, thresholds=[0.9, 0.7, 0.5])
    assert res["n_images"] == 6
    # Same predictions over 6 images: FP/N halves, so the curve reaches recall 0.4 at 1/6 FP per image.
    assert res["froc"]["tumour"] == pytest.approx(0.4)


def test_empty_predictions():
    ds, preds = worked_example()
    res = evaluate(ds, preds.iloc[0:0])
    assert res["froc"]["tumour"] == 0.0
    assert res["ap50"]["tumour"] == 0.0 and res["ap50"]["other"] is None
    assert res["n_images"] == 3
    # a system that found nothing (or only healthy images) still gets its ranked-perfectly line
    ds, preds = worked_example(extra_healthy=1)
    best = evaluate(ds, preds.iloc[0:0], ceiling=True)["ceiling"]
    assert best["accuracy"] == 0.0 and best["ap50"]["tumour"] == 0.0


def test_unknown_image_id_is_reported_with_file_and_row_and_skipped():
    ds, preds = worked_example()
    expected = evaluate(ds, preds.drop(index=3))
    preds.loc[3, "image_id"] = "nope"
    res = evaluate(ds, preds, predictions_path="preds.csv")
    assert any("preds.csv:5: image_id 'nope'" in w and "skipped" in w for w in res["warnings"])
    assert res["n_predictions"] == len(preds) - 1
    assert res["froc"] == expected["froc"] and res["ap50"] == expected["ap50"]


def test_predictions_naming_no_image_of_the_data_set_are_an_error():
    ds, preds = worked_example()
    preds["image_id"] = "nope"
    with pytest.raises(DataError, match=r"preds\.csv:2: image_id 'nope'.*wrong predictions file"):
        evaluate(ds, preds, predictions_path="preds.csv")


def test_missing_class_column_and_bad_numbers_are_data_errors():
    ds, preds = worked_example()
    with pytest.raises(DataError, match="p_other"):
        evaluate(ds, preds.drop(columns=["p_other"]), predictions_path="p.csv")
    preds["p_tumour"] = preds["p_tumour"].astype(object)
    preds.loc[1, "p_tumour"] = "high"
    with pytest.raises(DataError, match=r"p\.csv:3: column p_tumour"):
        evaluate(ds, preds, predictions_path="p.csv")


def test_split_sets_the_image_count_and_drops_other_splits(caplog):
    ds, preds = worked_example(extra_healthy=2)
    for r in ds.records:
        r.split = "train" if r.image_id == "b" else "test"
    res = evaluate(ds, preds, split="test", thresholds=[0.9, 0.7, 0.5])
    assert res["n_images"] == 4 and res["n_gt"]["tumour"] == 3
    assert res["n_predictions"] == 4
    assert any("outside split" in w for w in res["warnings"])
    keep = preds["image_id"] != "b"
    test_recs = [r for r in ds.records if r.split == "test"]
    index = {r.image_id: i for i, r in enumerate(test_recs)}
    gt_img = np.concatenate([[index[r.image_id]] * r.n_boxes for r in test_recs])
    gt_boxes = np.concatenate([r.boxes for r in test_recs])
    expected = class_froc(preds.loc[keep, "image_id"].map(index).to_numpy(),
                          preds.loc[keep, ["xmin", "ymin", "xmax", "ymax"]].to_numpy() * SIZE,
                          preds.loc[keep, "p_tumour"].to_numpy(), gt_img, gt_boxes, 4, [0.9, 0.7, 0.5])
    assert res["froc"]["tumour"] == pytest.approx(expected.froc)
    with pytest.raises(DataError, match="split 'val'"):
        evaluate(ds, preds, split="val")


def two_class_set() -> Dataset:
    return Dataset([
        record("x", [[10, 10, 50, 50], [100, 100, 160, 140]], [[1, 0], [1, 1]]),
        record("y", [[200, 200, 260, 250]], [[0, 1]]),
        record("z"),
    ], ["tumour", "other"])


def test_ap50_perfect_and_all_wrong():
    ds = two_class_set()
    perfect = predictions([
        ("x", [10, 10, 50, 50], 0.9, 0.0),
        ("x", [100, 100, 160, 140], 0.8, 0.95),
        ("y", [200, 200, 260, 250], 0.0, 0.7),
    ])
    res = evaluate(ds, perfect)
    assert res["ap50"] == {"tumour": 1.0, "other": 1.0}
    assert res["froc"] == {"tumour": 1.0, "other": 1.0}
    wrong = predictions([
        ("x", [300, 300, 340, 340], 0.9, 0.9),
        ("z", [10, 10, 50, 50], 0.8, 0.8),
        ("y", [10, 10, 50, 50], 0.7, 0.7),
    ])
    res = evaluate(ds, wrong)
    assert res["ap50"] == {"tumour": 0.0, "other": 0.0}
    assert res["froc"] == {"tumour": 0.0, "other": 0.0}
    assert "tumour" in format_table(res)


def test_ceiling_ranks_every_hit_first_by_each_metric_s_own_hit_test():
    """The same boxes ranked perfectly: misses scored above hits cost the real figure, not the ceiling;
    a box inside a cell is a hit for the challenge's IoP and a miss for AP50's IoU."""
    ds = two_class_set()
    preds = predictions([
        ("z", [10, 10, 50, 50], 0.9, 0.9),         # nothing there: a false positive, ranked first
        ("y", [300, 300, 340, 340], 0.95, 0.95),   # nothing there either
        ("x", [10, 10, 50, 50], 0.1, 0.05),        # tumour cell 0, exactly, scored low
        ("x", [100, 100, 130, 120], 0.2, 0.3),     # inside cell 1 (a quarter of it): IoP 1, IoU 0.25
        ("y", [200, 200, 260, 250], 0.05, 0.1),    # the other cell of image y, exactly
    ])
    res = evaluate(ds, preds, ceiling=True)
    best = res["ceiling"]
    assert res["accuracy"] < 1.0 and res["ap50"]["tumour"] < 0.5
    assert best["froc"] == {"tumour": 1.0, "other": 1.0} and best["accuracy"] == 1.0
    assert best["ap50"]["tumour"] == pytest.approx(0.5, abs=0.01)  # cell 1 has no box at IoU > 0.5
    assert best["ap50"]["other"] == pytest.approx(0.5, abs=0.01)
    assert "ranked perfectly" in format_table(res)
    # each class's top 2 boxes (2 cells each) are the two on empty ground, under either hit test
    assert res["box_kinds"]["iou"]["tumour"]["no_cell"] == 2 and res["box_kinds"]["iop"]["other"]["no_cell"] == 2
    assert "no_cell" in format_table(res)
    assert "ceiling" not in evaluate(ds, preds)  # only when asked: the fusion fit evaluates hundreds of times


def test_oracle_scores_keep_the_system_s_order_inside_hits_and_misses():
    from cytocore.ranking_ceiling import Truth, oracle_scores

    gt_boxes = np.array([[0, 0, 10, 10]], float)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 9, 9], [50, 50, 60, 60], [0, 0, 10, 10]], float)
    own = np.array([[0.2], [0.4], [0.9], [1.0]])
    image = np.array([0, 0, 0, 1])  # the last box is on another image, with no cell
    truth = Truth(np.array([0]), gt_boxes, np.array([[1]]))
    scores = oracle_scores(image, boxes, own, truth)
    assert np.argsort(-scores[:, 0]).tolist() == [1, 0, 3, 2]
    with pytest.raises(ValueError, match="hit test"):
        oracle_scores(image, boxes, own, truth, hit="dice")


def _mask_and_saliency(tmp_path: Path, image_id: str, h: int, w: int, seed: int, positive: bool = True):
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    if positive:
        mask[h // 4: h // 2, w // 3: w // 2] = 255
    sal = np.clip((mask > 0) * 90 + rng.integers(0, 160, (h, w)), 0, 255).astype(np.uint8)
    write_png(tmp_path / "masks" / f"{image_id}.png", mask)
    write_png(tmp_path / "saliency" / f"{image_id}.png", sal)
    return tmp_path / "masks" / f"{image_id}.png", mask, sal


def test_explainability_and_model_score(tmp_path):
    m1, mask1, sal1 = _mask_and_saliency(tmp_path, "x", 40, 60, 1)
    m2, mask2, sal2 = _mask_and_saliency(tmp_path, "y", 30, 50, 2)
    m3, _, _ = _mask_and_saliency(tmp_path, "z", 30, 30, 3, positive=False)
    (tmp_path / "saliency" / "z.png").unlink()  # not needed: its mask is single-valued
    recs = [
        record("x", [[5, 5, 20, 20]], [[1, 0]], mask_path=m1, size=(60, 40)),
        record("y", [[5, 5, 20, 20]], [[0, 1]], mask_path=m2, size=(50, 30)),
        record("z", mask_path=m3, size=(30, 30)),
        record("w", size=(30, 30)),  # no mask at all
    ]
    ds = Dataset(recs, ["tumour", "other"])
    preds = pd.DataFrame({"image_id": ["x"], "xmin": [5 / 60], "ymin": [5 / 40], "xmax": [20 / 60], "ymax": [20 / 40],
                          "p_tumour": [0.9], "p_other": [0.2]})
    res = evaluate(ds, preds, saliency_dir=tmp_path / "saliency")
    expected = (roc_auc_uint8(mask1, sal1) + roc_auc_uint8(mask2, sal2)) / 2
    assert res["explainability_auc"] == pytest.approx(expected)
    assert res["model_score"] == pytest.approx(0.8 * res["accuracy"] + 0.2 * expected)
    info = res["explainability"]
    assert info["n_images_used"] == 2 and info["n_single_valued_mask"] == 1 and info["n_skipped_no_mask"] == 1
    # Pooled, the single-valued mask's pixels count too, so its saliency map is required.
    with pytest.raises(DataError, match=r"z\.png: saliency map missing"):
        evaluate(ds, preds, saliency_dir=tmp_path / "saliency", pooled=True)
    write_png(tmp_path / "saliency" / "z.png", np.zeros((30, 30), np.uint8))
    pooled = evaluate(ds, preds, saliency_dir=tmp_path / "saliency", pooled=True)
    assert pooled["explainability"]["mode"] == "pooled" and pooled["explainability"]["n_images_used"] == 3
    assert pooled["explainability_auc"] != pytest.approx(expected)


def test_saliency_missing_or_wrong_size_is_a_data_error(tmp_path):
    m1, _, _ = _mask_and_saliency(tmp_path, "x", 40, 60, 1)
    ds = Dataset([record("x", mask_path=m1, size=(60, 40))], ["tumour", "other"])
    empty = predictions([])
    write_png(tmp_path / "saliency" / "x.png", np.zeros((40, 61), np.uint8))
    with pytest.raises(DataError, match=r"x\.png: saliency is 61x40 but image 'x' is 60x40"):
        evaluate(ds, empty, saliency_dir=tmp_path / "saliency")
    (tmp_path / "saliency" / "x.png").unlink()
    with pytest.raises(DataError, match=r"x\.png: saliency map missing"):
        evaluate(ds, empty, saliency_dir=tmp_path / "saliency")


# --- cytofuse evaluate, end to end on the challenge layout ------------------------------------------
def _write_challenge_set(root: Path) -> None:
    """3 images of 100x80 (one healthy), labels.csv normalised, metadata.csv, masks for two images."""
    w, h = 100, 80
    for image_id in ("p1", "p2", "h1"):
        write_png(root / "images" / f"{image_id}.png", np.full((h, w, 3), 200, np.uint8))
    (root / "labels.csv").write_text(
        "image_id,xmin,ymin,xmax,ymax,SCC,AC\n"
        "p1,0.1,0.1,0.3,0.35,1,0\n"
        "p1,0.5,0.5,0.7,0.8,0,1\n"
        "p2,0.2,0.2,0.4,0.4,1,1\n"
    )
    (root / "metadata.csv").write_text("image_id,width,height,bbox_count\np1,100,80,2\np2,100,80,1\nh1,100,80,0\n")
    for image_id in ("p1", "p2"):
        mask = np.zeros((h, w), np.uint8)
        mask[10:40, 10:40] = 255
        write_png(root / "masks" / f"{image_id}.png", mask)
        sal = np.zeros((h, w), np.uint8)
        sal[12:40, 10:45] = 230
        write_png(root / "saliency" / f"{image_id}.png", sal)


def test_cli_evaluate_end_to_end(tmp_path, capsys):
    from experiments.cli import run

    data = tmp_path / "data"
    _write_challenge_set(data)
    (tmp_path / "predictions.csv").write_text(
        "image_id,xmin,ymin,xmax,ymax,p_SCC,p_AC\n"
        "p1,0.11,0.1,0.3,0.35,0.9,0.1\n"  # SCC hit
        "p1,0.5,0.5,0.7,0.8,0.2,0.8\n"  # AC hit
        "h1,0.1,0.1,0.2,0.2,0.6,0.6\n"  # FP for both on the healthy image
        "p2,0.2,0.2,0.4,0.4,0.5,0.95\n"  # hit for both
    )
    out = tmp_path / "metrics.json"
    code = run(["evaluate", "--data", str(data), "--predictions", str(tmp_path / "predictions.csv"),
                "--saliency", str(data / "saliency"), "--out", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["n_images"] == 3 and metrics["n_gt"] == {"SCC": 2, "AC": 2}
    # SCC: 0.9 TP, 0.6 FP, 0.5 TP → curve (0, 0.5), (1/3, 0.5), (1/3, 1): recall 0.5 + 0.5·(0.25·3) at 1/4.
    assert metrics["froc"]["SCC"] == pytest.approx((0.875 + 5) / 6)
    assert metrics["froc"]["AC"] == pytest.approx(1.0)  # both AC boxes found before the FP
    assert 0.5 < metrics["explainability_auc"] < 1.0
    assert metrics["model_score"] == pytest.approx(0.8 * metrics["accuracy"] + 0.2 * metrics["explainability_auc"])
    printed = capsys.readouterr().out
    assert "SCC" in printed and "model score" in printed

    grid = tmp_path / "grid.json"
    assert run(["evaluate", "--data", str(data), "--predictions", str(tmp_path / "predictions.csv"),
                "--out", str(grid), "--thresholds", "0.9,0.7,0.5"]) == 0
    assert json.loads(grid.read_text())["explainability_auc"] is None


def test_cli_evaluate_all_unknown_images_is_one_line_error(tmp_path, capsys):
    from experiments.cli import run

    data = tmp_path / "data"
    _write_challenge_set(data)
    preds = tmp_path / "predictions.csv"
    preds.write_text("image_id,xmin,ymin,xmax,ymax,p_SCC,p_AC\nyy,0.1,0.1,0.3,0.35,0.9,0.1\nzz,0.1,0.1,0.2,0.2,0.5,0.5\n")
    out = tmp_path / "metrics.json"
    assert run(["evaluate", "--data", str(data), "--predictions", str(preds), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"{preds}:2" in err[-1] and "'yy'" in err[-1]
    assert not out.exists()


@pytest.mark.slow
def test_ground_truth_as_predictions_scores_one_on_monusac():
    from tests.conftest import shared_dataset
    from cytocore.readers import load_dataset

    ds = load_dataset(shared_dataset("monusac"))
    rows = [(r.image_id, *b, *l.astype(float)) for r in ds for b, l in zip(r.normalised_boxes(), r.labels)]
    preds = pd.DataFrame(rows, columns=["image_id", "xmin", "ymin", "xmax", "ymax", *[f"p_{c}" for c in ds.class_names]])
    res = evaluate(ds, preds)
    assert res["n_images"] == len(ds)
    assert res["accuracy"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in res["ap50"].values())
    # Swapping every box's class probabilities for the next class's makes things worse.
    shifted = preds.copy()
    shifted.iloc[:, 5:] = np.roll(preds.iloc[:, 5:].to_numpy(), 1, axis=1)
    assert evaluate(ds, shifted)["accuracy"] < 0.9
