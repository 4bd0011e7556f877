"""What `main` does after flag parsing: process set-up, default work directory and dispatch by `config.mode`."""

from __future__ import annotations

import logging as std_logging
import os

import jax
from absl import logging

from vcect_jax import sharding

MODES = ("train", "pretrain")


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


def dispatch(config, workdir: str):
  """Runs the job that `config.mode` names and returns its result."""
  if config.mode not in MODES:
    raise SystemExit(f"config.mode={config.mode!r} is not one of {MODES}")
  logging.info("Mode %s, work directory %s, %d devices", config.mode, workdir, jax.device_count())
  if config.mode == "pretrain":
    from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

    return pretrain.pretrain(config, workdir)
  from vcect_jax import train  # pylint: disable=g-import-not-at-top

  return train.train_and_evaluate(config, workdir)
