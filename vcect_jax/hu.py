"""Hounsfield units <-> network values: the CT window and its inverse, in one place.

Training, pretext pretraining, evaluation and inference all go through these functions, so that the window
(W400/L30 in the paper, section 4.2) is a configuration choice made once.

Value spaces:
  * HU: Hounsfield units as stored in the records (int16) and written by inference.
  * unit: the window mapped linearly to [0, 1] (HU level - width/2 -> 0, level + width/2 -> 1).
  * model: unit mapped to [-1, 1], what the networks see and produce.

Back to HU (evaluation and inference share the rule, `keep_input_outside_window`): the model was trained on
windowed images and knows nothing outside the window, so each output pixel is a blend of the virtual and the input
value, chosen by the *input* HU `x`, with `low`/`high` the window edges and `m = BLEND_FRACTION * width` (40 HU):

    w(x) = smoothstep((x - low) / m) * smoothstep((high - x) / m) * smoothstep((BONE_HU - x) / BONE_BLEND_HU),
    smoothstep(t) = 3t^2 - 2t^3 on [0, 1],     out = w * virtual + (1 - w) * input

Input pixels outside the window (air, lung, metal, pixel padding) are kept exactly (w = 0), pixels more than `m`
inside it are fully virtual (w = 1), and the transition is smooth. So are non-contrast pixels of `BONE_HU` (150 HU)
or more, whatever the window: no unenhanced soft tissue is that dense, so they are bone, calcification or oral
contrast, which intravenous contrast does not change; a window that shows them (W600/L130 holds the partial-volumed
edges of the vertebrae) would otherwise hand them to the model, which redraws them with errors (benchmarks/
RESULTS.md, issue 12, round 9: whole-body MAE 14.4 -> 13.6 HU for an arterial W600/L130 model, 14.3 -> 11.8 HU
for a delayed W1000/L330 one; 12.7 -> 12.6 through W400/L30). The virtual value itself is bounded by the window,
so a virtual vessel is at most `high` HU.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

DEFAULT_LEVEL = 30.0
DEFAULT_WIDTH = 400.0
BLEND_FRACTION = 0.1  # width of the blend at each window edge, as a fraction of the window width
BONE_HU = 150.0       # non-contrast pixels at least this dense keep their HU (bone, calcification; module docstring)
BONE_BLEND_HU = 40.0  # the blend below BONE_HU: fully virtual up to 110 HU


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

  @property
  def label(self) -> str:
    """'W400/L30': how radiologists name a window (width first), for titles, tables and messages."""
    return f"W{self.width:g}/L{self.level:g}"

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


def blend_weight(pre_hu, window: Window = Window()) -> np.ndarray:
  """The weight of the virtual value in the output (module docstring): 0 outside the window and on bone (input
  >= `BONE_HU`), 1 well inside the window below it.

  `(...)` HU -> `(...)` float32 weights; int16 input goes through a table of all 65536 values (fast).
  """
  pre_hu = np.asarray(pre_hu)
  if pre_hu.dtype == np.int16:
    return _weight_table(window)[pre_hu.view(np.uint16)]
  return _weight(pre_hu.astype(np.float32), window)


def _weight(x: np.ndarray, window: Window) -> np.ndarray:
  margin = BLEND_FRACTION * window.width

  def smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)

  return (smoothstep((x - window.low) / margin) * smoothstep((window.high - x) / margin)
          * smoothstep((BONE_HU - x) / BONE_BLEND_HU)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _weight_table(window: Window) -> np.ndarray:
  """The weight of every int16 value, indexed by its bits read as uint16."""
  return _weight(np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.float32), window)


def keep_input_outside_window(virtual_hu: np.ndarray, pre_hu: np.ndarray, window: Window = Window()) -> np.ndarray:
  """`pre + w(pre) * (clip(virtual, low, high) - pre)` in float32 (module docstring); `virtual_hu` (float32) is
  overwritten to keep one volume-sized temporary."""
  virtual_hu = np.asarray(virtual_hu, np.float32)
  np.clip(virtual_hu, window.low, window.high, out=virtual_hu)
  pre = np.asarray(pre_hu).astype(np.float32)
  virtual_hu -= pre
  virtual_hu *= blend_weight(pre_hu, window)
  virtual_hu += pre
  return virtual_hu


def _xp(x):
  """The array namespace of `x`: jax.numpy for jax arrays, numpy otherwise."""
  if type(x).__module__.startswith("jax"):
    import jax.numpy as jnp  # local import: data_prep uses this module without jax

    return jnp
  return np
