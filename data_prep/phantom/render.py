"""Rasterises the anatomy into a label volume on one series' own voxel grid, with that series' motion applied.

Each part is evaluated only inside its bounding box, at the reference-frame coordinates that the series'
voxels see (the inverse of the motion), so the labels move with the anatomy exactly as motion.json says.
"""

import dataclasses

import numpy as np

from data_prep.phantom import motion as motion_lib


@dataclasses.dataclass(frozen=True)
class Part:
  """One labelled solid of the anatomy.

  Attributes:
    label: label name painted where the shape is.
    shape: a primitive with ``box()`` and ``depth(x, y, z)`` (mm below the surface, > 0 inside).
    group: motion group: 'body' (rigid), 'liver', 'spleen', 'kidneys' (respiratory) or 'bowel' (deformed).
    inner: ``(depth_mm, label)`` layers painted deeper than ``depth_mm``, outermost first.
    fluid_level_y: if set, the innermost layer is air in front of this y (mm) and fluid behind it.
    over: if set, the only labels this part may overwrite.
  """
  label: str
  shape: object
  group: str = 'body'
  inner: tuple[tuple[float, str], ...] = ()
  fluid_level_y: float | None = None
  over: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
  """The voxel grid of one series: ``slices`` axial images, slice 0 the most cranial."""
  size: int
  pixel_spacing: float
  slice_z: np.ndarray  # (S,) table position of each slice, mm, decreasing


def render(parts: list[Part], grid: Grid, motion: motion_lib.SeriesMotion, label_ids: dict[str, int]) -> np.ndarray:
  """Label volume ``(S, H, W)`` uint8 of ``parts`` painted in order (later parts win)."""
  n, size, ps = len(grid.slice_z), grid.size, grid.pixel_spacing
  labels = np.zeros((n, size, size), np.uint8)
  x_ref, y_ref = motion.reference_xy(size, ps)
  z_by_group = {}
  margin_bowel = float(np.hypot(*motion.bowel_amplitude_mm)) + 1.0
  for part in parts:
    if part.group not in z_by_group:
      z_by_group[part.group] = motion.reference_z(grid.slice_z, part.group).astype(np.float32)
    margin = margin_bowel if part.group == 'bowel' else 1.0
    members = getattr(part.shape, 'members', (part.shape,))
    pieces = [_evaluate(m, part, grid, motion, x_ref, y_ref, z_by_group[part.group], margin, labels, label_ids)
              for m in members]
    pieces = [p for p in pieces if p is not None]
    layers = ((0.0, part.label),) + part.inner
    for i, (d, name) in enumerate(layers):
      for view, depth, inside, y in pieces:
        layer = inside & (depth > d) if d else inside
        if part.fluid_level_y is not None and i == len(layers) - 1 and i > 0:
          view[layer] = label_ids['bowel_lumen_fluid']
          view[layer & (y < np.float32(part.fluid_level_y))] = label_ids['bowel_lumen_air']
        else:
          view[layer] = label_ids[name]
  return labels


def _evaluate(shape, part, grid, motion, x_ref, y_ref, z_ref, margin, labels, label_ids):
  """The label view, depth, paintable mask and y of ``shape`` inside its box on this grid, or None."""
  size, ps = grid.size, grid.pixel_spacing
  x0, x1, y0, y1, z0, z1 = shape.box()
  ks = np.nonzero((z_ref >= z0 - margin) & (z_ref <= z1 + margin))[0]
  if ks.size == 0:
    return None
  k0, k1 = ks[0], ks[-1] + 1
  corners_c = np.array([x0 - margin, x1 + margin] * 2) / ps + (size - 1) / 2
  corners_r = np.array([y0 - margin] * 2 + [y1 + margin] * 2) / ps + (size - 1) / 2
  cols, rows = motion.forward_px(corners_c, corners_r, size)
  c0, c1 = max(int(np.floor(cols.min())) - 1, 0), min(int(np.ceil(cols.max())) + 2, size)
  r0, r1 = max(int(np.floor(rows.min())) - 1, 0), min(int(np.ceil(rows.max())) + 2, size)
  if c0 >= c1 or r0 >= r1:
    return None
  x = x_ref[None, r0:r1, c0:c1]
  y = y_ref[None, r0:r1, c0:c1]
  z = z_ref[k0:k1, None, None]
  if part.group == 'bowel':
    ux, uy = motion.bowel_offset(x, y, z)
    x, y = x - ux, y - uy
  depth = shape.depth(x, y, z)
  view = labels[k0:k1, r0:r1, c0:c1]
  inside = depth > 0
  if part.over is not None:
    inside &= np.isin(view, [label_ids[o] for o in part.over])
  return view, depth, inside, np.broadcast_to(y, depth.shape)
