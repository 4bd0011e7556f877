"""Pretext pretraining of the intensity-level classifier (paper sections 3.2 and 4.3.1).

Self-supervised: every non-contrast 3-slice stack is windowed to [0, 1] (`hu.hu_to_unit`), multiplied by each
intensity coefficient alpha (0.5, 1.0, 1.5, 2.0 by default; class k = k-th alpha), optionally clipped at 1
(`config.pretrain.clip`, like the authors' uint8 code), mapped to model space (`hu.unit_to_model`), and the
classifier learns which alpha it saw. Each step takes `batch_size` slices with all alphas, so the loss is the
paper's eq. (2), the cross-entropy averaged over the K levels of each slice. Adam, lr 1e-4, x0.1 after 8 of 10
epochs, batch 2 by default; epochs become steps through the size of the training split.

Data sources (`config.pretrain.source`), each random access with items `{"pre": int16 (3, H, W) HU}`:
  * `records`: the `pre` feature of converted records (`data_prep.records.load_split`, splits train/validation);
  * `phantom`: non-contrast volumes of in-memory synthetic cases (`data_prep.phantom.synthesize_case`);
  * `npy`: int16 HU arrays `(N, 3, H, W)` saved with `np.save`;
  * or sources passed to `pretrain(...)` directly (e.g. `ArraySource(pre_hu)`), which is what the tests do.

The result is an Orbax checkpoint (`<workdir>/pretext`, a CheckpointManager directory) holding the encoder state,
the fully connected head and a JSON description (widths, alphas, window, validation accuracy).
`load_pretext_encoder` gives the frozen perceptual encoder to the GAN training and `init_generator_from_pretext`
copies the encoder into a generator, as in the paper. Pretraining runs on one device: the network is small and the
paper's batch (2 slices) does not split over a mesh.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from vcect_jax import hu
from vcect_jax import models

CHECKPOINT_SUBDIR = "pretext"
_FORMAT = "vcect_jax.pretext/1"


# ---------------------------------------------------------------------------------------------------- data

class ArraySource:
  """Random-access source over an in-memory int16 HU array `pre_hu: (N, 3, H, W)`."""

  def __init__(self, pre_hu: np.ndarray):
    pre_hu = np.asarray(pre_hu)
    if pre_hu.ndim != 4:
      raise ValueError(f"expected non-contrast stacks (N, 3, H, W), got shape {pre_hu.shape}")
    self.pre_hu = pre_hu

  def __len__(self) -> int:
    return len(self.pre_hu)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"pre": self.pre_hu[index]}


def neighbour_stacks(volume_hu: np.ndarray) -> np.ndarray:
  """`(S, H, W)` volume -> `(S, 3, H, W)` (previous, current, next) stacks, edge slices duplicated."""
  prev = np.concatenate([volume_hu[:1], volume_hu[:-1]])
  nxt = np.concatenate([volume_hu[1:], volume_hu[-1:]])
  return np.stack([prev, volume_hu, nxt], axis=1)


def phantom_sources(config) -> tuple[ArraySource, ArraySource]:
  """Train and validation sources from in-memory phantom cases, split by case (the last ones validate)."""
  try:
    from data_prep import phantom  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("pretrain.source='phantom' needs data_prep.phantom (synthesize_case); "
                      "set --config.pretrain.source=records or npy to use other data") from e
  p, size = config.data.phantom, int(config.data.image_size)
  cases, n_val = int(p.cases), int(config.pretrain.validation_cases)
  if not 0 < n_val < cases:
    raise ValueError(f"pretrain.validation_cases={n_val} must be between 1 and data.phantom.cases-1={cases - 1}")
  stacks = []
  for index in range(cases):
    # Synthesised directly at the training size, with the pixel spacing the converter's resize would give.
    case = phantom.synthesize_case(index, int(p.seed), size, int(p.slices), float(p.slice_thickness),
                                   float(p.pixel_spacing) * float(p.size) / size)
    stacks.append(neighbour_stacks(np.asarray(case.hu["non_contrast"], np.int16)))
  return ArraySource(np.concatenate(stacks[:-n_val])), ArraySource(np.concatenate(stacks[-n_val:]))


def dicom_sources(config) -> tuple[ArraySource, ArraySource]:
  """Train and validation sources from a folder of non-contrast CT series (the paper's NLST role).

  Every CT series under `pretrain.dicom_dir` that the phase rules do not name a contrast phase is read (sorted,
  HU, resized like the converter does), split by study: the last `pretrain.validation_cases` studies validate.
  Series that cannot be read are skipped with their reason in the log.
  """
  from data_prep import convert  # pylint: disable=g-import-not-at-top
  from data_prep import dicom_io  # pylint: disable=g-import-not-at-top
  from data_prep import phases  # pylint: disable=g-import-not-at-top

  root, size = config.pretrain.dicom_dir, int(config.data.image_size)
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"pretrain.source='dicom' needs pretrain.dicom_dir, a folder of non-contrast CT "
                            f"series; {root!r} is not a directory")
  studies, skipped = dicom_io.scan(root)
  rules = phases.PhaseRules()
  per_study = []
  for study in studies:
    stacks = []
    for series in study.series:
      if rules.phase_of(series.uid, series.description, series.protocol_name) in phases.CONTRAST_PHASES:
        continue
      try:
        volume = dicom_io.read_volume(dicom_io.check_geometry(series))
      except dicom_io.SeriesRejected as e:
        logging.warning("pretext data: skipped a series of %d files: %s", len(series.slices), e)
        continue
      stacks.append(neighbour_stacks(convert.resize_square(volume.hu, size, False, -1024)))
    if stacks:
      per_study.append(np.concatenate(stacks))
  logging.info("pretext data: %d studies with non-contrast series under %s (%d files skipped)", len(per_study),
               root, len(skipped))
  n_val = int(config.pretrain.validation_cases)
  if not 0 < n_val < len(per_study):
    raise ValueError(f"pretrain.dicom_dir has {len(per_study)} usable studies; pretrain.validation_cases={n_val} "
                     "must leave at least one for training and one for validation")
  return ArraySource(np.concatenate(per_study[:-n_val])), ArraySource(np.concatenate(per_study[-n_val:]))


def make_sources(config) -> tuple[Any, Any]:
  """The train and validation sources that `config.pretrain.source` names."""
  source = config.pretrain.source
  if source == "auto":
    source = "records" if config.data.dir else "phantom"
  if source == "records":
    from data_prep import records  # pylint: disable=g-import-not-at-top
    phase_dir = config.pretrain.records_dir or os.path.join(config.data.dir, config.phase)
    if not phase_dir or not os.path.isdir(phase_dir):
      raise FileNotFoundError(f"no converted records at {phase_dir!r}: set --config.data.dir (or "
                              "--config.pretrain.records_dir) to the output of `python -m data_prep.convert`")
    return records.load_split(phase_dir, "train"), records.load_split(phase_dir, "validation")
  if source == "phantom":
    return phantom_sources(config)
  if source == "dicom":
    return dicom_sources(config)
  if source == "npy":
    paths = (config.pretrain.npy_train, config.pretrain.npy_validation)
    for path in paths:
      if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"pretrain.source='npy' needs int16 (N, 3, H, W) files in pretrain.npy_train and "
                                f"pretrain.npy_validation; missing {path!r}")
    return tuple(ArraySource(np.load(path, mmap_mode="r")) for path in paths)
  raise ValueError(f"pretrain.source={source!r} is not one of 'auto', 'records', 'phantom', 'dicom', 'npy'")


def _stack(source, indices: Sequence[int]) -> np.ndarray:
  return np.stack([np.asarray(source[int(i)]["pre"], np.int16) for i in indices])


def train_batches(source, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless `(batch_size, 3, H, W)` int16 batches: a seeded shuffle per epoch, remainder dropped."""
  if len(source) < batch_size:
    raise ValueError(f"the training split has {len(source)} slices, fewer than pretrain.batch_size={batch_size}")
  epoch = 0
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(len(source))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      yield _stack(source, order[start:start + batch_size])
    epoch += 1


# ---------------------------------------------------------------------------------------------------- steps

def intensity_levels(pre_hu: jax.Array, alphas: Sequence[float], window: hu.Window,
                     clip: bool) -> tuple[jax.Array, jax.Array]:
  """The pretext examples of a batch of non-contrast stacks.

  Args:
    pre_hu: `(B, 3, H, W)` HU.
    alphas: the K intensity coefficients; class k is `alphas[k]`.
    window: the CT window.
    clip: clip the scaled windowed intensities at 1.

  Returns:
    `x: (K*B, H, W, 3)` model space, alpha-major, and `labels: (K*B,)` int32.
  """
  unit = jnp.transpose(hu.hu_to_unit(pre_hu, window), (0, 2, 3, 1))
  scaled = unit[None] * jnp.asarray(alphas, jnp.float32)[:, None, None, None, None]
  if clip:
    scaled = jnp.minimum(scaled, 1.0)
  k, b = scaled.shape[:2]
  labels = jnp.repeat(jnp.arange(k, dtype=jnp.int32), b)
  return hu.unit_to_model(scaled.reshape((k * b,) + scaled.shape[2:])), labels


def _make_steps(alphas, window, clip):
  """The jitted train step and the evaluation count step."""

  @nnx.jit
  def train_step(model, optimizer, pre_hu):
    x, labels = intensity_levels(pre_hu, alphas, window, clip)

    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  @nnx.jit
  def eval_counts(model, pre_hu, valid):
    """Per-class (correct, total) over the valid slices of a padded batch."""
    x, labels = intensity_levels(pre_hu, alphas, window, clip)
    correct = (jnp.argmax(model(x, use_running_average=True), -1) == labels)
    weight = jnp.tile(valid, len(alphas)).astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, len(alphas))
    return onehot.T @ (correct * weight), onehot.T @ weight

  return train_step, eval_counts


def evaluate(model, source, eval_counts, batch_size: int, max_slices: int = 0) -> np.ndarray:
  """Per-class accuracy `(K,)` on a source; batches padded to a fixed size so nothing recompiles."""
  n = len(source) if max_slices <= 0 else min(len(source), max_slices)
  if n == 0:
    raise ValueError("the validation split is empty")
  correct = total = 0.0
  for start in range(0, n, batch_size):
    indices = list(range(start, min(start + batch_size, n)))
    valid = np.zeros(batch_size, bool)
    valid[:len(indices)] = True
    indices += [indices[-1]] * (batch_size - len(indices))
    c, t = eval_counts(model, _stack(source, indices), valid)
    correct, total = correct + np.asarray(c), total + np.asarray(t)
  return correct / total


# ---------------------------------------------------------------------------------------------------- checkpoint

def _description(config, **extra) -> dict:
  gen = config.model.generator
  return dict(format=_FORMAT, in_channels=int(gen.in_channels), widths=[int(w) for w in gen.widths],
              hidden=[int(h) for h in config.model.classifier.hidden],
              num_classes=int(config.model.classifier.num_classes),
              alphas=[float(a) for a in config.pretrain.alphas], clip=bool(config.pretrain.clip),
              window=dict(level=float(config.data.window.level), width=float(config.data.window.width)), **extra)


def save_pretext(path: str, classifier: models.IntensityClassifier, config, step: int, **extra) -> None:
  """Writes the classifier (encoder, head) and its description as step `step` of a CheckpointManager at `path`."""
  path = os.path.abspath(path)
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=1)) as manager:
    manager.save(step, args=ocp.args.Composite(
        encoder=ocp.args.StandardSave(nnx.state(classifier.encoder)),
        head=ocp.args.StandardSave(nnx.state(classifier.head)),
        description=ocp.args.JsonSave(_description(config, step=int(step), **extra))))
    manager.wait_until_finished()


def read_description(path: str) -> tuple[int, dict]:
  """The latest step and the JSON description of a pretext checkpoint; a clear error when there is none."""
  hint = ("run the pretext pretraining first (`python -m vcect_jax.main --config=configs/pretrain.py "
          "--workdir=DIR` writes DIR/pretext) or point --config.perceptual.pretext_checkpoint at its output")
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pretext checkpoint {path!r} does not exist: {hint}")
  with ocp.CheckpointManager(path) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint steps under {path!r}: {hint}")
    try:
      description = manager.restore(step, args=ocp.args.Composite(description=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for a foreign directory
      raise ValueError(f"{path!r} is not a pretext checkpoint written by vcect_jax.pretrain: {e}") from e
  description = dict(description["description"])
  if description.get("format") != _FORMAT:
    raise ValueError(f"{path!r} has format {description.get('format')!r}, expected {_FORMAT!r}")
  return step, description


def _restore_encoder_state(path: str, encoder: models.Encoder):
  """Restores the checkpoint's encoder state with the structure of `encoder` (checked first)."""
  step, description = read_description(path)
  want = dict(in_channels=encoder.in_channels, widths=list(encoder.widths))
  have = dict(in_channels=description["in_channels"], widths=list(description["widths"]))
  if want != have:
    raise ValueError(f"pretext checkpoint {path!r} has an encoder with {have} but the model needs {want}: "
                     "pretrain again with the same config.model.generator, or change the model config")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(encoder))
  with ocp.CheckpointManager(os.path.abspath(path)) as manager:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(encoder=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise ValueError(f"pretext checkpoint {path!r} does not fit the encoder {want}: {e}") from e
  return restored["encoder"], description


def load_pretext_encoder(path: str, config) -> models.Encoder:
  """The pretrained encoder for the perceptual loss, built from `config.model.generator`, in eval mode.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: the checkpoint's encoder (widths, input channels) differs from the config's.
  """
  gen = config.model.generator
  encoder = models.Encoder(gen.in_channels, gen.widths, momentum=float(gen.get("bn_momentum", 0.9)),
                           rngs=nnx.Rngs(0))
  state, description = _restore_encoder_state(path, encoder)
  nnx.update(encoder, state)
  encoder.eval()
  logging.info("Loaded pretext encoder from %s (step %d, validation accuracy per class %s)", path,
               description["step"], description.get("validation_accuracy"))
  return encoder


def init_generator_from_pretext(generator: models.Generator, path: str) -> models.Generator:
  """Copies the pretext encoder's parameters and BatchNorm statistics into `generator.encoder`, in place.

  The decoder and head are left as they are. Returns the generator.
  """
  state, _ = _restore_encoder_state(path, generator.encoder)
  nnx.update(generator.encoder, state)
  return generator


# ---------------------------------------------------------------------------------------------------- loop

def pretrain(config, workdir: str, train_source=None, validation_source=None) -> dict:
  """Trains the intensity-level classifier and saves it under `<workdir>/pretext`.

  Args:
    config: the full config (sections `model`, `pretrain`, `data`, `seed`).
    workdir: output directory.
    train_source, validation_source: optional random-access sources of `{"pre": (3, H, W) int16}`; default
      from `config.pretrain.source`.

  Returns:
    dict with `per_class_accuracy` (alpha -> validation accuracy), `accuracy`, `steps`, `steps_per_second`,
    `final_loss` and `checkpoint` (the path to give `config.perceptual.pretext_checkpoint`).
  """
  cfg = config.pretrain
  alphas = tuple(float(a) for a in cfg.alphas)
  if len(alphas) != int(config.model.classifier.num_classes):
    raise ValueError(f"pretrain.alphas {alphas} needs model.classifier.num_classes={len(alphas)}")
  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f"a pretext checkpoint already exists at {path!r}: choose another --workdir or delete it")
  if train_source is None or validation_source is None:
    train_source, validation_source = make_sources(config)
  window = hu.Window.from_config(config.data.window)
  batch_size = int(cfg.batch_size)

  steps_per_epoch = len(train_source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{len(train_source)} training slices do not fill one batch of {batch_size}")
  total_steps = int(cfg.steps) if cfg.steps > 0 else int(cfg.epochs) * steps_per_epoch
  decay_step = max(1, round(total_steps * float(cfg.decay_epochs) / float(cfg.epochs)))
  schedule = optax.piecewise_constant_schedule(float(cfg.learning_rate), {decay_step: float(cfg.decay_factor)})
  logging.info("Pretext pretraining: %d training / %d validation slices, %d steps (%d per epoch), lr decay at %d",
               len(train_source), len(validation_source), total_steps, steps_per_epoch, decay_step)

  model = models.IntensityClassifier(config.model, rngs=nnx.Rngs(int(config.seed)))
  model.train()
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
  train_step, eval_counts = _make_steps(alphas, window, bool(cfg.clip))

  batches = train_batches(train_source, batch_size, int(config.seed))
  start = None
  loss = accuracy = None
  for step in range(1, total_steps + 1):
    loss, accuracy = train_step(model, optimizer, next(batches))
    if step == 1:
      jax.block_until_ready(loss)
      start = time.perf_counter()  # steps/s without the compilation
    if step % int(cfg.log_every) == 0 or step == total_steps:
      loss, accuracy = float(loss), float(accuracy)
      if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite pretext loss {loss} at step {step}")
      logging.info("pretrain step %d/%d: loss %.4f, batch accuracy %.3f, lr %.2e", step, total_steps, loss,
                   accuracy, float(schedule(step)))
  jax.block_until_ready(loss)
  steps_per_second = (total_steps - 1) / (time.perf_counter() - start) if total_steps > 1 else float("nan")

  model.eval()
  per_class = evaluate(model, validation_source, eval_counts, int(cfg.eval_batch_size), int(cfg.max_eval_slices))
  per_class_accuracy = {f"{a:g}": float(acc) for a, acc in zip(alphas, per_class)}
  for a, acc in per_class_accuracy.items():
    logging.info("pretext validation accuracy alpha=%s: %.4f", a, acc)
  logging.info("pretext validation accuracy (mean over classes): %.4f; %.2f steps/s", float(per_class.mean()),
               steps_per_second)

  save_pretext(path, model, config, total_steps, validation_accuracy=per_class_accuracy)
  logging.info("Saved the pretext classifier to %s (set config.perceptual.pretext_checkpoint to it)", path)
  return dict(per_class_accuracy=per_class_accuracy, accuracy=float(per_class.mean()), steps=total_steps,
              steps_per_second=steps_per_second, final_loss=float(loss), checkpoint=path)
