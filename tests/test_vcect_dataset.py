"""The TFDS builder produces the converter's records (API path of `tfds build`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import arterial
from data_prep import convert
from data_prep import prepare
from data_prep import records

from data_prep import privacy
from data_prep.vcect_dataset import Builder
from tests import convert_fixtures as cf
from vcect_jax import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _records_by_key(sources) -> dict:
  """(split, case_id, slice_index) -> example, over {split: random-access source}."""
  out = {}
  for split, src in sources.items():
    for i in range(len(src)):
      ex = src[i]
      out[(split, bytes(ex["case_id"]), int(ex["slice_index"]))] = ex
  return out


def test_tfds_build_with_the_beam_runner_matches_the_converter(tmp_path):
  """`tfds build` (the CLI, as the README writes it: no PYTHONPATH, the package installed by `make`/`pip install
  -e .`) with Apache Beam's DirectRunner in two worker processes: the converter's records, a manifest that training
  accepts, and no attempt to reach the network (Beam's Prism runner download)."""
  pytest.importorskip("apache_beam", reason="apache-beam is in requirements.txt; install it to run `tfds build` "
                                            "with Beam")
  for i, name in enumerate("abc"):
    cf.write_case(tmp_path / "in", name, size=48, slices=8, spacing=6.0, seed=i)
  key_file = tmp_path / "key"
  key_file.write_text("22" * 32)
  env = dict(os.environ, VCECT_HMAC_KEY_FILE=str(key_file))
  env.pop("PYTHONPATH", None)
  tfds_cli = os.path.join(os.path.dirname(sys.executable), "tfds")
  proc = subprocess.run(
      [tfds_cli, "build", "data_prep/vcect_dataset", f"--manual_dir={tmp_path / 'in'}", "--config=arterial",
       f"--data_dir={tmp_path / 'beam'}", "--file_format=array_record",
       "--beam_pipeline_options=runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = proc.stderr + proc.stdout
  assert "BeamWriter" in log, "the build did not run through Beam"
  assert "prism" not in log.lower(), "Beam tried to fetch its Prism runner"
  assert "Converting string literal type hint" not in log
  data_dir = tmp_path / "beam" / "vcect_dataset"
  manifest = json.loads((data_dir / "manifest.json").read_text())
  assert manifest["phases"]["arterial"]["path"] == f"arterial/{records.VERSION}"
  config = arterial.get_config()
  config.data.dir = str(data_dir)
  assert prepare.check_dataset(config) == str(data_dir)
  n = sum(len(input_pipeline.load_source(str(data_dir), "arterial", s)) for s in records.SPLITS)
  assert n == sum(s["examples"] for s in manifest["phases"]["arterial"]["splits"].values()) > 0
  built = tfds.builder_from_directory(str(tmp_path / "beam" / "vcect_dataset" / "arterial" / records.VERSION))
  got = _records_by_key({s: built.as_data_source(split=s) for s in built.info.splits})
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'conv'}", "--phases=arterial",
                       f"--key_file={key_file}"]) == 0
  want = _records_by_key({s: records.load_split(tmp_path / "conv" / "arterial", s) for s in records.SPLITS})
  assert sorted(got) == sorted(want) and got
  for k, ex in got.items():
    for feature, value in ex.items():
      np.testing.assert_array_equal(np.asarray(value), np.asarray(want[k][feature]), err_msg=f"{k} {feature}")
