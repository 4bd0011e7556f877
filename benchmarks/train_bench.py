"""Training-step throughput of the dual-path GAN on random batches (no input pipeline).

  python -m benchmarks.train_bench --size=256 --batch=2 --steps=5            # paper size, default widths
  python -m benchmarks.train_bench --variant=smoke --steps=50                # the CI-sized config
  python -m benchmarks.train_bench --variant=demo --steps=20                 # the README demo config

Prints compile time and steady-state steps/s (median of the timed steps) for the full step: generator forward on
both paths, discriminator update, generator update with adversarial + pixel + perceptual losses.
"""

import argparse
import statistics
import time

from unittest import mock

import jax
import numpy as np
from flax import nnx

from configs import arterial
from vcect_jax import methods
from vcect_jax import models
from vcect_jax import pretrain
from vcect_jax import sharding
from vcect_jax import train


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="", help="'' (paper), 'smoke' or 'demo'")
  parser.add_argument("--size", type=int, default=0, help="override data.image_size")
  parser.add_argument("--batch", type=int, default=0, help="override train.batch_size")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  config = arterial.get_config(args.variant)
  if args.size:
    config.data.image_size = args.size
  if args.batch:
    config.train.batch_size = args.batch
  size, batch = config.data.image_size, config.train.batch_size

  mesh = sharding.make_mesh()
  config.perceptual.init_generator = False
  config.perceptual.pretext_checkpoint = "random-encoder"  # a random pretext encoder: same cost, no checkpoint
  method = methods.create(config)
  with mock.patch.object(pretrain, "load_pretext_encoder",
                         lambda *_: models.IntensityClassifier(config.model, rngs=nnx.Rngs(1)).encoder):
    module = method.create_state(steps_per_epoch=1000)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(module.generators.global_net, nnx.Param)))
  graphdef, state = nnx.split(module)
  step = train.jit_train_step(method, graphdef, mesh)
  rng = np.random.default_rng(0)
  batch_np = {"pre": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
              "post": rng.uniform(-1, 1, (batch, size, size, 1)).astype(np.float32)}
  batch_arr = sharding.global_batch(batch_np, mesh)
  state = sharding.replicate(state, mesh)

  t0 = time.perf_counter()
  state, m = step(state, batch_arr)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = step(state, batch_arr)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  print(f"variant={args.variant or 'paper'} size={size} batch={batch} devices={jax.device_count()} "
        f"({jax.devices()[0].platform}) generator_params={n_params:,} first_step(compile)={compile_s:.1f}s "
        f"median_step={med * 1000:.0f}ms steps/s={1 / med:.2f} (min {min(times) * 1000:.0f}ms over {len(times)})")


if __name__ == "__main__":
  main()
