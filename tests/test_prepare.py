"""Tests of `data_prep.prepare`: the embedded phantom dataset is made once, a given data.dir is checked."""

import json
import os

import pytest

import configs.arterial
from data_prep import phantom
from data_prep import prepare


def _config():
  return configs.arterial.get_config("smoke")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """A work directory whose phantom dataset was made by `ensure_dataset` (the smoke config)."""
  workdir = str(tmp_path_factory.mktemp("prepare"))
  data_dir = prepare.ensure_dataset(_config(), workdir)
  return {"workdir": workdir, "data_dir": data_dir}


def test_first_call_generates_and_converts_the_phantom(made):
  data_dir = made["data_dir"]
  assert data_dir == os.path.join(made["workdir"], "data", "converted")
  manifest = json.loads(open(os.path.join(data_dir, "manifest.json")).read())
  assert manifest["settings"]["image_size"] == 32
  assert manifest["phases"]["arterial"]["splits"]["train"]["examples"] > 0
  assert os.path.isfile(os.path.join(made["workdir"], "data", "dicom", "preview.png"))
  # The stamp holds the settings as JSON reads them back (split_fractions a list, not the config's tuple).
  stamp = json.loads(open(os.path.join(made["workdir"], "data", "settings.json")).read())
  assert stamp == prepare.phantom_settings(_config())
  assert stamp["phantom"]["split_fractions"] == [0.6, 0.2, 0.2]


def test_second_call_reuses_the_dataset(made, monkeypatch):
  calls = []
  monkeypatch.setattr(phantom, "generate", lambda *a, **k: calls.append(a) or pytest.fail("regenerated"))
  dicom = os.path.join(made["workdir"], "data", "dicom")
  before = os.stat(dicom).st_mtime_ns
  assert prepare.ensure_dataset(_config(), made["workdir"]) == made["data_dir"]
  assert not calls
  assert os.stat(dicom).st_mtime_ns == before


def test_changed_settings_make_the_dataset_again(made, tmp_path, monkeypatch):
  # A work directory that holds a dataset made with the smoke settings (its stamp and manifest)...
  (tmp_path / "data" / "converted").mkdir(parents=True)
  for name in ("settings.json", "converted/manifest.json"):
    (tmp_path / "data" / name).write_bytes(open(os.path.join(made["workdir"], "data", name), "rb").read())
  # ... is made again for another phantom seed.
  config = _config()
  config.data.phantom.seed = 1
  calls = []
  monkeypatch.setattr(phantom, "generate", lambda *a, **k: calls.append(a))
  # The spy writes nothing, so the conversion that follows finds no input: what matters is that it was asked.
  with pytest.raises(ValueError, match="is not a directory"):
    prepare.ensure_dataset(config, str(tmp_path))
  assert len(calls) == 1


@pytest.mark.parametrize("key, value, default", [("deformable", "demons", "none"),
                                                  ("through_plane", "local", "nearest")])
def test_alignment_option_reconverts_and_reaches_the_converter(made, tmp_path, monkeypatch, key, value, default):
  # The same studies (reused: same phantom settings), converted again with another alignment option.
  root = tmp_path / "data"
  (root / "converted").mkdir(parents=True)
  for name in ("settings.json", "converted/manifest.json", "phantom_settings.json"):
    (root / name).write_bytes(open(os.path.join(made["workdir"], "data", name), "rb").read())
  config = _config()
  assert config.data[key] == default
  config.data[key] = value
  assert prepare.phantom_settings(config)[key] == value
  assert key not in prepare.phantom_settings(_config())  # earlier stamps stay valid
  from data_prep import convert  # pylint: disable=import-outside-toplevel
  asked = []
  monkeypatch.setattr(convert, "run", lambda settings: asked.append(settings) or pytest.fail("converted"))
  with pytest.raises(pytest.fail.Exception):
    prepare.ensure_dataset(config, str(tmp_path))
  assert [getattr(s, key) for s in asked] == [value]


def test_given_data_dir_with_another_image_size_is_refused(made):
  config = _config()
  config.data.dir = made["data_dir"]
  assert prepare.ensure_dataset(config, "unused") == made["data_dir"]
  config.data.image_size = 64
  with pytest.raises(ValueError, match=r"32 px.*image_size=64.*--config\.data\.image_size=32"):
    prepare.ensure_dataset(config, "unused")


def test_image_size_falls_back_to_the_manifest(made, tmp_path):
  (tmp_path / "manifest.json").write_text(json.dumps({"settings": {"image_size": 48}}))
  assert prepare.dataset_image_size(str(tmp_path), "arterial") == 48
  assert prepare.dataset_image_size(made["data_dir"], "arterial") == 32
  assert prepare.dataset_image_size(str(tmp_path / "nothing"), "arterial") is None


def test_missing_data_dir_is_an_error(tmp_path):
  config = _config()
  config.data.dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="data_prep.convert"):
    prepare.ensure_dataset(config, str(tmp_path))


def test_cross_validation_folds_share_the_studies_and_deal_every_case_to_one_test_fold(tmp_path):
  """data.fold=k converts the phantom with fold k as the test split; over the folds every case is tested once."""
  import json  # pylint: disable=import-outside-toplevel

  tested = []
  for fold in range(3):
    config = _config()
    config.data.fold, config.data.num_folds = fold, 3
    data_dir = prepare.ensure_dataset(config, str(tmp_path))
    assert data_dir.endswith(f"converted_fold{fold}")
    with open(os.path.join(data_dir, "manifest.json")) as f:
      manifest = json.load(f)
    splits = manifest["phases"]["arterial"]["splits"]
    assert splits["test"]["cases"] and splits["train"]["cases"] and splits["validation"]["cases"]
    tested += [c["case_id"] for c in manifest["phases"]["arterial"]["cases"].values() if c["split"] == "test"]
  converted = len(manifest["phases"]["arterial"]["cases"])
  assert len(tested) == len(set(tested)) == converted >= 3
  with open(os.path.join(tmp_path, "data", "phantom_settings.json")) as f:
    assert json.load(f)["cases"] == _config().data.phantom.cases


def test_motion_scale_makes_the_phantom_again_and_reaches_it(made, tmp_path, monkeypatch):
  """`data.phantom.motion_scale`: 1 (the default) leaves the settings as before (earlier datasets stay reusable);
  another value is a new phantom, generated with it."""
  assert "motion_scale" not in prepare.phantom_settings(_config())["phantom"]
  config = _config()
  config.data.phantom.motion_scale = 0.0
  assert prepare.phantom_settings(config)["phantom"]["motion_scale"] == 0.0
  root = tmp_path / "data"
  (root / "converted").mkdir(parents=True)
  for name in ("settings.json", "converted/manifest.json", "phantom_settings.json"):
    (root / name).write_bytes(open(os.path.join(made["workdir"], "data", name), "rb").read())
  asked = []
  monkeypatch.setattr(phantom, "generate", lambda *a, **k: asked.append(k))
  with pytest.raises(ValueError, match="is not a directory"):   # the spy writes nothing to convert
    prepare.ensure_dataset(config, str(tmp_path))
  assert [k["motion_scale"] for k in asked] == [0.0]
