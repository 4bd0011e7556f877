"""Tests of `data_prep.pretext_sources`: the non-contrast 3-slice stacks of pretext pretraining."""

import numpy as np
import pytest

import configs.arterial
from data_prep import convert
from data_prep import dicom_io
from data_prep import phantom
from data_prep import pretext_sources
from data_prep import slices

SIZE = 32


def _config(**pretrain):
  config = configs.arterial.get_config("smoke")  # 5 phantom cases of 6 slices, 64 px -> 32 px
  config.pretrain.update(pretrain)
  return config


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
  """Three tiny phantom studies as DICOM, and their conversion to 32 px records (one case per split)."""
  base = tmp_path_factory.mktemp("pretext")
  phantom.generate(base / "dicom", cases=3, seed=0, size=64, slices=4, slice_thickness=5.0, pixel_spacing=6.0)
  (base / "key").write_bytes(bytes(32))
  converted = {}
  for name, fractions in (("balanced", (0.34, 0.33, 0.33)), ("no_validation", (0.5, 0.0, 0.5))):
    convert.run(convert.Settings(input=str(base / "dicom"), output=str(base / name), phases=("arterial",),
                                 image_size=SIZE, key_file=str(base / "key"), split_fractions=fractions,
                                 split_method="rank"))
    converted[name] = str(base / name)
  return {"dicom": str(base / "dicom"), **converted}


def _assert_stacks(source, count=None):
  assert len(source) > 0 if count is None else len(source) == count
  for i in (0, len(source) - 1):
    pre = source[i]["pre"]
    assert pre.shape == (3, SIZE, SIZE) and pre.dtype == np.int16


def test_phantom_source_splits_by_case_with_the_converter_geometry():
  train, validation = pretext_sources.make_sources(_config(source="phantom", validation_cases=2))
  _assert_stacks(train, 3 * 6)
  _assert_stacks(validation, 2 * 6)
  # The last case validates; it was synthesised at the model size with the spacing the converter's resize gives.
  case = phantom.synthesize_case(4, 0, SIZE, 6, 5.0, slices.resized_spacing_mm(6.0, (64, 64), SIZE))
  np.testing.assert_array_equal(validation.pre_hu[6:], slices.triplets(case.hu["non_contrast"]))


def test_auto_is_the_phantom_without_data_dir_and_the_records_with_it(studies):
  assert isinstance(pretext_sources.make_sources(_config())[0], pretext_sources.ArraySource)
  config = _config()
  config.data.dir = studies["balanced"]
  train, validation = pretext_sources.make_sources(config)
  assert isinstance(train, pretext_sources.RecordsSource)
  _assert_stacks(train)
  _assert_stacks(validation)
  assert set(train[0]) == {"pre"}


def test_dicom_source_reads_the_non_contrast_series_only(studies):
  train, validation = pretext_sources.make_sources(_config(source="dicom", dicom_dir=studies["dicom"],
                                                           validation_cases=1))
  _assert_stacks(train, 2 * 4)
  _assert_stacks(validation, 4)
  # The last study's non-contrast series, resized and stacked by the converter's rules.
  scanned, _ = dicom_io.scan(studies["dicom"])
  series = next(s for s in scanned[-1].series if "non" in s.description.lower())
  volume = dicom_io.read_volume(dicom_io.check_geometry(series))
  want = slices.triplets(slices.resize_square(volume.hu, SIZE, False, slices.AIR_HU))
  np.testing.assert_array_equal(validation.pre_hu, want)


def test_empty_validation_records_fail_at_once_with_what_to_do(studies):
  config = _config(source="records", records_dir=studies["no_validation"] + "/arterial")
  with pytest.raises(ValueError, match=r"validation.*split_fractions"):
    pretext_sources.make_sources(config)


def test_empty_npy_validation_fails_at_once(tmp_path):
  np.save(tmp_path / "train.npy", np.zeros((4, 3, 8, 8), np.int16))
  np.save(tmp_path / "val.npy", np.zeros((0, 3, 8, 8), np.int16))
  config = _config(source="npy", npy_train=str(tmp_path / "train.npy"), npy_validation=str(tmp_path / "val.npy"))
  with pytest.raises(ValueError, match="validation.*npy_validation"):
    pretext_sources.make_sources(config)


def test_bad_settings_say_what_to_change(tmp_path):
  with pytest.raises(ValueError, match="validation_cases"):
    pretext_sources.make_sources(_config(source="phantom", validation_cases=5))
  with pytest.raises(FileNotFoundError, match="dicom_dir"):
    pretext_sources.make_sources(_config(source="dicom", dicom_dir=str(tmp_path / "none")))
  with pytest.raises(FileNotFoundError, match="data_prep.convert"):
    pretext_sources.make_sources(_config(source="records"))
  with pytest.raises(ValueError, match="not one of"):
    pretext_sources.make_sources(_config(source="nlst"))
  with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
    pretext_sources.ArraySource(np.zeros((2, 8, 8), np.int16))
