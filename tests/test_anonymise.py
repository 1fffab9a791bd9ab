"""--anonymise keys: salted, stable across runs with the same key file, the key file kept outside the outputs."""
from __future__ import annotations

import os

import pytest

from cytocore.anonymise import Anonymiser, default_key_path
from cytocore.errors import DataError


def test_keys_are_salted_stable_and_mapped_in_a_separate_private_file(tmp_path):
    out = tmp_path / "run"
    key_path = default_key_path(out)
    assert key_path.parent == tmp_path and not str(key_path).startswith(str(out) + os.sep)
    a = Anonymiser(key_path)
    k1 = a.key("PATIENT-0042_slide", "PATIENT-0042_slide.svs")
    assert k1.startswith("anon-") and "0042" not in k1 and len(k1) == 21
    assert Anonymiser(tmp_path / "other.csv").key("PATIENT-0042_slide") != k1  # another salt, another key
    a.save()
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    again = Anonymiser(key_path)  # a second run reuses the salt: same keys, resumable
    assert again.key("PATIENT-0042_slide") == k1
    assert again.mapping["PATIENT-0042_slide"] == ("PATIENT-0042_slide.svs", k1)


def test_a_foreign_key_file_is_refused(tmp_path):
    (tmp_path / "k.csv").write_text("image_id,file,key\n")
    with pytest.raises(DataError, match="no #salt row"):
        Anonymiser(tmp_path / "k.csv")
