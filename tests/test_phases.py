"""Tests of data_prep.phases and data_prep.privacy (small pure functions of the converter)."""

import json

import pytest

from data_prep import phases
from data_prep import privacy


@pytest.mark.parametrize("description,phase", [
    ("NON-CONTRAST", "non_contrast"), ("ARTERIAL", "arterial"), ("PORTAL VENOUS", "portal"), ("DELAYED", "delayed"),
    ("Abd/Pel W/O 5mm", "non_contrast"), ("Unenhanced abdomen", "non_contrast"), ("Late arterial 35s", "arterial"),
    ("PV phase", "portal"), ("Venous 70s", "portal"), ("Delayed venous 5 min", "delayed"), ("Excretory", "delayed"),
    ("Topogram 0.6 T20f", "ignore"), ("Dose Report", "ignore"), ("Series 7", None),
])
def test_default_rules(description, phase):
  assert phases.PhaseRules().phase_of("1.2.3", description, "") == phase


def test_rules_file_and_csv(tmp_path):
  (tmp_path / "r.json").write_text(json.dumps({"non_contrast": ["^nat"], "portal": "^pv"}))
  rules = phases.PhaseRules.from_rules_file(tmp_path / "r.json")
  assert rules.phase_of("x", "NATIVE", "") == "non_contrast" and rules.phase_of("x", "ARTERIAL", "") is None
  (tmp_path / "s.csv").write_text("study,series_uid,phase\ns1,1.2.3,Portal\n")
  csv_rules = phases.PhaseRules.from_csv(tmp_path / "s.csv")
  assert csv_rules.phase_of("1.2.3", "", "") == "portal" and csv_rules.phase_of("9", "ARTERIAL", "") is None
  (tmp_path / "bad.csv").write_text("study,series_uid,phase\ns1,1.2.3,venous-ish\n")
  with pytest.raises(ValueError, match="unknown phase"):
    phases.PhaseRules.from_csv(tmp_path / "bad.csv")


def test_key_is_stored_beside_the_output_and_reused(tmp_path):
  key, path = privacy.load_or_create_key(tmp_path / "out")
  assert path == tmp_path / "out.hmac_key" and path.stat().st_mode & 0o077 == 0
  assert privacy.load_or_create_key(tmp_path / "out")[0] == key
  with pytest.raises(ValueError, match="must not be inside"):
    privacy.load_or_create_key(tmp_path / "out", tmp_path / "out" / "k")
  a = privacy.case_id(key, privacy.patient_identity("P1", "Doe^J", "19000101", "s"))
  assert len(a) == 16 and "P1" not in a
  assert a != privacy.case_id(b"other", privacy.patient_identity("P1", "Doe^J", "19000101", "s"))
