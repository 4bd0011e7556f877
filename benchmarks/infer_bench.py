"""Inference speed, end to end: read a non-contrast DICOM series, predict one phase, write the DICOM series.

  python -m benchmarks.infer_bench [--size=512] [--slices=100] [--batch_size=8] [--checkpoint=PATH] [--repeats=2]

Writes a phantom study (512x512, 100 slices by default) to a temporary folder, then runs `vcect_jax.infer.run`
on it `repeats` times; the first run includes the one compilation of the generator for the batch shape, so the
figures to compare with the goal (<= 30 s per study per phase) are the later runs'. Without ``--checkpoint`` the
generator is the paper-size one (`configs/arterial.py`, widths 32..512, 256 px) with random weights: the speed
does not depend on the weights.
"""

import argparse
import json
import tempfile
import time

import jax


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--slices", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--checkpoint", default="", help="a trained run instead of the random paper-size generator")
  parser.add_argument("--format", default="dicom", choices=("dicom", "nifti", "both"))
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()

  from flax import nnx

  from configs import arterial
  from data_prep import phantom
  from vcect_jax import infer
  from vcect_jax import models

  t0 = time.perf_counter()
  if args.checkpoint:
    predictor = infer.Predictor.from_checkpoint(args.checkpoint)
  else:
    config = arterial.get_config()
    predictor = infer.Predictor(models.Generator(config.model.generator, rngs=nnx.Rngs(0)), config, step=0,
                                path="random paper-size generator")
  print(f"model ready in {time.perf_counter() - t0:.1f} s ({predictor.image_size} px, {jax.devices()[0]})")
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    study = phantom.generate(f"{tmp}/in", cases=1, seed=0, size=args.size, slices=args.slices,
                             slice_thickness=4.0, pixel_spacing=0.75 * 512 / args.size)[0]
    print(f"phantom {args.size}x{args.size}x{args.slices} written in {time.perf_counter() - t0:.1f} s")
    for i in range(args.repeats):
      summary = infer.run(study, f"{tmp}/out{i}", {predictor.phase: predictor}, fmt=args.format,
                          batch_size=args.batch_size)
      seconds = summary["seconds"]
      total = seconds["total"]
      print(f"run {i + 1}{' (includes compilation)' if i == 0 else ''}: {total:.2f} s per study, "
            f"{1000 * total / args.slices:.0f} ms per slice; " + json.dumps(seconds))


if __name__ == "__main__":
  main()
