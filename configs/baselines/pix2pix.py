"""pix2pix (Isola et al., 2017) on the records of a phase: `--config=configs/baselines/pix2pix.py:<phase>[,<variant>]`.

Settings of junyanz/pytorch-CycleGAN-and-pix2pix's pix2pix model: `unet_256` generator (8 downsamplings, 256 ->
1x1; BatchNorm; dropout 0.5 in the three innermost 8ngf decoder levels), `basic` 70x70 PatchGAN with BatchNorm
conditioned on the input, vanilla GAN loss (BCE with logits) + L1 with lambda 100, no image pool, Adam 2e-4 /
(0.5, 0.999), 100 + 100 epochs, batch 1, N(0, 0.02) initialisation, paired training.

Adaptation to CT: the generator takes the 3-slice non-contrast stack (3 channels, as the proposed model) and
outputs the one contrast slice (1 channel, tanh, the [-1, 1] window); the discriminator sees both concatenated
(4 channels). Dropout is used in training only (the reference keeps it at test time as noise; our evaluation and
inference are deterministic), and BatchNorm uses its running statistics at evaluation (the reference's --eval).
`generator.num_downs` sets the U-Net depth: H and W must be multiples of 2**num_downs (8 at 256 px; the smoke
variant uses 5 at 32 px, the demo 5 at 96 px: 96 -> 3x3 at the bottleneck, so no dropout level).
"""

from configs import baselines


def get_config(arg=None):
  config, variant = baselines.base_config("pix2pix", arg)
  config.pix2pix = baselines.section({
      "generator": {
          "in_channels": 3,          # previous / current / next non-contrast slices
          "out_channels": 1,         # the contrast slice
          "ngf": 64,                 # width of the outermost level (ngf, 2ngf, 4ngf, then 8ngf)
          "num_downs": 8,            # unet_256: 2**8 = 256 -> 1x1 at the bottleneck
          "norm": "batch",           # 'batch', 'instance' or 'none'
          "dropout": 0.5,            # in the num_downs - 5 innermost 8ngf decoder levels, training only
          "bn_momentum": 0.9,        # flax momentum (PyTorch's 0.1)
          "init_type": "normal",     # N(0, init_gain) weights
          "init_gain": 0.02,
      },
      "discriminator": {
          "ndf": 64,
          "n_layers": 3,             # 'basic': the 70x70 PatchGAN
          "norm": "batch",
          "antialias": False,
          "bn_momentum": 0.9,
          "init_type": "normal",
          "init_gain": 0.02,
      },
      "gan_mode": "vanilla",         # 'vanilla' (BCE with logits) or 'lsgan'
      "lambda_l1": 100.0,            # weight of |virtual - post|
      **baselines.optimiser_fields(n_epochs=100, n_epochs_decay=100),
  })
  if variant == "smoke":
    config.pix2pix.generator.update(ngf=4, num_downs=5)
    config.pix2pix.discriminator.ndf = 4
  elif variant == "demo":
    config.pix2pix.generator.update(ngf=16, num_downs=5)  # 96 px = 3 * 2**5
    config.pix2pix.discriminator.ndf = 16
  return config
