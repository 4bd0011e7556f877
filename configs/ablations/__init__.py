"""The ablations of the paper's Table 2, as configs: `configs/ablations/<ablation>.py:<phase>[,<variant>]`.

    python -m vcect_jax.main --config=configs/ablations/no_discriminator.py:arterial,demo

  no_discriminator  the generator trained by the pixel and perceptual losses only (`loss.use_discriminator=False`)
  no_perceptual     no perceptual loss (`loss.use_perceptual=False`); the generator's encoder is still initialised
                    from the pretext encoder (`perceptual.init_generator` unchanged), so only the loss term goes
  no_dual_path      the global path only (`dual_path.enabled=False`)

The argument names the phase (`arterial`, `portal`, `delayed`; default `arterial`) and optionally a run-size
variant of `configs/variants.py` (`smoke`, `demo`): every ablation is its phase config with one switch turned off,
so that a row of Table 2 differs from the proposed model by that switch alone.
"""

import importlib

PHASES = ("arterial", "portal", "delayed")

# ablation -> {dotted config field: value}
ABLATIONS = {
    "no_discriminator": {"loss.use_discriminator": False},
    "no_perceptual": {"loss.use_perceptual": False},
    "no_dual_path": {"dual_path.enabled": False},
}


def parse_arg(arg: str | None) -> tuple[str, str]:
  """`'portal,demo'` -> ('portal', 'demo'); `''` or None -> ('arterial', '')."""
  parts = [p.strip() for p in (arg or "").split(",")]
  phase = parts[0] or "arterial"
  variant = parts[1] if len(parts) > 1 else ""
  if phase not in PHASES or len(parts) > 2:
    raise ValueError(f"ablation config argument {arg!r}: expected '<phase>[,<variant>]' with the phase one of "
                     f"{PHASES}, e.g. 'arterial,demo'")
  return phase, variant


def get_config(ablation: str, arg: str | None = None):
  """The config of `ablation` for the phase and variant that `arg` names."""
  if ablation not in ABLATIONS:
    raise ValueError(f"unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
  phase, variant = parse_arg(arg)
  config = importlib.import_module(f"configs.{phase}").get_config(variant or None)
  for field, value in ABLATIONS[ablation].items():
    section, name = field.split(".")
    config[section][name] = value
  return config
