"""Parameter counts and forward / forward+backward timing of the networks (issue 4).

    .venv/bin/python -m benchmarks.models_bench [--size=256] [--batch=2] [--repeats=5]

Times the default generator (paper widths) in training mode (BatchNorm batch statistics) under `nnx.jit`:
forward only, and forward + backward of a pixel MSE with respect to the parameters. Compilation is excluded.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from configs import default
from vcect_jax import models


def count(module, kind=nnx.Param) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, kind)))


def timed(fn, *args, repeats: int) -> tuple[float, float]:
  """(compile + first call, median of `repeats` calls) in seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, sorted(times)[len(times) // 2]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = default.get_config()
  generator = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
  discriminator = models.Discriminator(config.model.discriminator, rngs=nnx.Rngs(1))
  classifier = models.IntensityClassifier(config.model, rngs=nnx.Rngs(2))
  for name, module in [("generator", generator), ("generator.encoder", generator.encoder),
                       ("discriminator", discriminator), ("classifier", classifier)]:
    print(f"{name:20s} params {count(module):>11,d}  batch stats {count(module, nnx.BatchStat):>7,d}")

  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  target = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 1))

  @nnx.jit
  def forward(model, x):
    return model(x)

  @nnx.jit
  def forward_backward(model, x, target):
    return nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - target)))(model)

  flops = forward.lower(generator, x).compile().cost_analysis()
  flops = flops.get("flops") if isinstance(flops, dict) else None
  print(f"devices: {jax.devices()}")
  print(f"generator {args.size}x{args.size} batch {args.batch}: forward GFLOP (XLA estimate) "
        f"{flops / 1e9 if flops else float('nan'):.1f}")
  first, median = timed(forward, generator, x, repeats=args.repeats)
  print(f"  forward          compile+first {first:6.2f} s  median {median * 1e3:8.1f} ms")
  first, median = timed(forward_backward, generator, x, target, repeats=args.repeats)
  print(f"  forward+backward compile+first {first:6.2f} s  median {median * 1e3:8.1f} ms")


if __name__ == "__main__":
  main()
