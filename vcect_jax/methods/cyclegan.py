"""CycleGAN (Zhu et al., ICCV 2017) as a baseline on the shared loop: unpaired, two generators and cycle losses.

Domains: A = non-contrast 3-slice stacks `(B, H, W, 3)`, B = contrast slices `(B, H, W, 1)`.

State (`CycleGANState`): `generators.pre_to_post` (G_A, 3 -> 1 channels; the inference generator) and
`generators.post_to_pre` (G_B, 1 -> 3: it synthesises the whole non-contrast stack, so that the cycle
pre -> post -> pre reconstructs everything the forward generator saw and the backward cycle feeds G_A a real-shaped
stack); `discriminators.post` (D_A, judges contrast slices) and `discriminators.pre` (D_B, judges non-contrast
stacks), all ResNet-9-block / 70x70 PatchGAN with instance norm; one optimiser for both generators (`opt_g`) and
one for both discriminators (`opt_d`), as the reference; the image pools `pool_post` and `pool_pre` (50 earlier
virtual images each), whose contents and fill count are nnx variables, hence checkpointed with the rest.

One step (the reference's `optimize_parameters`): generators first, with the discriminators as they are:
  GAN(D_post(G_A(pre)), 1) + GAN(D_pre(G_B(post)), 1)                    (LSGAN)
  + lambda_A * |G_B(G_A(pre)) - pre| + lambda_B * |G_A(G_B(post)) - post|    (cycle, lambda 10)
  + lambda_idt * (lambda_B * |G_A(stack(post)) - post| + lambda_A * |G_B(mid(pre)) - pre|)   (identity, 0.5)
then both discriminators, 0.5 * (GAN(D(real), 1) + GAN(D(pool(virtual)), 0)) each, on virtual images drawn from
the pools. Identity adaptation: G_A takes stacks, so the contrast slice enters repeated three times; G_B takes one
slice, so the non-contrast stack enters as its middle slice and should come back as the whole stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax import losses
from vcect_jax.methods import translation
from vcect_jax.methods.pix2pix import GAN_MODES
from vcect_jax.methods.pix2pix import gan_loss
from vcect_jax.models import baselines as nets


class PoolImages(nnx.Variable):
  """The stored virtual images of an image pool (checkpointed, not trained)."""


class PoolCount(nnx.Variable):
  """How many slots of an image pool are filled."""


class ImagePool(nnx.Module):
  """The reference's `ImagePool` with its state in nnx variables: `(size, H, W, C)` images and a fill count.

  `query(images, key)` goes through the batch in order: while the pool is not full, each image is stored and
  returned; then each is, with probability 1/2, swapped for a uniformly chosen stored image (which is returned and
  replaced), else returned as it is. A size of 0 returns the images unchanged.
  """

  def __init__(self, size: int, image_shape: tuple[int, ...]):
    self.size = int(size)
    self.images = PoolImages(jnp.zeros((max(self.size, 1),) + tuple(image_shape), jnp.float32))
    self.count = PoolCount(jnp.zeros((), jnp.int32))

  def query(self, images: jax.Array, key: jax.Array) -> jax.Array:
    if self.size == 0:
      return images
    images = jax.lax.stop_gradient(images).astype(jnp.float32)

    def one(carry, inputs):
      pool, count = carry
      image, k = inputs
      k_swap, k_slot = jax.random.split(k)
      full = count >= self.size
      swap = full & (jax.random.uniform(k_swap) > 0.5)
      slot = jnp.where(full, jax.random.randint(k_slot, (), 0, self.size), jnp.minimum(count, self.size - 1))
      stored = pool[slot]
      out = jnp.where(swap, stored, image)
      pool = pool.at[slot].set(jnp.where(swap | ~full, image, stored))
      return (pool, count + (~full).astype(count.dtype)), out

    keys = jax.random.split(key, images.shape[0])
    (pool, count), out = jax.lax.scan(one, (self.images.value, self.count.value), (images, keys))
    self.images.value, self.count.value = pool, count
    return out


class Generators(nnx.Module):
  def __init__(self, config, *, rngs: nnx.Rngs):
    g = config.generator
    self.pre_to_post = nets.ResnetGenerator(g, rngs=rngs)
    self.post_to_pre = nets.ResnetGenerator(_inverse(g), rngs=rngs)


class Discriminators(nnx.Module):
  def __init__(self, config, *, rngs: nnx.Rngs):
    self.post = nets.PatchDiscriminator(config.discriminator, int(config.generator.out_channels), rngs=rngs)
    self.pre = nets.PatchDiscriminator(config.discriminator, int(config.generator.in_channels), rngs=rngs)


def _inverse(generator_config):
  inverse = generator_config.copy_and_resolve_references()
  inverse.in_channels, inverse.out_channels = generator_config.out_channels, generator_config.in_channels
  return inverse


class CycleGANState(nnx.Module):
  """Everything CycleGAN trains and keeps, by name."""

  def __init__(self, generators: Generators, discriminators: Discriminators, opt_g: nnx.Optimizer,
               opt_d: nnx.Optimizer, pool_post: ImagePool, pool_pre: ImagePool):
    self.generators = generators
    self.discriminators = discriminators
    self.opt_g = opt_g
    self.opt_d = opt_d
    self.pool_post = pool_post
    self.pool_pre = pool_pre


class CycleGAN(translation.TranslationBaseline):
  """CycleGAN between non-contrast stacks and contrast slices of `config.phase`, trained unpaired."""

  name = "cyclegan"
  generator_key = ("generators", "pre_to_post")
  unpaired = True

  def check_section(self):
    s, problems = self.section, []
    if s.gan_mode not in GAN_MODES:
      problems.append(f"cyclegan.gan_mode={s.gan_mode!r} must be one of {GAN_MODES}")
    if s.pool_size < 0:
      problems.append(f"cyclegan.pool_size={s.pool_size} must be >= 0")
    return problems

  def build_generator(self) -> nets.ResnetGenerator:
    return nets.ResnetGenerator(self.section.generator, rngs=nnx.Rngs(0))

  def create_state(self, steps_per_epoch: int) -> CycleGANState:
    s = self.section
    rngs = nnx.Rngs(int(self.config.seed))
    gens, discs = Generators(s, rngs=rngs), Discriminators(s, rngs=rngs)
    tx = self.make_optimizer(steps_per_epoch)
    size = int(self.config.data.image_size)
    return CycleGANState(gens, discs, nnx.Optimizer(gens, tx, wrt=nnx.Param), nnx.Optimizer(discs, tx, wrt=nnx.Param),
                         ImagePool(s.pool_size, (size, size, int(s.generator.out_channels))),
                         ImagePool(s.pool_size, (size, size, int(s.generator.in_channels))))

  def generator(self, state: CycleGANState) -> nnx.Module:
    return state.generators.pre_to_post

  def train_step(self, state: CycleGANState, batch):
    s = self.section
    gan = gan_loss(s.gan_mode)
    lambda_pre, lambda_post = float(s.lambda_cycle_pre), float(s.lambda_cycle_post)
    lambda_idt = float(s.lambda_identity)
    pre, post = batch["pre"], batch["post"]
    discs = state.discriminators

    # 1. Both generators, against the discriminators as they are.
    def g_loss_fn(gens):
      virtual_post = gens.pre_to_post(pre)
      virtual_pre = gens.post_to_pre(post)
      terms = {
          "g_adv_post": gan(discs.post(virtual_post), 1.0),
          "g_adv_pre": gan(discs.pre(virtual_pre), 1.0),
          "cycle_pre": losses.mean_absolute_error(gens.post_to_pre(virtual_post), pre),
          "cycle_post": losses.mean_absolute_error(gens.pre_to_post(virtual_pre), post),
      }
      total = (terms["g_adv_post"] + terms["g_adv_pre"] + lambda_pre * terms["cycle_pre"]
               + lambda_post * terms["cycle_post"])
      if lambda_idt > 0:
        terms["identity_post"] = losses.mean_absolute_error(gens.pre_to_post(translation.as_stack(post)), post)
        terms["identity_pre"] = losses.mean_absolute_error(gens.post_to_pre(translation.middle_slice(pre)), pre)
        total = total + lambda_idt * (lambda_post * terms["identity_post"] + lambda_pre * terms["identity_pre"])
      return total, (terms, virtual_post, virtual_pre)

    (g_loss, (g_terms, virtual_post, virtual_pre)), g_grads = nnx.value_and_grad(g_loss_fn, has_aux=True)(
        state.generators)
    key = self.step_key(state.opt_g, 0)  # before the update: the step counter of this step
    state.opt_g.update(state.generators, g_grads)

    # 2. Both discriminators, on virtual images drawn through the pools.
    pooled_post = state.pool_post.query(virtual_post, jax.random.fold_in(key, 1))
    pooled_pre = state.pool_pre.query(virtual_pre, jax.random.fold_in(key, 2))

    def d_loss_fn(d):
      terms = {
          "d_post": 0.5 * (gan(d.post(post), 1.0) + gan(d.post(pooled_post), 0.0)),
          "d_pre": 0.5 * (gan(d.pre(pre), 1.0) + gan(d.pre(pooled_pre), 0.0)),
      }
      return terms["d_post"] + terms["d_pre"], terms

    (d_loss, d_terms), d_grads = nnx.value_and_grad(d_loss_fn, has_aux=True)(discs)
    state.opt_d.update(discs, d_grads)
    return {"g_loss": g_loss, "d_loss": d_loss, **g_terms, **d_terms,
            "cycle": lambda_pre * g_terms["cycle_pre"] + lambda_post * g_terms["cycle_post"]}
