"""Pretext pretraining of the intensity-level classifier: `python -m vcect_jax.main --config=configs/pretrain.py`.

Variants (`--config=configs/pretrain.py:smoke`):
  * (none): the paper's schedule (lr 1e-4, x0.1 after 8 of 10 epochs, batch 2) on converted records when
    `data.dir` is set, else on in-memory phantom cases.
  * `smoke`: a tiny, fast CPU run (narrow encoder, 64 px, few steps) that checks the whole path end to end.
  * `clip`: the authors' variant, scaled intensities clipped at 1.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.mode = "pretrain"
  if arg in (None, ""):
    return config
  if arg == "smoke":
    config.data.image_size = 64
    config.data.phantom.cases = 3
    config.data.phantom.slices = 6
    config.model.generator.widths = (8, 16, 32, 64, 128)
    config.model.classifier.hidden = (32, 16)
    config.pretrain.validation_cases = 1
    config.pretrain.batch_size = 4
    config.pretrain.learning_rate = 1e-3
    config.pretrain.steps = 40
    config.pretrain.log_every = 10
    return config
  if arg == "clip":
    config.pretrain.clip = True
    return config
  raise ValueError(f"unknown variant {arg!r} of configs/pretrain.py: use '', 'smoke' or 'clip'")
