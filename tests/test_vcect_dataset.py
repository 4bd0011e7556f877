"""The TFDS builder produces the converter's records (API path of `tfds build`)."""

import numpy as np
import tensorflow_datasets as tfds

from data_prep import privacy
from data_prep.vcect_dataset import Builder
from tests import convert_fixtures as cf


def test_builder_matches_converter_records(tmp_path, monkeypatch):
  cf.write_case(tmp_path / "in", "a", size=48, slices=8, spacing=6.0)
  key_file = tmp_path / "key"
  key_file.write_text("11" * 32)
  monkeypatch.setenv("VCECT_HMAC_KEY_FILE", str(key_file))
  builder = Builder(config="arterial", data_dir=str(tmp_path / "data"), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "in")))
  total = sum(s.num_examples for s in builder.info.splits.values())
  assert total > 0
  split = next(name for name, s in builder.info.splits.items() if s.num_examples)
  ex = builder.as_data_source(split=split)[0]
  assert ex["pre"].shape == (3, 256, 256) and ex["pre"].dtype == np.int16
  key, _ = privacy.load_or_create_key(tmp_path / "out", key_file)
  assert ex["case_id"].decode() == privacy.case_id(key, privacy.patient_identity("FAKEPID-a", cf.FAKE["PatientName"],
                                                                                 cf.FAKE["PatientBirthDate"], ""))
  assert not list((tmp_path / "data").rglob("*hmac*"))
