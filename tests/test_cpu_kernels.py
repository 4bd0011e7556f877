"""The CPU fast paths of the networks: oneDNN convolutions (vcect_jax.cpu_kernels, when built) and the fused
BatchNorm + activation backward pass (models/layers.py) give Flax's / XLA's values and gradients."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vcect_jax import cpu_kernels
from vcect_jax.cpu_kernels import build
from vcect_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")
needs_onednn = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"oneDNN convolutions unavailable: {cpu_kernels.why_unavailable()}")

# (batch, size, C_in, C_out, kernel, stride, padding): the networks' kinds of convolution.
CASES = [
    (2, 16, 3, 8, 3, 1, "SAME"),          # the generator's first layer
    (2, 16, 8, 8, 3, 1, "SAME"),          # a U-Net 3x3
    (3, 16, 8, 16, 4, 2, "SAME"),         # the discriminator's 4x4 / stride 2 (asymmetric padding)
    (1, 12, 16, 4, 1, 1, "VALID"),        # a 1x1 head
    (2, 17, 5, 6, 4, 2, ((1, 1), (2, 0))),  # odd size, explicit uneven padding
    (4, 8, 16, 8, 3, 1, "SAME"),          # batch 4: two chunks of two images on a 2-thread pool
    (2, 16, 4, 8, 4, 1, "SAME"),          # the discriminator's first layer: 4x4 / stride 1, padding (1, 2)
]


def _reference(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)


def _fast(x, w, stride, padding):
  return layers.conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)


@needs_onednn
@pytest.mark.parametrize("threads", ["pool", "omp"])
@pytest.mark.parametrize("case", CASES)
def test_onednn_conv_matches_xla_forward_and_gradients(case, threads, monkeypatch):
  # "pool": the batch split into chunks run on XLA's thread pool (the kernel gradients summed over chunks);
  # "omp": one call on oneDNN's own OpenMP threads. The handlers read the setting on every call.
  monkeypatch.setenv("VCECT_ONEDNN_THREADS", threads)
  b, size, c_in, c_out, k, stride, padding = case
  rng = np.random.default_rng(sum(map(hash, map(str, case))) % 2**32)
  x = jnp.asarray(rng.standard_normal((b, size, size, c_in)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(k * k * c_in), jnp.float32)
  y_ref, vjp_ref = jax.vjp(lambda x, w: _reference(x, w, stride, padding), x, w)
  y, vjp = jax.vjp(lambda x, w: _fast(x, w, stride, padding), x, w)
  g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_networks_run_onednn_on_cpu_and_xla_when_switched_off(monkeypatch):
  conv = nnx.Conv(4, 8, (3, 3), padding="SAME", use_bias=False, rngs=nnx.Rngs(0),
                  conv_general_dilated=layers.conv)
  x = jnp.ones((1, 8, 8, 4))
  assert "vcect_conv_forward" in str(jax.make_jaxpr(lambda x: conv(x))(x))
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  assert "vcect_conv_forward" not in str(jax.make_jaxpr(lambda x: conv(x))(x))


@needs_onednn
def test_bfloat16_and_dilated_convolutions_stay_on_xla():
  x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  text = jax.jit(lambda x, w: layers.conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)).lower(x, w).as_text()
  assert "vcect_conv" not in text
  xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
  text = jax.jit(lambda x, w: layers.conv(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC)
                 ).lower(xf, wf).as_text()
  assert "vcect_conv" not in text


def test_opt_out_switches_the_kernels_off():
  code = "from vcect_jax import cpu_kernels; print(cpu_kernels.available(), cpu_kernels.why_unavailable())"
  out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VCECT_ONEDNN": "0"},
                       capture_output=True, text=True, check=True).stdout
  assert out.startswith("False VCECT_ONEDNN=0")


def test_build_says_what_to_install_without_onednn(monkeypatch, tmp_path):
  monkeypatch.setattr(cpu_kernels, "library_path", lambda: tmp_path / "lib.so")
  monkeypatch.setattr(build, "_dnnl_prefix", lambda: None)
  with pytest.raises(RuntimeError, match="libdnnl-dev"):
    build.build()
  assert build.main(["--if_possible"]) == 0
  assert build.main([]) == 1
  assert not (tmp_path / "lib.so").exists()


def test_library_name_follows_source_and_jaxlib(monkeypatch, tmp_path):
  path = cpu_kernels.library_path()
  assert path.parent == cpu_kernels.BUILD_DIR and path.suffix == ".so"
  assert path == cpu_kernels.library_path()   # stable
  changed = tmp_path / "onednn_conv.cc"
  changed.write_bytes(cpu_kernels.SOURCE.read_bytes() + b"// changed\n")
  monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
  assert cpu_kernels.library_path() != path, "a changed source would be served the stale build"


# ------------------------------------------------------------------------------------------------ BatchNorm + act
@needs_onednn
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (2, 64, 64, 5), (9000, 17)])
def test_channel_moments_match_float64_sums(shape):
  # (2, 64, 64, 5) and (9000, 17): rows split over the pool's threads (chunks of >= 4096 rows), an odd channel count.
  rng = np.random.default_rng(len(shape))
  a = rng.standard_normal(shape).astype(np.float32)
  b = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
  shift = rng.standard_normal(shape[-1]).astype(np.float32)
  sum_a, sum_ab = jax.jit(cpu_kernels.channel_moments)(a, b, shift)
  axes = tuple(range(len(shape) - 1))
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  np.testing.assert_allclose(sum_a, a64.sum(axes), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(sum_ab, (a64 * (b64 - shift)).sum(axes), rtol=1e-5, atol=1e-3)
  same, same_sq = jax.jit(cpu_kernels.channel_moments)(b, b, np.zeros(shape[-1], np.float32))  # the forward use
  np.testing.assert_allclose(same_sq, (b64 * b64).sum(axes), rtol=1e-5)


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_batch_norm_act_matches_flax_values_gradients_and_running_stats(slope):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 6)) * 2 + 0.5, jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def make():
    norm = nnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 1.5, 6)
    norm.bias[...] = jnp.linspace(-0.3, 0.3, 6)
    return norm

  def flax_path(norm, x):
    y = norm(x, use_running_average=False)
    return jax.nn.leaky_relu(y, slope) if slope else jax.nn.relu(y)

  def fast_path(norm, x):
    return layers.batch_norm_act(norm, x, use_running_average=False, negative_slope=slope)

  results = []
  for fn in (flax_path, fast_path):
    norm = make()
    graphdef, params, stats = nnx.split(norm, nnx.Param, nnx.BatchStat)

    def loss(params, x, stats, fn=fn):
      module = nnx.merge(graphdef, params, stats, copy=True)
      y = fn(module, x)
      return jnp.sum(y * g), (y, nnx.state(module, nnx.BatchStat))

    (_, (y, new_stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x, stats)
    results.append((y, new_stats, grads))
  (y0, s0, g0), (y1, s1, g1) = results
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The fast path is the one that ran (its custom VJP), not Flax's.
  jaxpr = str(jax.make_jaxpr(lambda x: fast_path(make(), x))(x))
  assert "custom_vjp_call" in jaxpr
  if cpu_kernels.available():  # with its statistics from the channel-moments kernel
    assert "vcect_channel_moments" in jaxpr


def test_batch_norm_act_eval_mode_is_flax():
  norm = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  norm.mean[...] = jnp.arange(4.0)
  x = jnp.linspace(-3, 3, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
  want = jax.nn.relu(norm(x, use_running_average=True))
  np.testing.assert_array_equal(layers.batch_norm_act(norm, x, use_running_average=True), want)
