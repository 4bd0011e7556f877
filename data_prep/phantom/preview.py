"""A PNG of a mid slice of the four phases side by side, in a soft-tissue window, for a quick look."""

import pathlib

import numpy as np
from PIL import Image, ImageDraw

WINDOWS = ((40.0, 400.0), (40.0, 1500.0))  # (level, width): soft tissue, then a wide window in a second row


def write_preview(path: pathlib.Path, hu_by_phase: dict[str, np.ndarray], slice_index: int | None = None) -> None:
  """Writes the preview of one case: one row per window, one column per phase, with the phase names."""
  phases = list(hu_by_phase)
  n = next(iter(hu_by_phase.values())).shape[0]
  k = n // 2 if slice_index is None else slice_index
  rows = []
  for level, width in WINDOWS:
    tiles = []
    for phase in phases:
      image = hu_by_phase[phase][k].astype(np.float32)
      tiles.append(np.clip((image - (level - width / 2)) / width * 255, 0, 255).astype(np.uint8))
    rows.append(np.concatenate(tiles, axis=1))
  canvas = Image.fromarray(np.concatenate(rows, axis=0))
  draw = ImageDraw.Draw(canvas)
  tile = hu_by_phase[phases[0]].shape[2]
  for i, phase in enumerate(phases):
    draw.text((i * tile + 4, 4), phase, fill=255)
  for j, (level, width) in enumerate(WINDOWS):
    draw.text((4, j * hu_by_phase[phases[0]].shape[1] + tile // 16 + 8), f'W{width:g} L{level:g}', fill=255)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path, format='PNG')
