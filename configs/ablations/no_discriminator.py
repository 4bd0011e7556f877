"""Table 2's 'w/o Discr.': no discriminator, no adversarial loss.

`--config=configs/ablations/no_discriminator.py:<phase>[,<variant>]`, e.g. `:arterial,demo` (see configs/ablations/__init__.py).
"""

from configs import ablations


def get_config(arg=None):
  return ablations.get_config("no_discriminator", arg)
