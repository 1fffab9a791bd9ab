"""Config merging: defaults, the user's file, overrides, and clear errors for typos."""
from __future__ import annotations

import pytest

from cytocore.config import load_config, merge, parse_overrides, set_path
from cytocore.errors import CytoFuseError

DEFAULTS = {"model": {"depth": 4, "width": 16}, "train": {"epochs": 10}, "extra": {}}


def test_user_file_and_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  width: 8\n")
    cfg = load_config(DEFAULTS, f, ["train.epochs=3"])
    assert cfg == {"model": {"depth": 4, "width": 8}, "train": {"epochs": 3}, "extra": {}}
    assert DEFAULTS["model"]["width"] == 16


def test_unknown_key_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  widht: 8\n")
    with pytest.raises(CytoFuseError, match=r"c.yaml: unknown option 'model.widht'"):
        load_config(DEFAULTS, f)


def test_free_form_sections_take_any_key():
    assert merge(DEFAULTS, {"extra": {"anything": 1}})["extra"] == {"anything": 1}


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  width: [8\n")
    with pytest.raises(CytoFuseError, match="bad.yaml:"):
        load_config(DEFAULTS, f)


def test_overrides_parse_values_and_set_path():
    assert parse_overrides(["a.b=1e-3", "c=true"]) == {"a": {"b": 1e-3}, "c": True}
    assert set_path(DEFAULTS, "model.width", 32)["model"]["width"] == 32
    with pytest.raises(CytoFuseError):
        parse_overrides(["novalue"])
