"""Faster equivalents of Flax layers, with the same parameters (names, shapes, initialisation).

`SubpixelConvTranspose` is a drop-in `nnx.ConvTranspose` for strided transposed convolutions. XLA lowers
`lax.conv_transpose` to a convolution of the input dilated by the stride (`lhs_dilation`), whose gradients are
very slow on CPU (and known to be slow on GPU): in the paper-size generator the four 2x2 transposed convolutions
took ~2.6 s of a ~5.7 s forward+backward at 256 px, batch 2, against ~22 ms forward (benchmarks/RESULTS.md,
"Performance").

A stride-s transposed convolution is s*s ordinary stride-1 correlations of the *undilated* input, one per output
phase, interleaved ("sub-pixel convolution", depth-to-space). Here the phases share one stride-1 convolution with
s*s*C_out output channels, whose kernel is gathered from the transposed kernel (zeros where a phase has no tap),
followed by a depth-to-space and a crop. When the kernel equals the stride and the padding is VALID (the
generator's 2x2 / stride 2 up-sampling) every phase has exactly one tap and the convolution is a per-pixel matrix
product with the kernel flipped in both spatial axes. The result equals `nnx.ConvTranspose` to float32 rounding
(tests/test_layers.py), forward and gradients.

Because the class subclasses `nnx.ConvTranspose` and only replaces `__call__`, its parameters are `kernel`
`(kh, kw, C_in, C_out)` and `bias` `(C_out,)`, initialised from the same random streams: checkpoints written with
`nnx.ConvTranspose` restore into it and the other way round. Configurations the sub-pixel path does not cover
(kernel dilation, masks, `transpose_kernel`, circular or negative padding, other than 2 spatial dimensions) run
`nnx.ConvTranspose`'s own code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcect_jax import cpu_kernels


def _pads(kernel: int, stride: int, padding) -> tuple[int, int]:
  """The (low, high) padding of the dilated input that `lax.conv_transpose` uses for one spatial dimension."""
  if padding == "VALID":
    lo, total = kernel - 1, kernel + stride - 2 + max(kernel - stride, 0)
    return lo, total - lo
  if padding == "SAME":
    total = kernel + stride - 2
    lo = kernel - 1 if stride > kernel - 1 else int(np.ceil(total / 2))
    return lo, total - lo
  lo, hi = padding
  return int(lo), int(hi)


def _phase_taps(kernel: int, stride: int, lo: int) -> tuple[np.ndarray, int]:
  """For one spatial dimension: `taps[e, r]`, the kernel index that input offset `e + e_min` contributes to output
  phase `r` (or `kernel`, meaning no tap: a zero), and `e_min`.

  With the dilated input padded by `lo`, output `y[s*q + r] = sum_t x[q + (r + t - lo) / s] * K[t]` over the taps
  `t` with `(r + t - lo) % s == 0`.
  """
  pairs = [(r, t, (r + t - lo) // stride) for r in range(stride) for t in range(kernel) if (r + t - lo) % stride == 0]
  offsets = [e for _, _, e in pairs]
  e_min, e_max = min(offsets), max(offsets)
  taps = np.full((e_max - e_min + 1, stride), kernel, dtype=np.int32)
  for r, t, e in pairs:
    taps[e - e_min, r] = t
  return taps, e_min


class SubpixelConvTranspose(nnx.ConvTranspose):
  """`nnx.ConvTranspose` computed as one stride-1 convolution (a matmul for kernel == stride, VALID) and a
  depth-to-space; same arguments, parameters and results."""

  def _subpixel_plan(self, inputs: jax.Array):
    """Static per-dimension (stride, taps, e_min, output size), or None when the sub-pixel path does not apply."""
    ks = tuple(self.kernel_size)
    if (len(ks) != 2 or inputs.ndim != 4 or self.mask is not None or self.transpose_kernel
        or self.padding == "CIRCULAR" or self.kernel_dilation not in (None, 1, (1, 1))):
      return None
    strides = self.strides if self.strides is not None else 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    if isinstance(self.padding, str):
      if self.padding not in ("SAME", "VALID"):
        return None
      pads = [self.padding] * 2
    elif isinstance(self.padding, int):
      pads = [(self.padding, self.padding)] * 2
    else:
      pads = [tuple(p) if not isinstance(p, int) else (p, p) for p in self.padding]
      if len(pads) != 2:
        return None
    plan = []
    for k, s, p, n in zip(ks, strides, pads, inputs.shape[1:3]):
      lo, hi = _pads(k, s, p)
      if lo < 0 or hi < 0:
        return None
      taps, e_min = _phase_taps(k, s, lo)
      out = s * (n - 1) + 1 + lo + hi - k + 1
      plan.append((s, taps, e_min, out))
    return plan

  def __call__(self, inputs: jax.Array) -> jax.Array:
    plan = self._subpixel_plan(inputs)
    if plan is None:
      return super().__call__(inputs)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    (sh, taps_h, emin_h, out_h), (sw, taps_w, emin_w, out_w) = plan
    b, h, w, c_in = inputs.shape
    c_out = kernel.shape[-1]
    # The combined kernel (Eh, Ew, C_in, sh, sw, C_out): index kh / kw of the zero-extended kernel is a zero.
    extended = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    combined = extended[taps_h[:, None, :, None], taps_w[None, :, None, :]]   # (Eh, Ew, sh, sw, C_in, C_out)
    combined = combined.transpose(0, 1, 4, 2, 3, 5).reshape(taps_h.shape[0], taps_w.shape[0], c_in, sh * sw * c_out)
    # Output rows per phase; the input is padded so that the stride-1 convolution yields that many.
    q_h, q_w = -(-out_h // sh), -(-out_w // sw)
    if combined.shape[:2] == (1, 1) and (emin_h, emin_w) == (0, 0) and (q_h, q_w) == (h, w):
      y = jnp.einsum("bhwc,cd->bhwd", inputs, combined[0, 0], precision=self.precision,
                     preferred_element_type=self.preferred_element_type)
    else:
      pad_h = (-emin_h, q_h + taps_h.shape[0] - 1 + emin_h - h)
      pad_w = (-emin_w, q_w + taps_w.shape[0] - 1 + emin_w - w)
      y = _conv_nhwc(inputs, combined, (1, 1), (pad_h, pad_w), self.precision, self.preferred_element_type)
    y = y.reshape(b, q_h, q_w, sh, sw, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(b, q_h * sh, q_w * sw, c_out)
    y = y[:, :out_h, :out_w, :]
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, -1)
    return y


# ------------------------------------------------------------------------------------------------ convolution
def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
         feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kwargs):
  """`lax.conv_general_dilated` for the networks' convolutions: the fastest measured path on each platform.

  On CPU, when the oneDNN handlers are built (`vcect_jax.cpu_kernels`), float32 2-D NHWC / HWIO convolutions
  without dilation or grouping run oneDNN's forward, backward-data and backward-weights primitives (a custom VJP;
  benchmarks/RESULTS.md, "Performance", section 7). Otherwise `strided_conv`
  (XLA's convolutions, with a faster input gradient for strided ones on CPU), which is `lax.conv_general_dilated`
  itself on GPU and TPU. Pass it as `nnx.Conv(..., conv_general_dilated=conv)`: the parameters are unchanged, and
  values and gradients equal XLA's to float32 rounding (tests/test_cpu_kernels.py).
  """
  if (on_cpu() and _plain_2d_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, kwargs)
      and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
      and preferred_element_type in (None, jnp.float32, np.float32) and cpu_kernels.available()):
    strides = tuple(int(s) for s in window_strides)
    pads = tuple(_resolved_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides))
    if all(lo >= 0 and hi >= 0 for lo, hi in pads):
      return _onednn_conv(lhs, rhs, strides, pads)
  return strided_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, precision, preferred_element_type, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, kernel, strides, pads):
  return cpu_kernels.conv_forward(x, kernel, strides, pads)


def _onednn_conv_fwd(x, kernel, strides, pads):
  return cpu_kernels.conv_forward(x, kernel, strides, pads), (x, kernel)


def _onednn_conv_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  return (_onednn_input_grad(g, kernel, x.shape, strides, pads),
          cpu_kernels.conv_backward_weights(x, g, kernel.shape, strides, pads))


def _onednn_input_grad(g, kernel, x_shape, strides, pads):
  """The input gradient. Of a stride-1 convolution it is the forward convolution of `g` with the kernel flipped in
  space and its channel axes swapped, padded by `k - 1 - pad`: oneDNN runs that as its forward kernel (`brgconv`),
  faster than its backward-data one at most of the networks' shapes (the 3x3 layers of the U-Net: 1.0-1.4x, 14% over
  the step's stride-1 shapes; never slower beyond 3%: benchmarks/RESULTS.md, "Performance", 9)."""
  kh, kw = kernel.shape[:2]
  flipped_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
  if tuple(strides) == (1, 1) and all(lo >= 0 and hi >= 0 for lo, hi in flipped_pads):
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return cpu_kernels.conv_forward(g, flipped, (1, 1), flipped_pads)
  return cpu_kernels.conv_backward_data(g, kernel, x_shape, strides, pads)


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


# ------------------------------------------------------------------------------------------------ strided convolution
def on_cpu() -> bool:
  """Whether JAX computes on CPU: the rewrites below were measured there only (benchmarks/RESULTS.md)."""
  return jax.default_backend() == "cpu"


def _resolved_pads(padding, spatial: tuple[int, ...], window: tuple[int, ...], strides: tuple[int, ...]):
  """`lax.conv_general_dilated`'s padding (a string or (low, high) pairs) as a list of (low, high) pairs."""
  if isinstance(padding, str):
    return [tuple(int(v) for v in p) for p in jax.lax.padtype_to_pads(spatial, window, strides, padding)]
  return [(int(lo), int(hi)) for lo, hi in padding]


def strided_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kwargs):
  """`lax.conv_general_dilated` with a faster input gradient for strided 2-D NHWC / HWIO convolutions.

  XLA computes the input gradient of a stride-s convolution as a convolution of the output gradient dilated by s
  (`lhs_dilation`), 2.5x slower on CPU than the stride-1 convolution it amounts to. Here the forward pass and the
  kernel gradient are XLA's own, and the input gradient is that of the same convolution written as a stride-1
  one on a space-to-depth input (`space_to_depth_conv`); in the paper-size discriminator's 4x4 / stride-2 layers
  this took the input gradient from 367 to 141 ms (64 -> 128 channels at 256 px, batch 6; benchmarks/RESULTS.md,
  "Performance"). Computing the forward and kernel gradient that way too was slower, so they are not.

  Pass it as `nnx.Conv(..., conv_general_dilated=strided_conv)`: the parameters are unchanged. Anything other than
  a 2-D NHWC/HWIO convolution with a stride above 1 and no dilation or grouping goes to `lax.conv_general_dilated`
  as it is, and so does everything on GPU and TPU, where the gain was not measured. Values and gradients equal
  XLA's to float32 rounding (tests/test_layers.py).
  """
  strides = tuple(int(s) for s in window_strides)
  plain = (not on_cpu() or all(s == 1 for s in strides)
           or not _plain_2d_nhwc(lhs, rhs, strides, lhs_dilation, rhs_dilation, dimension_numbers,
                                 feature_group_count, batch_group_count, kwargs))
  if plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type, **kwargs)
  pads = tuple(_resolved_pads(padding, lhs.shape[1:3], rhs.shape[:2], strides))
  return _strided_conv(lhs, rhs, strides, pads, precision, preferred_element_type)


def _conv_nhwc(x, kernel, strides, pads, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` of an NHWC input with an HWIO kernel, no dilation."""
  return jax.lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision,
                                      preferred_element_type=preferred_element_type)


_strided_conv = jax.custom_vjp(_conv_nhwc, nondiff_argnums=(2, 3, 4, 5))


def _strided_conv_fwd(x, kernel, strides, pads, precision, preferred_element_type):
  return _conv_nhwc(x, kernel, strides, pads, precision, preferred_element_type), (x, kernel)


def _strided_conv_bwd(strides, pads, precision, preferred_element_type, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: space_to_depth_conv(x, kernel, strides, pads, precision,
                                                       preferred_element_type), x)
  _, kernel_vjp = jax.vjp(lambda k: _conv_nhwc(x, k, strides, pads, precision, preferred_element_type), kernel)
  return input_vjp(g)[0], kernel_vjp(g)[0]


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def space_to_depth_conv(x, kernel, strides, pads, precision=None, preferred_element_type=None):
  """The NHWC / HWIO convolution of `x` with `kernel` at `strides` (>= 1) and `pads` ((low, high) per spatial
  dimension), computed as a stride-1 VALID convolution.

  With `t = s*a + p`, `y[o] = sum_t x_pad[s*o + t] K[t]` is the stride-1 convolution of the space-to-depth input
  `x'[q, (p, c)] = x_pad[s*q + p, c]` with the kernel `K'[a, (p, c)] = K[s*a + p]` (zero where `s*a + p` is past
  the kernel).
  """
  b, h, w, c = x.shape
  kh, kw, c_in, c_out = kernel.shape
  (lo_h, hi_h), (lo_w, hi_w) = pads
  sh, sw = strides
  out_h = (h + lo_h + hi_h - kh) // sh + 1
  out_w = (w + lo_w + hi_w - kw) // sw + 1
  ka_h, ka_w = -(-kh // sh), -(-kw // sw)
  # Pad (or crop: lax.pad takes negative padding) so that the padded input is (out + ka - 1) * s long.
  need_h, need_w = (out_h + ka_h - 1) * sh, (out_w + ka_w - 1) * sw
  zero = jnp.zeros((), x.dtype)
  x = jax.lax.pad(x, zero, ((0, 0, 0), (lo_h, need_h - h - lo_h, 0), (lo_w, need_w - w - lo_w, 0), (0, 0, 0)))
  x = x.reshape(b, need_h // sh, sh, need_w // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, need_h // sh, need_w // sw, sh * sw * c)
  k = jnp.pad(kernel, ((0, ka_h * sh - kh), (0, ka_w * sw - kw), (0, 0), (0, 0)))
  k = k.reshape(ka_h, sh, ka_w, sw, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)
  k = k.reshape(ka_h, ka_w, sh * sw * c_in, c_out)
  return _conv_nhwc(x, k, (1, 1), "VALID", precision, preferred_element_type)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_2d_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                   batch_group_count, kwargs) -> bool:
  """Whether a `lax.conv_general_dilated` call is a 2-D NHWC / HWIO convolution without dilation, grouping or an
  output sharding: the calls that `conv` and `strided_conv` may compute another way."""
  return (lhs.ndim == 4 and rhs.ndim == 4 and len(window_strides) == 2 and _is_nhwc(dimension_numbers)
          and all(int(d) == 1 for d in (lhs_dilation or (1, 1)))
          and all(int(d) == 1 for d in (rhs_dilation or (1, 1)))
          and feature_group_count == 1 and batch_group_count == 1 and kwargs.get("out_sharding") is None)


def _is_nhwc(dimension_numbers) -> bool:
  """Whether `dimension_numbers` (strings or a ConvDimensionNumbers) is NHWC / HWIO / NHWC."""
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
    return dimension_numbers == jax.lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC)
  return tuple(dimension_numbers) == _NHWC


# ------------------------------------------------------------------------------------------------ BatchNorm + activation
def batch_norm_act(norm: nnx.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                   negative_slope: float = 0.0) -> jax.Array:
  """`act(norm(x, use_running_average))` with act ReLU (`negative_slope` 0) or LeakyReLU: same values, gradients
  and running-statistic updates as `nnx.BatchNorm` followed by `jax.nn.relu` / `jax.nn.leaky_relu`.

  In training mode on CPU, a custom VJP computes the backward pass of batch statistics, normalisation and
  activation in two fused passes (the per-channel sums of the upstream gradient and of its product with the
  normalised input, then the input gradient). Autodiff of Flax's BatchNorm leaves XLA CPU several reductions that
  it rewrites into slow reduce-windows: the backward pass of one BatchNorm + ReLU at 256 px, 32 channels, batch 2
  took 26 ms, here 13 (benchmarks/RESULTS.md, "Performance"). Evaluation mode, other platforms, and BatchNorm
  settings this does not cover (non-float32, a feature axis other than the last, `axis_name`, the exact-variance
  formula, no scale or bias) run Flax's own code.
  """
  use_running_average = use_running_average if use_running_average is not None else norm.use_running_average
  fast = (not use_running_average and on_cpu() and x.dtype == jnp.float32 and norm.dtype in (None, jnp.float32)
          and norm.axis in (-1, x.ndim - 1) and norm.axis_name is None and norm.use_fast_variance
          and norm.scale is not None and norm.bias is not None)
  if not fast:
    y = norm(x, use_running_average=use_running_average)
    return jax.nn.leaky_relu(y, negative_slope) if negative_slope else jax.nn.relu(y)
  y, mean, var = _bn_act(x, norm.scale[...], norm.bias[...], float(norm.epsilon), float(negative_slope))
  momentum = norm.momentum
  norm.mean[...] = jax.lax.stop_gradient(momentum * norm.mean[...] + (1 - momentum) * mean)
  norm.var[...] = jax.lax.stop_gradient(momentum * norm.var[...] + (1 - momentum) * var)
  return y


def _channel_moments(a, b, shift):
  """`(sum(a), sum(a * (b - shift)))` per channel (the last axis): one vectorised pass with the CPU kernels
  (`cpu_kernels.channel_moments`; XLA CPU lowers these sums to scalar reduce-windows, ~8% of the paper-size
  training step: benchmarks/RESULTS.md, "Performance", 9), else XLA's reductions."""
  if cpu_kernels.available():
    return cpu_kernels.channel_moments(a, b, shift)
  axes = tuple(range(a.ndim - 1))
  return jnp.sum(a, axis=axes), jnp.sum(a * (b - shift), axis=axes)


def _activate(z, slope):
  return jnp.where(z >= 0, z, slope * z) if slope else jnp.maximum(z, 0)   # as jax.nn.leaky_relu / relu


def _activation_grad(z, g, slope):
  """The cotangent of `_activate` at z: jax.nn.relu's is 0 at z = 0, leaky_relu's is 1."""
  return jnp.where(z >= 0, g, slope * g) if slope else jnp.where(z > 0, g, jnp.zeros((), g.dtype))


def _bn_act_forward(x, scale, bias, epsilon, slope):
  count = x.size // x.shape[-1]
  total, total_sq = _channel_moments(x, x, jnp.zeros(x.shape[-1], x.dtype))
  mean = total / count
  var = jnp.maximum(0.0, total_sq / count - mean * mean)   # Flax's fast variance, clipped as Flax does
  inv = jax.lax.rsqrt(var + epsilon)
  y = _activate((x - mean) * (inv * scale) + bias, slope)
  return (y, mean, var), (x, mean, inv, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_act(x, scale, bias, epsilon, slope):
  return _bn_act_forward(x, scale, bias, epsilon, slope)[0]


def _bn_act_bwd(epsilon, slope, residuals, cotangents):
  del epsilon
  x, mean, inv, scale, bias = residuals
  g, g_mean, g_var = cotangents   # the statistics feed only the (stop-gradient) running averages: usually zeros
  count = x.size // x.shape[-1]
  x_hat = (x - mean) * inv
  g_z = _activation_grad(x_hat * scale + bias, g, slope)
  g_bias, g_centred = _channel_moments(g_z, x, mean)   # sum(g_z), sum(g_z * (x - mean))
  g_scale = inv * g_centred                             # = sum(g_z * x_hat)
  g_x = (inv * scale) * (g_z - g_bias / count - x_hat * (g_scale / count))
  g_x = g_x + g_mean / count + (2.0 / count) * g_var * (x - mean)
  return g_x, g_scale, g_bias


_bn_act.defvjp(_bn_act_forward, _bn_act_bwd)


# ------------------------------------------------------------------------------------------------ max-pool
@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Non-overlapping 2x2 max-pool of `(B, H, W, C)` (H, W even).

  The same values and gradients as `lax.reduce_window(max)` (the gradient goes to the first maximum of each window
  in row-major order, as XLA's `select_and_scatter` does), without it: XLA CPU rewrites the max-pool gradient into
  a reduce-window that tracks the argmax with four int32 index arrays and a scatter, about 8% of the paper-size
  training step. Here the backward pass is a few elementwise comparisons that XLA fuses.
  """
  return _window_max(_windows(x))


def _windows(x: jax.Array) -> jax.Array:
  """`(B, H, W, C)` -> `(4, B, H/2, W/2, C)`: the four positions of each 2x2 window, row-major."""
  b, h, w, c = x.shape
  t = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return jnp.stack([t[:, :, 0, :, 0], t[:, :, 0, :, 1], t[:, :, 1, :, 0], t[:, :, 1, :, 1]])


def _window_max(win: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.maximum(win[0], win[1]), jnp.maximum(win[2], win[3]))


def _max_pool_fwd(x):
  win = _windows(x)
  y = _window_max(win)
  return y, (win, y)


def _max_pool_bwd(res, g):
  win, y = res
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for k in range(4):
    first = (win[k] == y) & ~taken
    taken = taken | first
    parts.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
  b, h2, w2, c = y.shape
  top = jnp.stack([parts[0], parts[1]], axis=3)       # (B, H/2, W/2, 2, C)
  bottom = jnp.stack([parts[2], parts[3]], axis=3)
  dx = jnp.stack([top, bottom], axis=2)               # (B, H/2, 2, W/2, 2, C)
  return (dx.reshape(b, 2 * h2, 2 * w2, c),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
