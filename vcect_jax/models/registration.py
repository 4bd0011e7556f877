"""A registration network for training on misaligned pairs: it warps the virtual image onto its real target.

Real non-contrast / contrast pairs are never perfectly aligned (breathing, bowel motion; the paper's section 4.4.4),
and a pixel loss against a misaligned target teaches a generator to blur its enhancement over where the organ might
be. RegGAN (Kong et al., "Breaking the dilemma of medical image-to-image translation", NeurIPS 2021) trains a
registration network with the generator: the pixel term compares the *warped* virtual image with the real one, so
that misalignment is absorbed by the deformation instead of the generator, and a smoothness term keeps the
deformation plausible. The generator's output itself is never warped at inference.

`Registration` maps (virtual, real) `(B, H, W, 1)` each to an in-plane displacement field `(B, H, W, 2)` in pixels
(rows, columns): a small U-Net (two down-samplings, skip connections, LeakyReLU), whose last convolution starts at
zero, so that training starts from the identity warp. `warp` samples an image at the displaced positions
(bilinear, clamped at the border); `smoothness` is the mean squared spatial gradient of a field.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax.models import layers


def enabled(config) -> bool:
  """Whether a config asks for the registration (`registration.enabled`; absent in configs written before it)."""
  return bool(config.get("registration", {}).get("enabled", False))


def warp(image: jax.Array, flow: jax.Array) -> jax.Array:
  """`image` `(B, H, W, C)` sampled at `(row + flow[..., 0], column + flow[..., 1])`, bilinear, positions clamped to
  the image; differentiable in both."""
  b, h, w, _ = image.shape
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=flow.dtype), jnp.arange(w, dtype=flow.dtype), indexing="ij")
  y = jnp.clip(rows + flow[..., 0], 0.0, h - 1.0)
  x = jnp.clip(cols + flow[..., 1], 0.0, w - 1.0)
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
  batch = jnp.arange(b)[:, None, None]
  top = image[batch, y0, x0] * (1 - wx) + image[batch, y0, x1] * wx
  bottom = image[batch, y1, x0] * (1 - wx) + image[batch, y1, x1] * wx
  return top * (1 - wy) + bottom * wy


def smoothness(flow: jax.Array) -> jax.Array:
  """Mean squared spatial gradient of a displacement field `(B, H, W, 2)` (pixels per pixel): 0 for a uniform shift."""
  d_rows = flow[:, 1:] - flow[:, :-1]
  d_cols = flow[:, :, 1:] - flow[:, :, :-1]
  return jnp.mean(jnp.square(d_rows)) + jnp.mean(jnp.square(d_cols))


def _conv(cin: int, cout: int, rngs: nnx.Rngs, strides: int = 1, **kwargs) -> nnx.Conv:
  return nnx.Conv(cin, cout, (3, 3), strides=strides, padding="SAME", rngs=rngs,
                  conv_general_dilated=layers.conv, **kwargs)


def _up(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Registration(nnx.Module):
  """(virtual, real) -> displacement field `(B, H, W, 2)` in pixels; H and W divisible by 4. `widths`: the
  channels at full, half and quarter resolution."""

  def __init__(self, widths=(16, 32, 32), *, rngs: nnx.Rngs):
    w1, w2, w3 = (int(w) for w in widths)
    self.enc1 = _conv(2, w1, rngs)
    self.enc2 = _conv(w1, w2, rngs, strides=2)
    self.enc3 = _conv(w2, w3, rngs, strides=2)
    self.dec2 = _conv(w3 + w2, w2, rngs)
    self.dec1 = _conv(w2 + w1, w1, rngs)
    self.flow = _conv(w1, 2, rngs, kernel_init=nnx.initializers.zeros_init())

  def __call__(self, virtual: jax.Array, real: jax.Array) -> jax.Array:
    act = lambda x: jax.nn.leaky_relu(x, 0.2)  # noqa: E731
    e1 = act(self.enc1(jnp.concatenate([virtual, real], axis=-1)))
    e2 = act(self.enc2(e1))
    e3 = act(self.enc3(e2))
    d2 = act(self.dec2(jnp.concatenate([_up(e3), e2], axis=-1)))
    d1 = act(self.dec1(jnp.concatenate([_up(d2), e1], axis=-1)))
    return self.flow(d1)
