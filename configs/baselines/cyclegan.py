"""CycleGAN (Zhu et al., 2017) on the records of a phase: `--config=configs/baselines/cyclegan.py:<phase>[,<variant>]`.

Settings of junyanz/pytorch-CycleGAN-and-pix2pix's cycle_gan model: two `resnet_9blocks` generators (reflection
padding, instance norm without affine, transposed-convolution upsampling, no dropout), two `basic` 70x70 PatchGANs
with instance norm, LSGAN, cycle weights lambda_A = lambda_B = 10, identity 0.5 (times the cycle weight of the
domain), image pools of 50, Adam 2e-4 / (0.5, 0.999), 100 + 100 epochs with linear decay, batch 1, N(0, 0.02)
initialisation; unpaired (each non-contrast stack with the contrast slice of another, random slice:
`input_pipeline.UnpairedSource`, seeded by `cyclegan.pairing_seed`).

Adaptation to CT (3-slice stacks as domain A, single contrast slices as domain B): the forward generator maps 3 -> 1
channels (it is the one that evaluation and inference use); the inverse generator maps 1 -> 3, i.e. it
synthesises a whole non-contrast stack from one contrast slice, so the A cycle reconstructs the full input and the
B cycle feeds the forward generator a stack; the pre discriminator judges 3-slice stacks, the post discriminator
single slices. Identity: the contrast slice enters the forward generator repeated three times and must come back;
the non-contrast middle slice enters the inverse generator and its stack must come back. The pools keep virtual
images in nnx variables, so they are checkpointed and a resumed run continues with the same pools.
"""

from configs import baselines


def resnet_generator(ngf=64, n_blocks=9, antialias=False, init_type="normal"):
  return {
      "in_channels": 3,          # previous / current / next non-contrast slices
      "out_channels": 1,         # the contrast slice
      "ngf": ngf,                # width after the 7x7 stem (2ngf, 4ngf after the two downsamplings)
      "n_blocks": n_blocks,      # residual blocks at 1/4 resolution (resnet_9blocks)
      "norm": "instance",
      "antialias": antialias,    # CUT: blur-pool downsampling
      "antialias_up": antialias,  # CUT: fixed-filter upsampling + conv (else transposed convolutions)
      "init_type": init_type,
      "init_gain": 0.02,
  }


def patch_discriminator(ndf=64, antialias=False, init_type="normal"):
  return {"ndf": ndf, "n_layers": 3, "norm": "instance", "antialias": antialias, "init_type": init_type,
          "init_gain": 0.02}


def get_config(arg=None):
  config, variant = baselines.base_config("cyclegan", arg)
  config.cyclegan = baselines.section({
      "generator": resnet_generator(),   # the forward generator; the inverse one swaps the channel counts
      "discriminator": patch_discriminator(),
      "gan_mode": "lsgan",
      "lambda_cycle_pre": 10.0,    # lambda_A: |G_B(G_A(pre)) - pre|
      "lambda_cycle_post": 10.0,   # lambda_B: |G_A(G_B(post)) - post|
      "lambda_identity": 0.5,      # identity terms, times the cycle weight of their domain (0: off)
      "pool_size": 50,             # virtual images kept per discriminator (0: no pool)
      "pairing_seed": 1,           # seed of the random pre / post pairing of the unpaired training set
      **baselines.optimiser_fields(n_epochs=100, n_epochs_decay=100),
  })
  if variant == "smoke":
    config.cyclegan.generator.update(ngf=4, n_blocks=2)
    config.cyclegan.discriminator.ndf = 4
    config.cyclegan.pool_size = 3  # fills within the first steps, so that swaps are exercised
  elif variant == "demo":
    config.cyclegan.generator.update(ngf=16, n_blocks=6)
    config.cyclegan.discriminator.ndf = 16
  return config
