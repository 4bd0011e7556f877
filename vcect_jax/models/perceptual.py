"""Perceptual features, loss and heatmaps from the frozen pretext encoder (paper section 3.2, fig. 5).

The features are the outputs of the encoder's last four blocks, at /2, /4, /8 and /16 of the image. The encoder
is always run frozen: its parameters and statistics go through `stop_gradient` (gradients reach the images, never
the encoder) and BatchNorm uses its running statistics whatever the module's train/eval mode.

The pretext encoder takes three slices as channels. Contrast images are single slices `(B, H, W, 1)`; they enter
the encoder with the channel repeated three times (as the authors' code feeds one slice repeated). Images with
as many channels as the encoder expects go in unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax.models.generator import Encoder

NUM_BLOCKS = 4


def _frozen(encoder: Encoder) -> Encoder:
  graphdef, state = nnx.split(encoder)
  return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def _to_encoder_channels(encoder: Encoder, img: jax.Array) -> jax.Array:
  if img.ndim != 4:
    raise ValueError(f"expected (B, H, W, C) images, got shape {img.shape}")
  if img.shape[-1] == encoder.in_channels:
    return img
  if img.shape[-1] == 1:
    return jnp.repeat(img, encoder.in_channels, axis=-1)
  raise ValueError(f"images need 1 or {encoder.in_channels} channels, got {img.shape[-1]}")


def encoder_features(encoder: Encoder, img: jax.Array) -> list[jax.Array]:
  """The last four blocks' features of `img` `(B, H, W, 1 or 3)`, at /2, /4, /8, /16, frozen."""
  features = _frozen(encoder)(_to_encoder_channels(encoder, img), use_running_average=True)
  return features[-NUM_BLOCKS:]


def _paired_features(encoder, virtual, real):
  if virtual.shape != real.shape:
    raise ValueError(f"virtual and real images differ in shape: {virtual.shape} vs {real.shape}")
  # One encoder pass over both (BatchNorm uses running statistics, so the examples stay independent).
  both = encoder_features(encoder, jnp.concatenate([virtual, real], axis=0))
  b = virtual.shape[0]
  return [(f[:b], f[b:]) for f in both]


def perceptual_loss(encoder: Encoder, virtual: jax.Array, real: jax.Array,
                    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> tuple[jax.Array, jax.Array]:
  """Weighted sum over the last four blocks of the MSE between the features of `virtual` and `real`.

  Args:
    encoder: the (pretext) encoder; frozen here.
    virtual: `(B, H, W, 1)` virtual contrast slices, model space.
    real: the real contrast slices, same shape.
    weights: one weight per block (/2, /4, /8, /16); the paper sums them with weight 1.

  Returns:
    `(loss, per_block)`: the scalar loss and the `(4,)` unweighted MSE of each block.
  """
  if len(weights) != NUM_BLOCKS:
    raise ValueError(f"perceptual weights need {NUM_BLOCKS} values, got {tuple(weights)}")
  per_block = jnp.stack([jnp.mean(jnp.square(fv - fr)) for fv, fr in _paired_features(encoder, virtual, real)])
  return jnp.sum(jnp.asarray(weights, per_block.dtype) * per_block), per_block


def heatmaps(encoder: Encoder, virtual: jax.Array, real: jax.Array) -> jax.Array:
  """Channel mean of the squared feature differences per block, resized (bilinear) to the image: `(B, H, W, 4)`."""
  b, h, w = virtual.shape[:3]
  maps = []
  for fv, fr in _paired_features(encoder, virtual, real):
    diff = jnp.mean(jnp.square(fv - fr), axis=-1, keepdims=True)
    maps.append(jax.image.resize(diff, (b, h, w, 1), method="bilinear"))
  return jnp.concatenate(maps, axis=-1)
