"""The conditional patch discriminator (paper section 3.1).

It sees the non-contrast input and a contrast slice (real or virtual) concatenated along channels, runs four
conv + BatchNorm + LeakyReLU(0.2) blocks (widths 64, 128, 256, 512; strides 1, 2, 2, 2, so a 256 input gives
features of 256, 128, 64 and 32 px as in the paper), then a convolution to one logit per patch. The training
loss (BCE-with-logits and LSGAN MSE) lives with the training code; this module returns raw logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax.models import layers
from vcect_jax.models.generator import ConvBNAct
from vcect_jax.models.generator import compute_dtype


class Discriminator(nnx.Module):
  """`logits = D(x, y)`: x `(B, H, W, input_channels)`, y `(B, H, W, target_channels)` -> `(B, H/s, W/s, 1)`.

  `s` is the product of the strides (8 by default), so H and W must be multiples of it.

  Args:
    config: `config.model.discriminator` (fields `input_channels`, `target_channels`, `widths`, `strides`,
      `kernel_size`, `negative_slope`, `bn_momentum`, `compute_dtype`; with 'bfloat16' the blocks compute in
      bf16 and the last convolution, hence the logits, in float32).
    rngs: parameter initialisation.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in config.widths)
    strides = tuple(int(s) for s in config.strides)
    if len(strides) != len(widths):
      raise ValueError(f"discriminator strides {strides} and widths {widths} must have the same length")
    kernel_size = int(config.get("kernel_size", 4))
    self.input_channels = int(config.input_channels)
    self.target_channels = int(config.get("target_channels", 1))
    self.downsampling = math.prod(strides)
    self.dtype = dtype = compute_dtype(config)
    blocks, in_features = [], self.input_channels + self.target_channels
    for width, stride in zip(widths, strides):
      blocks.append(ConvBNAct(in_features, width, kernel_size=kernel_size, strides=stride,
                              negative_slope=float(config.get("negative_slope", 0.2)),
                              momentum=float(config.get("bn_momentum", 0.9)), dtype=dtype, rngs=rngs))
      in_features = width
    self.blocks = nnx.List(blocks)
    self.logits = nnx.Conv(in_features, 1, (kernel_size, kernel_size), padding="SAME", rngs=rngs,
                          conv_general_dilated=layers.conv)

  def __call__(self, x: jax.Array, y: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if x.shape[:3] != y.shape[:3] or x.shape[-1] != self.input_channels or y.shape[-1] != self.target_channels:
      raise ValueError(f"expected x (B, H, W, {self.input_channels}) and y (B, H, W, {self.target_channels}), "
                       f"got {x.shape} and {y.shape}")
    if x.shape[1] % self.downsampling or x.shape[2] % self.downsampling:
      raise ValueError(f"H and W must be multiples of {self.downsampling}, got {x.shape[1]}x{x.shape[2]}")
    h = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
    if self.dtype is not None:
      h = h.astype(self.dtype)
    for block in self.blocks:
      h = block(h, use_running_average)
    return self.logits(h)
