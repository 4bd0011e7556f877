"""What the image-to-image translation baselines (pix2pix, CycleGAN, CUT) share on the one training loop.

Each baseline reads its settings from its own config section (`config.pix2pix`, `config.cyclegan`, `config.cut`:
learning rate, Adam betas, `n_epochs` at the initial rate then `n_epochs_decay` of linear decay, loss weights,
networks) and its loop settings (batch size, steps, intervals) from `config.train`, like the dual-path GAN. Data:
the records of `config.phase`, windowed to [-1, 1] as for the proposed model; unpaired methods train on
`input_pipeline.UnpairedSource` (validation stays paired, for the metrics).

The 3-slice input (previous, current, next non-contrast slice) is the generator's input as for the proposed model,
and its output is the one contrast slice, so evaluation and inference call every baseline's generator exactly like
the dual-path generator: `generator(pre)`, `(B, H, W, 3) -> (B, H, W, 1)`. Where a network that expects a stack
must take a single slice, the slice is repeated three times (`as_stack`), as the perceptual loss does.

Randomness inside a step (dropout, the image pool, CUT's patch positions) is `jax.random.fold_in(key(seed),
step)` with the step counter of the generator's optimiser, which is in the checkpoint: a resumed run draws the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from vcect_jax import input_pipeline
from vcect_jax.methods import contrast
from vcect_jax.models import registration

CONTRAST_PHASES = contrast.CONTRAST_PHASES


def linear_decay(base_lr: float, n_epochs: float, n_epochs_decay: float, steps_per_epoch: float) -> optax.Schedule:
  """The references' 'linear' policy, per epoch: `base_lr` for `n_epochs`, then down by `base_lr /
  (n_epochs_decay + 1)` each epoch, over `n_epochs_decay` epochs (the last at `base_lr / (n_epochs_decay + 1)`).

  Their scheduler steps at the end of each epoch, so update `count` (0-based) of epoch e = count //
  steps_per_epoch + 1 uses `1 - max(0, e - n_epochs) / (n_epochs_decay + 1)`. `steps_per_epoch` may be fractional
  (a run of a fixed number of steps spread over `n_epochs + n_epochs_decay` epochs).
  """
  steps_per_epoch = max(float(steps_per_epoch), 1e-9)
  last_epoch = float(n_epochs + n_epochs_decay)

  def schedule(count):
    # Past the last epoch (a run extended beyond its schedule) the last epoch's rate stays.
    epoch = jnp.minimum(jnp.floor(jnp.asarray(count, jnp.float32) / steps_per_epoch) + 1.0, last_epoch)
    return base_lr * (1.0 - jnp.maximum(0.0, epoch - n_epochs) / (n_epochs_decay + 1.0))

  return schedule


def as_stack(img: jax.Array, channels: int = 3) -> jax.Array:
  """A single slice `(B, H, W, 1)` repeated into a `channels`-slice stack; a stack passes unchanged."""
  return img if img.shape[-1] == channels else jnp.repeat(img, channels, axis=-1)


def middle_slice(stack: jax.Array) -> jax.Array:
  """The current slice `(B, H, W, 1)` of a `(B, H, W, 3)` previous / current / next stack."""
  middle = stack.shape[-1] // 2
  return stack[..., middle:middle + 1]


class TranslationBaseline(contrast.ContrastMethod):
  """Base of the baselines: config section, loop settings, data, schedule, evaluation, images.

  Subclasses set `name` (also their config section), `generator_key`, `unpaired`, and define `create_state`,
  `train_step`, `generator` and `build_generator`.
  """

  unpaired = False
  console_keys = ("g_loss", "d_loss")

  def __init__(self, config):
    super().__init__(config)
    self._schedule = None

  @property
  def section(self):
    """The method's own config section (`config.<name>`)."""
    if self.name not in self.config:
      raise ValueError(f"config.method={self.name!r} needs the section config.{self.name}: start from "
                       f"configs/baselines/{self.name}.py")
    return self.config[self.name]

  # ---- configuration
  def validate(self) -> None:
    problems = [f"train.{p}" for p in self.loop_settings().check()]
    problems += self.check_section()
    if registration.enabled(self.config):
      problems.append(f"registration.enabled is a dual_path_gan option that {self.name} does not use: set "
                      "registration.enabled=False")
    if self.config.phase not in CONTRAST_PHASES:
      problems.append(f"phase={self.config.phase!r} must be one of {CONTRAST_PHASES}")
    s = self.section
    if not s.lr > 0:
      problems.append(f"{self.name}.lr={s.lr} must be > 0")
    if s.n_epochs < 0 or s.n_epochs_decay < 0 or s.n_epochs + s.n_epochs_decay <= 0:
      problems.append(f"{self.name}.n_epochs={s.n_epochs} and n_epochs_decay={s.n_epochs_decay} must be >= 0 "
                      "with a positive sum")
    size, div = int(self.config.data.image_size), self.size_multiple()
    if size % div:
      problems.append(f"data.image_size={size} must be a multiple of {div} for this {self.name} generator")
    if problems:
      raise ValueError("invalid config: " + "; ".join(problems))

  def check_section(self) -> list[str]:
    """Problems with the method's own fields."""
    return []

  def size_multiple(self) -> int:
    return 4

  def epochs(self) -> float:
    s = self.section
    return float(s.n_epochs + s.n_epochs_decay)

  # ---- data
  def sources(self, data_dir: str):
    train = input_pipeline.load_source(data_dir, self.config.phase, "train")
    if self.unpaired:
      train = input_pipeline.UnpairedSource(train, int(self.section.pairing_seed))
    return train, input_pipeline.load_source(data_dir, self.config.phase, "validation")

  # ---- optimisers
  def make_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam(lr, b1, b2) on the linear-decay schedule; every network of the method uses the same one."""
    s = self.section
    epochs = float(s.n_epochs + s.n_epochs_decay)
    total = self.loop_settings().total_steps(steps_per_epoch)
    per_epoch = total / epochs if self.config.train.steps > 0 else steps_per_epoch
    self._schedule = linear_decay(float(s.lr), float(s.n_epochs), float(s.n_epochs_decay), per_epoch)
    logging.info("learning rate %g, decaying linearly from step %d to the end of step %d (%g + %g epochs%s)", s.lr,
                 int(s.n_epochs * per_epoch), total, s.n_epochs, s.n_epochs_decay,
                 " spread over train.steps: a larger train.steps moves the decay" if self.config.train.steps > 0
                 else "")
    return optax.adam(self._schedule, b1=float(s.b1), b2=float(s.b2))

  def learning_rates(self, step: int) -> dict[str, float]:
    return {"lr": float(self._schedule(step - 1))} if self._schedule is not None else {}

  def step_key(self, optimizer: nnx.Optimizer, salt: int) -> jax.Array:
    """A key for this step's randomness: fold_in(key(seed), optimiser step), then `salt`."""
    key = jax.random.fold_in(jax.random.key(int(self.config.seed)), optimizer.step.value)
    return jax.random.fold_in(key, salt)
