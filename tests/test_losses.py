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
