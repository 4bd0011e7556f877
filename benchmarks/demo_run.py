"""The README's main job, timed, and the `:demo` acceptance criterion.

  python -m benchmarks.demo_run --workdir=/tmp/demo_arterial [--phase=arterial] [--reuse]

Runs `configs/<phase>.py:demo` from a fresh work directory (phantom generation, conversion, pretext pretraining,
GAN training), then, on the validation split, compares the mean HU inside the phantom's aorta label of the
non-contrast input, the virtual image and the real contrast image. The criterion (issue 5): in the arterial phase,
virtual aorta HU is at least halfway from the non-contrast value to the real one.
"""

import argparse
import ast
import glob
import os
import importlib
import shutil
import time

import jax
import numpy as np

from data_prep import cli_help
from data_prep.phantom.anatomy import LABEL_IDS
from vcect_jax import checkpoint
from vcect_jax import hu
from vcect_jax import input_pipeline
from vcect_jax import runtime


def aorta_hu(workdir: str) -> dict[str, float]:
  loaded = checkpoint.load_generator(workdir)
  config, generator = loaded.config, loaded.generator
  source = input_pipeline.load_source(f"{workdir}/data/converted", config.phase, "validation")
  window = hu.Window.from_config(config.data.window)
  forward = jax.jit(lambda x: generator(x))
  sums = {"pre": 0.0, "virtual": 0.0, "real": 0.0}
  count = 0
  for i in range(len(source)):
    ex = source[i]
    mask = np.asarray(ex["labels"]) == LABEL_IDS["aorta"]
    if not mask.any():
      continue
    x = input_pipeline.to_model_space(ex, window)["pre"][None]
    virtual = np.asarray(hu.model_to_hu(forward(x)[0, ..., 0], window))
    sums["pre"] += float(np.asarray(ex["pre"][1], np.float32)[mask].sum())
    sums["virtual"] += float(virtual[mask].sum())
    sums["real"] += float(np.asarray(ex["post"], np.float32)[mask].sum())
    count += int(mask.sum())
  means = {k: v / max(count, 1) for k, v in sums.items()}
  means["fraction_of_enhancement"] = (means["virtual"] - means["pre"]) / max(means["real"] - means["pre"], 1e-6)
  means["aorta_pixels"] = count
  return means


def main():
  parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_run", description=__doc__,
                                   formatter_class=cli_help.HelpFormatter,
                                   epilog="example:\n  python -m benchmarks.demo_run --workdir=/tmp/demo_arterial")
  parser.add_argument("--workdir", required=True, help="work directory of the run (emptied first unless --reuse)")
  parser.add_argument("--phase", default="arterial", help="contrast phase: configs/<phase>.py:demo")
  parser.add_argument("--reuse", action="store_true", help="only evaluate an existing run")
  parser.add_argument("--keep_data", action="store_true",
                      help="keep <workdir>/data (phantom + records) and retrain from scratch on it")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. --set train.steps=600 (repeatable)")
  args = parser.parse_args()
  if not args.reuse:
    if args.keep_data:
      for name in ("checkpoints", "pretrain"):
        shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
      for f in glob.glob(os.path.join(args.workdir, "events.out.tfevents.*")):
        os.remove(f)
    else:
      shutil.rmtree(args.workdir, ignore_errors=True)
    config = importlib.import_module(f"configs.{args.phase}").get_config("demo")
    config.update_from_flattened_dict({k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in args.set)})
    t0 = time.perf_counter()
    result = runtime.dispatch(config, args.workdir)
    print(f"demo run ({args.phase}): {time.perf_counter() - t0:.0f} s end to end, validation "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result["eval"].items())))
  m = aorta_hu(args.workdir)
  print(f"aorta mean HU on validation ({m['aorta_pixels']} px): non-contrast {m['pre']:.0f}, virtual "
        f"{m['virtual']:.0f}, real {m['real']:.0f}; fraction of the enhancement reached "
        f"{m['fraction_of_enhancement']:.2f} (criterion >= 0.5: {'met' if m['fraction_of_enhancement'] >= 0.5 else 'NOT met'})")


if __name__ == "__main__":
  main()
