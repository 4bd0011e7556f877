"""Tests of data_prep.dicom_io: discovery, sorting, HU, geometry checks, decoders."""

import pathlib

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from data_prep import dicom_io
from tests import convert_fixtures as cf


def _series(tmp_path, **kw):
  z = (np.arange(6)[::-1] - 3) * 5.0
  hu = cf.anatomy(z, 32, 10.0, "non_contrast")
  cf.write_series(tmp_path / "s", hu, z, 10.0, "NON-CONTRAST", generate_uid(), 1, 5.0, **kw)
  studies, skipped = dicom_io.scan(tmp_path)
  assert not skipped
  return studies[0].series[0], hu, z


def test_sorts_by_position_whatever_the_file_names(tmp_path):
  series, hu, z = _series(tmp_path)
  g = dicom_io.check_geometry(series)
  np.testing.assert_allclose(g.table_z_mm, z)
  vol = dicom_io.read_volume(g)
  np.testing.assert_array_equal(vol.hu, hu)
  assert g.slice_spacing_mm == pytest.approx(5.0)


def test_flipped_orientation_still_sorts_cranial_first(tmp_path):
  series, hu, z = _series(tmp_path, iop=(1, 0, 0, 0, -1, 0))
  g = dicom_io.check_geometry(series)
  np.testing.assert_allclose(g.table_z_mm, z)
  assert g.normal[2] > 0


def test_gantry_tilt_rejected(tmp_path):
  series, _, _ = _series(tmp_path, tilt_x_mm_per_slice=1.0)
  with pytest.raises(dicom_io.SeriesRejected, match="gantry tilt"):
    dicom_io.check_geometry(series)


def test_missing_and_duplicate_slices_rejected(tmp_path):
  series, _, _ = _series(tmp_path)
  ordered = dicom_io.check_geometry(series).slices
  gap = dicom_io.Series(series.uid, series.study_uid, ordered[:2] + ordered[3:])
  with pytest.raises(dicom_io.SeriesRejected, match="missing slices"):
    dicom_io.check_geometry(gap)
  dup = dicom_io.Series(series.uid, series.study_uid, ordered + [ordered[2]])
  with pytest.raises(dicom_io.SeriesRejected, match="duplicate"):
    dicom_io.check_geometry(dup)


def test_hu_and_padding_on_real_ct_file(tmp_path):
  path = pathlib.Path(get_testdata_file("CT_small.dcm"))
  header = dicom_io.read_header(path)
  assert header.modality == "CT"
  ds = pydicom.dcmread(path)
  expected = np.rint(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.int16)
  stored = dicom_io.decode_stored(path, header.transfer_syntax)
  np.testing.assert_array_equal(dicom_io.to_hu(stored, header.slope, header.intercept), expected)
  # Pixel padding is masked.
  ds.PixelPaddingValue = int(stored[0, 0])
  ds.save_as(tmp_path / "pad.dcm")
  h = dicom_io.read_header(tmp_path / "pad.dcm")
  g = dicom_io.Geometry([h], np.zeros(1), np.array([0, 0, 1.0]), 1.0, (1.0, 1.0), stored.shape)
  vol = dicom_io.read_volume(g)
  assert vol.padding is not None and vol.padding[0, 0, 0]
  assert vol.hu[0, 0, 0] == -1024


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("signed", [0, 1])
def test_direct_pixel_read_matches_pydicom(tmp_path, implicit, signed):
  # 12 of 16 bits stored, with random garbage in the unused high bits: pydicom clears (unsigned) or sign-extends
  # (signed) them, and so must the direct read that read_volume uses for native little-endian files.
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
  ds.PixelData = np.random.default_rng(signed).integers(0, 65536, (ds.Rows, ds.Columns)).astype("<u2").tobytes()
  ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
  path = tmp_path / "x.dcm"
  ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
  header = dicom_io.read_header(path)
  assert header.native_pixels is not None
  direct = dicom_io.read_native(path, header.native_pixels, (header.rows, header.columns))
  expected = pydicom.dcmread(path).pixel_array
  assert direct.dtype == expected.dtype
  np.testing.assert_array_equal(direct, expected)


def test_non_dicom_and_broken_files_are_skipped(tmp_path):
  (tmp_path / "notes.txt").write_text("not dicom")
  data = pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes()
  (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
  ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
  del ds.PixelData
  ds.save_as(tmp_path / "nopixels.dcm")
  pydicom.dcmread(get_testdata_file("MR_small.dcm")).save_as(tmp_path / "mr.dcm")
  studies, skipped = dicom_io.scan(tmp_path)
  reasons = {s.what: s.reason for s in skipped}
  assert reasons["notes.txt"] == "not a DICOM file"
  assert "truncated" in reasons["truncated"] or "unreadable" in reasons["truncated"]
  assert reasons["nopixels.dcm"] == "no pixel data"
  assert "not CT" in reasons["mr.dcm"]
  assert not studies


def test_jpeg_ls_without_a_safe_decoder_names_the_package():
  problem = dicom_io.decoder_problem("1.2.840.10008.1.2.4.80")
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("gdcm") or importlib.util.find_spec("jpeg_ls"):
    assert problem is None
  else:
    assert "python-gdcm" in problem and "GPL" in problem
  assert dicom_io.decoder_problem("1.2.840.10008.1.2.4.90") is None  # JPEG 2000
  assert dicom_io.decoder_problem("1.2.840.10008.1.2.5") is None  # RLE


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"])
def test_rle_and_jpeg2000_are_decoded(tmp_path, syntax):
  series, hu, _ = _series(tmp_path)
  for s in series.slices:
    ds = pydicom.dcmread(s.path)
    ds.compress(syntax)
    ds.save_as(s.path)
  studies, _ = dicom_io.scan(tmp_path)
  vol = dicom_io.read_volume(dicom_io.check_geometry(studies[0].series[0]))
  np.testing.assert_array_equal(vol.hu, hu)
