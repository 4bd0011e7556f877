"""grain pipelines over the converter's records: shuffle, window, batch, each process's share of a batch.

Records hold HU (`pre` int16 (3, H, W), `post` int16 (H, W)); the window is applied here, at training time, via
`vcect_jax.hu`, so that it stays a configuration choice. Batches are channels-last float32 in model space:

  pre:       (B, H, W, 3) previous / current / next non-contrast slices, [-1, 1]
  post:      (B, H, W, 1) the real contrast slice, [-1, 1]
  post_hu:   (B, H, W)    the real contrast slice in HU (evaluation batches only)
  pre_hu:    (B, H, W)    the current non-contrast slice in HU (evaluation batches only)
  body_mask: (B, H, W)    float32, 1 inside the body (evaluation batches only)

Training order is a pure function of (seed, step): the dataset is a random-access `MapDataset`, shuffled with a
new permutation each epoch, so the iterator's state is an index that goes into the checkpoint and a resumed run
sees exactly the batches it would have seen. With several processes (multi-host), each reads only its share of
every global batch, and the global batches are the same as those of a single-process run.

Unpaired methods (CycleGAN, CUT) train on `UnpairedSource(source, seed)`: each `pre` with the `post` of another,
randomly chosen slice.
"""

from __future__ import annotations

import json

import grain
from etils import epath
import jax
import numpy as np

from vcect_jax import hu

SPLITS = ("train", "validation", "test")


def phase_dir(data_dir, phase: str) -> str:
  """The TFDS directory of one phase inside a converted dataset, with errors that say what to fix.

  `data_dir` may be a local path or a cloud path (`gs://...`): it is read through `etils.epath`. The phase's folder
  is `manifest.json`'s `phases.<phase>.path` (`tfds build` puts it under `<config>/<version>`), else `<phase>`.
  """
  root = epath.Path(data_dir)
  manifest_path = root / "manifest.json"
  if not manifest_path.exists():
    raise FileNotFoundError(
        f"config.data.dir={str(data_dir)!r} has no manifest.json: point it at the --output of "
        "`python -m data_prep.convert` (or at <data_dir>/vcect_dataset after `tfds build data_prep/vcect_dataset`), "
        "or leave it empty to use the embedded phantom")
  from data_prep import prepare  # pylint: disable=g-import-not-at-top

  path = prepare.phase_path(root, phase)
  if not path.is_dir():
    phases = json.loads(manifest_path.read_text()).get("phases", {})
    raise FileNotFoundError(f"{data_dir} has no records for phase {phase!r}; converted phases: {sorted(phases)}")
  return str(path)


def load_source(data_dir: str, phase: str, split: str):
  """The random-access record source of one split."""
  from data_prep import records  # pylint: disable=g-import-not-at-top

  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return records.load_split(phase_dir(data_dir, phase), split)


def to_model_space(example: dict, window: hu.Window, with_hu: bool = False) -> dict[str, np.ndarray]:
  """One record -> the network's inputs and target, channels last, in model space."""
  pre_hu = np.asarray(example["pre"], np.float32)
  post_hu = np.asarray(example["post"], np.float32)
  out = {
      "pre": np.moveaxis(hu.hu_to_model(pre_hu, window), 0, -1),
      "post": hu.hu_to_model(post_hu, window)[..., None],
  }
  if with_hu:
    out["post_hu"] = post_hu
    out["pre_hu"] = pre_hu[1]
    out["body_mask"] = np.asarray(example["body_mask"], np.float32)
  return out


def augment(example: dict, rng: np.random.Generator, flip_lr: bool, max_shift_px: int) -> dict:
  """Optional, off by default: the same random left-right flip and integer shift on inputs and target."""
  out = dict(example)
  if flip_lr and rng.random() < 0.5:
    out = {k: v[:, ::-1] for k, v in out.items()}
  if max_shift_px:
    dy, dx = rng.integers(-max_shift_px, max_shift_px + 1, size=2)
    out = {k: np.roll(v, (int(dy), int(dx)), axis=(0, 1)) for k, v in out.items()}
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _this_process_share(ds: grain.MapDataset, local_batch: int) -> grain.MapDataset:
  """Batches of `local_batch`, of which this process keeps its share of every global batch.

  Global batch k is local batches k*P .. k*P+P-1 (P processes) of the one global sequence, and process p keeps
  local batch k*P+p. Each process reads only its own examples, and the global batches (hence the training run)
  are the same whatever the number of processes.
  """
  return ds.batch(local_batch, drop_remainder=True)[jax.process_index()::jax.process_count()]


def train_dataset(source, transform, local_batch: int, seed: int, augment=None) -> grain.MapDataset:
  """Endless training batches of this process: per-epoch shuffle, `transform` (record -> model inputs),
  optional `augment(example, rng)`, batch, this process's share."""
  ds = grain.MapDataset.source(source)
  global_batch = local_batch * jax.process_count()
  if len(ds) < global_batch:
    raise ValueError(f"{len(ds)} training examples, fewer than one batch of {global_batch}")
  ds = ds.seed(seed).shuffle().repeat().map(transform)
  if augment is not None:
    ds = ds.random_map(augment)
  return _this_process_share(ds, local_batch)


def eval_dataset(source, transform, local_batch: int, max_examples: int = 0) -> grain.MapDataset:
  """A fixed, unshuffled pass over (the first `max_examples` of) a split through `transform`.

  Only whole global batches are used (a remainder is left out), so every process runs the same number of
  collective evaluation steps.
  """
  ds = grain.MapDataset.source(source)
  if max_examples:
    ds = ds[:max_examples]
  per_round = local_batch * jax.process_count()
  ds = ds[:len(ds) // per_round * per_round]
  return _this_process_share(ds.map(transform), local_batch)


def make_iterator(ds: grain.MapDataset, worker_count: int = 0):
  """A checkpointable iterator; `worker_count > 0` decodes in that many worker processes."""
  it_ds = ds.to_iter_dataset()
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def steps_per_epoch(num_train_examples: int, global_batch: int) -> int:
  return max(1, num_train_examples // global_batch)


class UnpairedSource:
  """A random-access source for unpaired training (CycleGAN, CUT): example i is the non-contrast `pre` of slice i
  with the contrast `post` of slice `partner[i]`, where `partner` is a random permutation drawn from `seed`.

  The pairing is a pure function of (source, seed), so the grain iterator over it stays an index that goes into
  the checkpoint. Every `post` appears exactly once per epoch (the target distribution is the data's), and which
  `post` comes with a `pre` is independent of that `pre`'s slice and case: a slice meets its own contrast image
  only by chance (1 / len(source)). The pairs are drawn once per run (the epoch shuffle reorders them), where the
  references draw a new partner at every access; with per-image losses (instance norm, batch 1) this only changes
  which images share a batch. The pre-side fields (`body_mask`, `labels`, `case_id`, ...) are slice i's;
  `post_case_id` and `post_slice_index` name where the `post` came from.
  """

  def __init__(self, source, seed: int):
    self.source = source
    self.partner = np.random.default_rng(seed).permutation(len(source))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    example = dict(self.source[index])
    other = self.source[int(self.partner[index])]
    example["post"] = other["post"]
    example["post_case_id"] = other.get("case_id", b"")
    example["post_slice_index"] = other.get("slice_index", -1)
    return example
