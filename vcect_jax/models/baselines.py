"""The networks of the image-to-image translation baselines: pix2pix, CycleGAN and CUT (`vcect_jax/methods`).

    G = UNetGenerator(config.pix2pix.generator, rngs=rngs)          # (B,H,W,3) -> (B,H,W,1), tanh
    G = ResnetGenerator(config.cyclegan.generator, rngs=rngs)       # reflection padding, instance norm, tanh
    feats = G.encode(x, ("padded_input", "down1", "down2", "res1", "res5"))   # CUT's PatchNCE layers
    D = PatchDiscriminator(config.cut.discriminator, in_channels=1, rngs=rngs)  # 70x70 PatchGAN logits
    F = PatchProjector(channels, units=256, rngs=rngs)              # CUT's two-layer MLP head on sampled patches

They follow the architectures of the reference PyTorch repositories (junyanz/pytorch-CycleGAN-and-pix2pix for
`unet_256`, `resnet_9blocks` and the `basic` 70x70 PatchGAN; taesungp/contrastive-unpaired-translation for the
anti-aliased variants and `PatchSampleF`), channels last. Padding is explicit where PyTorch pads by 1 so that
feature sizes match (a 256 input gives 30x30 patch logits). Normalisation: 'batch' (learned affine, running
statistics for evaluation), 'instance' (PyTorch's default InstanceNorm2d: no affine, no running statistics) or
'none'. Convolutions in front of a batch norm have no bias, as in the references.

Generators take `(x, use_running_average=None, dropout_key=None)`: dropout (pix2pix's U-Net) is applied only when
a key is given, so evaluation and inference (`generator(pre)`) are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vcect_jax.models import layers

NORMS = ("batch", "instance", "none")
INITS = ("normal", "xavier")


def kernel_init(init_type: str = "normal", gain: float = 0.02):
  """The references' weight initialisation: N(0, gain) ('normal') or Xavier-normal with `gain` ('xavier')."""
  if init_type == "normal":
    return nnx.initializers.normal(gain)
  if init_type == "xavier":
    return nnx.initializers.variance_scaling(gain ** 2, "fan_avg", "normal")
  raise ValueError(f"init_type must be one of {INITS}, got {init_type!r}")


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Per-example, per-channel normalisation over H and W (no affine parameters, no running statistics)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.var(x, axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def _binomial_filter(size: int) -> np.ndarray:
  a = np.array([1.0, 3.0, 3.0, 1.0]) if size == 4 else np.array([1.0, 2.0, 1.0])
  f = a[:, None] * a[None, :]
  return (f / f.sum()).astype(np.float32)


def blur_downsample(x: jax.Array) -> jax.Array:
  """CUT's anti-aliased downsampling: reflection pad 1, [1 2 1] x [1 2 1] / 16 blur, stride 2 (per channel)."""
  c = x.shape[-1]
  kernel = jnp.broadcast_to(jnp.asarray(_binomial_filter(3))[:, :, None, None], (3, 3, 1, c)).astype(x.dtype)
  return jax.lax.conv_general_dilated(reflect_pad(x, 1), kernel, (2, 2), "VALID", feature_group_count=c,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def blur_upsample(x: jax.Array) -> jax.Array:
  """CUT's anti-aliased upsampling: edge pad 1, transposed [1 3 3 1] x [1 3 3 1] / 16 filter, stride 2, crop."""
  c = x.shape[-1]
  kernel = jnp.broadcast_to(jnp.asarray(4.0 * _binomial_filter(4))[:, :, None, None], (4, 4, 1, c)).astype(x.dtype)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  y = jax.lax.conv_general_dilated(padded, kernel, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2),
                                   feature_group_count=c, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y[:, 1:-1, 1:-1, :]


def _normal_around_one(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class Norm(nnx.Module):
  """'batch' (nnx.BatchNorm, PyTorch's momentum 0.1 = flax 0.9), 'instance' or 'none'."""

  def __init__(self, kind: str, features: int, *, momentum: float = 0.9, rngs: nnx.Rngs):
    if kind not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    self.kind = kind
    # The references initialise BatchNorm scales from N(1, 0.02).
    self.batch = (nnx.BatchNorm(features, momentum=momentum, epsilon=1e-5, scale_init=_normal_around_one,
                                rngs=rngs) if kind == "batch" else None)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if self.kind == "batch":
      return self.batch(x, use_running_average=use_running_average)
    if self.kind == "instance":
      return instance_norm(x)
    return x


def _conv(in_f, out_f, kernel, *, strides=1, padding=0, bias=True, init, rngs):
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nnx.Conv(in_f, out_f, (kernel, kernel), strides=strides, padding=pad, use_bias=bias, kernel_init=init,
                  rngs=rngs, conv_general_dilated=layers.conv)  # fastest path per platform: models/layers.py


def _conv_transpose(in_f, out_f, kernel, *, torch_padding, output_padding=0, bias=True, init, rngs):
  """A stride-2 transposed convolution with PyTorch's output geometry (`ConvTranspose2d(k, 2, p, op)`)."""
  lo = kernel - 1 - torch_padding
  pad = ((lo, lo + output_padding), (lo, lo + output_padding))
  # nnx.ConvTranspose's parameters and results, as a sub-pixel convolution (fast gradients; models/layers.py).
  return layers.SubpixelConvTranspose(in_f, out_f, (kernel, kernel), strides=(2, 2), padding=pad, use_bias=bias,
                                      kernel_init=init, rngs=rngs)


# ------------------------------------------------------------------------------------------------ U-Net (pix2pix)
class UNetGenerator(nnx.Module):
  """pix2pix's U-Net (`unet_256`: `num_downs=8`, 256 -> 1x1 at the bottleneck), skip connections at every level.

  Level 0 (outermost) to `num_downs - 1` (innermost); widths ngf, 2ngf, 4ngf, then 8ngf. Down: LeakyReLU(0.2),
  4x4 stride-2 conv, norm (none at the outermost and innermost); up: ReLU, 4x4 stride-2 transposed conv, norm
  (tanh at the outermost), dropout 0.5 in the `num_downs - 5` 8ngf levels above the innermost.

  Args:
    config: `in_channels`, `out_channels`, `ngf`, `num_downs` (>= 5; H and W multiples of 2**num_downs),
      `norm`, `dropout`, `bn_momentum`, `init_type`, `init_gain`.
    rngs: parameter initialisation.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    ngf, n = int(config.ngf), int(config.num_downs)
    if n < 5:
      raise ValueError(f"the U-Net needs num_downs >= 5, got {n}")
    norm = str(config.get("norm", "batch"))
    momentum = float(config.get("bn_momentum", 0.9))
    init = kernel_init(config.get("init_type", "normal"), float(config.get("init_gain", 0.02)))
    bias = norm != "batch"
    self.num_downs = n
    self.dropout_rate = float(config.get("dropout", 0.5))
    self.in_channels = int(config.in_channels)
    # (outer, inner) widths per level, outermost first.
    widths = [(int(config.out_channels), ngf), (ngf, 2 * ngf), (2 * ngf, 4 * ngf), (4 * ngf, 8 * ngf)]
    widths += [(8 * ngf, 8 * ngf)] * (n - 4)
    self.dropout_levels = tuple(range(4, n - 1))
    downs, down_norms, ups, up_norms = [], [], [], []
    for level, (outer, inner) in enumerate(widths):
      innermost, outermost = level == n - 1, level == 0
      down_in = self.in_channels if outermost else outer
      downs.append(_conv(down_in, inner, 4, strides=2, padding=1, bias=bias, init=init, rngs=rngs))
      down_norms.append(Norm("none" if (innermost or outermost) else norm, inner, momentum=momentum, rngs=rngs))
      up_in = inner if innermost else 2 * inner
      ups.append(_conv_transpose(up_in, outer, 4, torch_padding=1, bias=bias or outermost, init=init, rngs=rngs))
      up_norms.append(Norm("none" if outermost else norm, outer, momentum=momentum, rngs=rngs))
    self.downs, self.down_norms = nnx.List(downs), nnx.List(down_norms)
    self.ups, self.up_norms = nnx.List(ups), nnx.List(up_norms)

  @property
  def downsampling(self) -> int:
    return 2 ** self.num_downs

  def __call__(self, x: jax.Array, use_running_average: bool | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected (B, H, W, {self.in_channels}) input, got shape {x.shape}")
    if x.shape[1] % self.downsampling or x.shape[2] % self.downsampling:
      raise ValueError(f"H and W must be multiples of {self.downsampling} for num_downs={self.num_downs}, got "
                       f"{x.shape[1]}x{x.shape[2]}")
    skips, h = [], x
    for level in range(self.num_downs):
      skips.append(h)
      if level:
        h = jax.nn.leaky_relu(h, 0.2)
      h = self.down_norms[level](self.downs[level](h), use_running_average)
    for level in reversed(range(self.num_downs)):
      h = self.up_norms[level](self.ups[level](jax.nn.relu(h)), use_running_average)
      if level == 0:
        return jnp.tanh(h)
      if level in self.dropout_levels and dropout_key is not None and self.dropout_rate > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, level), 1.0 - self.dropout_rate, h.shape)
        h = jnp.where(keep, h / (1.0 - self.dropout_rate), 0.0)
      h = jnp.concatenate([skips[level], h], axis=-1)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ ResNet generator
class ResnetBlock(nnx.Module):
  """x + (reflect pad 1, 3x3 conv, norm, ReLU, reflect pad 1, 3x3 conv, norm)(x)."""

  def __init__(self, width: int, norm: str, *, init, rngs: nnx.Rngs):
    bias = norm != "batch"
    self.conv1 = _conv(width, width, 3, bias=bias, init=init, rngs=rngs)
    self.norm1 = Norm(norm, width, rngs=rngs)
    self.conv2 = _conv(width, width, 3, bias=bias, init=init, rngs=rngs)
    self.norm2 = Norm(norm, width, rngs=rngs)

  def __call__(self, x, use_running_average=None):
    h = jax.nn.relu(self.norm1(self.conv1(reflect_pad(x, 1)), use_running_average))
    return x + self.norm2(self.conv2(reflect_pad(h, 1)), use_running_average)


class ResnetGenerator(nnx.Module):
  """CycleGAN's / CUT's `resnet_9blocks`: 7x7 conv, two stride-2 downsamplings, residual blocks, two
  upsamplings, 7x7 conv and tanh, with reflection padding.

  `antialias` (CUT's default) downsamples with a stride-1 conv then a blur-pool, and `antialias_up` upsamples
  with a fixed blur filter then a 3x3 conv; without them (CycleGAN) stride-2 convs and transposed convs are used.

  `encode(x, layers)` returns the features CUT's PatchNCE reads, by name: 'padded_input' (the reflection-padded
  input), 'down1' / 'down2' (the outputs of the two downsampling convolutions, before their norm) and 'res<k>'
  (the output of residual block k, 1-based). CUT's default layers '0,4,8,12,16' are
  ('padded_input', 'down1', 'down2', 'res1', 'res5').

  Args:
    config: `in_channels`, `out_channels`, `ngf`, `n_blocks`, `norm`, `antialias`, `antialias_up`,
      `init_type`, `init_gain`. H and W must be multiples of 4.
    rngs: parameter initialisation.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    ngf, norm = int(config.ngf), str(config.get("norm", "instance"))
    init = kernel_init(config.get("init_type", "normal"), float(config.get("init_gain", 0.02)))
    bias = norm != "batch"
    self.in_channels = int(config.in_channels)
    self.out_channels = int(config.out_channels)
    self.n_blocks = int(config.n_blocks)
    self.antialias = bool(config.get("antialias", False))
    self.antialias_up = bool(config.get("antialias_up", False))
    self.stem = _conv(self.in_channels, ngf, 7, bias=bias, init=init, rngs=rngs)
    self.stem_norm = Norm(norm, ngf, rngs=rngs)
    downs, down_norms = [], []
    for i in range(2):
      a, b = ngf * 2 ** i, ngf * 2 ** (i + 1)
      downs.append(_conv(a, b, 3, strides=1 if self.antialias else 2, padding=1, bias=bias, init=init, rngs=rngs))
      down_norms.append(Norm(norm, b, rngs=rngs))
    self.downs, self.down_norms = nnx.List(downs), nnx.List(down_norms)
    self.blocks = nnx.List([ResnetBlock(4 * ngf, norm, init=init, rngs=rngs) for _ in range(self.n_blocks)])
    ups, up_norms = [], []
    for i in range(2):
      a, b = ngf * 2 ** (2 - i), ngf * 2 ** (1 - i)
      if self.antialias_up:
        ups.append(_conv(a, b, 3, padding=1, bias=bias, init=init, rngs=rngs))
      else:
        ups.append(_conv_transpose(a, b, 3, torch_padding=1, output_padding=1, bias=bias, init=init, rngs=rngs))
      up_norms.append(Norm(norm, b, rngs=rngs))
    self.ups, self.up_norms = nnx.List(ups), nnx.List(up_norms)
    self.head = _conv(ngf, self.out_channels, 7, init=init, rngs=rngs)
    self.tap_channels = {"padded_input": self.in_channels, "down1": 2 * ngf, "down2": 4 * ngf,
                         **{f"res{k}": 4 * ngf for k in range(1, self.n_blocks + 1)}}

  def _check(self, x):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected (B, H, W, {self.in_channels}) input, got shape {x.shape}")
    if x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f"H and W must be multiples of 4, got {x.shape[1]}x{x.shape[2]}")

  def _run(self, x, use_running_average=None, layers: Sequence[str] = ()):
    """The forward pass; with `layers`, stops after the last requested tap and returns the taps instead."""
    self._check(x)
    taps, wanted = {}, set(layers)

    def tap(name, value):
      if name in wanted:
        taps[name] = value
      return wanted and wanted <= set(taps)

    h = reflect_pad(x, 3)
    if tap("padded_input", h):
      return taps
    h = jax.nn.relu(self.stem_norm(self.stem(h), use_running_average))
    for i, (conv, norm) in enumerate(zip(self.downs, self.down_norms)):
      h = conv(h)
      if tap(f"down{i + 1}", h):
        return taps
      h = jax.nn.relu(norm(h, use_running_average))
      if self.antialias:
        h = blur_downsample(h)
    for k, block in enumerate(self.blocks):
      h = block(h, use_running_average)
      if tap(f"res{k + 1}", h):
        return taps
    if wanted:
      raise ValueError(f"unknown layers {sorted(wanted - set(taps))}; choose from {list(self.tap_channels)}")
    for conv, norm in zip(self.ups, self.up_norms):
      if self.antialias_up:
        h = blur_upsample(h)
      h = jax.nn.relu(norm(conv(h), use_running_average))
    return jnp.tanh(self.head(reflect_pad(h, 3)))

  def __call__(self, x: jax.Array, use_running_average: bool | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    del dropout_key  # no dropout in the references' ResNet generators (--no_dropout)
    return self._run(x, use_running_average)

  def encode(self, x: jax.Array, layers: Sequence[str], use_running_average: bool | None = None) -> list[jax.Array]:
    """The features at `layers` (names as in the class docstring), in that order."""
    unknown = [l for l in layers if l not in self.tap_channels]
    if unknown:
      raise ValueError(f"unknown generator layers {unknown}; choose from {list(self.tap_channels)}")
    taps = self._run(x, use_running_average, layers)
    return [taps[l] for l in layers]


# ------------------------------------------------------------------------------------------------ PatchGAN
class PatchDiscriminator(nnx.Module):
  """The 70x70 PatchGAN (`basic`, `n_layers=3`): 4x4 convs with LeakyReLU(0.2), widths ndf * (1, 2, 4, 8), the
  first three stride 2 (or stride 1 + blur-pool with `antialias`, CUT), no norm on the first; one logit per patch.

  Args:
    config: `ndf`, `n_layers`, `norm`, `antialias`, `bn_momentum`, `init_type`, `init_gain`.
    in_channels: channels of the images it judges (pix2pix: input and target concatenated).
    rngs: parameter initialisation.
  """

  def __init__(self, config, in_channels: int, *, rngs: nnx.Rngs):
    ndf, n_layers, norm = int(config.ndf), int(config.get("n_layers", 3)), str(config.get("norm", "instance"))
    momentum = float(config.get("bn_momentum", 0.9))
    init = kernel_init(config.get("init_type", "normal"), float(config.get("init_gain", 0.02)))
    bias = norm != "batch"
    self.in_channels = int(in_channels)
    self.antialias = bool(config.get("antialias", False))
    stride = 1 if self.antialias else 2
    widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
    convs = [_conv(self.in_channels, widths[0], 4, strides=stride, padding=1, init=init, rngs=rngs)]
    norms = [Norm("none", widths[0], rngs=rngs)]
    strided = [True]
    for n in range(1, n_layers + 1):
      last = n == n_layers
      convs.append(_conv(widths[n - 1], widths[n], 4, strides=1 if (last or self.antialias) else 2, padding=1,
                         bias=bias, init=init, rngs=rngs))
      norms.append(Norm(norm, widths[n], momentum=momentum, rngs=rngs))
      strided.append(not last)
    self.strided = tuple(strided)
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.logits = _conv(widths[-1], 1, 4, padding=1, init=init, rngs=rngs)

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected (B, H, W, {self.in_channels}) images, got shape {x.shape}")
    h = x
    for conv, norm, strided in zip(self.convs, self.norms, self.strided):
      h = jax.nn.leaky_relu(norm(conv(h), use_running_average), 0.2)
      if strided and self.antialias:
        h = blur_downsample(h)
    return self.logits(h)


# ------------------------------------------------------------------------------------------------ CUT's head
def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / (||x|| + 1e-7), as CUT's `Normalize`; the norm's gradient stays finite at x = 0 (an all-zero MLP output,
  where the square root alone would give NaN)."""
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  norm = jnp.sqrt(jnp.where(squared > 0, squared, 1.0)) * (squared > 0)
  return x / (norm + 1e-7)


def sample_patches(features: jax.Array, num_patches: int, key: jax.Array) -> jax.Array:
  """`num_patches` random positions (without replacement, all of them if fewer), the same for every image:
  `(B, H, W, C)` features -> the `(P,)` flat indices into H * W."""
  hw = features.shape[1] * features.shape[2]
  return jax.random.permutation(key, hw)[:min(int(num_patches), hw)]


class PatchProjector(nnx.Module):
  """CUT's `PatchSampleF` with `mlp_sample`: per layer a Linear-ReLU-Linear head (`units` wide) on features
  gathered at sampled positions, then L2 normalisation.

  Args:
    channels: the channels of each layer's features, in order.
    units: the MLP width and output dimension (netF_nc, 256).
    init_type, init_gain: weight initialisation (CUT: Xavier-normal, 0.02).
    rngs: parameter initialisation.
  """

  def __init__(self, channels: Sequence[int], units: int = 256, *, init_type: str = "xavier",
               init_gain: float = 0.02, rngs: nnx.Rngs):
    init = kernel_init(init_type, init_gain)
    self.hidden = nnx.List([nnx.Linear(int(c), units, kernel_init=init, rngs=rngs) for c in channels])
    self.out = nnx.List([nnx.Linear(units, units, kernel_init=init, rngs=rngs) for _ in channels])

  def __call__(self, features: Sequence[jax.Array], patch_ids: Sequence[jax.Array]) -> list[jax.Array]:
    """`features[l]` `(B, H, W, C_l)` at `patch_ids[l]` `(P_l,)` -> `(B, P_l, units)` unit vectors."""
    out = []
    for l, (feat, ids) in enumerate(zip(features, patch_ids)):
      flat = feat.reshape(feat.shape[0], -1, feat.shape[-1])[:, ids, :]
      out.append(l2_normalize(self.out[l](jax.nn.relu(self.hidden[l](flat)))))
    return out
