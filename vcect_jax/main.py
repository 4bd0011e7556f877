"""Entry point: `python -m vcect_jax.main --config=configs/arterial.py:demo [--workdir=DIR]`.

Parses flags and the config, logs the devices, then hands over to the library. No logic lives here.

A mistake in the data or the configuration (a missing path, an invalid value, a checkpoint of another phase)
ends with its message and exit status 2, without a traceback; `--traceback` shows it anyway.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and logs. Default: workdir/<config name>.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_bool("traceback", False, "Show the traceback of a data or configuration error too.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so that --jax_* flags and XLA_FLAGS apply

  from vcect_jax import runtime

  config = FLAGS.config
  workdir = FLAGS.workdir or runtime.default_workdir(config)
  runtime.initialize(config)
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    runtime.dispatch(config, workdir)
  except runtime.USER_ERRORS as e:
    if FLAGS.traceback:
      raise
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
