"""What `main` does after flag parsing: process set-up, default work directory and dispatch by `config.mode`.

Modes, each a stage of the data flow:
  prepare   the data step alone: with `data.dir` empty, generate and convert the embedded phantom (data_prep);
  pretrain  pretext pretraining of the intensity classifier (the `pretext` method on the shared loop);
  train     `prepare_inputs` (data, and a pretext checkpoint when none is configured), then the training loop;
  eval      evaluation of a checkpoint on whole cases of a split (vcect_jax.evaluate) -> report/.
"""

from __future__ import annotations

import logging as std_logging
import os

import jax
from absl import logging

from vcect_jax import sharding

MODES = ("train", "pretrain", "prepare", "eval")
# What a data or configuration mistake raises: `main` reports these as one message (exit status 2). Our own code
# raises them with a message that says what to fix; FloatingPointError is the non-finite-loss stop.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def default_workdir(config) -> str:
  """`workdir/<mode>_<phase>` when no --workdir is given."""
  name = config.mode if config.mode == "pretrain" else f"{config.mode}_{config.phase}"
  return os.path.join("workdir", name)


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps warnings and errors of libraries, drops their INFO chatter (Orbax logs every file it writes)."""

  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}clu{os.sep}")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(p in record.pathname for p in self.NOISY)


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def initialize(config) -> None:
  """Multi-host join (when configured) and JAX settings that must precede any computation."""
  quiet_library_logs()
  sharding.initialize_distributed(config)
  # TensorFlow (clu's TensorBoard writer, TFDS) must never grab an accelerator.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (ImportError, RuntimeError, ValueError):
    pass


def pretrains_first(config) -> bool:
  """Whether a run of `config` pretrains a pretext encoder before it starts: GAN training with the perceptual loss
  or the pretext initialisation, and no `perceptual.pretext_checkpoint` named."""
  needs_pretext = config.loss.use_perceptual or config.perceptual.init_generator
  return config.mode == "train" and needs_pretext and not config.perceptual.pretext_checkpoint


def prepare_inputs(config, workdir: str):
  """The inputs a training run reads, made when the config does not name them; returns the resolved config.

  * `data.dir` empty: the embedded phantom, generated and converted once under `<workdir>/data`
    (`data_prep.prepare`); a given `data.dir` is checked (its image size must match the config's).
  * GAN training with the perceptual loss or the pretext initialisation and `perceptual.pretext_checkpoint`
    empty: a pretext classifier pretrained once under `<workdir>/pretrain` on the training split.
  """
  from data_prep import prepare  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.dir = prepare.ensure_dataset(config, workdir)
    if pretrains_first(config):
      from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

      config.perceptual.pretext_checkpoint = pretrain.ensure_pretext_checkpoint(config, workdir)
  return config


def check_config(config) -> None:
  """The configuration mistakes that can be seen before any work: an unknown mode or method, invalid fields of
  the method, a global batch that does not split over the devices. Raises ValueError saying what to fix."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} is not one of {', '.join(MODES)} (--config.mode=...)")
  if config.mode in ("prepare", "eval"):
    return
  from vcect_jax import methods  # pylint: disable=g-import-not-at-top

  to_check = []  # (method, the field of its batch size)
  config = config.copy_and_resolve_references()
  if pretrains_first(config):
    pretext_config = config.copy_and_resolve_references()
    with pretext_config.unlocked():
      pretext_config.mode = "pretrain"
    to_check.append((methods.create(pretext_config), "pretrain.batch_size"))
    with config.unlocked():  # `prepare_inputs` will pretrain one
      config.perceptual.pretext_checkpoint = "<pretrained first>"
  method = methods.create(config)
  method.validate()
  to_check.insert(0, (method, "pretrain.batch_size" if config.mode == "pretrain" else "train.batch_size"))
  devices = jax.device_count()
  for method, field in to_check:
    batch = method.loop_settings().batch_size
    if batch % devices:
      raise ValueError(
          f"{field}={batch} does not split over the {devices} devices (every device takes an equal share of the "
          f"global batch): choose a multiple of {devices}, e.g. --config.{field}={max(devices, batch // devices * devices)}")


def dispatch(config, workdir: str):
  """Runs the job that `config.mode` names and returns its result."""
  check_config(config)
  logging.info("Mode %s, work directory %s, %d devices", config.mode, workdir, jax.device_count())
  if config.mode == "prepare":
    data_dir = prepare_inputs(config, workdir).data.dir
    logging.info("Done: the records are in %s (with manifest.json); train on them with --config.data.dir=%s",
                 data_dir, data_dir)
    return data_dir
  if config.mode == "eval":
    from vcect_jax import evaluate  # pylint: disable=g-import-not-at-top

    result = evaluate.run(config, workdir)
    logging.info("Done: wrote the evaluation report (%d files: tables, metrics, figures) to %s",
                 len(result["files"]), result["report_dir"])
    return result
  if config.mode == "pretrain":
    from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

    if config.data.dir or config.pretrain.source == "records":
      config = prepare_inputs(config, workdir)
    result = pretrain.pretrain(config, workdir)
    logging.info("Done: wrote the pretext classifier to %s (give it to training as "
                 "--config.perceptual.pretext_checkpoint=%s); logs in %s", result["checkpoint"],
                 result["checkpoint"], workdir)
    return result
  from vcect_jax import train  # pylint: disable=g-import-not-at-top

  result = train.train_and_evaluate(prepare_inputs(config, workdir), workdir)
  logging.info("Done: step %d; checkpoints in %s, TensorBoard logs in %s (tensorboard --logdir %s); evaluate with "
               "--config.mode=eval --config.eval.checkpoint=%s", result["step"], os.path.join(workdir, "checkpoints"),
               workdir, workdir, workdir)
  return result
