"""The registration network that warps virtual images onto misaligned targets during training (RegGAN-style)."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import arterial
from configs.baselines import pix2pix as baselines_pix2pix
from vcect_jax import methods
from vcect_jax import models
from vcect_jax import pretrain
from vcect_jax import sharding
from vcect_jax import train
from vcect_jax.models import registration


def _image(size=24, seed=0):
  """A smooth random image (B=1, size, size, 1): bilinear sampling of it is meaningful."""
  rng = np.random.default_rng(seed)
  coarse = rng.normal(size=(1, size // 4, size // 4, 1)).astype(np.float32)
  return jax.image.resize(jnp.asarray(coarse), (1, size, size, 1), "linear")


def test_warp_identity_shift_and_interpolation():
  image = _image()
  zero = jnp.zeros(image.shape[:3] + (2,))
  np.testing.assert_allclose(registration.warp(image, zero), image, atol=1e-6)
  # A whole-pixel flow of +2 rows samples two rows further down (inside the image).
  shifted = registration.warp(image, zero.at[..., 0].set(2.0))
  np.testing.assert_allclose(shifted[:, :-2], image[:, 2:], atol=1e-6)
  # Half a column: the mean of the two neighbours; the last column clamps to the border.
  half = registration.warp(image, zero.at[..., 1].set(0.5))
  np.testing.assert_allclose(half[:, :, :-1], 0.5 * (image[:, :, :-1] + image[:, :, 1:]), atol=1e-6)
  np.testing.assert_allclose(half[:, :, -1], image[:, :, -1], atol=1e-6)
  # Differentiable in the flow.
  grad = jax.grad(lambda f: jnp.sum(registration.warp(image, f) * image))(zero.at[..., 0].set(0.3))
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


def test_smoothness_is_zero_for_a_uniform_shift_only():
  flow = jnp.ones((2, 8, 8, 2)) * 1.5
  assert float(registration.smoothness(flow)) == 0.0
  bent = flow.at[:, 4:, :, 0].add(1.0)
  assert float(registration.smoothness(bent)) > 0.0


def test_network_starts_at_the_identity_and_learns_to_undo_a_shift():
  net = registration.Registration((8, 16, 16), rngs=nnx.Rngs(0))
  moving = _image(32, seed=1)
  target = registration.warp(moving, jnp.zeros((1, 32, 32, 2)).at[..., 0].set(-1.5))   # moved 1.5 rows up
  assert float(jnp.abs(net(moving, target)).max()) == 0.0
  opt = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)

  def loss(net):
    flow = net(moving, target)
    return jnp.mean(jnp.abs(registration.warp(moving, flow) - target)) + 0.1 * registration.smoothness(flow)

  @nnx.jit
  def step(net, opt):
    value, grads = nnx.value_and_grad(loss)(net)
    opt.update(net, grads)
    return value

  first = float(step(net, opt))
  for _ in range(150):
    last = float(step(net, opt))
  assert last < 0.4 * first, (first, last)
  inner = net(moving, target)[0, 8:-8, 8:-8, 0]
  assert abs(float(jnp.median(inner)) + 1.5) < 0.5   # the rows' flow found the shift


def test_dual_path_gan_trains_the_registration_only_when_enabled():
  config = arterial.get_config("smoke")
  config.dual_path.enabled = False
  config.loss.use_perceptual = False
  config.perceptual.init_generator = False
  config.perceptual.pretext_checkpoint = "unused"
  encoder = lambda *_: models.IntensityClassifier(config.model, rngs=nnx.Rngs(5)).encoder  # noqa: E731
  with mock.patch.object(pretrain, "load_pretext_encoder", encoder):
    plain = methods.create(config).create_state(steps_per_epoch=10)
  assert not hasattr(plain, "registration")   # the default keeps the checkpoint layout
  config.registration.enabled = True
  method = methods.create(config)
  with mock.patch.object(pretrain, "load_pretext_encoder", encoder):
    module = method.create_state(steps_per_epoch=10)
  graphdef, state = nnx.split(module)
  before = jax.tree.map(np.array, nnx.to_pure_dict(state)["registration"])
  step = train.jit_train_step(method, graphdef, sharding.make_mesh())
  size = config.data.image_size
  k1, k2 = jax.random.split(jax.random.key(0))
  batch = {"pre": jax.random.uniform(k1, (2, size, size, 3), minval=-1, maxval=1),
           "post": jax.random.uniform(k2, (2, size, size, 1), minval=-1, maxval=1)}
  for _ in range(2):
    state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["g_smooth_global"]) and metrics["g_smooth_global"] > 0   # the field is no longer 0
  after = nnx.to_pure_dict(jax.device_get(state))["registration"]
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert all(changed)
  # The generator a checkpoint's evaluation builds is the plain one.
  assert isinstance(method.build_generator(), models.Generator)
  def pixel_terms(steps):
    """The global path's pixel term at each of `steps` steps from a fresh start of the current config."""
    variant = methods.create(config)
    with mock.patch.object(pretrain, "load_pretext_encoder", encoder):
      variant_def, variant_state = nnx.split(variant.create_state(steps_per_epoch=10))
    variant_step = train.jit_train_step(variant, variant_def, sharding.make_mesh())
    terms = []
    for _ in range(steps):
      variant_state, m = variant_step(variant_state, batch)
      terms.append(float(jax.device_get(m["g_pixel_global"])))
    return terms

  # With `unwarped_weight`, the unwarped virtual image is compared too: at the first step the field is still zero
  # (the warp is the identity), so the pixel term is (1 + weight) times the plain one, on the same start.
  first_pixel = {}
  for weight in (0.0, 0.5):
    config.registration.unwarped_weight = weight
    first_pixel[weight] = pixel_terms(1)[0]
  np.testing.assert_allclose(first_pixel[0.5], 1.5 * first_pixel[0.0], rtol=1e-5)
  # `gradient_term_unwarped`: the gradient difference term compares the unwarped image. The same first step (the
  # warp is still the identity), then the field, trained without that term, differs and so does the second step.
  config.registration.unwarped_weight = 0.0
  config.loss.pixel_gradient_weight = 1.0
  pixels = {}
  for unwarped in (False, True):
    config.registration.gradient_term_unwarped = unwarped
    pixels[unwarped] = pixel_terms(2)
  assert pixels[True][0] == pytest.approx(pixels[False][0], rel=1e-6)
  assert pixels[True][1] != pytest.approx(pixels[False][1], rel=1e-6)
  config.registration.unwarped_weight = -1.0
  with pytest.raises(ValueError, match="registration.unwarped_weight"):
    methods.create(config).validate()
  # The baselines do not take the option silently.
  baseline = baselines_pix2pix.get_config("arterial,smoke")
  methods.create(baseline).validate()
  baseline.registration.enabled = True
  with pytest.raises(ValueError, match="registration.enabled"):
    methods.create(baseline).validate()


def test_demo_registers_where_the_kidney_cortex_is_a_goal_and_the_baselines_never():
  """The `:demo` trains with the registration (and the gradient difference term on the unwarped image) in the
  arterial and portal phases, not in the delayed one nor in the paper configs; the baselines' `demo` variants, built
  on the same phase configs, turn it off and validate."""
  from configs import delayed, portal  # pylint: disable=import-outside-toplevel
  from configs.baselines import cut as baselines_cut  # pylint: disable=import-outside-toplevel
  from configs.baselines import cyclegan as baselines_cyclegan  # pylint: disable=import-outside-toplevel

  for module in (arterial, portal):
    config = module.get_config("demo")
    assert config.registration.enabled and config.registration.gradient_term_unwarped
    config.perceptual.pretext_checkpoint = "pretrained"   # `vcect_jax.main` sets it
    methods.create(config).validate()
  assert not delayed.get_config("demo").registration.enabled
  for module in (arterial, portal, delayed):
    assert not module.get_config().registration.enabled   # the paper's method
  for baseline in (baselines_pix2pix, baselines_cyclegan, baselines_cut):
    for phase in ("arterial", "portal"):
      config = baseline.get_config(f"{phase},demo")
      assert not config.registration.enabled
      methods.create(config).validate()
