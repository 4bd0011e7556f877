"""Pretext pretraining of the intensity-level classifier as a method of the shared loop (sections 3.2, 4.3.1).

Self-supervised: every non-contrast 3-slice stack is windowed to [0, 1], multiplied by each intensity
coefficient alpha (class k = k-th alpha), optionally clipped at 1, mapped to model space, and the classifier
learns which alpha it saw (`vcect_jax.pretrain.intensity_levels`). Each step takes `pretrain.batch_size` slices
with all alphas, so the loss is the paper's eq. (2), the cross-entropy averaged over the K levels of each slice.
Adam, lr 1e-4, x0.1 after 8 of 10 epochs, batch 2 by default; epochs become steps through the size of the
training split.

Examples are `{"pre_hu": float32 (3, H, W)}`, from any random-access source of `{"pre": int16 (3, H, W)}`
(`data_prep.pretext_sources`). The validation metric is the accuracy per class (`accuracy_alpha_<a>`). When
training ends, `finish` exports the classifier as the pretext checkpoint (`<workdir>/pretext`) that the GAN's
perceptual loss and generator initialisation read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from vcect_jax import hu
from vcect_jax import losses
from vcect_jax import models
from vcect_jax.methods import base

NEVER = 1 << 62  # an interval that never comes: the loop still evaluates and saves at the last step


class PretextState(nnx.Module):
  """The classifier (encoder + fully connected head) and its optimiser."""

  def __init__(self, classifier: models.IntensityClassifier, optimizer: nnx.Optimizer):
    self.classifier = classifier
    self.optimizer = optimizer


def intensity_levels(pre_hu: jax.Array, alphas, window: hu.Window, clip: bool) -> tuple[jax.Array, jax.Array]:
  """The pretext examples of a batch of non-contrast stacks.

  Args:
    pre_hu: `(B, 3, H, W)` HU.
    alphas: the K intensity coefficients; class k is `alphas[k]`.
    window: the CT window.
    clip: clip the scaled windowed intensities at 1.

  Returns:
    `x: (K*B, H, W, 3)` model space, alpha-major, and `labels: (K*B,)` int32.
  """
  unit = jnp.transpose(hu.hu_to_unit(pre_hu, window), (0, 2, 3, 1))
  scaled = unit[None] * jnp.asarray(alphas, jnp.float32)[:, None, None, None, None]
  if clip:
    scaled = jnp.minimum(scaled, 1.0)
  k, b = scaled.shape[:2]
  labels = jnp.repeat(jnp.arange(k, dtype=jnp.int32), b)
  return hu.unit_to_model(scaled.reshape((k * b,) + scaled.shape[2:])), labels


def accuracy_key(alpha: float) -> str:
  return f"accuracy_alpha_{alpha:g}"


class Pretext(base.Method):
  """The intensity-level classifier; optional `sources` override `data_prep.pretext_sources.make_sources`."""

  name = "pretext"
  console_keys = ("loss", "accuracy")

  def __init__(self, config, sources=None):
    super().__init__(config)
    self.window = hu.Window.from_config(config.data.window)
    self.alphas = tuple(float(a) for a in config.pretrain.alphas)
    self.clip = bool(config.pretrain.clip)
    self._sources = sources
    self._schedule = None

  def validate(self) -> None:
    cfg = self.config.pretrain
    problems = [f"pretrain.{p}" for p in self.loop_settings().check()]
    if len(self.alphas) != int(self.config.model.classifier.num_classes):
      problems.append(f"pretrain.alphas {self.alphas} needs model.classifier.num_classes={len(self.alphas)}")
    if not cfg.learning_rate > 0:
      problems.append(f"pretrain.learning_rate={cfg.learning_rate} must be > 0")
    if problems:
      raise ValueError("invalid config: " + "; ".join(problems))

  def loop_settings(self) -> base.LoopSettings:
    cfg = self.config.pretrain
    return base.LoopSettings(
        batch_size=int(cfg.batch_size), steps=int(cfg.steps), epochs=float(cfg.epochs), log_every=int(cfg.log_every),
        eval_every=NEVER, image_every=NEVER, checkpoint_every=int(cfg.get("checkpoint_every", 1000)),
        keep_checkpoints=2, async_checkpoints=True, eval_examples=int(cfg.max_eval_slices),
        eval_batch_size=int(cfg.eval_batch_size), shuffle_seed=int(self.config.seed))

  # ---- data
  def sources(self, data_dir: str):
    del data_dir  # pretrain.source says where the non-contrast slices come from
    if self._sources is not None:
      train, validation = self._sources
    else:
      from data_prep import pretext_sources  # pylint: disable=g-import-not-at-top

      train, validation = pretext_sources.make_sources(self.config)
    if not len(validation):
      raise ValueError("the pretext validation split is empty: give more cases or studies (or lower "
                       "pretrain.validation_cases so that both splits get some), then rerun")
    return train, validation

  def train_example(self, example):
    return {"pre_hu": np.asarray(example["pre"], np.float32)}

  # ---- state
  def create_state(self, steps_per_epoch: int) -> PretextState:
    cfg = self.config.pretrain
    total = self.loop_settings().total_steps(steps_per_epoch)
    decay_step = max(1, round(total * float(cfg.decay_epochs) / float(cfg.epochs)))
    logging.info("pretext learning rate %g, times %g after step %d of %d (pretrain.decay_epochs/pretrain.epochs = "
                 "%g/%g of the run%s)", cfg.learning_rate, cfg.decay_factor, decay_step, total, cfg.decay_epochs,
                 cfg.epochs, ": a larger pretrain.steps moves the decay" if cfg.steps > 0 else "")
    self._schedule = optax.piecewise_constant_schedule(float(cfg.learning_rate), {decay_step: float(cfg.decay_factor)})
    classifier = models.IntensityClassifier(self.config.model, rngs=nnx.Rngs(int(self.config.seed)))
    classifier.train()
    return PretextState(classifier, nnx.Optimizer(classifier, optax.adam(self._schedule), wrt=nnx.Param))

  def learning_rates(self, step: int) -> dict[str, float]:
    return {"lr": float(self._schedule(step - 1))}

  # ---- steps
  def train_step(self, state: PretextState, batch):
    x, labels = intensity_levels(batch["pre_hu"], self.alphas, self.window, self.clip)

    def loss_fn(model):
      logits = model(x)
      return losses.classification(logits, labels), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(state.classifier)
    state.optimizer.update(state.classifier, grads)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  def eval_step(self, state: PretextState, batch):
    """Per slice and class: 1 where the classifier names the alpha right (running BatchNorm statistics)."""
    x, labels = intensity_levels(batch["pre_hu"], self.alphas, self.window, self.clip)
    correct = (jnp.argmax(state.classifier(x, use_running_average=True), -1) == labels).astype(jnp.float32)
    per_alpha = correct.reshape(len(self.alphas), -1)  # alpha-major
    return {accuracy_key(a): per_alpha[k] for k, a in enumerate(self.alphas)}

  # ---- export
  def finish(self, state: PretextState, workdir: str, result: dict) -> dict:
    from vcect_jax import pretrain  # pylint: disable=g-import-not-at-top

    per_class = {f"{a:g}": float(result["eval"][accuracy_key(a)]) for a in self.alphas}
    path = pretrain.export_path(workdir)
    pretrain.save_pretext(path, state.classifier, self.config, result["step"], validation_accuracy=per_class)
    result.update(per_class_accuracy=per_class, accuracy=float(np.mean(list(per_class.values()))),
                  steps=result["step"], final_loss=float(result["train"].get("loss", float("nan"))),
                  checkpoint=path)
    return result
