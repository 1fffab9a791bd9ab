"""Detections table, predictions CSV (write, read, validation) and writing the challenge layout."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytocore.errors import DataError
from cytocore.readers import load_dataset
from cytocore.writers import (
    detections_columns,
    detections_frame,
    read_predictions_csv,
    write_challenge_dataset,
    write_detections_csv,
    write_predictions_csv,
)
from tests.test_readers import make_challenge

CLASSES = ["SCC", "AC"]
PRED_HEADER = "image_id,xmin,ymin,xmax,ymax,p_SCC,p_AC\n"


def frame() -> pd.DataFrame:
    boxes = np.array([[10, 20, 30, 60], [0, 0, 100, 50], [5, 5, 6, 7]], float)
    probs = np.array([[0.9, 0.2], [0.1, 0.7], [0.5, 0.5]])
    return detections_frame(["a", "a", "b"], boxes, probs, CLASSES, {"a": (100, 100), "b": (10, 20)},
                            seg_scores=[0.8, 0.6, 0.4])


def test_detections_frame_has_the_canonical_columns():
    df = frame()
    assert list(df.columns) == detections_columns(CLASSES) == [
        "image_id", "x0", "y0", "x1", "y1", "xmin", "ymin", "xmax", "ymax", "p_SCC", "p_AC", "seg_score", "area", "label"]
    np.testing.assert_allclose(df.loc[0, ["xmin", "ymin", "xmax", "ymax"]].to_numpy(float), [0.1, 0.2, 0.3, 0.6])
    np.testing.assert_allclose(df.loc[2, ["xmin", "ymin", "xmax", "ymax"]].to_numpy(float), [0.5, 0.25, 0.6, 0.35])
    assert df["area"].tolist() == [800, 5000, 2]
    assert df["label"].tolist() == ["SCC", "AC", "SCC"]
    empty = detections_frame([], np.zeros((0, 4)), np.zeros((0, 2)), CLASSES, (64, 64))
    assert list(empty.columns) == detections_columns(CLASSES) and len(empty) == 0
    one_size = detections_frame("z", [[0, 0, 32, 16]], [[1, 0]], CLASSES, (64, 32))
    assert one_size[["xmax", "ymax"]].iloc[0].tolist() == [0.5, 0.5] and one_size["seg_score"].isna().all()


def test_predictions_round_trip(tmp_path):
    path = tmp_path / "out" / "predictions.csv"
    write_predictions_csv(path, frame())
    assert path.read_text().splitlines()[0] == "image_id,xmin,ymin,xmax,ymax,p_SCC,p_AC"
    back = read_predictions_csv(path, CLASSES)
    assert back["image_id"].tolist() == ["a", "a", "b"]
    np.testing.assert_allclose(back[["xmin", "ymin", "xmax", "ymax", "p_SCC", "p_AC"]].to_numpy(),
                               frame()[["xmin", "ymin", "xmax", "ymax", "p_SCC", "p_AC"]].to_numpy(), atol=1e-6)
    arrays = {"image_id": ["q"], "boxes": [[0.1, 0.1, 0.2, 0.3]], "probs": [[0.25, 0.75]]}
    write_predictions_csv(path, arrays, CLASSES)
    assert read_predictions_csv(path)["p_AC"].tolist() == [0.75]
    assert [p.name for p in path.parent.iterdir()] == ["predictions.csv"]  # no temporary files left


def test_empty_predictions_are_valid(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(PRED_HEADER)
    assert len(read_predictions_csv(path, CLASSES)) == 0


@pytest.mark.parametrize("body, message", [
    ("image_id,xmin,ymin,xmax,p_SCC\n", "missing column(s) ymax"),
    ("image_id,xmin,ymin,xmax,ymax\n", "no p_<class> probability columns"),
    ("image_id,xmin,ymin,xmax,ymax,p_SCC\n", "missing column(s) p_AC"),
    (PRED_HEADER + "a,0.1,0.1,0.2,0.2,0.5,0.5\na,0.1,,0.2,0.2,0.5,0.5\n", "p.csv:3: column ymin has '', not a number"),
    (PRED_HEADER + "a,0.1,0.1,0.2,0.2,high,0.5\n", "p.csv:2: column p_SCC has 'high', not a number"),
    (PRED_HEADER + "a,0.1,0.1,0.2,0.2,nan,0.5\n", "p.csv:2: column p_SCC has 'nan', not a number"),
    (PRED_HEADER + "a,0.1,0.1,0.2,0.2,0.5,0.5\nb,0.1,0.1,0.2,0.2,0.5,1.5\n", "p.csv:3: column p_AC is out of range"),
    (PRED_HEADER + "a,10,10,20,20,0.5,0.5\n", "p.csv:2: column xmin is out of range; coordinates must be normalised"),
    (PRED_HEADER + "a,0.3,0.1,0.2,0.2,0.5,0.5\n", "p.csv:2: zero-area box"),
    (PRED_HEADER + ",0.1,0.1,0.2,0.2,0.5,0.5\n", "p.csv:2: empty image_id"),
    ("", "p.csv: file is empty"),
])
def test_predictions_validation_errors(tmp_path, body, message):
    path = tmp_path / "p.csv"
    path.write_text(body)
    with pytest.raises(DataError) as err:
        read_predictions_csv(path, CLASSES if "p_<class>" not in message else None)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_write_predictions_rejects_missing_columns_without_leaving_a_file(tmp_path):
    with pytest.raises(ValueError, match="p_AC"):
        write_predictions_csv(tmp_path / "p.csv", frame().drop(columns=["p_AC"]), CLASSES)
    assert list(tmp_path.iterdir()) == []


def test_detections_csv_keeps_every_column(tmp_path):
    path = tmp_path / "detections.csv"
    df = frame()
    write_detections_csv(path, df[list(reversed(df.columns))], CLASSES)
    back = pd.read_csv(path)
    assert list(back.columns) == detections_columns(CLASSES)
    np.testing.assert_allclose(back["x1"], df["x1"])
    assert back["label"].tolist() == df["label"].tolist()
    # detections.csv carries the normalised columns too, so the evaluator can read it
    assert len(read_predictions_csv(path, CLASSES)) == 3


def test_challenge_dataset_round_trip_with_masks_and_splits(tmp_path):
    src = make_challenge(tmp_path / "src", masks=("a",), splits="image_id,split\na,train\nb,test\nc,val\n")
    ds = load_dataset(src)
    for mode in ("copy", "link"):
        out = write_challenge_dataset(ds, tmp_path / mode, images=mode)
        back = load_dataset(out)
        assert back.problems == [] and back.class_names == ds.class_names
        assert [r.image_id for r in back] == [r.image_id for r in ds]
        for r, b in zip(ds, back):
            np.testing.assert_allclose(b.boxes, r.boxes, atol=1e-3)
            np.testing.assert_array_equal(b.labels, r.labels)
            assert (b.split, b.width, b.height, b.mask_path is None) == (r.split, r.width, r.height, r.mask_path is None)
    assert (tmp_path / "link" / "images" / "a.png").is_symlink()
    meta = pd.read_csv(tmp_path / "copy" / "metadata.csv")
    assert meta.to_dict("list") == {"image_id": ["a", "b", "c"], "width": [40, 10, 16], "height": [20, 10, 16],
                                    "bbox_count": [2, 1, 0]}


def test_challenge_writer_rejects_ids_that_are_not_file_names(tmp_path):
    ds = load_dataset(make_challenge(tmp_path / "src"))
    ds.records[0].image_id = "../escape"
    with pytest.raises(DataError, match="cannot be a file name"):
        write_challenge_dataset(ds, tmp_path / "out")
    assert not (tmp_path / "out").exists()
