"""Every loss term and how they combine: plain functions of arrays and weights (paper equations 1-4).

Discriminator (eq. 1): BCE-with-logits plus least-squares terms on the patch logits, real = 1 and virtual = 0;
  with the dual path, the virtual images of the two paths enter weighted 0.6 / 0.4.
Generator, per path (eq. 3): adversarial_weight * adversarial (the same two terms, target 1)
  + pixel_weight (lambda1) * pixel term (MSE in the paper; `loss.pixel` also offers L1 and L1 + w * MSE, and
    `loss.pixel_gradient_weight` adds the gradient difference term)
  + perceptual_weight * the sum of the perceptual terms over the pretext
  encoder's last four blocks.
Dual path (eq. 4): 0.6 * global + 0.4 * local.
Pretext (eq. 2): softmax cross-entropy over the intensity levels.
Baselines (pix2pix, CycleGAN, CUT): L1 and PatchNCE, at the end of the file.

Training steps call these and nothing else, so a method's objective reads in one place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vcect_jax import hu


@dataclasses.dataclass(frozen=True)
class GeneratorWeights:
  """The weight of each generator term (config section `loss`)."""

  pixel: float = 1.0
  adversarial: float = 1.0
  perceptual: float = 1.0
  pixel_kind: str = "mse"
  pixel_mse_weight: float = 1.0   # the MSE's weight inside the 'l1+mse' pixel term (unused by the others)
  adversarial_warmup_steps: int = 0
  # Enhancement-weighted pixel term (off at 0): each pixel's term is scaled by 1 + enhancement_weight * (the
  # real slice's enhancement over the non-contrast one, beyond `enhancement_threshold`, per `enhancement_unit`),
  # both in model units (from HU with the window width: `from_config`).
  enhancement_weight: float = 0.0
  enhancement_threshold: float = 0.25
  enhancement_unit: float = 0.5
  # ... and only where the non-contrast pixel lies within (low, high) (model units): tissue that can enhance. Fat,
  # air and bone do not; a large real - non-contrast there is the pairs' misalignment, not contrast to learn.
  enhancement_pre_range: tuple[float, float] = (-jnp.inf, jnp.inf)
  # Gradient difference term (off at 0; after the gradient difference loss of Mathieu et al. 2016 that Nie et al.
  # 2018 used for MR -> CT synthesis, here on signed differences): plus this weight times the mean L1 of the spatial
  # finite differences of (virtual - real), inside the pixel term (lambda1 scales both). Each pixel enters four
  # differences, so the input's noise that the residual output passes on costs about twice what it costs in L1 (the
  # real slice's own noise is independent of it): the model learns to remove it.
  gradient_weight: float = 0.0

  @classmethod
  def from_config(cls, loss_config, window_width: float = 400.0, window_level: float = 30.0) -> "GeneratorWeights":
    """From config section `loss`; the window (HU, `config.data.window`) converts the enhancement weighting's HU
    settings to model units (the window's width spans 2 model units, centred on its level)."""
    kind = str(loss_config.get("pixel", "mse"))
    if kind not in PIXEL_LOSSES:
      raise ValueError(f"loss.pixel must be one of {tuple(PIXEL_LOSSES)}, got {kind!r}")
    warmup = int(loss_config.get("adversarial_warmup_steps", 0))
    if warmup < 0:
      raise ValueError(f"loss.adversarial_warmup_steps must be >= 0, got {warmup}")
    mse_weight = float(loss_config.get("pixel_mse_weight", 1.0))
    if mse_weight < 0:
      raise ValueError(f"loss.pixel_mse_weight must be >= 0, got {mse_weight}")
    enhancement = float(loss_config.get("pixel_enhancement_weight", 0.0))
    if enhancement < 0:
      raise ValueError(f"loss.pixel_enhancement_weight must be >= 0, got {enhancement}")
    units_per_hu = 2.0 / float(window_width)
    pre_range = tuple(loss_config.get("pixel_enhancement_pre_hu", ()) or ())
    if not pre_range:
      pre_range = (-jnp.inf, jnp.inf)
    else:
      if len(pre_range) != 2 or not float(pre_range[0]) < float(pre_range[1]):
        raise ValueError(f"loss.pixel_enhancement_pre_hu must be (low, high) HU with low < high, or () for every "
                         f"pixel; got {pre_range!r}")
      window = hu.Window(level=float(window_level), width=float(window_width))
      pre_range = tuple(float(v) for v in hu.hu_to_model(np.asarray(pre_range, np.float32), window, clip=False))
    gradient_weight = float(loss_config.get("pixel_gradient_weight", 0.0))
    if gradient_weight < 0:
      raise ValueError(f"loss.pixel_gradient_weight must be >= 0 (0 = off), got {gradient_weight}")
    return cls(pixel=float(loss_config.pixel_weight), adversarial=float(loss_config.adversarial_weight),
               perceptual=float(loss_config.get("perceptual_weight", 1.0)), pixel_kind=kind,
               pixel_mse_weight=mse_weight, adversarial_warmup_steps=warmup, enhancement_weight=enhancement,
               enhancement_threshold=float(loss_config.get("pixel_enhancement_threshold_hu", 50.0)) * units_per_hu,
               enhancement_unit=100.0 * units_per_hu, enhancement_pre_range=pre_range,
               gradient_weight=gradient_weight)

  def pixel_loss(self, virtual: jnp.ndarray, real: jnp.ndarray, pre: jnp.ndarray | None = None,
                 gradient_virtual: jnp.ndarray | None = None) -> jnp.ndarray:
    """The pixel term; `pre` (the non-contrast slice, model space, shaped as `real`) is needed only by the
    enhancement weighting, which is skipped without it. `gradient_virtual`: the image that the gradient difference
    term compares instead of `virtual` (the registration's unwarped virtual image)."""
    term = self._pointwise_term(virtual, real, pre)
    if self.gradient_weight > 0:
      other = virtual if gradient_virtual is None else gradient_virtual
      term = term + self.gradient_weight * gradient_difference(other, real)
    return term

  def _pointwise_term(self, virtual: jnp.ndarray, real: jnp.ndarray, pre: jnp.ndarray | None) -> jnp.ndarray:
    """The pixel kind's mean over the pixels, enhancement-weighted if configured."""
    if self.enhancement_weight > 0 and pre is not None:
      low, high = self.enhancement_pre_range
      can_enhance = (pre > low) & (pre < high)
      w = 1.0 + self.enhancement_weight * jnp.where(
          can_enhance, jax.nn.relu(real - pre - self.enhancement_threshold) / self.enhancement_unit, 0.0)
      return jnp.mean(jax.lax.stop_gradient(w) * pixel_elementwise(virtual, real, self.pixel_kind,
                                                                   self.pixel_mse_weight))
    if self.pixel_kind == "l1+mse":
      return pixel_l1_mse(virtual, real, self.pixel_mse_weight)
    return PIXEL_LOSSES[self.pixel_kind](virtual, real)

  def at_step(self, step) -> "GeneratorWeights":
    """The weights of generator step `step` (0-based, may be traced): the adversarial ramp of the warm-up."""
    if self.adversarial_warmup_steps <= 0:
      return self
    ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / self.adversarial_warmup_steps)
    return dataclasses.replace(self, adversarial=self.adversarial * ramp)


# ------------------------------------------------------------------------------------------------ terms
def bce_with_logits(logits: jnp.ndarray, target: float) -> jnp.ndarray:
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def least_squares(logits: jnp.ndarray, target: float) -> jnp.ndarray:
  return jnp.mean(jnp.square(logits - target))


def adversarial(logits: jnp.ndarray, target: float) -> jnp.ndarray:
  """BCE-with-logits + MSE of the patch logits against a constant target (paper section 3.1)."""
  return bce_with_logits(logits, target) + least_squares(logits, target)


def pixel_mse(virtual: jnp.ndarray, real: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.square(virtual - real))


def pixel_l1(virtual: jnp.ndarray, real: jnp.ndarray) -> jnp.ndarray:
  return jnp.mean(jnp.abs(virtual - real))


def pixel_l1_mse(virtual: jnp.ndarray, real: jnp.ndarray, mse_weight: float = 1.0) -> jnp.ndarray:
  """L1 + mse_weight * MSE: the median's pull on small errors (noise, misaligned edges), with the mean's larger
  pull on large ones (an enhancement of a few pixels, where L1's gradient is no larger than anywhere else)."""
  return pixel_l1(virtual, real) + mse_weight * pixel_mse(virtual, real)


def gradient_difference(virtual: jnp.ndarray, real: jnp.ndarray) -> jnp.ndarray:
  """Mean L1 difference of the vertical and horizontal finite differences of (B, H, W, C) images, the two directions
  averaged: the gradient difference loss (Mathieu et al. 2016; Nie et al. 2018) with exponent 1, on the signed
  differences (theirs compares the differences' magnitudes, so an edge of the opposite sign would cost nothing)."""
  d = virtual - real
  return 0.5 * (jnp.mean(jnp.abs(jnp.diff(d, axis=1))) + jnp.mean(jnp.abs(jnp.diff(d, axis=2))))


PIXEL_LOSSES = {"mse": pixel_mse, "l1": pixel_l1, "l1+mse": pixel_l1_mse}


def pixel_elementwise(virtual: jnp.ndarray, real: jnp.ndarray, kind: str, mse_weight: float = 1.0) -> jnp.ndarray:
  """The pixel term of `kind` per pixel, before the mean (`PIXEL_LOSSES[kind]` is its mean)."""
  d = virtual - real
  if kind == "mse":
    return jnp.square(d)
  if kind == "l1":
    return jnp.abs(d)
  return jnp.abs(d) + mse_weight * jnp.square(d)


def classification(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of integer labels (the pretext task, eq. 2)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ------------------------------------------------------------------------------------------------ composition
def weighted_sum(terms: dict[str, jnp.ndarray], weights: dict[str, float]) -> jnp.ndarray:
  """sum_k weights[k] * terms[k] over the keys of `weights`."""
  return sum(weights[k] * terms[k] for k in weights)


def discriminator_loss(real_logits: jnp.ndarray, virtual_logits: dict[str, jnp.ndarray],
                       path_weights: dict[str, float]) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Eq. 1 with the dual path: real pairs -> 1, each path's virtual pairs -> 0, the paths weighted.

  Returns:
    (loss, terms) with terms `d_real` and `d_fake_<path>`.
  """
  terms = {"d_real": adversarial(real_logits, 1.0)}
  for path in path_weights:
    terms[f"d_fake_{path}"] = adversarial(virtual_logits[path], 0.0)
  fake = weighted_sum({p: terms[f"d_fake_{p}"] for p in path_weights}, path_weights)
  return terms["d_real"] + fake, terms


def generator_path_loss(weights: GeneratorWeights, pixel: jnp.ndarray, adversarial_term: jnp.ndarray | None = None,
                        perceptual: jnp.ndarray | None = None) -> jnp.ndarray:
  """Eq. 3 for one path; a term given as None is switched off (the ablations of Table 2)."""
  total = weights.pixel * pixel
  if adversarial_term is not None:
    total = total + weights.adversarial * adversarial_term
  if perceptual is not None:
    total = total + weights.perceptual * perceptual
  return total


def dual_path_loss(path_totals: dict[str, jnp.ndarray], path_weights: dict[str, float]) -> jnp.ndarray:
  """Eq. 4: lambda2 * global + lambda3 * local (or the global path alone without the dual path)."""
  return weighted_sum(path_totals, path_weights)


# ------------------------------------------------------------------------------------------------ baselines
# The image-to-image translation baselines (vcect_jax/methods: pix2pix, cyclegan, cut) compose these with
# `bce_with_logits` (pix2pix's vanilla GAN) and `least_squares` (LSGAN) above.
def mean_absolute_error(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """L1 loss: pix2pix's reconstruction term, CycleGAN's cycle and identity terms."""
  return jnp.mean(jnp.abs(a - b))


def patch_nce(query: jnp.ndarray, key: jnp.ndarray, temperature: float = 0.07) -> jnp.ndarray:
  """CUT's PatchNCE: each query patch must pick its own key patch among the image's other patches.

  Args:
    query: `(B, P, D)` unit vectors of P patches of the translated image (gradients flow).
    key: `(B, P, D)` unit vectors of the same positions in the source image (no gradient).
    temperature: tau (CUT: 0.07).

  Returns:
    `(B, P)` cross-entropy per query patch: logits (q.k+, q.k- over the same image's other P - 1 patches, the
    diagonal set to -10 before the temperature, as in CUT) divided by tau, the positive as class 0.
  """
  key = jax.lax.stop_gradient(key)
  positive = jnp.sum(query * key, axis=-1, keepdims=True)               # (B, P, 1)
  negative = jnp.einsum("bpd,bqd->bpq", query, key)                      # (B, P, P)
  eye = jnp.eye(query.shape[1], dtype=bool)
  negative = jnp.where(eye, -10.0, negative)
  logits = jnp.concatenate([positive, negative], axis=-1) / temperature
  return -jax.nn.log_softmax(logits, axis=-1)[..., 0]
