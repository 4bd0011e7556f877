"""Dual-path GAN training for one contrast phase (paper sections 3.1-3.3, 4.3.2).

`train_and_evaluate(config, workdir)` reads top to bottom: data, networks and optimisers, mesh and shardings,
the jitted step, checkpoint restore, then the loop with its periodic summaries, evaluations and checkpoints.

Order of the updates inside one step (pix2pix's order, with a single generator forward pass):
  1. The generator runs once on the whole image (global path) and on its four quadrants (local path, re-assembled),
     keeping the VJP of that forward pass.
  2. The discriminator is updated on real pairs (target 1) and on both paths' virtual images (target 0,
     weighted 0.6 / 0.4, no gradient to the generator).
  3. The generator loss of each path (adversarial against the *updated* discriminator + lambda1 * pixel MSE +
     perceptual) is combined 0.6 / 0.4, differentiated with respect to the virtual images, and pulled back
     through the saved VJP to the generator parameters: gradients flow through both paths.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from data_prep import phases

from vcect_jax import checkpoint as ckpt_lib
from vcect_jax import dual_path
from vcect_jax import embedded
from vcect_jax import hu
from vcect_jax import input_pipeline
from vcect_jax import losses
from vcect_jax import metrics as metrics_lib
from vcect_jax import models
from vcect_jax import sharding
from vcect_jax import summaries


class Generators(nnx.Module):
  """The generator of each path; `local_net is global_net` unless `dual_path.shared_generator` is False."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.global_net = models.Generator(config.model.generator, rngs=rngs)
    if config.dual_path.enabled and not config.dual_path.shared_generator:
      self.local_net = models.Generator(config.model.generator, rngs=rngs)
    else:
      self.local_net = self.global_net


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------------------------------------ optimisers
def learning_rate_schedule(base_lr: float, config, steps_per_epoch: int) -> optax.Schedule:
  """Constant, times `decay_factor` after `decay_epochs` (paper: x0.1 after 40 of 50 epochs).

  With `train.steps` set, the decay comes at the same fraction of the run (`steps * decay_epochs / epochs`).
  """
  t = config.train
  if t.steps > 0:
    decay_step = int(round(t.steps * t.decay_epochs / t.epochs))
  else:
    decay_step = int(t.decay_epochs * steps_per_epoch)
  return optax.piecewise_constant_schedule(base_lr, {decay_step: config.train.decay_factor})


def make_optimizer(schedule: optax.Schedule, config) -> optax.GradientTransformation:
  t = config.train
  if t.weight_decay_mode == "decoupled":
    return optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  if t.weight_decay_mode == "l2":
    return optax.chain(optax.add_decayed_weights(t.weight_decay), optax.adam(schedule, b1=t.b1, b2=t.b2))
  raise ValueError(f"train.weight_decay_mode must be 'l2' or 'decoupled', got {t.weight_decay_mode!r}")


# ------------------------------------------------------------------------------------------------ the step
def path_weights(config) -> dict[str, float]:
  if config.dual_path.enabled:
    return {"global": config.dual_path.global_weight, "local": config.dual_path.local_weight}
  return {"global": 1.0}


def generate(gens: Generators, pre: jax.Array, paths) -> dict[str, jax.Array]:
  """The virtual contrast image of each path: global on the whole image, local on re-assembled quadrants."""
  out = {"global": gens.global_net(pre)}
  if "local" in paths:
    out["local"] = dual_path.assemble(gens.local_net(dual_path.quadrants(pre)))
  return out


def make_train_step(config, graphdef, encoder_graphdef):
  """The pure step `(state, encoder_state, batch) -> (state, metrics)` for `jax.jit`."""
  weights = path_weights(config)
  use_d = config.loss.use_discriminator
  use_perc = config.loss.use_perceptual
  perc_weights = tuple(config.perceptual.weights)

  def step(state, encoder_state, batch):
    gens, disc, opt_g, opt_d = nnx.merge(graphdef, state)
    pre, post = batch["pre"], batch["post"]
    metrics = {}

    # 1. One generator forward pass over both paths, keeping its VJP.
    g_def, g_params, g_rest = nnx.split(gens, nnx.Param, ...)

    def forward(params):
      g = nnx.merge(g_def, params, g_rest, copy=True)
      return generate(g, pre, weights), nnx.state(g, nnx.BatchStat)

    virtual, pullback, g_stats = jax.vjp(forward, g_params, has_aux=True)
    nnx.update(gens, g_stats)

    # 2. Discriminator update: real pairs -> 1, virtual pairs of each path -> 0.
    if use_d:
      d_def, d_params, d_rest = nnx.split(disc, nnx.Param, ...)

      def d_loss_fn(params):
        d = nnx.merge(d_def, params, d_rest, copy=True)
        terms = {"d_real": losses.adversarial(d(pre, post), 1.0)}
        for path in weights:
          terms[f"d_fake_{path}"] = losses.adversarial(d(pre, jax.lax.stop_gradient(virtual[path])), 0.0)
        fake = losses.weighted_sum({p: terms[f"d_fake_{p}"] for p in weights}, weights)
        return terms["d_real"] + fake, (terms, nnx.state(d, nnx.BatchStat))

      (d_loss, (d_terms, d_stats)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
      nnx.update(disc, d_stats)
      opt_d.update(disc, d_grads)
      metrics.update(d_terms, d_loss=d_loss)
      d_now = nnx.split(disc)

    encoder = nnx.merge(encoder_graphdef, encoder_state) if use_perc else None

    # 3. Generator loss on the virtual images, against the updated discriminator, pulled back to the params.
    def g_loss_fn(virtual):
      terms, totals = {}, {}
      for path, v in virtual.items():
        terms[f"g_pixel_{path}"] = losses.pixel_mse(v, post)
        path_total = config.loss.pixel_weight * terms[f"g_pixel_{path}"]
        if use_d:
          d = nnx.merge(*d_now, copy=True)  # batch statistics of the virtual images; running averages are not kept
          terms[f"g_adv_{path}"] = losses.adversarial(d(pre, v), 1.0)
          path_total += config.loss.adversarial_weight * terms[f"g_adv_{path}"]
        if use_perc:
          perc, per_block = models.perceptual.perceptual_loss(encoder, v, post, perc_weights)
          terms[f"g_perc_{path}"] = perc
          for j, block_loss in enumerate(per_block):
            terms[f"g_perc_{path}_block{j + 1}"] = block_loss
          path_total += perc
        totals[path] = path_total
        terms[f"g_total_{path}"] = path_total
      return losses.weighted_sum(totals, weights), terms

    (g_loss, g_terms), d_virtual = jax.value_and_grad(g_loss_fn, has_aux=True)(virtual)
    (g_grads,) = pullback(d_virtual)
    opt_g.update(gens, g_grads)
    metrics.update(g_terms, g_loss=g_loss)
    return nnx.state((gens, disc, opt_g, opt_d)), metrics

  return step


def jit_train_step(config, graphdef, encoder_graphdef, mesh):
  """The jitted train step over `mesh`: state and encoder replicated, batch split over 'data', state donated."""
  replicated = sharding.replicated(mesh)
  return jax.jit(make_train_step(config, graphdef, encoder_graphdef),
                 in_shardings=(replicated, replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(config, graphdef, encoder_graphdef):
  """`(state, encoder_state, batch) -> per-image metrics and images`, global path, running statistics."""
  window = hu.Window.from_config(config.data.window)

  def step(state, encoder_state, batch):
    gens, _, _, _ = nnx.merge(graphdef, state)
    gens.eval()
    virtual = gens.global_net(batch["pre"])
    virtual_unit = hu.model_to_unit(virtual[..., 0])
    real_unit = hu.model_to_unit(batch["post"][..., 0])
    virtual_hu = hu.model_to_hu(virtual[..., 0], window)
    out = {
        "psnr": metrics_lib.psnr(jnp.clip(virtual_unit, 0, 1), real_unit),
        "ssim": metrics_lib.ssim(jnp.clip(virtual_unit, 0, 1), real_unit),
        "mae_hu": metrics_lib.mae_hu(virtual_hu, batch["post_hu"], batch["body_mask"], window.low, window.high),
        "identity_mae_hu": metrics_lib.mae_hu(batch["pre_hu"], batch["post_hu"], batch["body_mask"],
                                              window.low, window.high),
        "virtual": virtual,
    }
    if encoder_state is not None:
      encoder = nnx.merge(encoder_graphdef, encoder_state)
      out["heatmaps"] = models.perceptual.heatmaps(encoder, virtual, batch["post"])
    return out

  return step


# ------------------------------------------------------------------------------------------------ set-up
def num_train_steps(config, steps_per_epoch: int) -> int:
  return int(config.train.steps) if config.train.steps > 0 else int(config.train.epochs * steps_per_epoch)


def validate_config(config) -> None:
  """Stops early, with what to fix, on values that would fail later or silently do something else."""
  t = config.train
  problems = []
  if config.phase not in phases.CONTRAST_PHASES:
    problems.append(f"phase={config.phase!r} must be one of {phases.CONTRAST_PHASES}")
  if t.batch_size < 1:
    problems.append(f"train.batch_size={t.batch_size} must be >= 1")
  if t.weight_decay_mode not in ("l2", "decoupled"):
    problems.append(f"train.weight_decay_mode={t.weight_decay_mode!r} must be 'l2' or 'decoupled'")
  for name in ("generator_lr", "discriminator_lr"):
    if not t[name] > 0:
      problems.append(f"train.{name}={t[name]} must be > 0")
  size, div = config.data.image_size, 2 ** len(config.model.generator.widths)
  if size % div:
    problems.append(f"data.image_size={size} must be a multiple of {div} (the local path halves it and the "
                    f"generator needs multiples of {div // 2})")
  if config.dual_path.enabled and not math.isclose(config.dual_path.global_weight + config.dual_path.local_weight,
                                                   1.0):
    logging.warning("dual_path weights sum to %s, not 1", config.dual_path.global_weight +
                    config.dual_path.local_weight)
  for name in ("log_every", "image_every", "eval_every", "checkpoint_every"):
    if t[name] < 1:
      problems.append(f"train.{name}={t[name]} must be >= 1")
  if problems:
    raise ValueError("invalid config: " + "; ".join(problems))


def build_networks(config, steps_per_epoch: int):
  """Generators, discriminator and their optimisers, initialised from `config.seed`."""
  rngs = nnx.Rngs(config.seed)
  gens = Generators(config, rngs=rngs)
  disc = models.Discriminator(config.model.discriminator, rngs=rngs)
  g_lr = learning_rate_schedule(config.train.generator_lr, config, steps_per_epoch)
  d_lr = learning_rate_schedule(config.train.discriminator_lr, config, steps_per_epoch)
  opt_g = nnx.Optimizer(gens, make_optimizer(g_lr, config), wrt=nnx.Param)
  opt_d = nnx.Optimizer(disc, make_optimizer(d_lr, config), wrt=nnx.Param)
  return (gens, disc, opt_g, opt_d), (g_lr, d_lr)


def load_perceptual_encoder(config, workdir: str):
  """The frozen pretext encoder (or None without the perceptual loss); pretrains one for the embedded default."""
  if not config.loss.use_perceptual and not config.perceptual.init_generator:
    return None, None
  path = embedded.ensure_pretext_checkpoint(config, workdir)
  from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

  encoder = pretrain.load_pretext_encoder(path, config)
  return encoder, path


# ------------------------------------------------------------------------------------------------ main loop
def train_and_evaluate(config, workdir: str) -> dict:
  """Trains one phase's dual-path GAN in `workdir`.

  Returns:
    {"step": last step, "train": mean training metrics of the last logging interval, "eval": the last validation
    metrics, "state": the final nnx state of (generators, discriminator, optimisers) on the host}.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)

  # ---- data
  data_dir = embedded.ensure_dataset(config, workdir)
  train_source = input_pipeline.load_source(data_dir, config.phase, "train")
  val_source = input_pipeline.load_source(data_dir, config.phase, "validation")
  mesh = sharding.make_mesh()
  local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_source), config.train.batch_size)
  total_steps = num_train_steps(config, steps_per_epoch)
  train_ds = input_pipeline.train_dataset(train_source, config, local_batch)
  logging.info("%d training pairs, %d validation pairs, %d steps/epoch, %d steps", len(train_source),
               len(val_source), steps_per_epoch, total_steps)

  # ---- networks, optimisers, frozen perceptual encoder
  objects, (g_lr, d_lr) = build_networks(config, steps_per_epoch)
  encoder, pretext_path = load_perceptual_encoder(config, workdir)
  if encoder is not None and config.perceptual.init_generator:
    from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

    gens = objects[0]
    pretrain.init_generator_from_pretext(gens.global_net, pretext_path)
    if gens.local_net is not gens.global_net:
      pretrain.init_generator_from_pretext(gens.local_net, pretext_path)
  for obj in objects[:2]:
    obj.train()
  graphdef, state = nnx.split(objects)
  if config.loss.use_perceptual:
    encoder.eval()
    encoder_graphdef, encoder_state = nnx.split(encoder)
  else:
    encoder_graphdef, encoder_state = None, None

  # ---- shardings: parameters replicated, batch split over 'data'
  state = sharding.replicate(state, mesh)
  if encoder_state is not None:
    encoder_state = sharding.replicate(encoder_state, mesh)
  train_step = jit_train_step(config, graphdef, encoder_graphdef, mesh)
  eval_step = jax.jit(make_eval_step(config, graphdef, encoder_graphdef))

  # ---- checkpoint restore
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                       async_save=config.train.async_checkpoints)
  train_iter = input_pipeline.make_iterator(train_ds, config.input.worker_count)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state, iter_state = checkpointer.restore(start_step, state)
    train_iter.set_state(iter_state)
    logging.info("Resumed from step %d", start_step)

  # ---- loop
  writer = summaries.Writer(workdir, total_steps)
  preempted = ckpt_lib.PreemptionFlag()
  window = hu.Window.from_config(config.data.window)
  pending = []  # (step, device metrics) since the last host fetch
  last_eval, last_train = {}, {}
  step = start_step
  try:
    with jax.set_mesh(mesh):
      while step < total_steps:
        batch = sharding.global_batch(next(train_iter), mesh)
        state, step_metrics = train_step(state, encoder_state, batch)
        step += 1
        pending.append((step, step_metrics))
        writer.tick(step)

        last = step == total_steps
        if (step % config.train.log_every == 0 or last or step % config.train.checkpoint_every == 0
            or preempted.is_set()):
          last_train = _flush_scalars(writer, pending, {"lr_generator": g_lr(step - 1),
                                                        "lr_discriminator": d_lr(step - 1)})
          pending = []
        if step % config.train.image_every == 0 or last:
          summaries.write_images(writer, eval_step, state, encoder_state, val_source, config, step, window, mesh)
        if step % config.train.eval_every == 0 or last:
          last_eval = evaluate(eval_step, state, encoder_state, val_source, config, mesh)
          writer.scalars(step, {f"eval_{k}": v for k, v in last_eval.items()})
          logging.info("step %d validation: %s", step, _fmt(last_eval))
        if step % config.train.checkpoint_every == 0 or last or preempted.is_set():
          checkpointer.save(step, state, train_iter.get_state(), config)
        if preempted.is_set():
          logging.warning("Stopped at step %d after SIGTERM; rerun the same command to resume", step)
          break
  finally:
    checkpointer.close()
    writer.close()
    preempted.restore_handler()
  return {"step": step, "train": last_train, "eval": last_eval, "state": jax.device_get(state)}


METRIC_KEYS = ("psnr", "ssim", "mae_hu", "identity_mae_hu")


@jax.jit
def _metric_sums(out: dict) -> dict:
  return {k: jnp.sum(out[k]) for k in METRIC_KEYS}


def evaluate(eval_step, state, encoder_state, source, config, mesh) -> dict[str, float]:
  """Mean PSNR, SSIM and MAE (HU) of the global path over the first `train.eval_examples` validation pairs.

  Every process feeds its share of each global batch; the sums are taken on the devices, so the means cover all
  processes' examples. Empty when the validation split has fewer examples than devices.
  """
  available = min(len(source), config.train.eval_examples or len(source))
  batch_size = sharding.fitting_batch_size(mesh, config.train.eval_batch_size, available)
  if not batch_size:
    logging.warning("validation skipped: %d validation examples, fewer than the %d devices", available,
                    mesh.devices.size)
    return {}
  ds = input_pipeline.eval_dataset(source, config, batch_size // jax.process_count(), config.train.eval_examples)
  sums, count = {}, 0
  for batch in ds:
    out = eval_step(state, None, sharding.global_batch(batch, mesh))
    for k, v in jax.device_get(_metric_sums(out)).items():
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


def load_generators(workdir: str, step: int | None = None):
  """The trained generators of a run (eval mode) and the config stored with its checkpoint.

  Evaluation and inference need only the work directory: the checkpoint carries its config.
  """
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  config = ckpt_lib.read_config(checkpoint_dir, step)
  objects, _ = build_networks(config, steps_per_epoch=1)
  graphdef, state = nnx.split(objects)
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    state, _ = checkpointer.restore(step, state)
  finally:
    checkpointer.close()
  gens = nnx.merge(graphdef, state)[0]
  gens.eval()
  return config, gens
