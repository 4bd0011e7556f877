"""The generator: an HRNet-style dense multi-resolution encoder and a U-Net decoder (paper section 3.1, fig. 3).

Layout (widths `w = (32, 64, 128, 256, 512)` by default, input `(B, H, W, 3)` in model space):

  block 1  at /1   two (3x3 conv + BatchNorm + ReLU) on the input                     -> w[0]
  block i  at /2^(i-1), i = 2..5: a 2x2 max-pool of the concatenation of ALL earlier blocks' outputs
           (each already resampled to the previous block's resolution), then two (3x3 conv + BN + ReLU)  -> w[i-1]
  decoder  U-Net: 2x2 transposed conv up, concatenate the encoder skip of that resolution, two (conv+BN+ReLU)
  head     the last w[0] features concatenated with the input, then a 3x3 conv + BN + ReLU and a 1x1 conv -> 1

Choice of resolutions. The paper says both "each block is a 2x2 max-pool then a double convolution" and "the
input is downsampled by 2x, 4x, 8x and 16x at the last four convolutional blocks" (section 3.2, fig. 5). Pooling
in all five blocks would put the last four at /4../32 and need H divisible by 32. We follow the second statement
and the U-Net convention the authors' code builds on: block 1 works at full resolution (no pool), blocks 2-5 pool,
so the last four blocks are at /2, /4, /8, /16 (the perceptual features) and H, W divisible by 16 suffice - the
256 global path and its 128 quadrants share one set of weights.

Resampling earlier blocks. Block j's output reaches block i (j < i) through a 2^(i-j) max-pool. Because
non-overlapping max-pools compose, this is computed incrementally: the dense input of block i is a 2x2 max-pool
of (dense input of block i-1, output of block i-1), so its channels are sum(w[:i-1]).

Parameter count of the default generator (widths 32..512, 3 input channels): 9,063,425 trainable parameters
(encoder 6,004,448, decoder and head 3,058,977), plus 5,952 BatchNorm running statistics; asserted in
tests/test_models.py. The dense connections add about 1.2 M parameters to a plain U-Net of the same widths.

Output. `(B, H, W, 1)` in model space, linear by default (`output_activation="tanh"` bounds it to [-1, 1]). With
`residual=True` the network predicts the enhancement, which is added to the middle input slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vcect_jax.models import layers

OUTPUT_ACTIVATIONS = ("none", "tanh")
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(config):
  """The layers' computation dtype from a model config's `compute_dtype` (None: float32, Flax's default).

  'bfloat16' (mixed precision, for accelerators) computes convolutions and normalisation in bf16; parameters,
  BatchNorm statistics and the optimiser states stay float32, and the networks return float32 so that the losses
  are computed in float32.
  """
  name = str(config.get("compute_dtype", "float32"))
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
  return None if name == "float32" else jnp.dtype(name)


def max_pool(x: jax.Array, factor: int) -> jax.Array:
  """Non-overlapping `factor x factor` max-pool of `(B, H, W, C)`."""
  if factor == 1:
    return x
  if factor == 2 and x.ndim == 4 and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0 and layers.on_cpu():
    return layers.max_pool_2x2(x)  # the same values and gradients, a faster backward pass on XLA CPU
  window = (1, factor, factor, 1)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")


class ConvBNAct(nnx.Module):
  """3x3 (by default) convolution, BatchNorm and ReLU or LeakyReLU."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3, strides: int = 1,
               negative_slope: float = 0.0, momentum: float = 0.9, dtype=None, rngs: nnx.Rngs):
    # The bias is redundant in front of BatchNorm.
    # The fastest convolution path per platform (same parameters and results; models/layers.py `conv`).
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=strides,
                         padding="SAME", use_bias=False, dtype=dtype, rngs=rngs,
                         conv_general_dilated=layers.conv)
    self.norm = nnx.BatchNorm(out_features, momentum=momentum, dtype=dtype, rngs=rngs)
    self.negative_slope = negative_slope

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    # nnx.BatchNorm + (Leaky)ReLU, with a faster backward pass on CPU (same results; models/layers.py).
    return layers.batch_norm_act(self.norm, self.conv(x), use_running_average, self.negative_slope)


class DoubleConv(nnx.Module):
  """Two (3x3 conv + BatchNorm + ReLU)."""

  def __init__(self, in_features: int, out_features: int, *, momentum: float = 0.9, dtype=None,
               rngs: nnx.Rngs):
    self.first = ConvBNAct(in_features, out_features, momentum=momentum, dtype=dtype, rngs=rngs)
    self.second = ConvBNAct(out_features, out_features, momentum=momentum, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    return self.second(self.first(x, use_running_average), use_running_average)


class Encoder(nnx.Module):
  """The dense multi-resolution encoder shared by the generator and the pretext classifier.

  `Encoder(...)(x)` returns the list of the blocks' outputs, block i at resolution /2^(i-1).
  """

  def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 256, 512), *,
               momentum: float = 0.9, dtype=None, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2:
      raise ValueError(f"the encoder needs at least two blocks, got widths={widths}")
    self.in_channels = int(in_channels)
    self.widths = widths
    blocks = [DoubleConv(self.in_channels, widths[0], momentum=momentum, dtype=dtype, rngs=rngs)]
    for i in range(1, len(widths)):
      blocks.append(DoubleConv(sum(widths[:i]), widths[i], momentum=momentum, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)

  @property
  def downsampling(self) -> int:
    """H and W must be multiples of this."""
    return 2 ** (len(self.widths) - 1)

  def check_input(self, x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected (B, H, W, {self.in_channels}) input, got shape {x.shape}")
    h, w = x.shape[1:3]
    if h % self.downsampling or w % self.downsampling:
      raise ValueError(f"H and W must be multiples of {self.downsampling} for {len(self.widths)} encoder blocks, "
                       f"got {h}x{w}")

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> list[jax.Array]:
    self.check_input(x)
    features = [self.blocks[0](x, use_running_average)]
    dense = None  # earlier blocks' outputs, resampled to the previous block's resolution
    for block in self.blocks[1:]:
      dense = features[-1] if dense is None else jnp.concatenate([dense, features[-1]], axis=-1)
      dense = max_pool(dense, 2)
      features.append(block(dense, use_running_average))
    return features


class Generator(nnx.Module):
  """Dense encoder + U-Net decoder: `(B, H, W, in_channels)` -> `(B, H, W, 1)`, both in model space.

  Args:
    config: `config.model.generator` (fields `in_channels`, `widths`, `residual`, `output_activation`,
      `bn_momentum`, `compute_dtype`).
    rngs: parameter initialisation.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in config.widths)
    momentum = float(config.get("bn_momentum", 0.9))
    self.residual = bool(config.get("residual", False))
    self.output_activation = str(config.get("output_activation", "none"))
    if self.output_activation not in OUTPUT_ACTIVATIONS:
      raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {self.output_activation!r}")
    self.dtype = dtype = compute_dtype(config)
    self.encoder = Encoder(config.in_channels, widths, momentum=momentum, dtype=dtype, rngs=rngs)
    ups, decoders = [], []
    for level in range(len(widths) - 1, 0, -1):  # from the deepest block up to full resolution
      # nnx.ConvTranspose's parameters and results, computed as a matmul + depth-to-space (models/layers.py).
      ups.append(layers.SubpixelConvTranspose(widths[level], widths[level - 1], (2, 2), strides=(2, 2),
                                              padding="VALID", dtype=dtype, rngs=rngs))
      decoders.append(DoubleConv(2 * widths[level - 1], widths[level - 1], momentum=momentum, dtype=dtype,
                                 rngs=rngs))
    self.ups = nnx.List(ups)
    self.decoders = nnx.List(decoders)
    # The paper concatenates the last 32 features with the input so that the structures of the non-contrast
    # slice reach the output directly, then two convolutions.
    self.fuse = ConvBNAct(widths[0] + int(config.in_channels), widths[0], momentum=momentum, dtype=dtype,
                          rngs=rngs)
    # With `residual`, the head starts at zero, so that the untrained network is the identity (the non-contrast
    # slice) and training learns only the enhancement.
    head_init = nnx.initializers.zeros_init() if self.residual else nnx.initializers.lecun_normal()
    # The 1x1 head computes in float32 (its input is promoted to the float32 parameters): float32 output.
    self.out = nnx.Conv(widths[0], 1, (1, 1), kernel_init=head_init, rngs=rngs)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    h = x if self.dtype is None else x.astype(self.dtype)
    features = self.encoder(h, use_running_average)
    y = features[-1]
    for up, decode, skip in zip(self.ups, self.decoders, reversed(features[:-1])):
      y = decode(jnp.concatenate([up(y), skip], axis=-1), use_running_average)
    y = self.fuse(jnp.concatenate([y, h], axis=-1), use_running_average)
    y = self.out(y)
    if self.residual:
      middle = x.shape[-1] // 2
      y = x[..., middle:middle + 1] + y
    if self.output_activation == "tanh":
      y = jnp.tanh(y)
    return y
