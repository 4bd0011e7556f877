"""Pretext pretraining of the intensity-level classifier (paper sections 3.2 and 4.3.1): entry point and export.

The training itself is the `pretext` method (`vcect_jax/methods/pretext.py`) on the shared loop
(`vcect_jax.train`): grain input with checkpointed iterator state, Orbax exact resume, clu/TensorBoard, data
parallel over the mesh. The non-contrast slices come from `data_prep.pretext_sources` (`config.pretrain.source`:
converted records, a DICOM folder, the phantom or npy arrays).

The result is an Orbax checkpoint (`<workdir>/pretext`, a CheckpointManager directory) holding the encoder state,
the fully connected head and a JSON description (widths, alphas, window, validation accuracy per class).
`load_pretext_encoder` gives the frozen perceptual encoder to the GAN training and `init_generator_from_pretext`
copies the encoder into a generator, as in the paper. `ensure_pretext_checkpoint` is the on-demand step that
`python -m vcect_jax.main` runs before GAN training when no pretext checkpoint is configured.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from vcect_jax import checkpoint
from vcect_jax import hu
from vcect_jax import models
from vcect_jax.methods.pretext import intensity_levels  # noqa: F401  (part of this module's API)

CHECKPOINT_SUBDIR = "pretext"
_FORMAT = "vcect_jax.pretext/1"


def export_path(workdir: str) -> str:
  """Where a pretraining run in `workdir` writes its pretext checkpoint."""
  return os.path.join(checkpoint.absolute(workdir), CHECKPOINT_SUBDIR)  # local or gs://


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
  path = checkpoint.absolute(path)
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
  path = checkpoint.absolute(path)
  if not epath.Path(path).is_dir():
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


def check_window(path: str, description: dict, window) -> None:
  """Raises ValueError when the pretext checkpoint at `path` (its `description`) was pretrained with another CT
  window than `window` (a config section with `level` and `width`, e.g. `config.data.window`; None: no check).

  The encoder knows intensities only as the window maps them to [-1, 1]: fed another window's images it would
  compute features of differently scaled inputs (a perceptual loss and an initialisation silently off), so the
  two must match. A description without a window (none is written without one) is not checked.
  """
  have = description.get("window")
  if window is None or have is None:
    return
  have, want = _window_key(have), _window_key(window)
  if have != want:
    raise ValueError(
        f"pretext checkpoint {path!r} was pretrained with the window {hu.Window(*have).label} but the model "
        f"uses {hu.Window(*want).label} (config.data.window): its encoder would see differently scaled intensities; "
        "pretrain again with the model's window (a new --workdir, or an empty perceptual.pretext_checkpoint in a "
        "new one), or set config.data.window to the checkpoint's")


def _restore_encoder_state(path: str, encoder: models.Encoder, window=None):
  """Restores the checkpoint's encoder state with the structure of `encoder` (checked first, and the window
  against `window` when given: `check_window`)."""
  step, description = read_description(path)
  check_window(path, description, window)
  want = dict(in_channels=encoder.in_channels, widths=list(encoder.widths))
  have = dict(in_channels=description["in_channels"], widths=list(description["widths"]))
  if want != have:
    raise ValueError(f"pretext checkpoint {path!r} has an encoder with {have} but the model needs {want}: "
                     "pretrain again with the same config.model.generator, or change the model config")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(encoder))
  with ocp.CheckpointManager(checkpoint.absolute(path)) as manager:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(encoder=ocp.args.StandardRestore(abstract)))
    except Exception as e:
      raise ValueError(f"pretext checkpoint {path!r} does not fit the encoder {want}: {e}") from e
  return restored["encoder"], description


def load_pretext_encoder(path: str, config) -> models.Encoder:
  """The pretrained encoder for the perceptual loss, built from `config.model.generator`, in eval mode.

  Raises:
    FileNotFoundError: no checkpoint at `path`.
    ValueError: the checkpoint's encoder (widths, input channels) or window differs from the config's.
  """
  gen = config.model.generator
  encoder = models.Encoder(gen.in_channels, gen.widths, momentum=float(gen.get("bn_momentum", 0.9)),
                           rngs=nnx.Rngs(0))
  state, description = _restore_encoder_state(path, encoder, config.data.window)
  nnx.update(encoder, state)
  encoder.eval()
  logging.info("Loaded pretext encoder from %s (step %d, validation accuracy per class %s)", path,
               description["step"], description.get("validation_accuracy"))
  return encoder


def init_generator_from_pretext(generator: models.Generator, path: str, window=None) -> models.Generator:
  """Copies the pretext encoder's parameters and BatchNorm statistics into `generator.encoder`, in place.

  The decoder and head are left as they are. `window` (e.g. `config.data.window`), when given, must be the one
  the checkpoint was pretrained with (`check_window`). Returns the generator.
  """
  state, _ = _restore_encoder_state(path, generator.encoder, window)
  nnx.update(generator.encoder, state)
  return generator


# ---------------------------------------------------------------------------------------------------- runs

def pretrain(config, workdir: str, train_source=None, validation_source=None) -> dict:
  """Trains the intensity-level classifier on the shared loop and exports it to `<workdir>/pretext`.

  Args:
    config: the full config (sections `model`, `pretrain`, `data`, `seed`, `input`).
    workdir: output directory (checkpoints and TensorBoard logs of the run, and the export).
    train_source, validation_source: optional random-access sources of `{"pre": (3, H, W) int16}`; default
      from `config.pretrain.source` (`data_prep.pretext_sources`).

  Returns:
    dict with `per_class_accuracy` (alpha -> validation accuracy), `accuracy`, `steps`, `steps_per_second`,
    `final_loss` and `checkpoint` (the path to give `config.perceptual.pretext_checkpoint`).
  """
  from vcect_jax import train  # pylint: disable=g-import-not-at-top
  from vcect_jax.methods import pretext  # pylint: disable=g-import-not-at-top

  path = export_path(workdir)
  if epath.Path(path).is_dir() and any(epath.Path(path).iterdir()):
    raise FileExistsError(f"a pretext checkpoint already exists at {path!r}: choose another --workdir or delete it")
  sources = None
  if train_source is not None and validation_source is not None:
    sources = (train_source, validation_source)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mode = "pretrain"
  result = train.train_and_evaluate(cfg, workdir, method=pretext.Pretext(cfg, sources=sources))
  for a, acc in result["per_class_accuracy"].items():
    logging.info("pretext validation accuracy alpha=%s: %.4f", a, acc)
  logging.info("Saved the pretext classifier to %s (set config.perceptual.pretext_checkpoint to it)", path)
  return result


def pretext_per_window(config, workdir: str, made: dict) -> str:
  """`ensure_pretext_checkpoint` for runs that share one encoder per CT window (several phases or rows on one data
  set): the first window's under `<workdir>/pretrain`, another's under `<workdir>/window_W<width>_L<level>/pretrain`
  (the arterial and delayed `:demo` have their own windows). `made` maps (level, width) -> path across calls; it is
  updated. Across invocations (e.g. `benchmarks.paper_tables --phases=arterial`, then `--phases=portal`) the
  encoder already under `<workdir>/pretrain` keeps that place for its own window only: another window goes to its
  window folder whatever the order of the phases."""
  window = _window_key(config.data.window)
  if window not in made:
    first = _existing_window(export_path(os.path.join(workdir, "pretrain")))
    use_workdir = window == first if first is not None else not made
    folder = workdir if use_workdir else os.path.join(workdir, f"window_W{window[1]:g}_L{window[0]:g}")
    made[window] = ensure_pretext_checkpoint(config, folder)
  return made[window]


def _existing_window(path: str) -> tuple[float, float] | None:
  """(level, width) of the pretext checkpoint at `path`; None when there is no usable one (or it has no window)."""
  if not epath.Path(path).is_dir():
    return None
  try:
    _, description = read_description(path)
  except (FileNotFoundError, ValueError):  # an interrupted export: ensure_pretext_checkpoint redoes it
    return None
  window = description.get("window")
  return _window_key(window) if window else None


def _window_key(window) -> tuple[float, float]:
  """(level, width) of a window: a description's dict or a config section (`config.data.window`)."""
  return float(window["level"]), float(window["width"])


def ensure_pretext_checkpoint(config, workdir: str) -> str:
  """The pretext checkpoint path: the configured one (which must exist) or one pretrained here once.

  A pretraining that was interrupted resumes from its own checkpoints under `<workdir>/pretrain`.
  """
  path = config.perceptual.pretext_checkpoint
  if path:
    if not epath.Path(path).is_dir():
      raise FileNotFoundError(
          f"perceptual.pretext_checkpoint={path!r} does not exist: run `python -m vcect_jax.main "
          "--config=configs/pretrain.py` first and pass its <workdir>/pretext, or leave the field empty to "
          "pretrain one automatically")
    return path
  pretrain_workdir = os.path.join(workdir, "pretrain")
  path = export_path(pretrain_workdir)
  if epath.Path(path).is_dir():
    try:
      read_description(path)
      logging.info("Reusing the pretext checkpoint in %s", path)
      return path
    except (FileNotFoundError, ValueError) as e:  # an interrupted export: do it again
      logging.warning("Discarding the unusable pretext checkpoint in %s: %s", path, e)
      epath.Path(path).rmtree()
  logging.info("No perceptual.pretext_checkpoint: pretraining the intensity classifier in %s", pretrain_workdir)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mode = "pretrain"
  pretrain(cfg, pretrain_workdir)
  return path
