"""What every method that learns a contrast phase from the converted records shares (the dual-path GAN and the
translation baselines): the data hooks, the loop settings from `config.train`, the validation metrics and the
comparison grid. Subclasses supply the networks, the step and the generator; `_virtual` runs that generator on
the validation inputs with running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vcect_jax import hu
from vcect_jax import input_pipeline
from vcect_jax import metrics as metrics_lib
from vcect_jax.methods import base

CONTRAST_PHASES = ("arterial", "portal", "delayed")


def eval_metrics(virtual: jax.Array, batch, window: hu.Window) -> dict[str, jax.Array]:
  """Per-image PSNR and SSIM of `virtual` `(B, H, W, 1)` on the unit window, MAE in HU inside the body, and the
  identity baseline's MAE."""
  virtual_unit = jnp.clip(hu.model_to_unit(virtual[..., 0]), 0, 1)
  real_unit = hu.model_to_unit(batch["post"][..., 0])
  virtual_hu = hu.model_to_hu(virtual[..., 0], window)
  return {
      "psnr": metrics_lib.batch_psnr(virtual_unit, real_unit),
      "ssim": metrics_lib.batch_ssim(virtual_unit, real_unit),
      "mae_hu": metrics_lib.batch_mae_hu(virtual_hu, batch["post_hu"], batch["body_mask"], window.low,
                                         window.high),
      "identity_mae_hu": metrics_lib.batch_mae_hu(batch["pre_hu"], batch["post_hu"], batch["body_mask"],
                                                  window.low, window.high),
  }


COMPARISON_PANELS = ("non-contrast", "virtual", "real", "|virtual - real|")
HEATMAP_PANELS = ("block /2", "block /4", "block /8", "block /16")


def comparison_grid(virtual: jax.Array, batch) -> jax.Array:
  """Non-contrast | virtual | real | |virtual - real| on the training window, `(B, H, 4W, 1)` in [0, 1]."""
  pre = hu.model_to_unit(batch["pre"][..., 1])
  v = jnp.clip(hu.model_to_unit(virtual[..., 0]), 0, 1)
  real = hu.model_to_unit(batch["post"][..., 0])
  return jnp.concatenate([pre, v, real, jnp.abs(v - real)], axis=2)[..., None]


class ContrastMethod(base.Method):
  """Records of `config.phase` windowed to [-1, 1]; loop settings from `config.train` (epochs: `epochs()`)."""

  image_panels = {"pre_virtual_real_absdiff": COMPARISON_PANELS, "perceptual_heatmaps": HEATMAP_PANELS}

  def __init__(self, config):
    super().__init__(config)
    self.window = hu.Window.from_config(config.data.window)

  def epochs(self) -> float:
    return float(self.config.train.epochs)

  def loop_settings(self) -> base.LoopSettings:
    t = self.config.train
    return base.LoopSettings(
        batch_size=int(t.batch_size), steps=int(t.steps), epochs=self.epochs(), log_every=int(t.log_every),
        eval_every=int(t.eval_every), image_every=int(t.image_every), checkpoint_every=int(t.checkpoint_every),
        keep_checkpoints=int(t.keep_checkpoints), async_checkpoints=bool(t.async_checkpoints),
        eval_examples=int(t.eval_examples), eval_batch_size=int(t.eval_batch_size), shuffle_seed=int(self.config.seed))

  # ---- data
  def sources(self, data_dir: str):
    return (input_pipeline.load_source(data_dir, self.config.phase, "train"),
            input_pipeline.load_source(data_dir, self.config.phase, "validation"))

  def train_example(self, example):
    return input_pipeline.to_model_space(example, self.window)

  def eval_example(self, example):
    return input_pipeline.to_model_space(example, self.window, with_hu=True)

  @property
  def augments(self) -> bool:
    return bool(self.config.input.augment.enabled)

  def augment(self, example, rng):
    aug = self.config.input.augment
    return input_pipeline.augment(example, rng, aug.flip_lr, aug.max_shift_px)

  # ---- validation
  def _virtual(self, state, pre):
    """The generator's virtual image with running statistics, leaving the state's train mode alone."""
    return self.generator(state)(pre, use_running_average=True)

  def eval_step(self, state, batch):
    return eval_metrics(self._virtual(state, batch["pre"]), batch, self.window)

  def images(self, state, batch):
    return {"pre_virtual_real_absdiff": comparison_grid(self._virtual(state, batch["pre"]), batch)}
