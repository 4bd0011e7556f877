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
