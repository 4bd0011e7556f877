"""Entry point: `python -m vcect_jax.main --config=configs/arterial.py:demo [--workdir=DIR]`.

Parses flags and the config, logs the devices, then hands over to the library. No logic lives here.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and logs. Default: workdir/<config name>.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
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
  runtime.dispatch(config, workdir)


if __name__ == "__main__":
  app.run(main)
