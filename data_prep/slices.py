"""Slice geometry shared by conversion, pretext pretraining and inference: one implementation of each rule.

  * `resize_square`: pad an `(..., H, W)` image to a square (centred, with a fill value), then resize it to the
    model size: HU by area averaging (rounded), masks and labels by nearest neighbour.
  * `resized_spacing_mm`: the in-plane pixel spacing after that resize.
  * `unresize_square`: the inverse of `resize_square` for model outputs: back to the original matrix
    (bilinear for images, nearest for masks), padding cropped away.
  * `triplet_indices` / `triplets`: the 2.5D input of the paper (previous, current, next slice as channels);
    the first and last slices duplicate themselves as their missing neighbour.
"""

from __future__ import annotations

import cv2
import numpy as np

# HU of the padding that squares a non-square CT matrix (air), the `fill` of `resize_square` for HU images.
AIR_HU = -1024


def _square(img: np.ndarray, fill) -> np.ndarray:
  h, w = img.shape[-2:]
  if h == w:
    return img
  n = max(h, w)
  out = np.full(img.shape[:-2] + (n, n), fill, img.dtype)
  y, x = (n - h) // 2, (n - w) // 2
  out[..., y:y + h, x:x + w] = img
  return out


def resize_square(img: np.ndarray, size: int, nearest: bool, fill) -> np.ndarray:
  """(..., H, W) -> (..., size, size): HU by area averaging (rounded), masks and labels by nearest neighbour.

  A non-square matrix is first padded to a square with `fill` (centred), so that pixels stay square.
  """
  img = _square(img, fill)
  if img.shape[-1] == size:
    return img
  if img.ndim == 3:
    return np.stack([resize_square(x, size, nearest, fill) for x in img])
  if nearest:
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)
  out = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
  if np.issubdtype(img.dtype, np.integer):
    info = np.iinfo(img.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
  return out.astype(img.dtype)


def unresize_square(img: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
  """(..., size, size) -> (..., H, W): undoes `resize_square` (bilinear, or nearest for masks), crop of the pad.

  Float images stay float (no rounding): the caller decides how to quantise.
  """
  h, w = int(shape[0]), int(shape[1])
  n = max(h, w)
  if img.ndim == 3:
    return np.stack([unresize_square(x, shape, nearest) for x in img])
  if img.shape[-1] != n:
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    src = img if nearest else img.astype(np.float32)
    img = cv2.resize(src, (n, n), interpolation=interp)
  y, x = (n - h) // 2, (n - w) // 2
  return img[y:y + h, x:x + w]


def resized_spacing_mm(pixel_spacing_mm: float, shape: tuple[int, int], size: int) -> float:
  """In-plane pixel spacing after `resize_square` of an `shape` (H, W) matrix with spacing `pixel_spacing_mm`."""
  return float(pixel_spacing_mm) * max(int(shape[0]), int(shape[1])) / int(size)


def triplet_indices(index: int, count: int) -> list[int]:
  """The (previous, current, next) slice indices of slice `index` of `count`, edges duplicated."""
  if not 0 <= index < count:
    raise IndexError(f"slice {index} out of range for {count} slices")
  return [max(index - 1, 0), index, min(index + 1, count - 1)]


def triplets(volume: np.ndarray) -> np.ndarray:
  """`(S, H, W)` volume -> `(S, 3, H, W)` (previous, current, next) stacks, edge slices duplicated."""
  volume = np.asarray(volume)
  if volume.ndim != 3 or not len(volume):
    raise ValueError(f"expected a (slices, H, W) volume with at least one slice, got shape {volume.shape}")
  prev = np.concatenate([volume[:1], volume[:-1]])
  nxt = np.concatenate([volume[1:], volume[-1:]])
  return np.stack([prev, volume, nxt], axis=1)
