"""The paper's dual path (section 3.3): the local path sees the four N/2 x N/2 quadrants of the input.

`quadrants` cuts a batch into its quadrants (stacked on the batch axis, quadrant-major) and `assemble` puts the
generator's quadrant outputs back into whole images, so that the local path's loss is computed on a whole
virtual image, exactly like the global path's, and combined with weights 0.6 / 0.4.
"""

from __future__ import annotations

import jax.numpy as jnp


def quadrants(x: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W, C) -> (4B, H/2, W/2, C): top-left, top-right, bottom-left, bottom-right, each over the batch."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"image size {h}x{w} must be even to split into quadrants")
  q = x.reshape(b, 2, h // 2, 2, w // 2, c)
  return q.transpose(1, 3, 0, 2, 4, 5).reshape(4 * b, h // 2, w // 2, c)


def assemble(q: jnp.ndarray) -> jnp.ndarray:
  """(4B, h, w, C) quadrants from `quadrants` -> (B, 2h, 2w, C) whole images."""
  b4, h, w, c = q.shape
  b = b4 // 4
  x = q.reshape(2, 2, b, h, w, c).transpose(2, 0, 3, 1, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c)
