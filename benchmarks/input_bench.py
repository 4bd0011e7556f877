"""Input pipeline throughput: training slices per second against what the training step consumes.

  python -m benchmarks.input_bench --data_dir=CONVERTED [--phase=arterial] [--batch=2] [--seconds=10]
      [--worker_count=0] [--step_ms=7100]

Reads the training split of a converted dataset through exactly the training input path
(`input_pipeline.train_dataset` with the method's `train_example`: record decode, window to model space, shuffle,
batch) for `--seconds` after one warm-up batch, and prints slices (training examples) per second. With `--step_ms`
(the median training step, e.g. from `benchmarks.run` or `benchmarks.train_bench`) it also prints the step's
consumption (batch / step time) and the ratio: the pipeline keeps the step fed when the ratio is well above 1
(issue 14's goal: >= 10x on the same core budget).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data_prep import cli_help


def measure(data_dir: str, phase: str = "arterial", batch: int = 2, seconds: float = 10.0,
            worker_count: int = 0) -> dict[str, float]:
  """{"slices_per_s", "batches", "seconds"} of the training input path on `data_dir`."""
  import configs.arterial  # pylint: disable=import-outside-toplevel
  from vcect_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  from vcect_jax import methods  # pylint: disable=import-outside-toplevel

  config = configs.arterial.get_config()
  config.phase, config.data.dir = phase, data_dir
  method = methods.create(config)
  source = input_pipeline.load_source(data_dir, phase, "train")
  ds = input_pipeline.train_dataset(source, method.train_example, batch, seed=0)
  it = input_pipeline.make_iterator(ds, worker_count)
  first = next(it)  # warm-up: opens the shards, starts the workers
  if not all(np.isfinite(v).all() for v in first.values()):
    raise ValueError("the first batch holds non-finite values")
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    batches += 1
  elapsed = time.perf_counter() - start
  return {"slices_per_s": batches * batch / elapsed, "batches": float(batches), "seconds": elapsed}


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=cli_help.HelpFormatter,
      epilog="example:\n  python -m benchmarks.input_bench --data_dir=workdir/demo_arterial/data/converted "
             "--batch=4 --step_ms=252")
  parser.add_argument("--data_dir", required=True, help="a converted dataset (holding manifest.json)")
  parser.add_argument("--phase", default="arterial", choices=("arterial", "portal", "delayed"))
  parser.add_argument("--batch", type=int, default=2, help="batch size of the training step")
  parser.add_argument("--seconds", type=float, default=10.0, help="how long to read after the warm-up batch")
  parser.add_argument("--worker_count", type=int, default=0, help="grain worker processes (config input.worker_count)")
  parser.add_argument("--step_ms", type=float, default=0.0, help="median training step to compare with (ms)")
  args = parser.parse_args(argv)
  out = measure(args.data_dir, args.phase, args.batch, args.seconds, args.worker_count)
  line = f"input pipeline: {out['slices_per_s']:.1f} slices/s (batch {args.batch}, {args.worker_count} workers)"
  if args.step_ms > 0:
    out["step_slices_per_s"] = args.batch / (args.step_ms / 1000.0)
    out["ratio"] = out["slices_per_s"] / out["step_slices_per_s"]
    line += f"; the step consumes {out['step_slices_per_s']:.2f} slices/s; ratio {out['ratio']:.0f}x"
  print(line)
  return out


if __name__ == "__main__":
  main()
