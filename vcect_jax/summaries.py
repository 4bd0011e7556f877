"""TensorBoard summaries (clu metric writers, process 0 only) and the console progress line.

Scalars carry `train_` / `eval_` prefixes. Image grids show, per validation slice, the non-contrast input |
virtual | real | |virtual - real| on the training window, and the perceptual heatmaps of the four encoder blocks,
each panel titled in a strip above it (`Method.image_panels`).
"""

from __future__ import annotations

import datetime
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from vcect_jax import input_pipeline
from vcect_jax import sharding

IMAGE_EXAMPLES = 2
# Longest silence of the console between two `log_every` lines: a progress line (step, steps/s, ETA) comes at least
# this often, so that a slow run (paper-size pretraining on a CPU) shows it is alive.
HEARTBEAT_S = 30.0


class Writer:
  """One run's summary writer, progress reporter (steps/s) and console ETA."""

  def __init__(self, workdir: str, total_steps: int, console_keys=("g_loss", "d_loss")):
    # clu's writers import TensorFlow: imported here, when a run writes summaries, so that importing the training
    # step (vcect_jax.train: benchmarks, evaluation, inference) keeps TensorFlow out of the process.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    self.total_steps = total_steps
    self.console_keys = tuple(console_keys)
    self._writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    self._progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=self._writer)
    self._last_console = None  # (time, step)

  def tick(self, step: int) -> None:
    self._progress(step)

  def scalars(self, step: int, values: dict) -> None:
    self._writer.write_scalars(step, values)

  def images(self, step: int, images: dict) -> None:
    self._writer.write_images(step, images)

  def heartbeat_due(self, step: int) -> bool:
    """True when no console line came for HEARTBEAT_S seconds: time for `console(step, {})`, a progress line
    without losses (`step 12/500 (2%)  0.35 steps/s  ETA 0:23:14`); the caller first waits for `step` to finish,
    so that the rate counts finished steps, not dispatched ones."""
    now = time.monotonic()
    if self._last_console is None:
      self._last_console = (now, step)
      return False
    return now - self._last_console[0] >= HEARTBEAT_S

  def console(self, step: int, means: dict) -> None:
    """`step 120/500 (24%)  g_loss 0.41  d_loss 1.23  2.1 steps/s  ETA 0:03:01` (the method's console keys)."""
    now = time.monotonic()
    rate_text, eta_text = "", ""
    if self._last_console is not None and step > self._last_console[1]:
      rate = (step - self._last_console[1]) / max(now - self._last_console[0], 1e-9)
      eta = datetime.timedelta(seconds=round((self.total_steps - step) / rate))
      rate_text, eta_text = f"  {rate:.2f} steps/s", f"  ETA {eta}"
    self._last_console = (now, step)
    losses = "".join(f"  {k} {means[k]:.4g}" for k in self.console_keys if k in means)
    logging.info("step %d/%d (%d%%)%s%s%s", step, self.total_steps, 100 * step // self.total_steps, losses,
                 rate_text, eta_text)

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


def label_panels(images: np.ndarray, labels) -> np.ndarray:
  """Image grids `(B, H, n*W, C)` in [0, 1] of n side-by-side panels, with each panel's title in a strip above it.

  Small panels are first enlarged (nearest neighbour, an integer factor) so that the longest title fits.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw
  from PIL import ImageFont

  images = np.asarray(images, np.float32)
  b, h, width, c = images.shape
  n = len(labels)
  if not n or width % n:
    return images
  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new("L", (1, 1)))
  boxes = [measure.textbbox((0, 0), text, font=font) for text in labels]
  text_w = max(x1 - x0 for x0, _, x1, _ in boxes) + 4
  text_h = max(y1 for _, _, _, y1 in boxes) + 4
  scale = max(1, -(-text_w // (width // n)))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  panel = width // n * scale
  strip = Image.new("L", (width * scale, text_h), 0)
  draw = ImageDraw.Draw(strip)
  for i, text in enumerate(labels):
    draw.text((i * panel + 2, 1), text, fill=255, font=font)
  header = np.asarray(strip, np.float32)[None, :, :, None] / 255.0
  return np.concatenate([np.broadcast_to(header, (b, text_h, width * scale, c)), images], axis=1)


def write_images(writer: Writer, image_step, state, source, transform, step: int, mesh, panels=None) -> None:
  """The method's image grids (values in [0, 1]) for the first validation examples, each panel titled as
  `panels[key]` says (`Method.image_panels`).

  Every process runs this (the step is a collective over all devices); the images are gathered everywhere and
  only process 0's writer writes them.
  """
  n = sharding.fitting_batch_size(mesh, IMAGE_EXAMPLES, len(source))
  if not n:
    return
  local = next(iter(input_pipeline.eval_dataset(source, transform, n // jax.process_count(), n)))
  images = image_step(state, sharding.global_batch(local, mesh))
  if not images:
    return
  images = multihost_utils.process_allgather(images, tiled=True)
  panels = panels or {}
  writer.images(step, {k: label_panels(np.asarray(v), panels.get(k, ())) for k, v in images.items()})
