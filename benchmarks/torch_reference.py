"""A PyTorch reference of the dual-path GAN, for benchmarks only (`benchmarks/run.py`); torch is not a dependency.

The same networks as `vcect_jax.models` (generator: dense multi-resolution encoder + U-Net decoder with 2x2
stride-2 transposed convolutions; conditional patch discriminator; the pretext encoder for the perceptual loss),
the same widths from the same config, and the same training step as `vcect_jax.methods.dual_path_gan` with the
losses of `vcect_jax.losses`:

  1. the generator runs on the whole image (global path) and on its four quadrants (local path, re-assembled);
  2. the discriminator is updated on real pairs (target 1) and both paths' detached virtual images (target 0,
     weighted 0.6 / 0.4), adversarial = BCE-with-logits + least squares;
  3. the generator loss per path (adversarial against the updated discriminator + lambda1 * pixel MSE +
     perceptual MSE on the frozen encoder's last four blocks) is combined 0.6 / 0.4 and back-propagated through
     both paths; the discriminator's parameters do not require gradients during that pass (pix2pix's
     `set_requires_grad(netD, False)`, as the JAX step differentiates only with respect to the virtual images).

Optimisers: Adam with coupled L2 weight decay (`torch.optim.Adam(weight_decay=...)`, the paper's), betas and
learning rates from `config.train`. Layout NCHW (PyTorch's default, what the authors' code uses), float32; on a
GPU `benchmarks/gpu_bench.py` also runs it channels-last and under `torch.autocast` bf16 (`amp_dtype`: the
forward passes in bf16, parameters, optimiser states, losses and the frozen encoder float32, as the JAX side's
`model.compute_dtype=bfloat16`).
The one difference that does not change the cost: during the generator's pass through the discriminator the JAX
step does not keep the BatchNorm running averages, PyTorch updates them.

`from_jax_*` copy the weights of the JAX networks (Flax `(kh, kw, in, out)` kernels to PyTorch `(out, in, kh, kw)`;
the transposed kernels also flipped in both spatial axes), so tests can check that both compute the same thing
(tests/test_bench_run.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _same_pads(kernel: int, stride: int) -> tuple[int, int]:
  """Flax's 'SAME' padding (low, high) for inputs divisible by the stride."""
  total = max(kernel - stride, 0)
  return total // 2, total - total // 2


class ConvBNAct(nn.Module):
  """Conv (no bias, Flax 'SAME' padding) + BatchNorm (eps 1e-5, PyTorch momentum 0.1 = Flax 0.9) + (Leaky)ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, negative_slope: float = 0.0):
    super().__init__()
    lo, hi = _same_pads(kernel, stride)
    self.pad = (lo, hi, lo, hi)
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=lo if lo == hi else 0, bias=False)
    self.symmetric = lo == hi
    self.norm = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
    self.negative_slope = negative_slope

  def forward(self, x):
    if not self.symmetric:
      x = F.pad(x, self.pad)
    x = self.norm(self.conv(x))
    return F.leaky_relu(x, self.negative_slope) if self.negative_slope else F.relu(x)


class DoubleConv(nn.Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.first = ConvBNAct(cin, cout)
    self.second = ConvBNAct(cout, cout)

  def forward(self, x):
    return self.second(self.first(x))


class Encoder(nn.Module):
  """Block 1 at full resolution; block i: 2x2 max-pool of all earlier blocks' outputs (dense), double conv."""

  def __init__(self, in_channels: int, widths):
    super().__init__()
    widths = tuple(int(w) for w in widths)
    self.blocks = nn.ModuleList([DoubleConv(in_channels, widths[0])] +
                                [DoubleConv(sum(widths[:i]), widths[i]) for i in range(1, len(widths))])

  def forward(self, x):
    features = [self.blocks[0](x)]
    dense = None
    for block in self.blocks[1:]:
      dense = features[-1] if dense is None else torch.cat([dense, features[-1]], dim=1)
      dense = F.max_pool2d(dense, 2)
      features.append(block(dense))
    return features


class Generator(nn.Module):
  """`vcect_jax.models.Generator` (residual=False, linear output): (B, 3, H, W) -> (B, 1, H, W)."""

  def __init__(self, gen_config):
    super().__init__()
    if gen_config.get("residual", False) or gen_config.get("output_activation", "none") != "none":
      raise ValueError("the PyTorch reference implements generator residual=False, output_activation='none'")
    widths = tuple(int(w) for w in gen_config.widths)
    cin = int(gen_config.in_channels)
    self.encoder = Encoder(cin, widths)
    self.ups = nn.ModuleList()
    self.decoders = nn.ModuleList()
    for level in range(len(widths) - 1, 0, -1):
      self.ups.append(nn.ConvTranspose2d(widths[level], widths[level - 1], 2, stride=2))
      self.decoders.append(DoubleConv(2 * widths[level - 1], widths[level - 1]))
    self.fuse = ConvBNAct(widths[0] + cin, widths[0])
    self.out = nn.Conv2d(widths[0], 1, 1)

  def forward(self, x):
    features = self.encoder(x)
    y = features[-1]
    for up, decode, skip in zip(self.ups, self.decoders, reversed(features[:-1])):
      y = decode(torch.cat([up(y), skip], dim=1))
    return self.out(self.fuse(torch.cat([y, x], dim=1)))


class Discriminator(nn.Module):
  """`vcect_jax.models.Discriminator`: D(x, y) on concat(x, y) -> patch logits."""

  def __init__(self, disc_config):
    super().__init__()
    kernel = int(disc_config.get("kernel_size", 4))
    slope = float(disc_config.get("negative_slope", 0.2))
    cin = int(disc_config.input_channels) + int(disc_config.get("target_channels", 1))
    blocks = []
    for width, stride in zip(disc_config.widths, disc_config.strides):
      blocks.append(ConvBNAct(cin, int(width), kernel, int(stride), slope))
      cin = int(width)
    self.blocks = nn.ModuleList(blocks)
    lo, hi = _same_pads(kernel, 1)
    self.pad = (lo, hi, lo, hi)
    self.logits = nn.Conv2d(cin, 1, kernel)

  def forward(self, x, y):
    h = torch.cat([x, y], dim=1)
    for block in self.blocks:
      h = block(h)
    return self.logits(F.pad(h, self.pad))


# ------------------------------------------------------------------------------------------------ losses
def adversarial(logits, target: float):
  t = torch.full_like(logits, target)
  return F.binary_cross_entropy_with_logits(logits, t) + torch.mean(torch.square(logits - target))


def quadrants(x):
  b, c, h, w = x.shape
  return x.reshape(b, c, 2, h // 2, 2, w // 2).permute(2, 4, 0, 1, 3, 5).reshape(4 * b, c, h // 2, w // 2)


def assemble(q):
  b4, c, h, w = q.shape
  return q.reshape(2, 2, b4 // 4, c, h, w).permute(2, 3, 0, 4, 1, 5).reshape(b4 // 4, c, 2 * h, 2 * w)


def perceptual(encoder, virtual, real, weights=(1.0, 1.0, 1.0, 1.0)):
  both = torch.cat([virtual, real], dim=0)
  if both.shape[1] == 1:
    both = both.repeat(1, 3, 1, 1)
  b = virtual.shape[0]
  with torch.autocast(device_type=both.device.type, enabled=False):  # frozen encoder in float32, as in JAX
    feats = encoder(both.float())[-4:]
  return sum(w * torch.mean(torch.square(f[:b] - f[b:])) for w, f in zip(weights, feats))


class DualPathStep:
  """One training step of the dual-path GAN: `metrics = step(pre, post)` on NCHW float32 tensors."""

  def __init__(self, config, generator: Generator, discriminator: Discriminator, encoder: Encoder | None,
               amp_dtype: torch.dtype | None = None):
    """`amp_dtype` (e.g. torch.bfloat16): the forward passes under `torch.autocast` (mixed precision, parameters
    and optimiser states float32, losses computed in float32), as the JAX side's `model.compute_dtype`."""
    t = config.train
    if t.weight_decay_mode != "l2":
      raise ValueError("the PyTorch reference implements train.weight_decay_mode='l2' (torch.optim.Adam)")
    if config.loss.get("pixel", "mse") != "mse" or config.loss.get("adversarial_warmup_steps", 0):
      raise ValueError("the PyTorch reference implements loss.pixel='mse' without adversarial warm-up (the paper)")
    self.g, self.d, self.encoder = generator.train(), discriminator.train(), encoder
    if encoder is not None:
      encoder.eval()
      for p in encoder.parameters():
        p.requires_grad_(False)
    self.opt_g = torch.optim.Adam(self.g.parameters(), lr=t.generator_lr, betas=(t.b1, t.b2),
                                  weight_decay=t.weight_decay)
    self.opt_d = torch.optim.Adam(self.d.parameters(), lr=t.discriminator_lr, betas=(t.b1, t.b2),
                                  weight_decay=t.weight_decay)
    self.paths = ({"global": config.dual_path.global_weight, "local": config.dual_path.local_weight}
                  if config.dual_path.enabled else {"global": 1.0})
    self.pixel_weight = float(config.loss.pixel_weight)
    self.adv_weight = float(config.loss.adversarial_weight)
    self.perc_weight = float(config.loss.get("perceptual_weight", 1.0))
    self.use_d, self.use_perc = bool(config.loss.use_discriminator), bool(config.loss.use_perceptual)
    self.perc_block_weights = tuple(config.perceptual.weights)
    self.amp_dtype = amp_dtype

  def _amp(self, x):
    return torch.autocast(device_type=x.device.type, dtype=self.amp_dtype or torch.float32,
                          enabled=self.amp_dtype is not None)

  def __call__(self, pre, post) -> dict[str, float]:
    with self._amp(pre):
      virtual = {"global": self.g(pre).float()}
      if "local" in self.paths:
        virtual["local"] = assemble(self.g(quadrants(pre)).float())
    metrics = {}
    if self.use_d:
      for p in self.d.parameters():
        p.requires_grad_(True)
      self.opt_d.zero_grad(set_to_none=True)
      with self._amp(pre):
        d_loss = adversarial(self.d(pre, post).float(), 1.0)
        for path, w in self.paths.items():
          d_loss = d_loss + w * adversarial(self.d(pre, virtual[path].detach()).float(), 0.0)
      d_loss.backward()
      self.opt_d.step()
      metrics["d_loss"] = d_loss.detach()
      for p in self.d.parameters():
        p.requires_grad_(False)
    self.opt_g.zero_grad(set_to_none=True)
    g_loss = 0.0
    with self._amp(pre):
      for path, w in self.paths.items():
        v = virtual[path]
        total = self.pixel_weight * torch.mean(torch.square(v - post))
        if self.use_d:
          total = total + self.adv_weight * adversarial(self.d(pre, v).float(), 1.0)
        if self.use_perc:
          total = total + self.perc_weight * perceptual(self.encoder, v, post, self.perc_block_weights)
        g_loss = g_loss + w * total
    g_loss.backward()
    self.opt_g.step()
    metrics["g_loss"] = g_loss.detach()
    return metrics


# ------------------------------------------------------------------------------------------------ weights from JAX
def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True, order="C"))


def _conv(torch_conv, nnx_conv):
  torch_conv.weight.data.copy_(_t(np.asarray(nnx_conv.kernel[...]).transpose(3, 2, 0, 1)))
  if torch_conv.bias is not None:
    torch_conv.bias.data.copy_(_t(nnx_conv.bias[...]))


def _conv_transpose(torch_conv, nnx_conv):
  # lax.conv_transpose (transpose_kernel=False) correlates the dilated input with the kernel; PyTorch scatters
  # each input pixel through the kernel: the same operator with the kernel flipped in both spatial axes.
  kernel = np.asarray(nnx_conv.kernel[...])[::-1, ::-1]
  torch_conv.weight.data.copy_(_t(kernel.transpose(2, 3, 0, 1)))
  torch_conv.bias.data.copy_(_t(nnx_conv.bias[...]))


def _norm(torch_bn, nnx_bn):
  torch_bn.weight.data.copy_(_t(nnx_bn.scale[...]))
  torch_bn.bias.data.copy_(_t(nnx_bn.bias[...]))
  torch_bn.running_mean.copy_(_t(nnx_bn.mean[...]))
  torch_bn.running_var.copy_(_t(nnx_bn.var[...]))


def _conv_bn(t, j):
  _conv(t.conv, j.conv)
  _norm(t.norm, j.norm)


def _double(t, j):
  _conv_bn(t.first, j.first)
  _conv_bn(t.second, j.second)


def encoder_from_jax(t: Encoder, j) -> Encoder:
  for tb, jb in zip(t.blocks, j.blocks):
    _double(tb, jb)
  return t


@torch.no_grad()
def generator_from_jax(t: Generator, j) -> Generator:
  """Copies a `vcect_jax.models.Generator`'s parameters and BatchNorm statistics into `t`."""
  encoder_from_jax(t.encoder, j.encoder)
  for tu, ju in zip(t.ups, j.ups):
    _conv_transpose(tu, ju)
  for td, jd in zip(t.decoders, j.decoders):
    _double(td, jd)
  _conv_bn(t.fuse, j.fuse)
  _conv(t.out, j.out)
  return t


@torch.no_grad()
def discriminator_from_jax(t: Discriminator, j) -> Discriminator:
  for tb, jb in zip(t.blocks, j.blocks):
    _conv_bn(tb, jb)
  _conv(t.logits, j.logits)
  return t


@torch.no_grad()
def frozen_encoder_from_jax(j, in_channels: int, widths) -> Encoder:
  return encoder_from_jax(Encoder(in_channels, widths), j)


def dual_path_step_from_jax(config, jax_module, amp_dtype: torch.dtype | None = None, device: str = "cpu",
                            memory_format: torch.memory_format = torch.contiguous_format) -> DualPathStep:
  """The reference's training step started from a JAX `DualPathGANState`'s weights (generator, discriminator, and
  the frozen encoder when the perceptual term is on), its networks on `device` in `memory_format`."""
  if not config.dual_path.shared_generator:
    raise ValueError("the PyTorch reference implements dual_path.shared_generator=True")
  gen_cfg = config.model.generator
  g = generator_from_jax(Generator(gen_cfg), jax_module.generators.global_net)
  d = discriminator_from_jax(Discriminator(config.model.discriminator), jax_module.discriminator)
  e = (frozen_encoder_from_jax(jax_module.encoder, gen_cfg.in_channels, gen_cfg.widths)
       if config.loss.use_perceptual else None)
  g, d = (m.to(device, memory_format=memory_format) for m in (g, d))   # before the optimisers take their params
  if e is not None:
    e = e.to(device, memory_format=memory_format)
  return DualPathStep(config, g, d, e, amp_dtype=amp_dtype)


def nchw(a) -> torch.Tensor:
  """A (B, H, W, C) array as a contiguous (B, C, H, W) float32 tensor."""
  return _t(np.asarray(a).transpose(0, 3, 1, 2))
