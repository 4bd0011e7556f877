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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
      y = jax.lax.conv_general_dilated(inputs, combined, (1, 1), (pad_h, pad_w),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
                                       preferred_element_type=self.preferred_element_type)
    y = y.reshape(b, q_h, q_w, sh, sw, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(b, q_h * sh, q_w * sw, c_out)
    y = y[:, :out_h, :out_w, :]
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, -1)
    return y
