"""The sub-pixel transposed convolution (`vcect_jax.models.layers`) against `nnx.ConvTranspose`, checkpoint
compatibility of the networks that use it, and the mixed-precision option (`model.compute_dtype`)."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import arterial
from configs.baselines import cyclegan as cyclegan_config
from configs.baselines import pix2pix as pix2pix_config
from vcect_jax import methods
from vcect_jax import models
from vcect_jax import pretrain
from vcect_jax import sharding
from vcect_jax import train
from vcect_jax.models import baselines as baseline_models
from vcect_jax.models import layers

# (kernel, stride, padding): the generator's 2x2 VALID, pix2pix's ConvTranspose2d(4, 2, 1), CycleGAN's
# ConvTranspose2d(3, 2, 1, output_padding=1), a string padding, a stride of 3 and a phase without taps (1x1, s=2).
CASES = [(2, 2, "VALID"), (4, 2, ((2, 2), (2, 2))), (3, 2, ((1, 2), (1, 2))), (4, 2, "SAME"),
         (5, 3, ((1, 3), (2, 2))), (1, 2, "VALID")]


@nnx.jit
def _jitted(module, *args):
  return module(*args)


def _pair(kernel, stride, padding, use_bias=True):
  kwargs = dict(strides=(stride, stride), padding=padding, use_bias=use_bias)
  return (nnx.ConvTranspose(3, 5, (kernel, kernel), rngs=nnx.Rngs(3), **kwargs),
          layers.SubpixelConvTranspose(3, 5, (kernel, kernel), rngs=nnx.Rngs(3), **kwargs))


def _loss_and_grads(layer, x, target):
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)) * target)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def _assert_same_forward_and_gradients(ref, fast, x):
  """Outputs, a loss, and its gradients with respect to the parameters and the input agree (float32 rounding)."""
  y_ref, y_fast = _jitted(ref, x), _jitted(fast, x)
  assert y_fast.shape == y_ref.shape
  np.testing.assert_allclose(y_fast, y_ref, atol=1e-5, rtol=1e-5)
  target = jax.random.normal(jax.random.key(1), y_ref.shape)
  (l_ref, (gp_ref, gx_ref)), (l_fast, (gp_fast, gx_fast)) = (_loss_and_grads(ref, x, target),
                                                             _loss_and_grads(fast, x, target))
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
  np.testing.assert_allclose(gx_fast, gx_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gp_fast), jax.tree.leaves(gp_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_subpixel_matches_conv_transpose_forward_and_gradients(kernel, stride, padding):
  ref, fast = _pair(kernel, stride, padding)
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  assert fast._subpixel_plan(x) is not None  # the fast path runs, not the fallback
  _assert_same_forward_and_gradients(ref, fast, x)


def test_fast_path_is_not_lax_conv_transpose():
  """The speed comes from avoiding the input-dilated convolution: the jaxpr has no lhs_dilation other than 1."""
  _, fast = _pair(2, 2, "VALID")
  x = jnp.zeros((1, 4, 4, 3))
  graphdef, params = nnx.split(fast)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)), argnums=(0, 1)))(params, x))
  assert "lhs_dilation=(2, 2)" not in jaxpr


def test_same_parameters_as_conv_transpose():
  ref, fast = _pair(4, 2, ((2, 2), (2, 2)), use_bias=False)
  assert set(nnx.state(fast).to_pure_dict()) == set(nnx.state(ref).to_pure_dict()) == {"kernel"}
  ref, fast = _pair(2, 2, "VALID")
  ref_state, fast_state = nnx.state(ref).to_pure_dict(), nnx.state(fast).to_pure_dict()
  assert jax.tree.structure(ref_state) == jax.tree.structure(fast_state)
  for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(fast_state)):
    np.testing.assert_array_equal(a, b)   # same shapes and the same initial values from the same rngs


def _swap_ups_for_reference(ups):
  """Replaces each SubpixelConvTranspose in `ups` by an nnx.ConvTranspose with the same arguments and weights."""
  for i, up in enumerate(ups):
    ref = nnx.ConvTranspose(up.in_features, up.out_features, up.kernel_size, strides=up.strides,
                            padding=up.padding, use_bias=up.use_bias, rngs=nnx.Rngs(9))
    ref.kernel[...] = up.kernel[...]
    if up.use_bias:
      ref.bias[...] = up.bias[...]
    ups[i] = ref


def _shapes(module):
  return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(module).to_pure_dict())


@pytest.mark.parametrize("build", ["generator", "unet", "resnet"])
def test_networks_keep_their_checkpoint_layout_and_outputs(build):
  """A state with nnx.ConvTranspose (as checkpoints before the swap hold) restores into the new networks and gives
  the same outputs."""
  if build == "generator":
    config = arterial.get_config("smoke").model.generator
    make, size = lambda: models.Generator(config, rngs=nnx.Rngs(0)), 32
  else:
    config = (pix2pix_config.get_config("arterial,smoke").pix2pix.generator if build == "unet" else
              cyclegan_config.get_config("arterial,smoke").cyclegan.generator)
    cls = baseline_models.UNetGenerator if build == "unet" else baseline_models.ResnetGenerator
    make, size = lambda: cls(config, rngs=nnx.Rngs(0)), 32
  new, old = make(), make()
  assert any(isinstance(u, layers.SubpixelConvTranspose) for u in new.ups)
  _swap_ups_for_reference(old.ups)
  assert _shapes(new) == _shapes(old)
  restored = make()
  nnx.update(restored, nnx.state(old))
  x = jax.random.uniform(jax.random.key(1), (2, size, size, new.in_channels if build != "generator" else 3))
  for m in (old, restored):
    m.eval()
  np.testing.assert_allclose(_jitted(restored, x), _jitted(old, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ mixed precision
def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  config = arterial.get_config("smoke")
  config.model.compute_dtype = "bfloat16"
  assert config.model.generator.compute_dtype == config.model.discriminator.compute_dtype == "bfloat16"
  gen = models.Generator(config.model.generator, rngs=nnx.Rngs(0))
  disc = models.Discriminator(config.model.discriminator, rngs=nnx.Rngs(1))
  config32 = arterial.get_config("smoke")
  gen32 = models.Generator(config32.model.generator, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  for module in (gen, disc):
    assert {a.dtype for a in jax.tree.leaves(nnx.state(module))} == {jnp.dtype(jnp.float32)}
  y, y32 = _jitted(gen, x), _jitted(gen32, x)
  assert y.dtype == jnp.float32 and _jitted(disc, x, y).dtype == jnp.float32
  # The same weights in bf16 give the float32 result to bf16 precision, and not exactly (bf16 really runs).
  assert 0 < float(jnp.max(jnp.abs(y - y32))) < 0.1 * float(jnp.max(jnp.abs(y32)))
  with pytest.raises(ValueError, match="compute_dtype"):
    config.model.compute_dtype = "float16"
    models.Generator(config.model.generator, rngs=nnx.Rngs(0))


def test_bfloat16_training_steps_run_with_finite_losses():
  config = arterial.get_config("smoke")
  config.model.compute_dtype = "bfloat16"
  # The global path and the adversarial + pixel terms: both bf16 networks, forward and backward, at a smaller
  # compile cost than the full step (the perceptual encoder is float32 in any case).
  config.dual_path.enabled = False
  config.loss.use_perceptual = False
  config.perceptual.init_generator = False
  config.perceptual.pretext_checkpoint = "unused"
  method = methods.create(config)
  with mock.patch.object(pretrain, "load_pretext_encoder",
                         lambda *_: models.IntensityClassifier(config.model, rngs=nnx.Rngs(5)).encoder):
    module = method.create_state(steps_per_epoch=10)
  graphdef, state = nnx.split(module)
  before = jax.tree.map(np.array, nnx.to_pure_dict(state))
  step = train.jit_train_step(method, graphdef, sharding.make_mesh())
  k1, k2 = jax.random.split(jax.random.key(0))
  batch = {"pre": jax.random.uniform(k1, (2, 32, 32, 3), minval=-1, maxval=1),
           "post": jax.random.uniform(k2, (2, 32, 32, 1), minval=-1, maxval=1)}
  for _ in range(2):
    state, metrics = step(state, batch)  # donated: each step consumes the previous state
    metrics = jax.device_get(metrics)
    assert metrics["g_loss"].dtype == np.float32 and metrics["d_loss"].dtype == np.float32
    assert all(np.isfinite(v).all() for v in metrics.values())
  after = nnx.to_pure_dict(jax.device_get(state))
  leaves_before, leaves_after = jax.tree.leaves(before), jax.tree.leaves(after)
  assert all(np.asarray(a).dtype == np.asarray(b).dtype for a, b in zip(leaves_before, leaves_after))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["generators"]),
                                                     jax.tree.leaves(after["generators"]))]
  assert any(changed)


# ------------------------------------------------------------------------------------------------ strided_conv
# (kernel, stride, padding, size): the discriminators' 4x4 / stride-2 SAME (even and odd sizes), CycleGAN's 3x3 /
# stride-2 with padding 1, VALID with a remainder, stride 3, asymmetric padding.
STRIDED = [(4, 2, "SAME", 16), (4, 2, "SAME", 15), (3, 2, ((1, 1), (1, 1)), 16), (3, 2, "VALID", 17),
           (5, 3, "SAME", 20), (4, 2, ((2, 0), (0, 3)), 16)]


def _conv_pair(kernel, stride, padding, c_in=4, c_out=6):
  kwargs = dict(strides=stride, padding=padding)
  return (nnx.Conv(c_in, c_out, (kernel, kernel), rngs=nnx.Rngs(5), **kwargs),
          nnx.Conv(c_in, c_out, (kernel, kernel), conv_general_dilated=layers.strided_conv, rngs=nnx.Rngs(5),
                   **kwargs))


@pytest.mark.parametrize("kernel,stride,padding,size", STRIDED)
def test_strided_conv_matches_lax_forward_and_gradients(kernel, stride, padding, size):
  ref, fast = _conv_pair(kernel, stride, padding)
  x = jax.random.normal(jax.random.key(0), (2, size, size + 2, 4))
  _assert_same_forward_and_gradients(ref, fast, x)


def test_strided_conv_input_gradient_avoids_the_dilated_convolution():
  """The speed comes from the input gradient: no convolution with lhs_dilation 2 in the gradient's jaxpr, while
  XLA's own gradient has one; stride-1 convolutions are left to lax as they are."""
  ref, fast = _conv_pair(4, 2, "SAME")
  x = jnp.zeros((1, 8, 8, 4))

  def grad_jaxpr(layer):
    graphdef, params = nnx.split(layer)
    return str(jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x)), argnums=(0, 1)))(params, x))

  assert "lhs_dilation=(2, 2)" in grad_jaxpr(ref)
  assert "lhs_dilation=(2, 2)" not in grad_jaxpr(fast)
  plain = nnx.Conv(4, 6, (3, 3), conv_general_dilated=layers.strided_conv, rngs=nnx.Rngs(0))
  assert "custom_vjp" not in str(jax.make_jaxpr(lambda x: plain(x))(x))


def test_rewrites_apply_on_cpu_only():
  """On GPU and TPU (not measured there) the strided convolution and the max-pool are lax's own."""
  from vcect_jax.models import generator
  _, fast = _conv_pair(4, 2, "SAME")
  x = jnp.zeros((1, 8, 8, 4))
  with mock.patch.object(layers.jax, "default_backend", return_value="gpu"):
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x: fast(x))(x))
    assert "reduce_window" in str(jax.make_jaxpr(lambda x: generator.max_pool(x, 2))(x))
  assert "custom_vjp" in str(jax.make_jaxpr(lambda x: fast(x))(x))


def test_strided_conv_keeps_the_conv_parameters():
  ref, fast = _conv_pair(4, 2, "SAME")
  assert jax.tree.map(jnp.shape, nnx.state(ref)) == jax.tree.map(jnp.shape, nnx.state(fast))
  for a, b in zip(jax.tree.leaves(nnx.state(ref)), jax.tree.leaves(nnx.state(fast))):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ max_pool_2x2
def _reference_pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def test_max_pool_2x2_matches_reduce_window_with_ties():
  """Values and gradients of lax.reduce_window's max-pool, including windows with tied maxima (ReLU zeros, equal
  values): the whole gradient goes to the first maximum in row-major order, as XLA's select_and_scatter does."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 6, 3)))
  x = x.at[0, 0, 0, 0].set(9.0).at[0, 0, 1, 0].set(9.0).at[0, 1, 0, 0].set(9.0)   # a three-way tie
  x = x.at[1, 2:4, 2:4, 1].set(0.0)                                                 # an all-zero window
  g = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), _reference_pool(x))
  got = jax.vjp(layers.max_pool_2x2, x)[1](g)[0]
  want = jax.vjp(_reference_pool, x)[1](g)[0]
  np.testing.assert_array_equal(got, want)
  assert float(got[0, 0, 0, 0]) == float(g[0, 0, 0, 0]) and float(got[0, 0, 1, 0]) == 0.0


def test_generator_max_pool_uses_the_fast_pool_for_even_sizes():
  from vcect_jax.models import generator
  x = jax.random.normal(jax.random.key(2), (1, 6, 6, 2))
  assert "reduce_window" not in str(jax.make_jaxpr(lambda x: generator.max_pool(x, 2))(x))
  np.testing.assert_array_equal(generator.max_pool(x, 2), _reference_pool(x))
  odd = jax.random.normal(jax.random.key(2), (1, 5, 6, 2))   # falls back to reduce_window
  np.testing.assert_array_equal(generator.max_pool(odd, 2), _reference_pool(odd))


# ------------------------------------------------------------------------------------------------ xla_cpu
def test_xla_cpu_flag_is_added_once_and_yields_to_the_users_setting():
  from vcect_jax import xla_cpu
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  assert xla_cpu.configure(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 " + xla_cpu.FLAG
  assert not xla_cpu.configure(env)                              # already there: not added twice
  user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}
  assert not xla_cpu.configure(user) and user["XLA_FLAGS"].endswith("individual_convolution")
  off = {xla_cpu.OPT_OUT: "0"}
  assert not xla_cpu.configure(off) and "XLA_FLAGS" not in off
  empty = {}
  assert xla_cpu.configure(empty) and empty["XLA_FLAGS"] == xla_cpu.FLAG


def test_importing_the_package_sets_the_flag_before_jax_starts():
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VCECT_XLA_CPU_DEFAULTS")}
  code = "import jax, vcect_jax, os; jax.numpy.ones(2).block_until_ready(); print(os.environ['XLA_FLAGS'])"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.strip().endswith("--xla_cpu_experimental_ynn_fusion_type=")
