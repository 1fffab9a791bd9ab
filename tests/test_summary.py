"""`cytofuse data summary`: the numbers and the text report."""
from __future__ import annotations

import json

import pytest

from cytocore.readers import load_dataset
from cytocore.summary import format_summary, summarise
from experiments.cli import run
from tests.conftest import shared_dataset
from tests.test_readers import HEADER, make_challenge


def small(tmp_path):
    labels = HEADER + "a,0.1,0.1,0.5,0.5,1,0\na,0.5,0.5,1.0,1.0,1,1\nb,0.2,0.2,0.4,0.6,0,1\nb,0.2,0.2,0.2,0.6,0,1\n"
    metadata = "image_id,width,height,bbox_count\na,40,20,2\nb,10,10,2\nc,16,16,0\n"
    return make_challenge(tmp_path, labels=labels, metadata=metadata, masks=("a",),
                          splits="image_id,split\na,train\nb,val\n")


def test_summarise_counts(tmp_path):
    info = summarise(load_dataset(small(tmp_path)))
    json.dumps(info)  # plain values only: `--json` prints it directly
    assert info["format"] == "challenge" and info["classes"] == ["tumour", "immune"]
    assert (info["n_images"], info["n_healthy"], info["n_boxes"]) == (3, 1, 3)
    assert info["boxes_per_class"] == {"tumour": 2, "immune": 2}
    assert info["images_per_class"] == {"tumour": 1, "immune": 2}
    assert info["multi_label_boxes"] == 1
    assert info["splits"]["train"] == {"images": 1, "healthy": 0, "boxes": 2, "boxes_per_class": {"tumour": 2, "immune": 1}}
    assert info["splits"]["(none)"]["images"] == 1 and info["splits"]["(none)"]["healthy"] == 1
    assert info["image_size"] == {"min_width": 10, "max_width": 40, "min_height": 10, "max_height": 20}
    assert info["masks"] == {"present": True, "images_with_mask": 1}
    assert info["problems"] == {"error": 1, "warning": 0}
    assert "labels.csv:5: zero-area box" in info["problem_lines"][0]


def test_format_summary_text(tmp_path):
    text = format_summary(summarise(load_dataset(small(tmp_path))))
    for needle in ("images      3  (1 healthy", "tumour", "immune", "splits", "train", "(none)",
                   "1 error(s), 0 warning(s)", "labels.csv:5: zero-area box", "masks       1 of 3 images"):
        assert needle in text, needle


def test_cli_data_summary(tmp_path, capsys):
    root = small(tmp_path)
    assert run(["data", "summary", str(root)]) == 0
    assert "tumour" in capsys.readouterr().out
    assert run(["data", "summary", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_boxes"] == 3
    assert run(["data", "summary", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name, images, boxes", [("bccd", 364, 4886), ("monusac", 46, 8343), ("lc25000-lung", 600, 600)])
def test_summary_of_real_data(name, images, boxes):
    info = summarise(load_dataset(shared_dataset(name)))
    assert (info["n_images"], info["n_boxes"]) == (images, boxes)
    assert name in format_summary(info)
