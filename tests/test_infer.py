"""Inference: phantom and real third-party DICOM in, virtual series out (DICOM, NIfTI, preview); bad inputs."""

import pathlib
import shutil
import subprocess
import types

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from data_prep import phantom
from vcect_jax import checkpoint
from vcect_jax import hu as hu_lib
from vcect_jax import infer
from vcect_jax import series_out
from tests.conftest import smoke_config

DCIODVFY = shutil.which("dciodvfy")
_FAKE_GENERATORS = {}  # one untrained generator per fake checkpoint name, shared by the tests


def _fresh_generator(config):
  from flax import nnx

  from vcect_jax import models

  return models.Generator(config.model.generator, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def predictor():
  """An untrained smoke-size generator: the geometry and bookkeeping do not depend on the weights."""
  config = smoke_config("arterial")
  return infer.Predictor(_fresh_generator(config), config, step=7, path="fresh-arterial")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """One phantom study folder (four series, 6 slices of 64x64, non-DICOM label files beside them)."""
  out = tmp_path_factory.mktemp("phantom")
  return phantom.generate(out, cases=1, seed=3, size=64, slices=6, slice_thickness=5.0, pixel_spacing=6.0)[0]


@pytest.fixture
def fake_checkpoints(monkeypatch):
  """`checkpoint.load_generator` that builds a fresh generator for paths named like `<phase>_ckpt`."""

  def load_generator(path):
    name = pathlib.Path(path).name
    if not name.endswith("_ckpt"):
      raise ValueError("structure of the checkpoint does not match")
    config = smoke_config(name[:-len("_ckpt")])
    if name not in _FAKE_GENERATORS:
      _FAKE_GENERATORS[name] = _fresh_generator(config)
    return types.SimpleNamespace(config=config, generator=_FAKE_GENERATORS[name], step=5, path=path)

  monkeypatch.setattr(checkpoint, "load_generator", load_generator, raising=False)

  def make(root, phase):
    path = pathlib.Path(root) / f"{phase}_ckpt"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)

  return make


def _copy_series(study, phase, dest):
  shutil.copytree(study / phase, dest)
  return dest


def _dciodvfy_errors(path):
  result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
  return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def _sorted_input(folder):
  files = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(pathlib.Path(folder).glob("*.dcm"))]
  return {ds.SOPInstanceUID: ds for ds in files}


# ---------------------------------------------------------------- round trips


def test_phantom_round_trip_dicom_and_nifti(study, predictor, tmp_path):
  out = tmp_path / "out"
  summary = infer.run(study, out, {"arterial": predictor}, fmt="both", preview=True)
  assert summary["phases"]["arterial"]["files"] == 6 and not summary["warnings"]
  sources = _sorted_input(study / "non_contrast")
  written = sorted((out / "arterial").glob("*.dcm"))
  assert len(written) == 6
  series_uids, sop_uids = set(), set()
  for path in written:
    ds = pydicom.dcmread(path)
    src = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows",
                    "Columns", "FrameOfReferenceUID", "StudyInstanceUID", "PatientID", "PatientName",
                    "AccessionNumber", "InstanceNumber"):
      assert ds[keyword].value == src[keyword].value, keyword
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "SYNTHETIC" in ds.SeriesDescription and "ARTERIAL" in ds.SeriesDescription
    assert "fresh-arterial" in ds.DerivationDescription and "step 7" in ds.DerivationDescription
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID not in sources
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    assert float(ds.WindowWidth) > 0
    assert ds.pixel_array.shape == (64, 64)
    series_uids.add(ds.SeriesInstanceUID)
    sop_uids.add(ds.SOPInstanceUID)
  assert len(series_uids) == 1 and len(sop_uids) == 6

  # SimpleITK reads the DICOM output with the input's geometry, and the NIfTI output has the same geometry.
  def itk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()

  source_image, virtual_image = itk_series(study / "non_contrast"), itk_series(out / "arterial")
  nifti = sitk.ReadImage(str(out / "arterial.nii.gz"))
  for image in (virtual_image, nifti):
    np.testing.assert_allclose(image.GetOrigin(), source_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), source_image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), source_image.GetDirection(), atol=1e-6)
  np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti), sitk.GetArrayFromImage(virtual_image))
  # nibabel (RAS) agrees with the DICOM positions (LPS) of every slice.
  affine = nib.load(str(out / "arterial.nii.gz")).affine
  ras_to_lps = np.diag([-1.0, -1.0, 1.0])
  positions = sorted((np.array(s.ImagePositionPatient, float) for s in sources.values()),
                     key=lambda p: p[2])  # ascending along this series' normal (+z)
  for k, ipp in enumerate(positions):
    np.testing.assert_allclose(ras_to_lps @ (affine @ [0, 0, k, 1])[:3], ipp, atol=1e-3)
  row_step = ras_to_lps @ affine[:3, 1]  # one row down: PixelSpacing[0] along the column direction cosine
  np.testing.assert_allclose(row_step, 6.0 * np.array([0, 1, 0]), atol=1e-4)
  assert (out / "preview.png").stat().st_size > 0 and (out / "summary.json").exists()
  if DCIODVFY:
    assert _dciodvfy_errors(written[0]) == []


def test_outside_window_keeps_input_hu(predictor):
  window = predictor.window
  rng = np.random.default_rng(0)
  pre = rng.integers(-1100, 1500, size=(4, 40, 48)).astype(np.int16)  # non-square: padded, resized, cropped back
  virtual = infer.predict_volume(predictor, pre, batch_size=3)
  assert virtual.shape == pre.shape and virtual.dtype == np.int16
  outside = (pre <= window.low) | (pre >= window.high)
  np.testing.assert_array_equal(virtual[outside], pre[outside])
  inside = (pre > window.low + hu_lib.BLEND_FRACTION * window.width) & (
      pre < window.high - hu_lib.BLEND_FRACTION * window.width)
  assert np.all((virtual[inside] >= window.low - 1) & (virtual[inside] <= window.high + 1))
  weight = hu_lib.blend_weight(np.linspace(window.low - 50, window.high + 50, 2001), window)
  assert np.all(np.diff(weight[:1000]) >= 0) and np.all(np.diff(weight[1001:]) <= 0)  # smooth ramp at each edge
  assert np.max(np.abs(np.diff(weight))) < 0.01


def test_blend_weight_edges():
  window = hu_lib.Window(30, 400)
  w = hu_lib.blend_weight(np.array([-1000, -170, -150, -130, 30, 110, 130, 150, 190, 230, 231]), window)
  np.testing.assert_allclose(w, [0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0], atol=1e-6)
  # A wide window keeps the non-contrast bone too (no soft tissue is 150 HU dense before contrast).
  wide = hu_lib.Window(330, 1000)
  w = hu_lib.blend_weight(np.array([-70, 60, 110, 130, 150, 400, 700, 830]), wide)
  np.testing.assert_allclose(w, [1, 1, 1, 0.5, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_array_equal(hu_lib.blend_weight(np.array([60, 140, 700], np.int16), wide),
                                hu_lib.blend_weight(np.array([60.0, 140.0, 700.0]), wide))  # the int16 table


# ---------------------------------------------------------------- real third-party files


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "693_J2KR.dcm"])
def test_real_single_slices(name, predictor, tmp_path):
  """GE CT_small (pydicom), a lossy JPEG 2000 CT slice (pydicom) and a lossless one (pydicom-data)."""
  path = get_testdata_file(name, download=False)  # never the network: the file is in a package or absent
  if path is None:
    pytest.skip(f"{name} comes with the pydicom-data package (requirements.txt), which is not installed")
  folder = tmp_path / "in"
  folder.mkdir()
  shutil.copy(path, folder / "slice.dcm")
  summary = infer.run(folder, tmp_path / "out", {"arterial": predictor}, fmt="both")
  assert any("1 slice" in w for w in summary["warnings"])
  (written,) = list((tmp_path / "out" / "arterial").glob("*.dcm"))
  ds, src = pydicom.dcmread(written), pydicom.dcmread(path)
  assert ds.pixel_array.shape == src.pixel_array.shape
  assert ds.ImagePositionPatient == src.ImagePositionPatient and ds.PatientID == src.PatientID
  if "LossyImageCompression" in src:
    assert ds.LossyImageCompression == src.LossyImageCompression
  source_hu = infer.read_input(path).hu[0]  # pixel padding (-2000 stored in these files) reads as air, -1024
  out_hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  outside = (source_hu <= -170) | (source_hu >= 230)
  np.testing.assert_array_equal(out_hu[outside], source_hu[outside])
  nifti = nib.load(str(tmp_path / "out" / "arterial.nii.gz"))
  assert nifti.shape == (src.Columns, src.Rows, 1)
  # A single file works as the input too.
  infer.run(path, tmp_path / "out_file", {"arterial": predictor})
  if DCIODVFY:
    assert _dciodvfy_errors(written) == []


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed; .ci/run "
                    "installs it where apt-get is available")
def test_dciodvfy_reports_no_errors(study, predictor, tmp_path):
  infer.run(study, tmp_path / "out", {"arterial": predictor})
  result = subprocess.run([DCIODVFY, str(next((tmp_path / "out" / "arterial").glob("*.dcm")))],
                          capture_output=True, text=True, timeout=60)
  output = result.stdout + result.stderr
  assert "CTImage" in output
  assert not [line for line in output.splitlines() if line.startswith("Error")], output


# ---------------------------------------------------------------- NIfTI input


def test_nifti_input_keeps_its_geometry(study, predictor, tmp_path):
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(study / "non_contrast")))
  image = sitk.DICOMOrient(reader.Execute(), "RAS")  # a non-LPS orientation, as nibabel writes
  path = tmp_path / "pre.nii.gz"
  sitk.WriteImage(image, str(path))
  with pytest.raises(infer.InferenceError, match="needs a DICOM input"):
    infer.run(path, tmp_path / "bad", {"arterial": predictor}, fmt="dicom")
  summary = infer.run(path, tmp_path / "out", {"arterial": predictor}, preview=True)
  out = sitk.ReadImage(summary["phases"]["arterial"]["nifti"])
  np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)
  np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-6)
  np.testing.assert_allclose(nib.load(str(path)).affine, nib.load(summary["phases"]["arterial"]["nifti"]).affine,
                             atol=1e-4)
  pre, virtual = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(out)
  outside = (pre <= -170) | (pre >= 230)
  np.testing.assert_array_equal(virtual[outside], pre[outside])
  # The same volume through the DICOM path gives the same virtual image.
  from_dicom = infer.predict_volume(predictor, infer.read_input(study).hu)
  from_nifti = sitk.GetArrayFromImage(sitk.DICOMOrient(out, "LPS"))[::-1]
  np.testing.assert_array_equal(from_dicom, from_nifti)


# ---------------------------------------------------------------- bad input


def test_no_dicom_and_not_ct(tmp_path, predictor):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(infer.InferenceError, match="no CT DICOM series"):
    infer.read_input(empty)
  (empty / "notes.txt").write_text("hello")
  with pytest.raises(infer.InferenceError, match="not a DICOM file"):
    infer.read_input(empty)
  mr = tmp_path / "mr"
  mr.mkdir()
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  ds.Modality = "MR"
  ds.save_as(mr / "a.dcm")
  with pytest.raises(infer.InferenceError, match="modality MR is not CT"):
    infer.read_input(mr)
  with pytest.raises(infer.InferenceError, match="not CT"):
    infer.read_input(mr / "a.dcm")
  with pytest.raises(infer.InferenceError, match="does not exist"):
    infer.read_input(tmp_path / "nowhere")


def test_several_series_need_series_uid(study, tmp_path, predictor):
  folder = tmp_path / "study"
  for phase in ("non_contrast", "arterial"):
    _copy_series(study, phase, folder / phase)
  for path in (folder / "non_contrast").glob("*.dcm"):
    ds = pydicom.dcmread(path)
    ds.SeriesDescription = "AXIAL 5mm"  # no rule recognises it
    ds.save_as(path)
  with pytest.raises(infer.InferenceError, match="--series_uid") as error:
    infer.read_input(folder)
  uid = pydicom.dcmread(next((folder / "non_contrast").glob("*.dcm"))).SeriesInstanceUID
  assert uid in str(error.value) and "AXIAL 5mm" in str(error.value) and "ARTERIAL" in str(error.value)
  assert infer.read_input(folder, series_uid=uid).series_uid == uid
  with pytest.raises(infer.InferenceError, match="no series with SeriesInstanceUID"):
    infer.read_input(folder, series_uid="1.2.3")
  with pytest.raises(infer.InferenceError, match="looks like 'arterial'"):
    infer.read_input(folder / "arterial")
  # The phantom's own study: the non-contrast series is found by the phase rules.
  assert "NON-CONTRAST" in infer.read_input(study).description


def test_missing_and_truncated_slices(study, tmp_path, predictor):
  folder = _copy_series(study, "non_contrast", tmp_path / "series")
  full = infer.read_input(folder)
  by_z = sorted(folder.glob("*.dcm"), key=lambda p: -float(pydicom.dcmread(p).ImagePositionPatient[2]))
  by_z[2].unlink()  # a missing slice
  data = by_z[4].read_bytes()
  by_z[4].write_bytes(data[:len(data) // 2])  # a truncated file
  series = infer.read_input(folder)
  assert any("truncated" in w for w in series.warnings) and any("missing slices: 2" in w for w in series.warnings)
  assert series.present.tolist() == [True, True, False, True, False, True]
  # Each missing position holds its nearest existing slice (the cranial one on a tie).
  np.testing.assert_array_equal(series.hu[[0, 1, 3, 5]], full.hu[[0, 1, 3, 5]])
  np.testing.assert_array_equal(series.hu[2], full.hu[1])
  np.testing.assert_array_equal(series.hu[4], full.hu[3])
  summary = infer.run(folder, tmp_path / "out", {"arterial": predictor}, fmt="both")
  assert summary["phases"]["arterial"]["files"] == 4
  assert nib.load(summary["phases"]["arterial"]["nifti"]).shape == (64, 64, 6)
  # Nothing readable left: refused.
  for path in folder.glob("*.dcm"):
    path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(infer.InferenceError, match="no CT DICOM series.*truncated|unreadable"):
    infer.read_input(folder)


def test_bad_geometry_is_refused(study, tmp_path):
  folder = _copy_series(study, "non_contrast", tmp_path / "series")
  path = next(folder.glob("*.dcm"))
  ds = pydicom.dcmread(path)
  ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
  ds.save_as(path)
  with pytest.raises(infer.InferenceError, match="cannot be used: mixed orientation"):
    infer.read_input(folder)


def test_incompatible_configs(predictor):
  config = smoke_config("arterial")
  generator = _fresh_generator(config)
  bad = smoke_config("arterial")
  bad.model.generator.in_channels = 1
  with pytest.raises(infer.InferenceError, match="3 channels"):
    infer.Predictor(generator, bad, path="x")
  bad = smoke_config("arterial")
  bad.data.image_size = 36
  with pytest.raises(infer.InferenceError, match="not a multiple of 16"):
    infer.Predictor(generator, bad, path="x")
  bad = smoke_config("arterial")
  bad.phase = "non_contrast"
  with pytest.raises(infer.InferenceError, match="phase 'non_contrast'"):
    infer.Predictor(generator, bad, path="x")
  bad = smoke_config("arterial")
  del bad.data["window"]
  with pytest.raises(infer.InferenceError, match="lacks a field"):
    infer.Predictor(generator, bad, path="x")


def test_checkpoint_phase_checks(fake_checkpoints, tmp_path):
  arterial, portal = fake_checkpoints(tmp_path, "arterial"), fake_checkpoints(tmp_path, "portal")
  assert list(infer.load_predictors([arterial, portal])) == ["arterial", "portal"]
  with pytest.raises(infer.InferenceError, match="trained for the portal phase, not arterial"):
    infer.load_predictors([portal], ["arterial"])
  with pytest.raises(infer.InferenceError, match="one checkpoint per phase"):
    infer.load_predictors([arterial], ["arterial", "portal"])
  with pytest.raises(infer.InferenceError, match="two checkpoints for the arterial phase"):
    infer.load_predictors([arterial, arterial])
  with pytest.raises(infer.InferenceError, match="does not exist"):
    infer.load_predictors([str(tmp_path / "nowhere")])
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  with pytest.raises(infer.InferenceError, match="does not match"):
    infer.load_predictors([str(wrong)])


# ---------------------------------------------------------------- the command


def test_command_line(study, fake_checkpoints, tmp_path, capsys):
  arterial, portal = fake_checkpoints(tmp_path, "arterial"), fake_checkpoints(tmp_path, "portal")
  out = tmp_path / "out"
  argv = [f"--checkpoint={arterial},{portal}", f"--input={study}", f"--output={out}", "--phase=arterial,portal",
          "--format=both", "--preview", "--batch_size=4"]
  assert infer.main(argv) == 0
  printed = capsys.readouterr().out
  assert "arterial: 6 DICOM files" in printed and "portal: 6 DICOM files" in printed and "preview" in printed
  assert sorted(p.name for p in out.iterdir()) == [
      "arterial", "arterial.nii.gz", "non_contrast.nii.gz", "portal", "portal.nii.gz", "preview.png",
      "summary.json"]
  # An existing output folder is refused without --overwrite, with a message and status 2, no traceback.
  assert infer.main(argv) == 2
  err = capsys.readouterr().err
  assert "exists; pass --overwrite" in err and "Traceback" not in err
  assert infer.main(argv + ["--overwrite", "--format=dicom", "--phase=arterial,portal"]) == 0
  assert not (out / "arterial.nii.gz").exists()
  assert infer.main([f"--checkpoint={portal}", "--phase=arterial", f"--input={study}",
                     f"--output={tmp_path / 'x'}"]) == 2
  assert "trained for the portal phase" in capsys.readouterr().err
  assert infer.main([f"--checkpoint={arterial}", f"--input={tmp_path / 'none'}", f"--output={tmp_path / 'y'}"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
  with pytest.raises(SystemExit):
    infer.main(["--help"])
  assert "example:" in capsys.readouterr().out


def test_interrupted_run_leaves_no_output(study, predictor, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(series_out, "write_preview", fail)
  with pytest.raises(KeyboardInterrupt):
    infer.run(study, tmp_path / "out", {"arterial": predictor}, preview=True)
  assert list(tmp_path.iterdir()) == []
  # An existing output survives a failed --overwrite run untouched.
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep").write_text("x")
  with pytest.raises(KeyboardInterrupt):
    infer.run(study, tmp_path / "out", {"arterial": predictor}, preview=True, overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep").exists()


# ---------------------------------------------------------------- real checkpoints


def _write_checkpoint(run_dir, config, state_config=None):
  """A step-0 checkpoint written by the training's own Checkpointer (untrained weights); with ``state_config``,
  the state of another model is stored under ``config`` (an incompatible checkpoint)."""
  from flax import nnx

  from vcect_jax import methods

  state = nnx.state(methods.create(state_config or config).create_state(steps_per_epoch=1))
  checkpointer = checkpoint.Checkpointer(str(pathlib.Path(run_dir) / "checkpoints"), async_save=False)
  checkpointer.save(0, state, {}, config)
  checkpointer.close()
  return str(run_dir)


def _checkpoint_config(phase):
  config = smoke_config(phase)
  config.loss.use_perceptual = False  # no pretext encoder needed
  config.perceptual.init_generator = False
  return config


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(checkpoint, "load_generator"), reason="checkpoint.load_generator not available")
def test_command_line_with_real_checkpoints(study, tmp_path, capsys):
  arterial = _write_checkpoint(tmp_path / "arterial_run", _checkpoint_config("arterial"))
  out = tmp_path / "out"
  assert infer.main([f"--checkpoint={arterial}", f"--input={study}", f"--output={out}", "--no_progress"]) == 0
  ds = pydicom.dcmread(next((out / "arterial").glob("*.dcm")))
  assert "ARTERIAL" in ds.SeriesDescription and "step 0" in ds.DerivationDescription
  assert infer.main([f"--checkpoint={arterial}", "--phase=portal", f"--input={study}",
                     f"--output={tmp_path / 'x'}"]) == 2
  assert "trained for the arterial phase, not portal" in capsys.readouterr().err
  wider = _checkpoint_config("arterial")
  wider.model.generator.widths = (8, 8, 8, 16, 16)
  incompatible = _write_checkpoint(tmp_path / "bad_run", _checkpoint_config("arterial"), state_config=wider)
  assert infer.main([f"--checkpoint={incompatible}", f"--input={study}", f"--output={tmp_path / 'y'}"]) == 2
  err = capsys.readouterr().err
  assert "does not match" in err and "Traceback" not in err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
