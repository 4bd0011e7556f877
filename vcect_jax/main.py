"""Entry point: `python -m vcect_jax.main --config=configs/arterial.py:demo [--workdir=DIR]` (or `vcect-train`).

Parses flags and the config, logs the devices, then hands over to the library (`vcect_jax.runtime`). No logic
lives here beyond turning a mistake on the command line into one message.

A mistake in the command line, the data or the configuration (a missing config file, a misspelt field, an unknown
variant, a batch that does not split over the devices, a missing path, a checkpoint of another phase) ends with
one line `error: ...` on stderr and exit status 2, without a traceback; `--traceback` shows it anyway.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for data, checkpoints, TensorBoard logs and reports. Default: "
                    "workdir/<mode>_<phase> (e.g. workdir/train_arterial; workdir/pretrain in mode pretrain).")
config_flags.DEFINE_config_file("config", None, "Configuration file, FILE[:VARIANT], e.g. configs/arterial.py:demo.",
                                lock_config=True)
flags.DEFINE_bool("traceback", False, "Show the traceback of a data or configuration error too.")

HELP = """\
usage: python -m vcect_jax.main --config=FILE[:VARIANT] [--config.FIELD=VALUE ...] [--workdir=DIR] [--traceback]
       (`vcect-train` is the same command once the package is installed: `pip install -e .`)

Trains the model of a config on its records, or pretrains the pretext classifier, prepares the data or evaluates
a checkpoint, as the config's `mode` says. With `data.dir` empty the synthetic phantom is generated and converted
under <workdir>/data first; with `perceptual.pretext_checkpoint` empty a pretext classifier is pretrained under
<workdir>/pretrain first (both once; later runs reuse them). A rerun in the same work directory resumes.

options:
  --config=FILE[:VARIANT]
        required. The configuration: configs/arterial.py, configs/portal.py, configs/delayed.py (one contrast phase
        each), configs/pretrain.py (pretext pretraining), configs/ablations/*.py, configs/baselines/*.py:PHASE.
        VARIANT: none (the paper's settings: 256 px, batch 2, 50 epochs), `demo` (the short CPU demonstration,
        96 px) or `smoke` (CI-sized, learns nothing); baselines take PHASE[,VARIANT], e.g. cyclegan.py:arterial,demo.
  --config.FIELD=VALUE
        overrides one field of the config (default: the config file's value). Every field, its meaning and its
        default are in configs/default.py; e.g. --config.train.steps=2000, --config.data.dir=/data/converted,
        --config.mode=eval. train.steps > 0 replaces train.epochs and also moves the learning-rate decay.
  --workdir=DIR
        data, checkpoints, TensorBoard logs and reports go here (local path or gs://...).
        default: workdir/<mode>_<phase>, e.g. workdir/train_arterial (workdir/pretrain in mode pretrain).
  --[no]traceback
        show the Python traceback of a data or configuration error (default: false: one line `error: ...`).
  --helpfull
        also list the flags of absl, JAX and logging (e.g. --verbosity, --jax_platforms, --jax_debug_nans).
  -h, --help
        this help.

modes (--config.mode=MODE):
  train      (default) the training method `config.method` (dual_path_gan, pix2pix, cyclegan, cut)
  pretrain   the self-supervised intensity-level classifier (set by configs/pretrain.py)
  prepare    the data step alone: generate and convert the phantom (data.dir empty) or check data.dir
  eval       evaluate --config.eval.checkpoint=WORKDIR on whole cases of --config.eval.split -> <workdir>/report

examples:
  python -m vcect_jax.main --config=configs/arterial.py:demo --workdir=workdir/demo_arterial
  python -m vcect_jax.main --config=configs/portal.py --config.data.dir=/data/converted --workdir=runs/portal
  python -m vcect_jax.main --config=configs/arterial.py:demo --workdir=workdir/demo_arterial \\
      --config.mode=eval --config.eval.checkpoint=workdir/demo_arterial --config.eval.split=test

exit status: 0 done; 2 a mistake in the command line, configuration or data (the message says what to fix);
1 anything else (a bug: please report it with the output of --traceback).
"""

_HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


class _UserError(Exception):
  """A mistake on the command line, reported as `error: <message>` with exit status 2."""


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=VALUE` or `--name VALUE` in argv (the last one wins, as in absl), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def load_config_file(spec: str):
  """The ConfigDict of `FILE[:VARIANT]`, loaded as ml_collections does, with errors that say what to fix."""
  path, _, variant = spec.partition(":")
  if not path:
    raise _UserError("--config needs a file, e.g. --config=configs/arterial.py:demo")
  if not os.path.isfile(path):
    hint = ""
    if not path.endswith(".py") and os.path.isfile(path + ".py"):
      hint = f" (did you mean {path}.py?)"
    elif not os.path.isabs(path):
      hint = f" (relative to {os.getcwd()}; the configs are in the repository's configs/ folder)"
    raise _UserError(f"--config={spec}: no config file {path!r}{hint}")
  module_spec = importlib.util.spec_from_file_location("_vcect_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # a config that does not import is a user error
    raise _UserError(f"--config={spec}: the config file does not load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise _UserError(f"--config={spec}: {path} has no get_config() function")
  try:
    return module.get_config(variant) if variant else module.get_config()
  except ValueError as e:
    raise _UserError(f"--config={spec}: {e}") from e


def check_overrides(config, argv: list[str]) -> None:
  """Raises _UserError naming the first `--config.FIELD=...` whose FIELD the config lacks (with suggestions)."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, "config"
    for key in dotted.split("."):
      if not isinstance(node, config_dict.ConfigDict):
        break  # inside a plain value (a dict or tuple field): ml_collections decides
      if key not in node:
        close = difflib.get_close_matches(key, list(node.keys()), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'{walked}.{c}' for c in close)}?" if close else (
            f"{walked} has the fields {', '.join(sorted(node.keys()))}.")
        raise _UserError(f"{arg.split('=', 1)[0]}: there is no field {walked}.{key}: {hint} (the fields and their "
                         "meaning: configs/default.py)")
      node, walked = node[key], f"{walked}.{key}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with a help text of our own and command-line mistakes as one message (exit status 2)."""
  args = argv[1:]
  if any(a in _HELP_FLAGS for a in args):
    print(HELP, end="")
    sys.exit(0)
  if "--helpfull" in args:
    print(HELP)
    print("all flags, with absl's, JAX's and logging's:\n")
    print(FLAGS.get_help())
    sys.exit(0)
  show_traceback = "--traceback" in args
  try:
    spec = _flag_value(args, "config")
    if spec is None:
      raise _UserError("--config=FILE[:VARIANT] is required, e.g. --config=configs/arterial.py:demo "
                       "(python -m vcect_jax.main --help lists every option)")
    check_overrides(load_config_file(spec), args)
    rest = FLAGS(argv)
    _ = FLAGS.config  # loads the file now, so that its errors land here
    if len(rest) > 1:
      raise _UserError(f"unexpected arguments {rest[1:]}: options are written --name=value "
                       "(python -m vcect_jax.main --help)")
    return rest
  except Exception as e:  # pylint: disable=broad-except  # every command-line mistake gets one message
    if show_traceback:
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not isinstance(e, (_UserError, flags.Error)):
      message = f"{type(e).__name__}: {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv  # parse_flags refused leftovers
  import jax  # after flag parsing, so that --jax_* flags and XLA_FLAGS apply

  from vcect_jax import runtime

  config = FLAGS.config
  workdir = FLAGS.workdir or runtime.default_workdir(config)
  try:
    runtime.initialize(config)
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    runtime.dispatch(config, workdir)
  except runtime.USER_ERRORS as e:
    if FLAGS.traceback:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run():
  """The `vcect-train` console script (and `python -m vcect_jax.main`)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
