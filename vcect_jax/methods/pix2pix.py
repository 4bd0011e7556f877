"""pix2pix (Isola et al., CVPR 2017) as a baseline on the shared loop: paired, conditional GAN + L1.

State (`Pix2PixState`): `generator` (U-Net-256, `models.baselines.UNetGenerator`), `discriminator` (70x70
PatchGAN on the non-contrast stack and a contrast slice concatenated, 4 channels), and their optimisers `opt_g`,
`opt_d` (Adam 2e-4, betas (0.5, 0.999), linear decay: config section `pix2pix`).

Order inside one step (the reference's `optimize_parameters`):
  1. The generator runs once (dropout on, from the step's key; BatchNorm on the batch), keeping its VJP.
  2. The discriminator is updated: 0.5 * (GAN(D(pre, virtual), 0) + GAN(D(pre, post), 1)), no gradient to G.
  3. The generator loss GAN(D'(pre, virtual), 1) + lambda_L1 * |virtual - post| against the *updated*
     discriminator D' is pulled back through the saved VJP to the generator parameters.
GAN is the vanilla (BCE-with-logits) loss by default (`pix2pix.gan_mode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax import losses
from vcect_jax.methods import translation
from vcect_jax.models import baselines as nets

GAN_MODES = ("vanilla", "lsgan")


def gan_loss(mode: str):
  """`(logits, target) -> loss`: BCE-with-logits ('vanilla') or least squares ('lsgan')."""
  if mode == "vanilla":
    return losses.bce_with_logits
  if mode == "lsgan":
    return losses.least_squares
  raise ValueError(f"gan_mode must be one of {GAN_MODES}, got {mode!r}")


class Pix2PixState(nnx.Module):
  """Everything pix2pix trains, by name."""

  def __init__(self, generator: nets.UNetGenerator, discriminator: nets.PatchDiscriminator, opt_g: nnx.Optimizer,
               opt_d: nnx.Optimizer):
    self.generator = generator
    self.discriminator = discriminator
    self.opt_g = opt_g
    self.opt_d = opt_d


class Pix2Pix(translation.TranslationBaseline):
  """pix2pix on the records of `config.phase`: non-contrast stack -> contrast slice, paired."""

  name = "pix2pix"
  generator_key = ("generator",)

  def check_section(self):
    s, problems = self.section, []
    if s.gan_mode not in GAN_MODES:
      problems.append(f"pix2pix.gan_mode={s.gan_mode!r} must be one of {GAN_MODES}")
    if s.generator.num_downs < 5:
      problems.append(f"pix2pix.generator.num_downs={s.generator.num_downs} must be >= 5")
    return problems

  def size_multiple(self) -> int:
    return 2 ** int(self.section.generator.num_downs)

  def build_generator(self) -> nets.UNetGenerator:
    return nets.UNetGenerator(self.section.generator, rngs=nnx.Rngs(0))

  def create_state(self, steps_per_epoch: int) -> Pix2PixState:
    s = self.section
    rngs = nnx.Rngs(int(self.config.seed))
    gen = nets.UNetGenerator(s.generator, rngs=rngs)
    in_channels = int(s.generator.in_channels) + int(s.generator.out_channels)
    disc = nets.PatchDiscriminator(s.discriminator, in_channels, rngs=rngs)
    tx = self.make_optimizer(steps_per_epoch)
    return Pix2PixState(gen, disc, nnx.Optimizer(gen, tx, wrt=nnx.Param), nnx.Optimizer(disc, tx, wrt=nnx.Param))

  def generator(self, state: Pix2PixState) -> nnx.Module:
    return state.generator

  def train_step(self, state: Pix2PixState, batch):
    s = self.section
    gan = gan_loss(s.gan_mode)
    pre, post = batch["pre"], batch["post"]
    gen, disc = state.generator, state.discriminator
    dropout_key = self.step_key(state.opt_g, 0)

    # 1. One generator forward pass, keeping its VJP.
    g_def, g_params, g_rest = nnx.split(gen, nnx.Param, ...)

    def forward(params):
      g = nnx.merge(g_def, params, g_rest, copy=True)
      return g(pre, dropout_key=dropout_key), nnx.state(g, nnx.Not(nnx.Param))

    virtual, pullback, g_rest = jax.vjp(forward, g_params, has_aux=True)
    nnx.update(gen, g_rest)

    # 2. Discriminator update on (pre, virtual) -> 0 and (pre, post) -> 1.
    def d_loss_fn(d):
      d_fake = gan(d(jnp.concatenate([pre, jax.lax.stop_gradient(virtual)], axis=-1)), 0.0)
      d_real = gan(d(jnp.concatenate([pre, post], axis=-1)), 1.0)
      return 0.5 * (d_fake + d_real), {"d_fake": d_fake, "d_real": d_real}

    (d_loss, d_terms), d_grads = nnx.value_and_grad(d_loss_fn, has_aux=True)(disc)
    state.opt_d.update(disc, d_grads)
    d_now = nnx.split(disc)

    # 3. Generator loss against the updated discriminator, pulled back to the generator parameters.
    def g_loss_fn(v):
      d = nnx.merge(*d_now, copy=True)  # batch statistics of this call are not kept (D is never evaluated)
      adv = gan(d(jnp.concatenate([pre, v], axis=-1)), 1.0)
      l1 = losses.mean_absolute_error(v, post)
      return adv + float(s.lambda_l1) * l1, {"g_adv": adv, "g_l1": l1}

    (g_loss, g_terms), d_virtual = jax.value_and_grad(g_loss_fn, has_aux=True)(virtual)
    (g_grads,) = pullback(d_virtual)
    state.opt_g.update(gen, g_grads)
    return {"g_loss": g_loss, "d_loss": d_loss, **g_terms, **d_terms}
