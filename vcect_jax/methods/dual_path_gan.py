"""The paper's method: a dual-path conditional GAN with a perceptual loss (sections 3.1-3.3, 4.3.2).

State (`DualPathGANState`): `generators` (the global path's generator, and the local path's when it is not
shared), `discriminator`, their optimisers `opt_g` and `opt_d`, and the frozen pretext `encoder` of the perceptual
loss (None without it); with `registration.enabled` (not the paper: RegGAN's correction of misaligned targets,
`vcect_jax.models.registration`) also `registration` and `opt_r`, trained by the generator loss's pixel and
perceptual terms, which compare the warped virtual image with the real one.

Order of the updates inside one step (pix2pix's order, with a single generator forward pass):
  1. The generator runs once on the whole image (global path) and on its four quadrants (local path, re-assembled),
     keeping the VJP of that forward pass.
  2. The discriminator is updated on real pairs (target 1) and on both paths' virtual images (target 0,
     weighted 0.6 / 0.4, no gradient to the generator).
  3. The generator loss of each path (adversarial against the *updated* discriminator + lambda1 * pixel MSE +
     perceptual) is combined 0.6 / 0.4, differentiated with respect to the virtual images, and pulled back
     through the saved VJP to the generator parameters: gradients flow through both paths.
The loss terms and their composition are in `vcect_jax.losses`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from vcect_jax import dual_path
from vcect_jax import losses
from vcect_jax import models
from vcect_jax.methods import contrast
from vcect_jax.models import registration as registration_lib

CONTRAST_PHASES = contrast.CONTRAST_PHASES


class Generators(nnx.Module):
  """The generator of each path; `local_net is global_net` unless `dual_path.shared_generator` is False."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.global_net = models.Generator(config.model.generator, rngs=rngs)
    if config.dual_path.enabled and not config.dual_path.shared_generator:
      self.local_net = models.Generator(config.model.generator, rngs=rngs)
    else:
      self.local_net = self.global_net


class DualPathGANState(nnx.Module):
  """Everything the dual-path GAN trains (and the frozen encoder it uses), by name; with `registration.enabled`
  also the registration network and its optimiser, with `train.ema_decay > 0` the moving average of the global
  generator (each absent otherwise, so that checkpoints keep their layout)."""

  def __init__(self, generators: Generators, discriminator: models.Discriminator, opt_g: nnx.Optimizer,
               opt_d: nnx.Optimizer, encoder: models.Encoder | None,
               registration: registration_lib.Registration | None = None, opt_r: nnx.Optimizer | None = None,
               ema: models.Generator | None = None):
    self.generators = generators
    self.discriminator = discriminator
    self.opt_g = opt_g
    self.opt_d = opt_d
    self.encoder = encoder
    if registration is not None:
      self.registration = registration
      self.opt_r = opt_r
    if ema is not None:
      self.ema = ema


# ------------------------------------------------------------------------------------------------ optimisers
def learning_rate_schedule(base_lr: float, train_config, steps_per_epoch: int) -> optax.Schedule:
  """Constant, times `decay_factor` after `decay_epochs` (paper: x0.1 after 40 of 50 epochs).

  With `steps` set, the decay comes at the same fraction of the run (`steps * decay_epochs / epochs`).
  """
  t = train_config
  return optax.piecewise_constant_schedule(base_lr, {decay_step(t, steps_per_epoch): t.decay_factor})


def decay_step(train_config, steps_per_epoch: int) -> int:
  """The step after which the learning rates are multiplied by `decay_factor`: `decay_epochs` epochs in, or with
  `steps` set the same fraction of `steps` (so a larger `train.steps` moves it)."""
  t = train_config
  if t.steps > 0:
    return int(round(t.steps * t.decay_epochs / t.epochs))
  return int(t.decay_epochs * steps_per_epoch)


def make_optimizer(schedule: optax.Schedule, train_config) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (torch.optim.Adam(weight_decay), as in the paper) or AdamW."""
  t = train_config
  if t.weight_decay_mode == "decoupled":
    return optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  if t.weight_decay_mode == "l2":
    return optax.chain(optax.add_decayed_weights(t.weight_decay), optax.adam(schedule, b1=t.b1, b2=t.b2))
  raise ValueError(f"train.weight_decay_mode must be 'l2' or 'decoupled', got {t.weight_decay_mode!r}")


# ------------------------------------------------------------------------------------------------ paths
def ema_decay(config) -> float:
  return float(config.train.get("ema_decay", 0.0))


def update_ema(ema: nnx.Module, live: nnx.Module, decay: float, step) -> None:
  """`ema`'s parameters <- d * ema + (1 - d) * live's, d = min(decay, (1 + step) / (10 + step)) (early steps follow
  the live weights closely); BatchNorm running statistics copied from `live` (they are averages already)."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  averaged = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, nnx.state(ema, nnx.Param), nnx.state(live, nnx.Param))
  nnx.update(ema, averaged, nnx.state(live, nnx.BatchStat))


def path_weights(config) -> dict[str, float]:
  if config.dual_path.enabled:
    return {"global": config.dual_path.global_weight, "local": config.dual_path.local_weight}
  return {"global": 1.0}


def generate(gens: Generators, pre: jax.Array, paths) -> dict[str, jax.Array]:
  """The virtual contrast image of each path: global on the whole image, local on re-assembled quadrants.

  In training mode a shared generator's BatchNorm running statistics follow the whole images only: the local
  path's call normalises its quadrants with their own batch statistics, as before, but its update of the running
  averages is dropped. Evaluation and inference run the global path on whole images, and averages that were half
  quadrant statistics shifted every output (the same trained arterial `:demo` parameters on a held-out phantom:
  the liver's enhancement ratio 1.22 -> 1.11, the aorta's 0.90 -> 0.77; benchmarks/RESULTS.md, issue 12, round
  15). Training itself (its batch statistics, hence its parameters) is unchanged.
  """
  out = {"global": gens.global_net(pre)}
  if "local" in paths:
    local_net = gens.local_net
    if local_net is gens.global_net:  # a copy with the same parameters: its running-average update is not kept
      local_net = nnx.merge(*nnx.split(local_net), copy=True)
    out["local"] = dual_path.assemble(local_net(dual_path.quadrants(pre)))
  return out


class DualPathGAN(contrast.ContrastMethod):
  """The paper's dual-path GAN as a method of the shared training loop."""

  name = "dual_path_gan"
  console_keys = ("g_loss", "d_loss")

  def __init__(self, config):
    super().__init__(config)
    self.paths = path_weights(config)
    self.weights = losses.GeneratorWeights.from_config(config.loss, float(config.data.window.width),
                                                       float(config.data.window.level))
    self._schedules = None

  # ---- configuration
  def validate(self) -> None:
    config, t = self.config, self.config.train
    problems = [f"train.{p}" for p in self.loop_settings().check()]
    if config.phase not in CONTRAST_PHASES:
      problems.append(f"phase={config.phase!r} must be one of {CONTRAST_PHASES}")
    if t.weight_decay_mode not in ("l2", "decoupled"):
      problems.append(f"train.weight_decay_mode={t.weight_decay_mode!r} must be 'l2' or 'decoupled'")
    for name in ("generator_lr", "discriminator_lr"):
      if not t[name] > 0:
        problems.append(f"train.{name}={t[name]} must be > 0")
    size, div = config.data.image_size, 2 ** len(config.model.generator.widths)
    if size % div:
      problems.append(f"data.image_size={size} must be a multiple of {div} (the local path halves it and the "
                      f"generator needs multiples of {div // 2})")
    if config.dual_path.enabled and not math.isclose(config.dual_path.global_weight +
                                                     config.dual_path.local_weight, 1.0):
      logging.warning("dual_path weights sum to %s, not 1", config.dual_path.global_weight +
                      config.dual_path.local_weight)
    if (config.loss.use_perceptual or config.perceptual.init_generator) and not config.perceptual.pretext_checkpoint:
      problems.append("perceptual.pretext_checkpoint is empty: run through `python -m vcect_jax.main`, which "
                      "pretrains one, or pretrain with configs/pretrain.py and pass its <workdir>/pretext "
                      "(or set loss.use_perceptual=False and perceptual.init_generator=False)")
    if not 0.0 <= ema_decay(config) < 1.0:
      problems.append(f"train.ema_decay={ema_decay(config)} must be in [0, 1) (0: no moving average)")
    if self.registration_enabled:
      r = config.registration
      if not r.smooth_weight >= 0:
        problems.append(f"registration.smooth_weight={r.smooth_weight} must be >= 0")
      if len(tuple(r.widths)) != 3 or min(tuple(r.widths)) < 1:
        problems.append(f"registration.widths={tuple(r.widths)} must be three positive channel counts")
      if not r.get("unwarped_weight", 0.0) >= 0:
        problems.append(f"registration.unwarped_weight={r.unwarped_weight} must be >= 0")
    if problems:
      raise ValueError("invalid config: " + "; ".join(problems))

  # ---- state
  def _learning_rates(self, steps_per_epoch: int):
    t = self.config.train
    step = decay_step(t, steps_per_epoch)
    total = int(t.steps) if t.steps > 0 else int(math.ceil(t.epochs * steps_per_epoch))
    logging.info("learning rates: generator %g, discriminator %g, times %g after step %d of %d (%s)",
                 t.generator_lr, t.discriminator_lr, t.decay_factor, step, total,
                 f"train.decay_epochs/train.epochs = {t.decay_epochs:g}/{t.epochs:g} of train.steps={t.steps}: "
                 "a larger train.steps moves the decay" if t.steps > 0 else
                 f"train.decay_epochs={t.decay_epochs:g} epochs of {steps_per_epoch} steps")
    return (learning_rate_schedule(t.generator_lr, t, steps_per_epoch),
            learning_rate_schedule(t.discriminator_lr, t, steps_per_epoch))

  def create_state(self, steps_per_epoch: int) -> DualPathGANState:
    """Generators, discriminator, optimisers (from `config.seed`), and the frozen pretext encoder if used."""
    from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

    config = self.config
    rngs = nnx.Rngs(config.seed)
    gens = Generators(config, rngs=rngs)
    disc = models.Discriminator(config.model.discriminator, rngs=rngs)
    self._schedules = self._learning_rates(steps_per_epoch)
    g_lr, d_lr = self._schedules
    opt_g = nnx.Optimizer(gens, make_optimizer(g_lr, config.train), wrt=nnx.Param)
    opt_d = nnx.Optimizer(disc, make_optimizer(d_lr, config.train), wrt=nnx.Param)
    path = config.perceptual.pretext_checkpoint
    if config.perceptual.init_generator:
      pretrain.init_generator_from_pretext(gens.global_net, path, config.data.window)
      if gens.local_net is not gens.global_net:
        pretrain.init_generator_from_pretext(gens.local_net, path, config.data.window)
    encoder = pretrain.load_pretext_encoder(path, config) if config.loss.use_perceptual else None
    gens.train()
    disc.train()
    reg = opt_r = None
    if self.registration_enabled:
      reg = registration_lib.Registration(tuple(config.registration.widths), rngs=rngs)
      opt_r = nnx.Optimizer(reg, make_optimizer(g_lr, config.train), wrt=nnx.Param)
    ema = None
    if self.ema_enabled:  # a copy with its own buffers (the jitted step donates the whole state)
      ema = nnx.clone(gens.global_net)
      nnx.update(ema, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(ema)))
    return DualPathGANState(gens, disc, opt_g, opt_d, encoder, reg, opt_r, ema)

  @property
  def ema_enabled(self) -> bool:
    return ema_decay(self.config) > 0

  @property
  def registration_enabled(self) -> bool:
    return registration_lib.enabled(self.config)

  def learning_rates(self, step: int) -> dict[str, float]:
    g_lr, d_lr = self._schedules
    return {"lr_generator": float(g_lr(step - 1)), "lr_discriminator": float(d_lr(step - 1))}

  # ---- steps
  def train_step(self, state: DualPathGANState, batch):
    config, weights = self.config, self.paths
    use_d, use_perc = config.loss.use_discriminator, config.loss.use_perceptual
    gens, disc = state.generators, state.discriminator
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
        fake = {p: d(pre, jax.lax.stop_gradient(virtual[p])) for p in weights}
        loss, terms = losses.discriminator_loss(d(pre, post), fake, weights)
        return loss, (terms, nnx.state(d, nnx.BatchStat))

      (d_loss, (d_terms, d_stats)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
      nnx.update(disc, d_stats)
      state.opt_d.update(disc, d_grads)
      metrics.update(d_terms, d_loss=d_loss)
      d_now = nnx.split(disc)

    perc_weights = tuple(config.perceptual.weights)
    g_weights = self.weights.at_step(state.opt_g.step.value)  # the adversarial warm-up, if any

    # 3. Generator loss on the virtual images, against the updated discriminator, pulled back to the params.
    mid = pre.shape[-1] // 2
    pre_center = pre[..., mid:mid + post.shape[-1]]  # the non-contrast slice paired with `post`
    registering = self.registration_enabled
    gradient_unwarped = registering and bool(config.registration.get("gradient_term_unwarped", False))
    if registering:
      r_def, r_params = nnx.split(state.registration, nnx.Param)
      smooth_weight = float(config.registration.smooth_weight)
      unwarped_weight = float(config.registration.get("unwarped_weight", 0.0))

    def g_loss_fn(virtual, r_params):
      terms, totals = {}, {}
      for path, v in virtual.items():
        compared = v   # what the terms that compare with the real slice see
        if registering:  # the virtual image warped onto its target (RegGAN's correction loss)
          flow = nnx.merge(r_def, r_params)(v, post)
          compared = registration_lib.warp(v, flow)
          terms[f"g_smooth_{path}"] = registration_lib.smoothness(flow)
        terms[f"g_pixel_{path}"] = g_weights.pixel_loss(compared, post, pre_center,
                                                        gradient_virtual=v if gradient_unwarped else None)
        if registering:
          terms[f"g_pixel_{path}"] += smooth_weight * terms[f"g_smooth_{path}"]
          if unwarped_weight:  # the virtual image as it is, which inference shows, compared too
            terms[f"g_pixel_{path}"] += unwarped_weight * g_weights.pixel_loss(v, post, pre_center)
        adv = perc = None
        if use_d:
          d = nnx.merge(*d_now, copy=True)  # batch statistics of the virtual images; running averages not kept
          adv = terms[f"g_adv_{path}"] = losses.adversarial(d(pre, v), 1.0)
        if use_perc:
          perc, per_block = models.perceptual.perceptual_loss(state.encoder, compared, post, perc_weights)
          terms[f"g_perc_{path}"] = perc
          for j, block_loss in enumerate(per_block):
            terms[f"g_perc_{path}_block{j + 1}"] = block_loss
        totals[path] = terms[f"g_total_{path}"] = losses.generator_path_loss(
            g_weights, terms[f"g_pixel_{path}"], adv, perc)
      return losses.dual_path_loss(totals, weights), terms

    (g_loss, g_terms), (d_virtual, r_grads) = jax.value_and_grad(g_loss_fn, argnums=(0, 1), has_aux=True)(
        virtual, r_params if registering else {})
    (g_grads,) = pullback(d_virtual)
    state.opt_g.update(gens, g_grads)
    if self.ema_enabled:
      update_ema(state.ema, gens.global_net, ema_decay(config), state.opt_g.step.value)
    if registering:
      state.opt_r.update(state.registration, r_grads)
    metrics.update(g_terms, g_loss=g_loss)
    return metrics

  def images(self, state: DualPathGANState, batch):
    """Non-contrast | virtual | real | |virtual - real| on the training window; perceptual heatmaps."""
    virtual = self._virtual(state, batch["pre"])
    out = {"pre_virtual_real_absdiff": contrast.comparison_grid(virtual, batch)}
    if state.encoder is not None:
      heat = models.perceptual.heatmaps(state.encoder, virtual, batch["post"])  # (B, H, W, 4)
      heat = heat / jnp.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)
      out["perceptual_heatmaps"] = jnp.concatenate(list(jnp.moveaxis(heat, -1, 0)), axis=2)[..., None]
    return out

  # ---- the generator
  def generator(self, state: DualPathGANState) -> nnx.Module:
    """The generator that evaluation, exports and inference use: the moving average when `train.ema_decay > 0`."""
    return state.ema if self.ema_enabled else state.generators.global_net

  @property
  def generator_key(self) -> tuple[str, ...]:   # where `generator(state)` lies in a checkpoint's state
    return ("ema",) if self.ema_enabled else ("generators", "global_net")

  def build_generator(self) -> nnx.Module:
    return models.Generator(self.config.model.generator, rngs=nnx.Rngs(0))

