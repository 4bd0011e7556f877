"""The one training loop, shared by every method (`vcect_jax/methods`: the dual-path GAN, pretext pretraining).

`train_and_evaluate(config, workdir)` reads top to bottom: method, data, mesh and shardings, state, the jitted
steps, checkpoint restore (falling back past damaged checkpoints), then the loop with its periodic summaries,
evaluations and checkpoints, SIGTERM handling and the non-finite guard. What is particular to a method (its
networks and optimisers, its step, its validation metrics, its images) comes from the method object; nothing in
this file names a network.

The loop reads records only: the embedded phantom and the on-demand pretext checkpoint are prepared before it
(`vcect_jax.runtime.prepare_inputs`, which `python -m vcect_jax.main` runs).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from vcect_jax import checkpoint as ckpt_lib
from vcect_jax import input_pipeline
from vcect_jax import methods
from vcect_jax import sharding
from vcect_jax import summaries


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------------------------------------ jitted steps
def jit_train_step(method, graphdef, mesh):
  """`(state, batch) -> (state, metrics)` jitted over `mesh`: state replicated, batch split over 'data', donated."""

  def step(state, batch):
    module = nnx.merge(graphdef, state)
    metrics = method.train_step(module, batch)
    return nnx.state(module), metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def jit_readout(fn, graphdef):
  """`(state, batch) -> fn(module, batch)` jitted, for evaluation metrics and images (the state is not changed)."""
  return jax.jit(lambda state, batch: fn(nnx.merge(graphdef, state), batch))


# ------------------------------------------------------------------------------------------------ main loop
def train_and_evaluate(config, workdir: str, method=None) -> dict:
  """Trains `config`'s method in `workdir` (the data and any pretext checkpoint must already exist).

  Args:
    config: the full config; `methods.create(config)` picks the method.
    workdir: checkpoints and TensorBoard logs go here; a rerun resumes from its newest readable checkpoint.
    method: a method object to use instead (e.g. pretext pretraining on given sources).

  Returns:
    {"step": last step, "train": mean training metrics of the last logging interval, "eval": the last validation
    metrics, "state": the method's final nnx state on the host, "steps_per_second": after compilation}, plus
    whatever the method's `finish` adds.
  """
  method = method or methods.create(config)
  method.validate()
  loop = method.loop_settings()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local or gs:// path

  # ---- data
  train_source, val_source = method.sources(config.data.dir)
  mesh = sharding.make_mesh()
  local_batch = sharding.check_batch_size(loop.batch_size, mesh)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_source), loop.batch_size)
  total_steps = loop.total_steps(steps_per_epoch)
  train_ds = input_pipeline.train_dataset(train_source, method.train_example, local_batch, loop.shuffle_seed,
                                          method.augment if method.augments else None)
  logging.info("%s: %d training and %d validation examples, %d steps/epoch, %d steps", method.name,
               len(train_source), len(val_source), steps_per_epoch, total_steps)

  # ---- state (named networks and optimisers), replicated over the mesh
  graphdef, state = nnx.split(method.create_state(steps_per_epoch))
  state = sharding.replicate(state, mesh)
  train_step = jit_train_step(method, graphdef, mesh)
  eval_step = jit_readout(method.eval_step, graphdef)
  image_step = jit_readout(method.images, graphdef)

  # ---- checkpoint restore
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=loop.keep_checkpoints,
                                       async_save=loop.async_checkpoints)
  train_iter = input_pipeline.make_iterator(train_ds, config.input.worker_count)
  step = 0
  try:
    restored = checkpointer.restore_latest(state)
  except BaseException:
    checkpointer.close()
    raise
  if restored:
    step, state, iter_state = restored
    train_iter.set_state(iter_state)
    logging.info("Resumed from step %d", step)

  # ---- loop
  writer = summaries.Writer(workdir, total_steps, method.console_keys)
  preempted = ckpt_lib.PreemptionFlag()
  pending = []  # (step, device metrics) since the last host fetch
  last_eval, last_train = {}, {}
  timer = None  # (time, step) after the first step, so that compilation is not counted
  started = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      while step < total_steps:
        batch = sharding.global_batch(next(train_iter), mesh)
        state, step_metrics = train_step(state, batch)
        step += 1
        pending.append((step, step_metrics))
        writer.tick(step)
        if timer is None:
          jax.block_until_ready(step_metrics)
          timer = (time.perf_counter(), step)
          logging.info("step %d/%d done (compilation included: %.1f s); a line at least every %.0f s from now on",
                       step, total_steps, timer[0] - started, summaries.HEARTBEAT_S)
        if writer.heartbeat_due(step):
          jax.block_until_ready(step_metrics)  # the line's rate counts finished steps
          writer.console(step, {})

        last = step == total_steps
        if (step % loop.log_every == 0 or last or step % loop.checkpoint_every == 0 or preempted.is_set()):
          last_train = _flush_scalars(writer, pending, method.learning_rates(step))
          pending = []
        if step % loop.image_every == 0 or last:
          summaries.write_images(writer, image_step, state, val_source, method.eval_example, step, mesh,
                                 method.image_panels)
        if step % loop.eval_every == 0 or last:
          last_eval = evaluate(eval_step, state, val_source, method.eval_example, loop, mesh)
          writer.scalars(step, {f"eval_{k}": v for k, v in last_eval.items()})
          logging.info("step %d validation: %s", step, _fmt(last_eval))
        if step % loop.checkpoint_every == 0 or last or preempted.is_set():
          checkpointer.save(step, state, train_iter.get_state(), config)
        if preempted.is_set():
          logging.warning("Stopped at step %d after SIGTERM; rerun the same command to resume", step)
          break
      jax.block_until_ready(state)
  finally:
    checkpointer.close()
    writer.close()
    preempted.restore_handler()
  steps_per_second = float("nan")
  if timer is not None and step > timer[1]:
    steps_per_second = (step - timer[1]) / (time.perf_counter() - timer[0])
  result = {"step": step, "train": last_train, "eval": last_eval, "steps_per_second": steps_per_second}
  host_state = jax.device_get(state)
  result = method.finish(nnx.merge(graphdef, host_state), workdir, result)
  result["state"] = host_state
  return result


@jax.jit
def _sums(out: dict) -> dict:
  return {k: jnp.sum(v) for k, v in out.items()}


def evaluate(eval_step, state, source, transform, loop, mesh) -> dict[str, float]:
  """The method's validation metrics, averaged over the first `loop.eval_examples` validation examples.

  Every process feeds its share of each global batch; the sums are taken on the devices, so the means cover all
  processes' examples. Empty when the validation split has fewer examples than devices.
  """
  available = min(len(source), loop.eval_examples or len(source))
  batch_size = sharding.fitting_batch_size(mesh, loop.eval_batch_size, available)
  if not batch_size:
    logging.warning("validation skipped: %d validation examples, fewer than the %d devices", available,
                    mesh.devices.size)
    return {}
  ds = input_pipeline.eval_dataset(source, transform, batch_size // jax.process_count(), loop.eval_examples)
  sums, count = {}, 0
  for batch in ds:
    out = eval_step(state, sharding.global_batch(batch, mesh))
    for k, v in jax.device_get(_sums(out)).items():
      sums[k] = sums.get(k, 0.0) + float(v)
    count += batch_size
  return {k: v / max(count, 1) for k, v in sums.items()}


def _flush_scalars(writer, pending, extra) -> dict[str, float]:
  """Moves the pending step metrics to the host, stops on a non-finite loss, writes their means."""
  host = jax.device_get([m for _, m in pending])
  for (step, _), values in zip(pending, host):
    bad = sorted(k for k, v in values.items() if not np.isfinite(v))
    if bad:
      raise NonFiniteLossError(
          f"non-finite loss at step {step}: {', '.join(bad)}. The last good checkpoint is kept; lower the "
          "learning rates or check the data")
  means = {k: float(np.mean([v[k] for v in host])) for k in host[-1]}
  means.update({k: float(v) for k, v in extra.items()})
  writer.scalars(pending[-1][0], {f"train_{k}": v for k, v in means.items()})
  writer.console(pending[-1][0], means)
  return means


def _fmt(d: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(d.items()))
