"""Table 2's 'w/o Perc.': no perceptual loss (the pretext initialisation of the encoder stays).

`--config=configs/ablations/no_perceptual.py:<phase>[,<variant>]`, e.g. `:arterial,demo` (see configs/ablations/__init__.py).
"""

from configs import ablations


def get_config(arg=None):
  return ablations.get_config("no_perceptual", arg)
