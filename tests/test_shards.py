"""Sharded inference: shares of a folder run into one run folder and merge into the outputs one process writes."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from cytocore.errors import CytoFuseError
from cytocore.shards import Shard, shard_from_env
from tests.test_fusion_pipeline import NAMES, _cells, checkpoints, pipeline  # noqa: F401 (fixtures)

COMBINED = ["predictions.csv", "detections.csv", "detections.geojson", "detections.coco.json"]


def test_shard_parse_and_share():
    assert Shard.parse("1/3") == Shard(1, 3)
    assert Shard(1, 3).take(list("abcdefg")) == ["b", "e"]
    shares = [Shard(i, 3).take(list("abcdefg")) for i in range(3)]
    assert sorted(sum(shares, [])) == list("abcdefg")  # disjoint and complete
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(CytoFuseError):
            Shard.parse(bad)


def test_shard_from_launcher_environment(monkeypatch):
    from cytocore import distributed

    monkeypatch.delenv("MS_ROLE", raising=False)
    assert shard_from_env() is None  # a plain process: no shard, nothing joined
    monkeypatch.setitem(distributed._state, "ready", True)  # as after joining an msrun job of 2 as rank 1
    monkeypatch.setitem(distributed._state, "rank", 1)
    monkeypatch.setitem(distributed._state, "size", 2)
    assert shard_from_env() == Shard(1, 2)


@pytest.fixture()
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(_cells(10 + i, (64 + 8 * i, 80))).save(images / f"img_{i}.png")
    (images / "img_4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # fails in its shard: reported by the merge
    return images


def test_two_shards_merge_into_the_single_run_outputs(pipeline, folder, tmp_path):  # noqa: F811
    single = pipeline.run_folder(folder, tmp_path / "single", progress=False)

    out = tmp_path / "sharded"
    first = pipeline.run_folder(folder, out, progress=False, shard=Shard(0, 2))
    assert first["waiting_for"] == ["1/2"] and first["n_done"] == 2  # img_0, img_2 (img_4 failed)
    assert not (out / "predictions.csv").exists() and not (out / "run.json").exists()
    merged = pipeline.run_folder(folder, out, progress=False, shard=Shard(1, 2))
    for name in COMBINED:
        assert (out / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    for key in ("n_images", "n_done", "n_failed", "n_detections"):
        assert merged[key] == single[key], key
    assert merged["n_failed"] == 1 and "img_4.png" in merged["failed"][0]["image"]
    assert json.loads((out / "run.json").read_text())["n_done"] == 4

    # Resuming a shard skips its finished images; the merge gives the same files again.
    again = pipeline.run_folder(folder, out, progress=False, shard=Shard(0, 2))
    marker = json.loads((out / "shards" / "0-of-2.json").read_text())
    assert marker["n_skipped"] == 2 and marker["images"] == ["img_0", "img_2", "img_4"]
    assert again["n_done"] == 4  # shard 1 finished before: this rerun merged again
    assert (out / "predictions.csv").read_bytes() == (tmp_path / "single" / "predictions.csv").read_bytes()


def test_a_rerun_shard_waits_for_its_partner_again(pipeline, folder, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    pipeline.run_folder(folder, out, progress=False, shard=Shard(0, 2))
    (folder / "img_00.png").write_bytes((folder / "img_0.png").read_bytes())  # the folder changed: new shares
    second = pipeline.run_folder(folder, out, progress=False, shard=Shard(1, 2))
    assert second["waiting_for"] == ["0/2"]  # shard 0's marker covers another image list
    merged = pipeline.run_folder(folder, out, progress=False)  # a plain run merges (everything else is done)
    assert merged["n_processed_now"] == 2 and merged["n_done"] == 5  # img_1, img_3 were shard 0's share now


def test_seg_predict_shards_merge_into_the_single_run_table(checkpoints, folder, tmp_path):  # noqa: F811
    from segmentation.predict import segment_folder

    single = segment_folder(checkpoints["seg"], folder, tmp_path / "single", progress=False)
    first = segment_folder(checkpoints["seg"], folder, tmp_path / "sharded", progress=False, shard=Shard(1, 2))
    assert first.combined is None and first.extra["waiting_for"] == ["0/2"]
    merged = segment_folder(checkpoints["seg"], folder, tmp_path / "sharded", progress=False, shard=Shard(0, 2))
    assert merged.n_done == single.n_done == 4 and len(merged.failed) == 1
    assert (tmp_path / "sharded" / "instances.csv").read_bytes() == (tmp_path / "single" / "instances.csv").read_bytes()
