"""grain pipelines: determinism of the training order, each process's share of a global batch, eval batches."""

from unittest import mock

import jax
import numpy as np

from vcect_jax import hu
from vcect_jax import input_pipeline


class _Source:
  """n fake records whose `pre` holds their index."""

  def __init__(self, n, size=4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"pre": np.full((3, self.size, self.size), i, np.int16),
            "post": np.full((self.size, self.size), i, np.int16),
            "body_mask": np.ones((self.size, self.size), np.uint8)}


def _index(example):
  return {"index": np.int32(example["pre"][0, 0, 0])}


def _first_batches(ds, n):
  it = input_pipeline.make_iterator(ds)
  return [next(it)["index"].tolist() for _ in range(n)]


def test_two_fresh_iterators_give_the_same_batches_and_epochs_reshuffle():
  source = _Source(6)
  a = _first_batches(input_pipeline.train_dataset(source, _index, 2, seed=3), 6)
  b = _first_batches(input_pipeline.train_dataset(source, _index, 2, seed=3), 6)
  assert a == b
  first_epoch, second_epoch = sum(a[:3], []), sum(a[3:], [])
  assert sorted(first_epoch) == sorted(second_epoch) == list(range(6))
  assert first_epoch != second_epoch
  assert a != _first_batches(input_pipeline.train_dataset(source, _index, 2, seed=4), 6)


def test_iterator_state_resumes_the_sequence():
  ds = input_pipeline.train_dataset(_Source(10), _index, 2, seed=0)
  it = input_pipeline.make_iterator(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = [next(it)["index"].tolist() for _ in range(4)]
  again = input_pipeline.make_iterator(ds)
  again.set_state(state)
  assert [next(again)["index"].tolist() for _ in range(4)] == rest


def test_each_process_gets_its_own_share_of_every_global_batch():
  """With 2 processes, process p keeps local batches p, p+2, ...: together they are the 1-process global batches."""
  source = _Source(8)
  single = _first_batches(input_pipeline.train_dataset(source, _index, 4, seed=1), 4)
  shares = []
  for p in range(2):
    with mock.patch.object(jax, "process_index", return_value=p), \
         mock.patch.object(jax, "process_count", return_value=2):
      shares.append(_first_batches(input_pipeline.train_dataset(source, _index, 2, seed=1), 4))
  for k in range(4):
    assert shares[0][k] + shares[1][k] == single[k]
    assert not set(shares[0][k]) & set(shares[1][k])


def test_eval_dataset_is_ordered_whole_batches_with_hu_kept():
  window = hu.Window()
  ds = input_pipeline.eval_dataset(_Source(7), lambda ex: input_pipeline.to_model_space(ex, window, with_hu=True),
                                   3)
  batches = list(ds)
  assert len(batches) == 2  # the seventh example would not fill a batch
  assert batches[0]["pre"].shape == (3, 4, 4, 3) and batches[0]["post"].shape == (3, 4, 4, 1)
  np.testing.assert_array_equal(batches[1]["pre_hu"][:, 0, 0], [3, 4, 5])
  np.testing.assert_allclose(batches[0]["post"][1, 0, 0, 0], hu.hu_to_model(np.float32(1), window), atol=1e-6)


def test_records_read_through_epath_from_str_and_path_objects(tmp_path, caplog):
  """`data.dir` may be a cloud path: the manifest and records are read through etils.epath (the same code path
  as gs://, run here on a local folder given as str, epath.Path and pathlib.Path); a manifest's phase `path` is
  followed; TFDS does not complain that the metadata on disk differs from its reader's."""
  import json
  import logging
  import pathlib

  from etils import epath

  from configs import arterial
  from data_prep import convert
  from data_prep import prepare
  from data_prep import records
  from tests import convert_fixtures as cf

  cf.write_case(tmp_path / "in", "c", size=32, slices=6, spacing=9.0)
  out = tmp_path / "out"
  assert convert.main([f"--input={tmp_path / 'in'}", f"--output={out}", "--phases=arterial", "--image_size=32",
                       "--split_fractions=1,0,0", "--file_format=tfrecord"]) == 0
  caplog.set_level(logging.INFO)
  sizes = set()
  for data_dir in (str(out), epath.Path(out), pathlib.Path(out)):
    path = input_pipeline.phase_dir(data_dir, "arterial")
    assert isinstance(path, str) and path.endswith("arterial")
    source = input_pipeline.load_source(data_dir, "arterial", "train")
    sizes.add(len(source))
    assert source[0]["post"].shape == (32, 32)
    assert prepare.dataset_image_size(data_dir, "arterial") == 32
  assert len(sizes) == 1 and sizes.pop() > 0
  assert "differ on disk and in the code" not in caplog.text
  # A manifest may put a phase's records elsewhere (tfds build: <config>/<version>).
  (out / "arterial").rename(out / "moved")
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["phases"]["arterial"]["path"] = "moved"
  (out / "manifest.json").write_text(json.dumps(manifest))
  assert input_pipeline.phase_dir(epath.Path(out), "arterial") == str(epath.Path(out) / "moved")
  config = arterial.get_config()
  config.data.dir, config.data.image_size = str(out), 32
  assert prepare.check_dataset(config) == str(out)
  assert len(records.load_split(epath.Path(out) / "moved", "train")) == len(source)
