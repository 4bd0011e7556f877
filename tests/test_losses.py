"""The loss terms' composition (paper eq. 3) and the options around it: pixel kind, adversarial warm-up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from vcect_jax import losses


def _loss_config(**kw):
  base = dict(pixel_weight=2.0, adversarial_weight=3.0, perceptual_weight=0.5, pixel="mse",
              adversarial_warmup_steps=0)
  base.update(kw)
  return ConfigDict(base)


def test_path_loss_weighs_each_term():
  w = losses.GeneratorWeights.from_config(_loss_config())
  total = losses.generator_path_loss(w, jnp.float32(1.0), jnp.float32(10.0), jnp.float32(100.0))
  assert float(total) == pytest.approx(2.0 + 30.0 + 50.0)


def test_pixel_kinds():
  a, b = jnp.array([0.0, 1.0, -2.0]), jnp.zeros(3)
  assert float(losses.GeneratorWeights.from_config(_loss_config()).pixel_loss(a, b)) == pytest.approx(5 / 3)
  assert float(losses.GeneratorWeights.from_config(_loss_config(pixel="l1")).pixel_loss(a, b)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="loss.pixel"):
    losses.GeneratorWeights.from_config(_loss_config(pixel="huber"))


def test_mixed_pixel_term_adds_weighted_mse_to_l1():
  a, b = jnp.array([0.0, 1.0, -2.0]), jnp.zeros(3)
  mixed = losses.GeneratorWeights.from_config(_loss_config(pixel="l1+mse", pixel_mse_weight=4.0))
  assert float(mixed.pixel_loss(a, b)) == pytest.approx(1.0 + 4.0 * 5 / 3)
  # lambda1 (pixel_weight) scales the whole pixel term; without the field the MSE weighs 1.
  assert float(losses.generator_path_loss(mixed, mixed.pixel_loss(a, b))) == pytest.approx(2.0 * (1.0 + 4.0 * 5 / 3))
  plain = losses.GeneratorWeights.from_config(_loss_config(pixel="l1+mse"))
  assert float(plain.pixel_loss(a, b)) == pytest.approx(1.0 + 5 / 3)
  # The field does not touch the other kinds, and the default stays the paper's MSE.
  assert float(losses.GeneratorWeights.from_config(_loss_config(pixel_mse_weight=4.0)).pixel_loss(a, b)) == \
      pytest.approx(5 / 3)
  assert losses.GeneratorWeights.from_config(ConfigDict(dict(pixel_weight=1.0, adversarial_weight=1.0))).pixel_kind \
      == "mse"
  with pytest.raises(ValueError, match="pixel_mse_weight"):
    losses.GeneratorWeights.from_config(_loss_config(pixel="l1+mse", pixel_mse_weight=-1.0))


def test_adversarial_warmup_ramps_then_holds():
  w = losses.GeneratorWeights.from_config(_loss_config(adversarial_warmup_steps=4))
  ramp = [float(w.at_step(s).adversarial) for s in range(6)]
  np.testing.assert_allclose(ramp, [0.75, 1.5, 2.25, 3.0, 3.0, 3.0])
  assert w.at_step(0).pixel == 2.0 and w.at_step(0).perceptual == 0.5
  # Traced steps work (the step comes from the optimiser state inside jit).
  assert float(jax.jit(lambda s: w.at_step(s).adversarial)(jnp.int32(1))) == pytest.approx(1.5)
  no_warmup = losses.GeneratorWeights.from_config(_loss_config())
  assert no_warmup.at_step(0) is no_warmup
  with pytest.raises(ValueError, match="adversarial_warmup_steps"):
    losses.GeneratorWeights.from_config(_loss_config(adversarial_warmup_steps=-1))


def test_enhancement_weighting_weighs_enhancing_pixels_by_their_enhancement():
  # Window W400: 100 HU = 0.5 model units; threshold 50 HU = 0.25 units.
  w = losses.GeneratorWeights.from_config(_loss_config(pixel="l1", pixel_enhancement_weight=2.0), window_width=400.0)
  pre = jnp.zeros(4)
  real = jnp.array([0.0, 0.25, 0.75, 1.0])        # enhancement 0, 50, 150, 200 HU
  virtual = real + 0.1                           # the same error everywhere
  # weights 1, 1, 1 + 2 * 100/100 = 3, 1 + 2 * 150/100 = 4
  assert float(w.pixel_loss(virtual, real, pre)) == pytest.approx(0.1 * (1 + 1 + 3 + 4) / 4)
  # Without the non-contrast slice, or with the weight 0 (the default: the paper's term), it is unweighted.
  assert float(w.pixel_loss(virtual, real)) == pytest.approx(0.1)
  plain = losses.GeneratorWeights.from_config(_loss_config(pixel="l1"))
  assert float(plain.pixel_loss(virtual, real, pre)) == pytest.approx(0.1)
  # A wider window: the same HU are fewer model units, the weights follow the HU.
  wide = losses.GeneratorWeights.from_config(_loss_config(pixel="l1", pixel_enhancement_weight=2.0), window_width=800.0)
  assert float(wide.pixel_loss(virtual / 2, real / 2, pre)) == pytest.approx(0.05 * (1 + 1 + 3 + 4) / 4)
  # The weights are constants: the gradient is the weighted L1's.
  grad = jax.grad(lambda v: w.pixel_loss(v, real, pre))(virtual)
  np.testing.assert_allclose(grad, np.array([1, 1, 3, 4]) / 4, rtol=1e-6)
  # The other kinds weigh their own per-pixel terms: MSE, and L1 + MSE.
  mse = losses.GeneratorWeights.from_config(_loss_config(pixel_enhancement_weight=2.0))
  assert float(mse.pixel_loss(virtual, real, pre)) == pytest.approx(0.01 * (1 + 1 + 3 + 4) / 4)
  mixed = losses.GeneratorWeights.from_config(_loss_config(pixel="l1+mse", pixel_enhancement_weight=2.0))
  assert float(mixed.pixel_loss(virtual, real, pre)) == pytest.approx(0.11 * (1 + 1 + 3 + 4) / 4)
  with pytest.raises(ValueError, match="pixel_enhancement_weight"):
    losses.GeneratorWeights.from_config(_loss_config(pixel_enhancement_weight=-1.0))


def test_enhancement_weighting_skips_non_contrast_pixels_that_cannot_enhance():
  # W400/L30: the non-contrast range (-20, 150) HU is (-0.25, 0.6) model units. Pixels 0-3 enhance by 200 HU
  # (1.0 unit) from non-contrast fat (-100 HU), soft tissue (40 HU), soft tissue (100 HU) and bone (200 HU).
  config = _loss_config(pixel="l1", pixel_enhancement_weight=2.0, pixel_enhancement_pre_hu=(-20.0, 150.0))
  w = losses.GeneratorWeights.from_config(config, window_width=400.0, window_level=30.0)
  pre = (jnp.array([-100.0, 40.0, 100.0, 200.0]) - 30.0) / 200.0
  real = pre + 1.0
  virtual = real + 0.1
  # Only the soft-tissue pixels weigh 1 + 2 * 150/100 = 4; fat and bone keep weight 1.
  assert float(w.pixel_loss(virtual, real, pre)) == pytest.approx(0.1 * (1 + 4 + 4 + 1) / 4)
  # The range follows the window's level: at L130 the same HU are other model units, the same pixels weigh.
  w130 = losses.GeneratorWeights.from_config(config, window_width=400.0, window_level=130.0)
  assert float(w130.pixel_loss(virtual - 0.5, real - 0.5, pre - 0.5)) == pytest.approx(0.1 * (1 + 4 + 4 + 1) / 4)
  # () (the default): every pixel weighs by its enhancement.
  everywhere = losses.GeneratorWeights.from_config(_loss_config(pixel="l1", pixel_enhancement_weight=2.0))
  assert float(everywhere.pixel_loss(virtual, real, pre)) == pytest.approx(0.1 * 4)
  with pytest.raises(ValueError, match="pixel_enhancement_pre_hu"):
    losses.GeneratorWeights.from_config(_loss_config(pixel_enhancement_weight=1.0, pixel_enhancement_pre_hu=(150, -20)))


def test_gradient_difference_term_sees_edges_not_levels():
  # A constant offset has the same finite differences: the term is 0; a one-pixel step where the real image has
  # none costs its height over the differences that cross it.
  real = jnp.zeros((1, 4, 4, 1))
  assert float(losses.gradient_difference(real + 0.3, real)) == pytest.approx(0.0)
  step = real.at[:, :, 2:, :].set(1.0)   # a vertical edge: 4 of the 12 horizontal differences are 1, none vertical
  assert float(losses.gradient_difference(step, real)) == pytest.approx(0.5 * (0.0 + 4 / 12))
  # Pixel noise costs more here than in L1: each noisy pixel enters up to four differences.
  noise = real.at[0, 1, 1, 0].set(0.5)
  assert float(losses.gradient_difference(noise, real)) == pytest.approx(0.5 * (2 * 0.5 / 12 + 2 * 0.5 / 12))
  # Inside the pixel term: weight x the term, added to the pixel kind's own mean (lambda1 scales both).
  w = losses.GeneratorWeights.from_config(_loss_config(pixel="l1", pixel_gradient_weight=2.0))
  assert float(w.pixel_loss(step, real)) == pytest.approx(0.5 + 2.0 * 0.5 * 4 / 12)
  plain = losses.GeneratorWeights.from_config(_loss_config(pixel="l1"))
  assert float(plain.pixel_loss(step, real)) == pytest.approx(0.5)
  # `gradient_virtual` (the registration's unwarped image): the term compares it instead, the pointwise mean does not.
  assert float(w.pixel_loss(step, real, gradient_virtual=real + 0.3)) == pytest.approx(0.5)
  assert float(w.pixel_loss(real + 0.3, real, gradient_virtual=step)) == pytest.approx(0.3 + 2.0 * 0.5 * 4 / 12)
  # With the enhancement weighting (the delayed `:demo`): the weighted pointwise mean plus the unweighted term.
  both = losses.GeneratorWeights.from_config(_loss_config(pixel="l1", pixel_enhancement_weight=2.0,
                                                          pixel_gradient_weight=2.0), window_width=400.0)
  weighted = losses.GeneratorWeights.from_config(_loss_config(pixel="l1", pixel_enhancement_weight=2.0),
                                                 window_width=400.0)
  pre = real - 1.0   # every pixel enhances by 200 HU: weight 4
  assert float(both.pixel_loss(step, real, pre)) == pytest.approx(
      float(weighted.pixel_loss(step, real, pre)) + 2.0 * 0.5 * 4 / 12)
  assert float(weighted.pixel_loss(step, real, pre)) == pytest.approx(4 * 0.5)
  with pytest.raises(ValueError, match="pixel_gradient_weight"):
    losses.GeneratorWeights.from_config(_loss_config(pixel_gradient_weight=-1.0))
