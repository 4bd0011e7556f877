"""Run-size variants shared by the phase configs: `configs/<phase>.py:smoke` and `configs/<phase>.py:demo`.

  (none)  the paper's settings: 256 px, batch 2, 50 epochs (real data or a large phantom).
  smoke   CI-sized: 32 px, narrow networks, a handful of steps; checks the machinery, learns nothing.
  demo    about 10 minutes on a 2-core CPU, including phantom generation, conversion and pretext pretraining;
          visibly learns the enhancement of the phantom (the aorta in the arterial phase).
"""

VARIANTS = ("", "smoke", "demo")


def apply(config, variant: str | None):
  variant = variant or ""
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS[1:]} or none")
  if variant == "smoke":
    _smoke(config)
  elif variant == "demo":
    _demo(config)
  return config


def _smoke(config):
  config.data.image_size = 32
  config.data.phantom.update(cases=5, slices=6, size=64, slice_thickness=5.0, pixel_spacing=6.0)
  config.model.generator.widths = (4, 8, 8, 16, 16)  # shared with configs/pretrain.py:smoke
  config.model.discriminator.widths = (4, 8, 8, 8)
  config.model.classifier.hidden = (16, 8)
  config.pretrain.steps = 4
  config.pretrain.batch_size = 2
  config.pretrain.log_every = 2
  config.pretrain.max_eval_slices = 8
  config.train.batch_size = 2
  config.train.steps = 6
  config.train.log_every = 2
  config.train.image_every = 3
  config.train.eval_every = 3
  config.train.eval_examples = 4
  config.train.eval_batch_size = 2
  config.train.checkpoint_every = 3
  config.train.keep_checkpoints = 2


def _demo(config):
  config.data.image_size = 64
  config.data.phantom.update(cases=8, slices=16, size=128, slice_thickness=5.0, pixel_spacing=3.0)
  config.model.generator.widths = (16, 32, 64, 64, 128)
  config.model.discriminator.widths = (16, 32, 64, 64)
  config.model.classifier.hidden = (64, 32)
  config.pretrain.steps = 150
  config.pretrain.learning_rate = 1e-3  # a short run on few slices (the paper: 1e-4 for 10 epochs of NLST)
  config.pretrain.batch_size = 8
  config.pretrain.log_every = 50
  config.pretrain.max_eval_slices = 64
  config.train.batch_size = 4
  config.train.steps = 800
  config.train.generator_lr = 2e-4   # a short run: the paper's 5e-5 is tuned for 50 epochs of real data
  config.train.log_every = 50
  config.train.image_every = 200
  config.train.eval_every = 200
  config.train.eval_examples = 64
  config.train.checkpoint_every = 200
