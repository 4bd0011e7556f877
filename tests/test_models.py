"""Tests of the networks: shapes, parameter count, residual output, perceptual loss and heatmaps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from vcect_jax import models
from vcect_jax.models import perceptual

# The default generator's size, documented in vcect_jax/models/generator.py.
DEFAULT_GENERATOR_PARAMS = 9_063_425
DEFAULT_ENCODER_PARAMS = 6_004_448


def _narrow_config():
  config = default.get_config()
  config.model.generator.widths = (4, 8, 8, 16, 16)
  config.model.discriminator.widths = (4, 8, 8, 16)
  config.model.classifier.hidden = (8, 8)
  return config


def _snapshot(module, kind=nnx.BatchStat):
  """A copy of the module's variables of a kind (nnx.state shares the live variables)."""
  return [np.array(x) for x in jax.tree.leaves(nnx.state(module, kind))]


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


def _count(module, kind=nnx.Param):
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, kind)))


def test_default_generator_parameter_count():
  generator = nnx.eval_shape(lambda: models.Generator(default.get_config().model.generator, rngs=nnx.Rngs(0)))
  assert _count(generator) == DEFAULT_GENERATOR_PARAMS
  assert _count(generator.encoder) == DEFAULT_ENCODER_PARAMS


def test_classifier_encoder_matches_generator_encoder():
  config = default.get_config()
  generator = nnx.eval_shape(lambda: models.Generator(config.model.generator, rngs=nnx.Rngs(0)))
  classifier = nnx.eval_shape(lambda: models.IntensityClassifier(config.model, rngs=nnx.Rngs(0)))
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m.encoder))
  assert shapes(generator) == shapes(classifier)


def _traced_shapes(fn, *args):
  """Output shapes of `fn(*args)` by tracing only (the forward passes themselves run in the tests below)."""
  return jax.tree.map(lambda a: a.shape, nnx.eval_shape(fn, *args))


@pytest.mark.parametrize("size", [32, 48, 64, 128, 256])
def test_shapes(size):
  config = _narrow_config()
  generator = nnx.eval_shape(lambda: models.Generator(config.model.generator, rngs=nnx.Rngs(0)))
  discriminator = nnx.eval_shape(lambda: models.Discriminator(config.model.discriminator, rngs=nnx.Rngs(1)))
  classifier = nnx.eval_shape(lambda: models.IntensityClassifier(config.model, rngs=nnx.Rngs(2)))
  x = jnp.zeros((1, size, size, 3))
  y = jnp.zeros((1, size, size, 1))
  assert _traced_shapes(lambda g, x: g(x), generator, x) == (1, size, size, 1)
  assert _traced_shapes(lambda d, x, y: d(x, y), discriminator, x, y) == (1, size // 8, size // 8, 1)
  assert _traced_shapes(lambda c, x: c(x), classifier, x) == (1, 4)
  features = _traced_shapes(perceptual.encoder_features, classifier.encoder, y)
  assert features == [(1, size // s, size // s, w) for s, w in zip((2, 4, 8, 16), (8, 8, 16, 16))]


def test_forward_pass_runs():
  config = _narrow_config()
  generator = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
  discriminator = models.Discriminator(config.model.discriminator, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  y = generator(x)
  logits = discriminator(x, y)
  assert y.shape == (2, 32, 32, 1) and logits.shape == (2, 4, 4, 1)
  assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(logits)))


def test_non_square_and_invalid_sizes():
  generator = models.Generator(_narrow_config().model.generator, rngs=nnx.Rngs(0))
  assert generator(jnp.zeros((2, 32, 48, 3))).shape == (2, 32, 48, 1)
  with pytest.raises(ValueError, match="multiples of 16"):
    generator(jnp.zeros((1, 40, 40, 3)))


def test_quadrants_share_weights_with_the_global_path():
  generator = models.Generator(_narrow_config().model.generator, rngs=nnx.Rngs(0))
  generator.eval()
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  quadrants = jnp.concatenate([x[:, :32, :32], x[:, :32, 32:], x[:, 32:, :32], x[:, 32:, 32:]])
  assert generator(quadrants).shape == (4, 32, 32, 1)
  assert generator(x).shape == (1, 64, 64, 1)


def test_residual_output_adds_the_middle_slice():
  config = _narrow_config().model.generator
  config.residual = True
  generator = models.Generator(config, rngs=nnx.Rngs(0))
  generator.eval()
  # With the last layer zeroed the enhancement is zero, so the output is the middle slice itself.
  generator.out.kernel.value = jnp.zeros_like(generator.out.kernel.value)
  generator.out.bias.value = jnp.zeros_like(generator.out.bias.value)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  np.testing.assert_allclose(generator(x), x[..., 1:2], atol=1e-6)


def test_untrained_residual_generator_is_the_identity():
  config = _narrow_config().model.generator
  config.residual = True
  generator = models.Generator(config, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(generator(x), x[..., 1:2])  # no noise added before training
  config.residual = False
  assert float(jnp.abs(models.Generator(config, rngs=nnx.Rngs(0))(x) - x[..., 1:2]).max()) > 0.1


def test_batchnorm_train_and_eval_modes():
  generator = models.Generator(_narrow_config().model.generator, rngs=nnx.Rngs(0))
  before = _snapshot(generator)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  generator.eval()
  generator(x)
  assert _same(before, _snapshot(generator))
  generator.train()
  generator(x)
  after = _snapshot(generator)
  assert not any(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.fixture(scope="module")
def encoder():
  return models.IntensityClassifier(_narrow_config().model, rngs=nnx.Rngs(3)).encoder


def test_perceptual_loss_zero_for_identical_images_and_grows(encoder):
  real = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1), minval=-1, maxval=0.5)
  loss, per_block = perceptual.perceptual_loss(encoder, real, real)
  assert float(loss) == 0.0 and per_block.shape == (4,)
  losses = [float(perceptual.perceptual_loss(encoder, real + d, real)[0]) for d in (0.05, 0.2, 0.5)]
  assert 0 < losses[0] < losses[1] < losses[2]
  weighted, per_block = perceptual.perceptual_loss(encoder, real + 0.2, real, (1.0, 0.0, 2.0, 0.0))
  np.testing.assert_allclose(weighted, per_block[0] + 2 * per_block[2], rtol=1e-6)


def test_perceptual_gradient_reaches_the_image_not_the_encoder(encoder):
  real = jax.random.uniform(jax.random.key(1), (1, 32, 32, 1), minval=-1, maxval=1)

  def loss_fn(enc, virtual):
    return perceptual.perceptual_loss(enc, virtual, real)[0]

  grad_encoder, grad_image = nnx.grad(loss_fn, argnums=(0, 1))(encoder, real + 0.3)
  assert float(jnp.abs(grad_image).sum()) > 0
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grad_encoder))


def test_perceptual_ignores_train_mode(encoder):
  encoder.train()
  before = _snapshot(encoder)
  real = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
  perceptual.perceptual_loss(encoder, real + 0.1, real)
  assert _same(before, _snapshot(encoder))
  encoder.eval()


def test_single_slice_enters_as_three_repeated_channels(encoder):
  img = jax.random.uniform(jax.random.key(2), (1, 32, 32, 1))
  for a, b in zip(perceptual.encoder_features(encoder, img),
                  perceptual.encoder_features(encoder, jnp.repeat(img, 3, axis=-1))):
    np.testing.assert_array_equal(a, b)


def test_heatmaps_have_the_image_shape(encoder):
  real = jax.random.uniform(jax.random.key(1), (2, 64, 48, 1))
  virtual = real.at[:, 16:32, 16:32].add(0.5)
  heat = perceptual.heatmaps(encoder, virtual, real)
  assert heat.shape == (2, 64, 48, 4)
  assert float(heat.min()) >= 0
  np.testing.assert_array_equal(perceptual.heatmaps(encoder, real, real), 0)
  # The change is local: the heatmap of the /2 block is larger where the images differ.
  assert float(heat[:, 16:32, 16:32, 0].mean()) > float(heat[:, 48:, 32:, 0].mean())
