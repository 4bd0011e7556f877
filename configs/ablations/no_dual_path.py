"""Table 2's 'w/o Dual': the global path only.

`--config=configs/ablations/no_dual_path.py:<phase>[,<variant>]`, e.g. `:arterial,demo` (see configs/ablations/__init__.py).
"""

from configs import ablations


def get_config(arg=None):
  return ablations.get_config("no_dual_path", arg)
