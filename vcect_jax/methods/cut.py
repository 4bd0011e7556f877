"""Contrastive unpaired translation (CUT; Park et al., ECCV 2020) as a baseline on the shared loop.

State (`CUTState`): `generator` (ResNet-9-block with CUT's anti-aliased down/upsampling, 3 -> 1 channels; its
encoder gives the PatchNCE features), `projector` (the two-layer MLP head, 256 units, per NCE layer),
`discriminator` (70x70 PatchGAN on contrast slices, anti-aliased), optimisers `opt_g`, `opt_f`, `opt_d` (Adam 2e-4,
betas (0.5, 0.999), linear decay over 200 + 200 epochs: config section `cut`).

One step (the reference's `optimize_parameters`, CUT mode, not FastCUT):
  1. The generator translates the non-contrast stacks and, for the identity NCE, the contrast slices (as stacks).
  2. The discriminator is updated: 0.5 * (GAN(D(virtual), 0) + GAN(D(post), 1)) (LSGAN).
  3. Generator and projector: lambda_GAN * GAN(D'(virtual), 1) + 0.5 * (NCE(pre, virtual) + NCE(post, idt))
     against the updated D'. NCE(src, tgt): the generator's encoder features of both at 5 layers
     (`cut.nce_layers`), 256 random positions per layer (the same for src and tgt and for every image), projected
     and L2-normalised; PatchNCE with tau 0.07 (`losses.patch_nce`), lambda_NCE 1, averaged over the layers.
A contrast slice enters the generator (translation and NCE encoding) repeated into a 3-slice stack, as does the
virtual slice when it is encoded for NCE.
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


class CUTState(nnx.Module):
  """Everything CUT trains, by name."""

  def __init__(self, generator: nets.ResnetGenerator, projector: nets.PatchProjector,
               discriminator: nets.PatchDiscriminator, opt_g: nnx.Optimizer, opt_f: nnx.Optimizer,
               opt_d: nnx.Optimizer):
    self.generator = generator
    self.projector = projector
    self.discriminator = discriminator
    self.opt_g = opt_g
    self.opt_f = opt_f
    self.opt_d = opt_d


def patch_nce_loss(generator: nets.ResnetGenerator, projector: nets.PatchProjector, source: jax.Array,
                   target: jax.Array, layers, num_patches: int, temperature: float, key: jax.Array) -> jax.Array:
  """CUT's `calculate_NCE_loss`: mean PatchNCE over `layers` between the encodings of `target` (queries) and
  `source` (keys, no gradient), at `num_patches` random positions per layer shared by both."""
  feat_q = generator.encode(target, layers)
  feat_k = generator.encode(source, layers)
  ids = [nets.sample_patches(f, num_patches, jax.random.fold_in(key, l)) for l, f in enumerate(feat_k)]
  queries, keys = projector(feat_q, ids), projector(feat_k, ids)
  per_layer = [jnp.mean(losses.patch_nce(q, k, temperature)) for q, k in zip(queries, keys)]
  return sum(per_layer) / len(per_layer)


class CUT(translation.TranslationBaseline):
  """CUT from non-contrast stacks to contrast slices of `config.phase`, trained unpaired."""

  name = "cut"
  generator_key = ("generator",)
  unpaired = True

  def check_section(self):
    s, problems = self.section, []
    if s.gan_mode not in GAN_MODES:
      problems.append(f"cut.gan_mode={s.gan_mode!r} must be one of {GAN_MODES}")
    taps = self._tap_names()
    unknown = [l for l in s.nce_layers if l not in taps]
    if unknown or not s.nce_layers:
      problems.append(f"cut.nce_layers={tuple(s.nce_layers)} must be names among {taps}")
    if s.num_patches < 1 or not s.nce_temperature > 0:
      problems.append(f"cut.num_patches={s.num_patches} must be >= 1 and cut.nce_temperature > 0")
    return problems

  def _tap_names(self) -> list[str]:
    blocks = int(self.section.generator.n_blocks)
    return ["padded_input", "down1", "down2"] + [f"res{k}" for k in range(1, blocks + 1)]

  def build_generator(self) -> nets.ResnetGenerator:
    return nets.ResnetGenerator(self.section.generator, rngs=nnx.Rngs(0))

  def create_state(self, steps_per_epoch: int) -> CUTState:
    s = self.section
    rngs = nnx.Rngs(int(self.config.seed))
    gen = nets.ResnetGenerator(s.generator, rngs=rngs)
    projector = nets.PatchProjector([gen.tap_channels[l] for l in s.nce_layers], int(s.projection_units),
                                    init_type=s.generator.init_type, init_gain=float(s.generator.init_gain),
                                    rngs=rngs)
    disc = nets.PatchDiscriminator(s.discriminator, int(s.generator.out_channels), rngs=rngs)
    tx = self.make_optimizer(steps_per_epoch)
    return CUTState(gen, projector, disc, nnx.Optimizer(gen, tx, wrt=nnx.Param),
                    nnx.Optimizer(projector, tx, wrt=nnx.Param), nnx.Optimizer(disc, tx, wrt=nnx.Param))

  def generator(self, state: CUTState) -> nnx.Module:
    return state.generator

  def train_step(self, state: CUTState, batch):
    s = self.section
    gan = gan_loss(s.gan_mode)
    layers, identity = tuple(s.nce_layers), bool(s.nce_identity)
    pre, post = batch["pre"], batch["post"]
    post_stack = translation.as_stack(post, pre.shape[-1])
    n = pre.shape[0]
    real = jnp.concatenate([pre, post_stack], axis=0) if identity else pre
    key = self.step_key(state.opt_g, 0)
    disc = state.discriminator

    # 1-2. Translate, then update the discriminator on the (detached) virtual slices.
    virtual = jax.lax.stop_gradient(state.generator(real)[:n])

    def d_loss_fn(d):
      terms = {"d_fake": gan(d(virtual), 0.0), "d_real": gan(d(post), 1.0)}
      return 0.5 * (terms["d_fake"] + terms["d_real"]), terms

    (d_loss, d_terms), d_grads = nnx.value_and_grad(d_loss_fn, has_aux=True)(disc)
    state.opt_d.update(disc, d_grads)

    # 3. Generator and projector against the updated discriminator.
    def g_loss_fn(gen, projector):
      out = gen(real)
      virtual = out[:n]
      nce = lambda src, tgt, salt: patch_nce_loss(  # noqa: E731
          gen, projector, src, translation.as_stack(tgt, pre.shape[-1]), layers, int(s.num_patches),
          float(s.nce_temperature), jax.random.fold_in(key, salt))
      terms = {"g_adv": gan(disc(virtual), 1.0), "nce": nce(pre, virtual, 1)}
      nce_total = float(s.lambda_nce) * terms["nce"]
      if identity:
        terms["nce_identity"] = nce(post_stack, out[n:], 2)
        nce_total = 0.5 * (nce_total + float(s.lambda_nce) * terms["nce_identity"])
      return float(s.lambda_gan) * terms["g_adv"] + nce_total, terms

    (g_loss, g_terms), (g_grads, f_grads) = nnx.value_and_grad(g_loss_fn, argnums=(0, 1), has_aux=True)(
        state.generator, state.projector)
    state.opt_g.update(state.generator, g_grads)
    state.opt_f.update(state.projector, f_grads)
    return {"g_loss": g_loss, "d_loss": d_loss, **g_terms, **d_terms}
