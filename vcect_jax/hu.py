"""Hounsfield units <-> network values: the CT window and its inverse, in one place.

Training, pretext pretraining, evaluation and inference all go through these functions, so that the window
(W400/L30 in the paper, section 4.2) is a configuration choice made once.

Value spaces:
  * HU: Hounsfield units as stored in the records (int16) and written by inference.
  * unit: the window mapped linearly to [0, 1] (HU level - width/2 -> 0, level + width/2 -> 1).
  * model: unit mapped to [-1, 1], what the networks see and produce.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_LEVEL = 30.0
DEFAULT_WIDTH = 400.0


@dataclasses.dataclass(frozen=True)
class Window:
  """A CT display window: centre (level) and width, both in HU."""

  level: float = DEFAULT_LEVEL
  width: float = DEFAULT_WIDTH

  def __post_init__(self):
    if not self.width > 0:
      raise ValueError(f"window width must be positive, got {self.width}")

  @property
  def low(self) -> float:
    return self.level - self.width / 2.0

  @property
  def high(self) -> float:
    return self.level + self.width / 2.0

  @classmethod
  def from_config(cls, cfg) -> "Window":
    """From a config section with `level` and `width` fields (e.g. `config.data.window`)."""
    return cls(level=float(cfg.level), width=float(cfg.width))


def hu_to_unit(hu, window: Window = Window(), clip: bool = True):
  """HU -> [0, 1] over the window; values outside the window are clipped unless `clip=False`.

  Works on numpy and jax arrays alike (only arithmetic and clip are used).
  """
  xp = _xp(hu)
  unit = (xp.asarray(hu, dtype=xp.float32) - window.low) / window.width
  return xp.clip(unit, 0.0, 1.0) if clip else unit


def unit_to_model(unit):
  """[0, 1] -> [-1, 1]."""
  return unit * 2.0 - 1.0


def model_to_unit(x):
  """[-1, 1] -> [0, 1]."""
  return (x + 1.0) / 2.0


def hu_to_model(hu, window: Window = Window(), clip: bool = True):
  """HU -> network space [-1, 1] (the window, then normalisation)."""
  return unit_to_model(hu_to_unit(hu, window, clip=clip))


def model_to_hu(x, window: Window = Window()):
  """Network space -> HU. The inverse of `hu_to_model` inside the window; it does not clip."""
  return model_to_unit(x) * window.width + window.low


def _xp(x):
  """The array namespace of `x`: jax.numpy for jax arrays, numpy otherwise."""
  if type(x).__module__.startswith("jax"):
    import jax.numpy as jnp  # local import: data_prep uses this module without jax

    return jnp
  return np
