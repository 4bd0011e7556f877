"""The baselines of the paper's Table 1 as configs: `configs/baselines/<method>.py:<phase>[,<variant>]`.

    python -m vcect_jax.main --config=configs/baselines/cyclegan.py:arterial,demo --workdir=workdir/cyclegan

  pix2pix   paired conditional GAN: U-Net-256, 70x70 PatchGAN, vanilla GAN + L1 (lambda 100)
  cyclegan  unpaired: two ResNet-9-block generators, two PatchGANs, LSGAN, cycle 10, identity 0.5, image pools
  cut       unpaired contrastive translation: ResNet generator, PatchNCE over 5 layers, LSGAN, identity NCE

Each is the phase config (data, window, loop intervals of `configs/<phase>.py` and its variant) with
`config.method` set, the dual-path fields that would need a pretext checkpoint switched off
(`loss.use_perceptual`, `perceptual.init_generator`), and the method's own section (`config.<method>`) holding the
reference repositories' settings: Adam 2e-4 with betas (0.5, 0.999), batch 1, `n_epochs` at that rate then
`n_epochs_decay` of linear decay (mapped to steps when `train.steps` is set). Data augmentation follows
`input.augment` as for the proposed model (off by default); the references' resize-to-286 + random-crop jitter is
not applied, so every model sees the same slices.

Variants (`configs/variants.py`): `smoke` (32 px, tiny widths, U-Net depth 5, 2 residual blocks, pool of 3) and
`demo` (96 px, narrow networks, U-Net depth 5, 6 residual blocks, batch 8, 800 steps: the pairs the proposed
model sees; batch 4 before round 19 of issue 12).
"""

import importlib

import ml_collections

from configs import ablations

PHASES = ablations.PHASES
parse_arg = ablations.parse_arg


def base_config(method: str, arg: str | None):
  """The phase config named by `arg` ('<phase>[,<variant>]') with `config.method` set and no pretext needed.

  Returns:
    (config, variant).
  """
  phase, variant = parse_arg(arg)
  config = importlib.import_module(f"configs.{phase}").get_config(variant or None)
  config.method = method
  config.loss.use_perceptual = False
  config.perceptual.init_generator = False
  config.registration.enabled = False  # the `:demo`'s registration in the loop is the proposed model's, not theirs
  if not variant:
    config.train.batch_size = 1  # the references' batch size (the variants keep theirs)
  return config, variant


def optimiser_fields(n_epochs: int, n_epochs_decay: int) -> dict:
  """The references' Adam and linear-decay settings."""
  return {
      "lr": 2e-4,                 # initial learning rate of every network
      "b1": 0.5,                  # Adam beta1 (the references' --beta1)
      "b2": 0.999,
      "n_epochs": n_epochs,       # epochs at the initial rate
      "n_epochs_decay": n_epochs_decay,  # then linear decay to lr / (n_epochs_decay + 1) over this many epochs
  }


def section(fields: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)
