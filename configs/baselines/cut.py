"""CUT (Park et al., 2020) on the records of a phase: `--config=configs/baselines/cut.py:<phase>[,<variant>]`.

Settings of taesungp/contrastive-unpaired-translation in CUT mode (not FastCUT): `resnet_9blocks` generator with
anti-aliased down- and upsampling, instance norm, reflection padding, no dropout; `basic` 70x70 PatchGAN with
instance norm and anti-aliasing; LSGAN with lambda_GAN 1; PatchNCE at layers 0, 4, 8, 12, 16 of the generator
(the padded input, the two downsampling convolutions, residual blocks 1 and 5), 256 patches per layer, tau 0.07,
lambda_NCE 1, an `mlp_sample` projection head (Linear-ReLU-Linear, 256 units) per layer, negatives from the same
image only, identity NCE on contrast slices; no image pool; Adam 2e-4 / (0.5, 0.999) for G, D and the head,
200 + 200 epochs with linear decay, batch 1, Xavier-normal (gain 0.02) initialisation; unpaired
(`input_pipeline.UnpairedSource`, seeded by `cut.pairing_seed`).

Adaptation to CT: the generator maps the 3-slice non-contrast stack to the one contrast slice (3 -> 1). A contrast
slice that must enter it (the identity translation, and the NCE encoding of the virtual slice and of the identity
pair) is repeated into a 3-slice stack, so the layer-0 patches of such images are three equal values.
"""

from configs import baselines
from configs.baselines import cyclegan


def get_config(arg=None):
  config, variant = baselines.base_config("cut", arg)
  config.cut = baselines.section({
      "generator": cyclegan.resnet_generator(antialias=True, init_type="xavier"),
      "discriminator": cyclegan.patch_discriminator(antialias=True, init_type="xavier"),
      "gan_mode": "lsgan",
      "lambda_gan": 1.0,
      "lambda_nce": 1.0,
      "nce_identity": True,        # NCE(post, G(post)) too, averaged with NCE(pre, G(pre)) (CUT; FastCUT: False)
      # Generator features for PatchNCE: 'padded_input', 'down1', 'down2', 'res<k>' (CUT's '0,4,8,12,16').
      "nce_layers": ("padded_input", "down1", "down2", "res1", "res5"),
      "num_patches": 256,          # positions sampled per layer (all of them if the layer has fewer)
      "nce_temperature": 0.07,
      "projection_units": 256,     # width and output size of the MLP head (netF_nc)
      "pairing_seed": 1,           # seed of the random pre / post pairing of the unpaired training set
      **baselines.optimiser_fields(n_epochs=200, n_epochs_decay=200),
  })
  if variant == "smoke":
    config.cut.generator.update(ngf=4, n_blocks=2)
    config.cut.discriminator.ndf = 4
    config.cut.nce_layers = ("padded_input", "down1", "down2", "res1", "res2")
    config.cut.projection_units = 16
  elif variant == "demo":
    config.cut.generator.update(ngf=16, n_blocks=6)
    config.cut.discriminator.ndf = 16
  return config
