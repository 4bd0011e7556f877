"""What a training method supplies to the one training loop (`vcect_jax.train.train_and_evaluate`).

A method is a small class bound to a config. The loop owns everything generic: data sources to grain batches,
the mesh and shardings, restore (with fallback), summaries, evaluation, checkpoints, SIGTERM and the non-finite
guard. The method owns what is particular to it:

  * `loop_settings()`: batch size, number of steps and the periodic intervals (from its config section);
  * `sources(data_dir)`, `train_example(example)`, `eval_example(example)`: what a training / evaluation example
    is, in numpy, before batching;
  * `create_state(steps_per_epoch)`: its networks and optimisers as one named `nnx.Module` (never a tuple);
  * `train_step(state, batch) -> metrics`: one update, in place on the nnx state (the loop jits it);
  * `eval_step(state, batch) -> {name: (B,) per example}`: validation metrics, averaged by the loop;
  * `images(state, batch) -> {name: (B, H, W', 1) in [0, 1]}`: image grids for TensorBoard (optional);
  * `learning_rates(step)`: scalars to log;
  * `generator(state)` and `build_generator()`, `generator_key`: the network that turns non-contrast input into a
    virtual contrast image, and where it sits in the checkpointed state, so that evaluation and inference restore
    it alone;
  * `finish(state, workdir, result)`: anything to write when training ends (the pretext export).

Adding a method is one module in `vcect_jax/methods/` and one line in the registry (`methods/__init__.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The numbers the loop needs from a method's config section."""

  batch_size: int                   # global batch
  steps: int                        # > 0: this many steps; else epochs * steps per epoch
  epochs: float
  log_every: int
  eval_every: int
  image_every: int
  checkpoint_every: int
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  eval_examples: int = 0            # validation examples per evaluation (0: all)
  eval_batch_size: int = 8
  shuffle_seed: int = 0

  def total_steps(self, steps_per_epoch: int) -> int:
    return int(self.steps) if self.steps > 0 else int(math.ceil(self.epochs * steps_per_epoch))

  def check(self) -> list[str]:
    problems = []
    if self.batch_size < 1:
      problems.append(f"batch_size={self.batch_size} must be >= 1")
    for name in ("log_every", "image_every", "eval_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        problems.append(f"{name}={getattr(self, name)} must be >= 1")
    return problems


class Method:
  """Base class: a method bound to its config. Subclasses override what the module docstring lists."""

  name: str = ""
  # Path of the inference generator's state inside the checkpointed state (`nnx.State.to_pure_dict()` keys).
  generator_key: tuple[str, ...] = ()
  # Summary name of the metric that the console line shows first.
  console_keys: tuple[str, ...] = ()
  # Titles of the equal-width panels, left to right, of each image grid of `images()` (by its key): TensorBoard
  # shows them above the panels.
  image_panels: dict[str, tuple[str, ...]] = {}

  def __init__(self, config):
    self.config = config

  # ---- configuration
  def validate(self) -> None:
    """Raises ValueError naming every invalid field."""

  def loop_settings(self) -> LoopSettings:
    raise NotImplementedError

  # ---- data
  def sources(self, data_dir: str) -> tuple[Any, Any]:
    """(train, validation) random-access sources."""
    raise NotImplementedError

  def train_example(self, example: dict) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def eval_example(self, example: dict) -> dict[str, np.ndarray]:
    return self.train_example(example)

  def augment(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random augmentation of a `train_example` output (identity by default)."""
    del rng
    return example

  @property
  def augments(self) -> bool:
    return False

  # ---- state and steps
  def create_state(self, steps_per_epoch: int) -> nnx.Module:
    raise NotImplementedError

  def train_step(self, state: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    raise NotImplementedError

  def eval_step(self, state: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    raise NotImplementedError

  def images(self, state: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    del state, batch
    return {}

  def learning_rates(self, step: int) -> dict[str, float]:
    del step
    return {}

  # ---- the generator, for evaluation and inference
  def generator(self, state: nnx.Module) -> nnx.Module:
    raise NotImplementedError(f"method {self.name!r} has no generator")

  def build_generator(self) -> nnx.Module:
    raise NotImplementedError(f"method {self.name!r} has no generator")

  # ---- end of training
  def finish(self, state: nnx.Module, workdir: str, result: dict) -> dict:
    del state, workdir
    return result
