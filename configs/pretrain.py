"""Pretext pretraining of the intensity-level classifier: `python -m vcect_jax.main --config=configs/pretrain.py`.

Variants (`--config=configs/pretrain.py:smoke`):
  * (none): the paper's schedule (lr 1e-4, x0.1 after 8 of 10 epochs, batch 2) on converted records when
    `data.dir` is set, else on in-memory phantom cases.
  * `smoke` / `demo`: the networks of `configs/<phase>.py:smoke` / `:demo` (configs/variants.py), so that a pretext
    checkpoint of one fits the other; `smoke` pretrains at 64 px for a few dozen steps, end to end on the CPU.
    `demo` pretrains with the window of `configs/arterial.py:demo`; `demo,portal` (or `demo,delayed`) with that
    phase's `:demo` window (`variants.DEMO_WINDOWS`: the arterial and delayed demos have their own).
  * `clip`: the authors' variant, scaled intensities clipped at 1.
"""

from configs import default
from configs import variants
from configs.ablations import PHASES


def get_config(arg: str | None = None):
  config = default.get_config()
  config.mode = "pretrain"
  if arg == "clip":
    config.pretrain.clip = True
    return config
  variant, _, phase = (arg or "").partition(",")
  if variant not in ("", "smoke", "demo") or (phase and phase not in PHASES):
    raise ValueError(f"unknown variant {arg!r} of configs/pretrain.py: use '', 'smoke', 'demo' or 'clip', the "
                     f"first three optionally followed by ',<phase>' (one of {', '.join(PHASES)})")
  config.phase = phase or config.phase
  variants.apply(config, variant)
  if variant == "smoke":
    config.data.image_size = 64
    config.data.phantom.cases = 3
    config.data.phantom.slices = 6
    config.pretrain.validation_cases = 1
    config.pretrain.batch_size = 4
    config.pretrain.learning_rate = 1e-3
    config.pretrain.steps = 40
    config.pretrain.log_every = 10
  return config
