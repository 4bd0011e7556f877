"""The delayed phase with the paper's defaults; `:smoke` and `:demo` shrink the run (configs/variants.py)."""

from configs import default
from configs import variants


def get_config(variant=None):
  config = default.get_config()
  config.phase = "delayed"
  return variants.apply(config, variant)
