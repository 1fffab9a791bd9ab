"""Config merging: defaults, the user's file, overrides, and clear errors for typos."""
from __future__ import annotations

import pytest

import yaml

from cytocore.config import dump_yaml, load_config, merge, parse_overrides, set_path
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


def test_free_form_section_stays_open_after_a_layer_fills_it(tmp_path):
    """A seg config's ``postprocess: {min_area: 12}`` must not make ``--set postprocess.threshold`` or a
    compare override (a merge over the merged config) an unknown option."""
    defaults = {"postprocess": {}, "fusion": {"logistic": None}, "train": {"epochs": 10}}
    f = tmp_path / "c.yaml"
    f.write_text("postprocess:\n  min_area: 12\n  nested: {a: 1}\nfusion:\n  logistic: {coef: [1]}\n")
    cfg = load_config(defaults, f, ["postprocess.threshold=0.4", "postprocess.nested.b=2"])
    assert cfg["postprocess"] == {"min_area": 12, "nested": {"a": 1, "b": 2}, "threshold": 0.4}
    later = merge(cfg, {"postprocess": {"markers": "head_peaks"}, "fusion": {"logistic": {"intercept": 0.5}}}, "compare")
    assert later["postprocess"]["markers"] == "head_peaks"
    assert later["fusion"]["logistic"] == {"coef": [1], "intercept": 0.5}
    # the rest stays strict, and the marks never reach a written config
    with pytest.raises(CytoFuseError, match=r"unknown option 'train.epoch'"):
        merge(later, {"train": {"epoch": 3}}, "compare")
    assert yaml.safe_load(dump_yaml(later)) == later


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


def test_an_empty_mapping_over_a_filled_section_is_refused_not_ignored(tmp_path):
    """Sections merge, so ``--set key={}`` would leave the section as it was while the user meant to clear it."""
    f = tmp_path / "c.yaml"
    f.write_text("extra:\n  readings: {hypotheses: [1, 2]}\n")
    with pytest.raises(CytoFuseError, match=r"--set extra=\{\}: .*changes nothing.*readings"):
        load_config(DEFAULTS, f, ["extra={}"])
    with pytest.raises(CytoFuseError, match=r"--set extra.readings=\{\}"):
        load_config(DEFAULTS, f, ["extra.readings={}"])
    assert load_config(DEFAULTS, None, ["extra={}"])["extra"] == {}  # empty over empty: nothing lost, no error
    assert load_config(DEFAULTS, f, ["extra.readings.hypotheses=[]"])["extra"]["readings"] == {"hypotheses": []}
