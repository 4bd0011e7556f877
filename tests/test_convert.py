"""End-to-end tests of `python -m data_prep.convert` on small phantom cases.

The input comes from `data_prep.phantom.generate` when the phantom exposes it, else from the analytic series of
`tests/convert_fixtures.py` (same folder layout and motion.json conventions).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data_prep import convert
from data_prep import dicom_io
from data_prep import records
from data_prep.convert import job as convert_job
from tests import convert_fixtures as cf

SIZE = 96
PHASES = ("arterial", "portal")


def _make_input(root: pathlib.Path) -> list[pathlib.Path]:
  try:
    from data_prep import phantom  # pylint: disable=import-outside-toplevel
    generate = phantom.generate
  except (ImportError, AttributeError):
    generate = None
  if generate is not None:
    return list(generate(root, cases=4, seed=0, size=SIZE, slices=10, slice_thickness=5.0,
                         pixel_spacing=0.75 * 512 / SIZE))
  motions = [((2.0, -1.5), 1.0, 5.0), ((-3.0, 1.0), -1.5, -4.0), ((9.0, 4.0), 0.0, 0.0), ((1.0, 2.5), 0.5, 7.0)]
  return [cf.write_case(root, f"case_{i:04d}", size=SIZE, phases=("arterial", "portal", "delayed"), shift_px=s,
                        rotation_deg=r, table_shift_mm=t, seed=10 * i)["dir"]
          for i, (s, r, t) in enumerate(motions)]


def _convert(inp, out, *extra, key=None):
  argv = [f"--input={inp}", f"--output={out}", f"--phases={','.join(PHASES)}", f"--image_size={SIZE}",
          "--split_fractions=0.5,0.25,0.25", *extra]
  if key:
    argv.append(f"--key_file={key}")
  return convert.main(argv)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  base = tmp_path_factory.mktemp("conv")
  cases = _make_input(base / "in")
  # A fixed key where the converter would create a random one: the same splits every run (two training patients,
  # so that every phase has several training shards below).
  (base / "out.hmac_key").write_text("00" * 32)
  proc = subprocess.run([sys.executable, "-m", "data_prep.convert", f"--input={base / 'in'}",
                         f"--output={base / 'out'}", f"--phases={','.join(PHASES)}", f"--image_size={SIZE}",
                         "--split_fractions=0.5,0.25,0.25", "--workers=2", "--verbose"],
                        capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1], check=False)
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((base / "out" / "manifest.json").read_text())
  return {"base": base, "in": base / "in", "out": base / "out", "cases": cases, "manifest": manifest,
          "log": proc.stdout + proc.stderr}


def _all_records(phase_dir):
  out = []
  for split in records.SPLITS:
    src = records.load_split(phase_dir, split)
    out.extend((split, src[i]) for i in range(len(src)))
  return out


def _case_stats(manifest, phase):
  """folder -> per-case stats of a phase."""
  return {c["folder"]: c for c in manifest["phases"][phase]["cases"].values()}


def test_alignment_recovers_the_phantom_motion(dataset):
  for phase in PHASES:
    stats = _case_stats(dataset["manifest"], phase)
    for case in dataset["cases"]:
      motion = json.loads((case / "motion.json").read_text())
      m = motion["phases"][phase]
      s = stats[case.name]
      thickness = motion["slice_thickness_mm"]
      assert abs(s["z_offset_mm"] - m["table_shift_mm"]) <= thickness / 2, (case.name, phase, s, m)
      if m["large_misalignment"]:
        continue
      assert s["examples"] > 0, (case.name, phase, s)
      np.testing.assert_allclose(s["shift_px_mean"], m["in_plane_shift_px"], atol=0.5, err_msg=case.name)


def test_large_motion_cases_are_excluded(dataset):
  found_large = False
  for phase in PHASES:
    stats = _case_stats(dataset["manifest"], phase)
    excluded = dataset["manifest"]["phases"][phase]["excluded_pairs"]
    for case in dataset["cases"]:
      m = json.loads((case / "motion.json").read_text())["phases"][phase]
      s = stats[case.name]
      if m["large_misalignment"]:
        found_large = True
        assert s["examples"] == 0, (case.name, s)
        assert any(e["case_id"] == s["case_id"] and e["reason"].startswith("misalignment") for e in excluded)
      elif np.hypot(*m["in_plane_shift_px"]) < 5.0:
        assert s["examples"] > 0
  assert found_large, "the test input should contain a large-motion case"


def test_splits_are_disjoint_by_case(dataset):
  for phase in PHASES:
    by_split = {}
    for split, rec in _all_records(dataset["out"] / phase):
      by_split.setdefault(split, set()).add(rec["case_id"])
    splits = list(by_split.values())
    for i, a in enumerate(splits):
      for b in splits[i + 1:]:
        assert not a & b
    manifest_counts = dataset["manifest"]["phases"][phase]["splits"]
    assert sum(v["examples"] for v in manifest_counts.values()) == len(_all_records(dataset["out"] / phase))


def test_hu_round_trips_exactly(dataset):
  phase = PHASES[0]
  folders = {c["case_id"]: c["folder"] for c in dataset["manifest"]["phases"][phase]["cases"].values()}
  checked = 0
  for _, rec in _all_records(dataset["out"] / phase):
    folder = dataset["in"] / folders[rec["case_id"].decode()] / "non_contrast"
    by_z = {}
    for p in folder.iterdir():
      ds = pydicom.dcmread(p)
      by_z[round(float(ds.ImagePositionPatient[2]), 3)] = ds
    ds = by_z[round(float(rec["table_z_mm"]), 3)]
    hu = np.rint(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.int16)
    assert rec["pre"].shape == (3, SIZE, SIZE) and rec["pre"].dtype == np.int16
    np.testing.assert_array_equal(rec["pre"][1], hu)
    assert rec["post"].shape == (SIZE, SIZE) and rec["body_mask"].dtype == np.uint8
    assert rec["misalignment_px"] <= 6.0
    checked += 1
  assert checked > 0


def _identifiers(root: pathlib.Path) -> set[str]:
  out = set()
  for p in root.rglob("*.dcm"):
    ds = pydicom.dcmread(p, stop_before_pixels=True)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "PerformingPhysicianName", "StudyDate", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
      value = str(ds.get(kw, "") or "").strip()
      if len(value) >= 4:
        out.add(value)
        out.update(part for part in value.split("^") if len(part) >= 4)
  return out


def test_no_identifier_in_any_output_byte(dataset):
  ids = _identifiers(dataset["in"])
  assert ids
  blobs = [("log", dataset["log"].encode())]
  blobs += [(str(p), p.read_bytes()) for p in dataset["out"].rglob("*") if p.is_file()]
  for name, blob in blobs:
    for value in ids:
      assert value.encode() not in blob, f"{value!r} found in {name}"
  # The key lives beside the output, not inside it.
  assert (dataset["base"] / "out.hmac_key").exists()
  assert not list(dataset["out"].rglob("*hmac*"))


def test_killed_run_resumes_to_the_same_dataset(dataset, tmp_path, monkeypatch):
  key = dataset["base"] / "out.hmac_key"
  out = tmp_path / "out"
  real = convert_job.run_case
  calls = []

  def dying(plan, settings, cache):
    if len(calls) == 2:
      raise KeyboardInterrupt  # the "kill" after two finished cases
    calls.append(plan)
    return real(plan, settings, cache)

  monkeypatch.setattr(convert_job, "run_case", dying)
  with pytest.raises(KeyboardInterrupt):
    _convert(dataset["in"], out, key=key)
  monkeypatch.setattr(convert_job, "run_case", real)
  # Debris a kill can leave: a temporary cache file, a temporary shard, a stale shard with a final name.
  cache = next((out / convert.CACHE_DIR).iterdir())
  (cache / ("x.json" + records.TMP_SUFFIX)).write_text("{")
  (out / PHASES[0]).mkdir(parents=True, exist_ok=True)
  (out / PHASES[0] / ("vcect-train.array_record-00000-of-00001" + records.TMP_SUFFIX)).write_bytes(b"partial")
  (out / PHASES[0] / "vcect-train.array_record-00000-of-00009").write_bytes(b"stale")
  assert _convert(dataset["in"], out, key=key) == 0
  assert not (out / convert.CACHE_DIR).exists()
  for phase in PHASES:
    names = sorted(p.name for p in (out / phase).iterdir())
    assert names == sorted(p.name for p in (dataset["out"] / phase).iterdir())
    _assert_same_records(out / phase, dataset["out"] / phase)


def _assert_same_records(got_dir, want_dir):
  got, want = _all_records(got_dir), _all_records(want_dir)
  assert len(got) == len(want)
  for (s1, a), (s2, b) in zip(got, want):
    assert s1 == s2
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_small_shards_written_in_parallel_hold_the_same_records(dataset, tmp_path):
  # Shards cut across cases and written by two worker processes: same records, same order, several shards.
  out = tmp_path / "out"
  key = dataset["base"] / "out.hmac_key"
  assert _convert(dataset["in"], out, "--workers=2", "--examples_per_shard=5", key=key) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  for phase in PHASES:
    splits = manifest["phases"][phase]["splits"]
    assert splits["train"]["shards"] == -(-splits["train"]["examples"] // 5) > 1
    _assert_same_records(out / phase, dataset["out"] / phase)


def test_tfrecord_output_reads_back(dataset, tmp_path):
  out = tmp_path / "out"
  assert _convert(dataset["in"], out, "--file_format=tfrecord", "--phases=arterial",
                  key=dataset["base"] / "out.hmac_key") == 0
  phase_dir = out / "arterial"
  manifest = json.loads((out / "manifest.json").read_text())
  files = sorted(str(p) for p in phase_dir.glob("vcect-*.tfrecord-*"))
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import grain  # pylint: disable=import-outside-toplevel
  feats = records.features(SIZE)
  n_tf = 0
  for raw in tf.data.TFRecordDataset(files):  # CRC-checked reads
    ex = feats.deserialize_example_np(raw.numpy())
    assert ex["pre"].shape == (3, SIZE, SIZE)
    n_tf += 1
  assert n_tf == sum(v["examples"] for v in manifest["phases"]["arterial"]["splits"].values()) > 0
  n_grain = sum(1 for f in files for _ in grain.experimental.TFRecordIterDataset(f))
  assert n_grain == n_tf
  assert sum(len(records.load_split(phase_dir, s)) for s in records.SPLITS) == n_tf


def _bad_input(root: pathlib.Path) -> None:
  """One good study plus every kind of bad input."""
  cf.write_case(root, "good", size=48, slices=8, spacing=6.0, shift_px=(1.0, 1.0))
  (root / "readme.txt").write_text("not dicom")
  bad = cf.write_case(root, "broken", size=48, slices=8, spacing=6.0)["dir"]
  files = sorted((bad / "arterial").iterdir())
  data = files[0].read_bytes()
  files[0].write_bytes(data[: len(data) - 500])  # truncated
  ds = pydicom.dcmread(files[1])
  del ds.PixelData
  ds.save_as(files[1])  # no pixel data
  # Missing slice in a non-contrast series.
  gap = cf.write_case(root, "gap", size=48, slices=8, spacing=6.0)["dir"]
  sorted_pre = sorted((gap / "non_contrast").iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
  sorted_pre[3].unlink()
  # Duplicate slice position.
  dup = cf.write_case(root, "dup", size=48, slices=8, spacing=6.0, phases=("portal",))["dir"]
  src = sorted((dup / "portal").iterdir())[0]
  ds = pydicom.dcmread(src)
  ds.SOPInstanceUID = generate_uid()
  ds.save_as(dup / "portal" / "copy.dcm")
  # Inconsistent geometry: mixed orientation.
  mixed = cf.write_case(root, "mixed", size=48, slices=8, spacing=6.0)["dir"]
  p = sorted((mixed / "arterial").iterdir())[2]
  ds = pydicom.dcmread(p)
  ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.199]
  ds.save_as(p)
  # No non-contrast series; unknown description; non-CT modality.
  nonc = cf.write_case(root, "no_pre", size=48, slices=8, spacing=6.0)["dir"]
  for p in (nonc / "non_contrast").iterdir():
    ds = pydicom.dcmread(p)
    ds.SeriesDescription = "SOMETHING ODD"
    ds.save_as(p)
  mr = cf.write_case(root, "mr", size=48, slices=8, spacing=6.0)["dir"]
  for p in (mr / "arterial").iterdir():
    ds = pydicom.dcmread(p)
    ds.Modality = "MR"
    ds.save_as(p)
  # JPEG-LS pixel data (no safe decoder installed here).
  jls = cf.write_case(root, "jpegls", size=48, slices=8, spacing=6.0)["dir"]
  template = pydicom.dcmread(get_testdata_file("JPEGLSNearLossless_16.dcm"))
  for p in (jls / "arterial").iterdir():
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = template.file_meta.TransferSyntaxUID
    ds.Rows, ds.Columns = template.Rows, template.Columns
    ds.PixelData = template.PixelData
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)


def test_every_bad_input_is_skipped_with_a_reason(tmp_path, capsys):
  _bad_input(tmp_path / "in")
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}",
                       "--phases=arterial,portal", "--image_size=48"]) == 0
  m = json.loads((tmp_path / "out" / "manifest.json").read_text())
  files = {f["path"]: f["reason"] for f in m["skipped_files"]}
  assert files["readme.txt"] == "not a DICOM file"
  assert any("truncated" in r for p, r in files.items() if p.startswith("broken"))
  assert any(r == "no pixel data" for p, r in files.items() if p.startswith("broken"))
  assert any("not CT" in r for p, r in files.items() if p.startswith("mr"))
  series = [(s.get("folder", "") + "/" + s.get("series", ""), s["reason"]) for s in m["skipped_series"]]
  assert any("unknown series description" in r for w, r in series if "no_pre" in w)
  art = {c["folder"]: c["reason"] for c in m["phases"]["arterial"]["skipped_cases"]}
  por = {c["folder"]: c["reason"] for c in m["phases"]["portal"]["skipped_cases"]}
  assert "missing slices" in art["gap"]
  assert "duplicate slice positions" in por["dup"]
  assert "no arterial series" in art["dup"]
  assert "mixed orientation" in art["mixed"]
  assert "no non-contrast series" in art["no_pre"]
  assert "python-gdcm" in art["jpegls"] or "jpegls" not in art
  assert "slice" in art["broken"] or "missing" in art["broken"]
  good = [c for c in m["phases"]["arterial"]["cases"].values() if c["folder"] == "good"]
  assert good and good[0]["examples"] > 0
  assert "Traceback" not in capsys.readouterr().err


def test_nothing_converted_exits_non_zero(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.txt").write_text("x")
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}"]) == 2
  assert "nothing converted" in capsys.readouterr().err


def test_series_csv_and_rules_file(tmp_path):
  case = cf.write_case(tmp_path / "in", "c", size=48, slices=8, spacing=6.0)["dir"]
  studies, _ = dicom_io.scan(tmp_path / "in")
  rows = ["study,series_uid,phase"]
  for s in studies[0].series:
    rows.append(f"x,{s.uid},{'non_contrast' if s.folder.name == 'non_contrast' else 'arterial'}")
    for p in s.slices:
      ds = pydicom.dcmread(p.path)
      ds.SeriesDescription = "Series " + str(ds.SeriesNumber)
      ds.save_as(p.path)
  (tmp_path / "s.csv").write_text("\n".join(rows))
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'o1'}", "--phases=arterial",
                       "--image_size=48", f"--series_csv={tmp_path / 's.csv'}"]) == 0
  (tmp_path / "rules.json").write_text(json.dumps([["non_contrast", r"series 1$"], ["arterial", r"series 2$"]]))
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'o2'}", "--phases=arterial",
                       "--image_size=48", f"--phase_rules={tmp_path / 'rules.json'}"]) == 0
  assert case.exists()


def _plans(n):
  from data_prep import convert
  return [convert.CasePlan(f"{i:016x}", "t", "", f"case_{i}", None, {}) for i in range(n)]


def test_rank_splits_follow_fractions_and_fill_every_split():
  from data_prep import convert
  settings = convert.Settings(input="in", output="out", split_fractions=(0.6, 0.2, 0.2), split_method="rank")
  for n, want in ((5, (3, 1, 1)), (8, (4, 2, 2)), (10, (6, 2, 2))):
    cases = _plans(n)
    for c in cases:
      c.split = convert.assign_split(c.case_id, settings)
    convert.balance_splits(cases, settings)
    got = tuple(sum(c.split == s for c in cases) for s in ("train", "validation", "test"))
    assert got == want, (n, got)
  # Deterministic: the same set of patients, in any order, gets the same splits.
  a, b = _plans(8), _plans(8)[::-1]
  for cs in (a, b):
    convert.balance_splits(cs, settings)
  assert {c.case_id: c.split for c in a} == {c.case_id: c.split for c in b}


def test_hash_splits_never_leave_a_split_empty_when_patients_suffice():
  from data_prep import convert
  for seed in range(20):
    settings = convert.Settings(input="in", output="out", split_fractions=(0.6, 0.2, 0.2), split_seed=seed)
    cases = _plans(4)
    for c in cases:
      c.split = convert.assign_split(c.case_id, settings)
    before = {c.case_id: c.split for c in cases}
    convert.balance_splits(cases, settings)
    assert {c.split for c in cases} == {"train", "validation", "test"}, seed
    # Only the patients needed to fill empty splits move.
    moved = sum(before[c.case_id] != c.split for c in cases)
    assert moved == 3 - len(set(before.values())), seed


def test_existing_output_with_other_settings_is_refused_unless_overwrite(tmp_path, capsys):
  cf.write_case(tmp_path / "in", "c", size=48, slices=8, spacing=6.0)
  out = tmp_path / "out"
  args = [f"--input={tmp_path / 'in'}", f"--output={out}", "--phases=arterial", "--split_fractions=1,0,0"]
  assert convert.main(args + ["--image_size=48"]) == 0
  assert convert.main(args + ["--image_size=48", "--workers=2"]) == 0  # the same conversion again
  capsys.readouterr()
  assert convert.main(args + ["--image_size=32"]) == 2
  err = capsys.readouterr().err
  assert "other settings" in err and "image_size: 48 -> 32" in err and "--overwrite" in err
  assert json.loads((out / "manifest.json").read_text())["settings"]["image_size"] == 48  # untouched
  assert convert.main(args + ["--image_size=32", "--overwrite"]) == 0
  assert json.loads((out / "manifest.json").read_text())["settings"]["image_size"] == 32
  assert records.load_split(out / "arterial", "train")[0]["post"].shape == (32, 32)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'mine'}", "--overwrite"]) == 2
  assert "not a conversion" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").exists()



def test_a_lone_series_of_unknown_phase_says_how_to_name_it_and_leaves_no_debris(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "ct.dcm").write_bytes(pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes())
  out = tmp_path / "out"
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={out}"]) == 2
  err = capsys.readouterr().err
  assert "nothing converted" in err and "--series_csv" in err and "--phase_rules" in err
  assert len([line for line in err.splitlines() if "error" in line]) == 1 and "Traceback" not in err
  assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no .cache/, no empty phase folders
  assert not (tmp_path / "out.hmac_key").exists()  # the key made for this run pseudonymised nothing
