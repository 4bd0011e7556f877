"""Aligning a contrast series to its non-contrast reference (paper section 4.2).

Two steps:

* Through-plane: ``estimate_z_offset`` finds the craniocaudal shift between the two scans by correlating
  low-resolution slice images (contrast-robust: HU clipped to [-1000, 200]) as a function of table offset, with a
  sub-slice search; ``pair_slices`` then pairs each non-contrast slice with the contrast slice nearest to its
  corrected table position, within half a slice.
* In-plane: ``align_slice`` maximises the enhanced correlation coefficient (OpenCV ``findTransformECC``, affine)
  of the windowed contrast slice onto the windowed non-contrast slice. For speed it runs on the body's bounding box
  downsampled to about ``ecc_size`` pixels and scales the warp back to original pixels. It reports the
  displacement magnitude (of the body centroid, i.e. the rigid shift, in original pixels; the paper's 6 px rule
  applies to it), the largest displacement of any body pixel, and the ECC score.

Conventions (as in the phantom's motion.json): the warp maps a point ``p = (column, row)`` of the non-contrast
slice to ``A p + b`` in the contrast slice; a positive z offset means the anatomy is at a higher table position
(towards the head) in the contrast series.
"""

import dataclasses

import cv2
import numpy as np

from vcect_jax import hu as hu_lib

# ECC works on windowed images: the training window (W400/L30 as in the paper), from its one definition.
ECC_WINDOW_HU = (hu_lib.Window().low, hu_lib.Window().high)
# Through-plane profiles: clip out contrast enhancement (vessels, kidneys, urine) so that it does not dominate.
PROFILE_CLIP_HU = (-1000.0, 200.0)
PROFILE_SIZE = 64


@dataclasses.dataclass
class SliceAlignment:
  """Result of aligning one contrast slice onto its non-contrast slice."""

  post_hu: np.ndarray  # int16 (H, W): the contrast slice resampled onto the non-contrast grid
  warp: np.ndarray  # (2, 3) float64, non-contrast pixel -> contrast pixel, original pixels
  shift_px: tuple[float, float]  # (dx, dy): displacement of the image centre
  misalignment_px: float  # displacement of the body's centroid (the rigid shift; what the 6 px rule tests)
  max_displacement_px: float  # largest displacement of any body pixel (includes rotation and scaling)
  ecc_score: float


class AlignmentFailed(Exception):
  """ECC did not converge; the message is the reason recorded in the manifest."""


def _small_slices(hu: np.ndarray) -> np.ndarray:
  """(S, PROFILE_SIZE, PROFILE_SIZE) float32 low-resolution slices, clipped to PROFILE_CLIP_HU."""
  return np.stack([cv2.resize(np.clip(s.astype(np.float32), *PROFILE_CLIP_HU), (PROFILE_SIZE, PROFILE_SIZE),
                              interpolation=cv2.INTER_AREA) for s in hu])


def _in_plane_shift(small_a: np.ndarray, small_b: np.ndarray) -> tuple[float, float]:
  """Global translation (in small pixels) of volume b relative to a, from their mean slices."""
  (dx, dy), _ = cv2.phaseCorrelate(small_a.mean(0), small_b.mean(0))
  return dx, dy


def _profiles(small: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
  """(S, PROFILE_SIZE**2) slice vectors, moved back by ``shift`` (small pixels) onto the reference grid."""
  if shift != (0.0, 0.0):
    m = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float32)
    small = np.stack([cv2.warpAffine(s, m, s.shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REPLICATE) for s in small])
  return small.reshape(len(small), -1)


def _normalise(x: np.ndarray) -> np.ndarray:
  x = x - x.mean(axis=-1, keepdims=True)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _offset_scores(fa: np.ndarray, fb: np.ndarray, za: np.ndarray, zb: np.ndarray, candidates: np.ndarray,
                   min_overlap: int) -> np.ndarray:
  """Mean correlation of the slices of a with b linearly interpolated at ``za + offset``, for each offset.

  Centring is linear, so the centred interpolant is the interpolant of centred profiles, and its norm and its dot
  products with a's slices follow from the Gram matrices: every candidate costs O(slices), not O(slices x pixels).
  ``zb`` increases; offsets with fewer than ``min_overlap`` slices inside b score -inf.
  """
  a = _normalise(fa).astype(np.float64)
  b = (fb - fb.mean(axis=-1, keepdims=True)).astype(np.float64)
  cross = a @ b.T  # (Sa, Sb)
  gram = b @ b.T  # (Sb, Sb)
  target = za[None, :] + candidates[:, None]  # (C, Sa)
  inside = (target >= zb[0]) & (target <= zb[-1])
  k = np.clip(np.searchsorted(zb, target) - 1, 0, len(zb) - 2)
  w = np.clip((target - zb[k]) / np.maximum(zb[k + 1] - zb[k], 1e-9), 0.0, 1.0)
  rows = np.arange(len(za))[None, :]
  dot = (1 - w) * cross[rows, k] + w * cross[rows, k + 1]
  norm2 = (1 - w) ** 2 * gram[k, k] + 2 * w * (1 - w) * gram[k, k + 1] + w ** 2 * gram[k + 1, k + 1]
  corr = np.where(inside, dot / np.maximum(np.sqrt(np.maximum(norm2, 0.0)), 1e-6), 0.0)
  count = inside.sum(axis=1)
  return np.where(count >= min_overlap, corr.sum(axis=1) / np.maximum(count, 1), -np.inf)


def estimate_z_offset(pre_hu: np.ndarray, pre_z: np.ndarray, post_hu: np.ndarray, post_z: np.ndarray,
                      search_mm: float = 40.0, min_overlap: int = 3,
                      overlap_fraction: float = 0.5) -> tuple[float, float]:
  """Craniocaudal offset of the contrast series relative to the non-contrast series.

  Args:
    pre_hu: int16 (S1, H, W) non-contrast volume; ``pre_z`` its (S1,) table positions in mm, decreasing.
    post_hu: int16 (S2, H', W') contrast volume; ``post_z`` its (S2,) table positions, decreasing.
    search_mm: largest offset considered, either way.
    min_overlap, overlap_fraction: fewest overlapping slices for an offset to count, as a number and as a
      fraction of the shorter series.

  Returns:
    (offset_mm, score): anatomy at table position z in the non-contrast series is at ``z + offset_mm`` in the
    contrast series; ``score`` is the mean slice correlation at that offset.
  """
  small_a, small_b = _small_slices(pre_hu), _small_slices(post_hu)
  # Undo the in-plane motion first, so that the slice correlation measures the through-plane match only.
  fa = _profiles(small_a)
  fb = _profiles(small_b, _in_plane_shift(small_a, small_b))
  min_overlap = max(min_overlap, int(np.ceil(overlap_fraction * min(len(pre_z), len(post_z)))))
  # Increasing positions for np.interp.
  zb = post_z[::-1]
  fb = fb[::-1]
  step = float(np.median(np.abs(np.diff(post_z)))) if len(post_z) > 1 else 1.0
  candidates = np.arange(-search_mm, search_mm + 1e-9, step / 8.0)
  scores = _offset_scores(fa, fb, pre_z, zb, candidates, min_overlap)
  best = int(np.argmax(scores))
  if not np.isfinite(scores[best]):
    return 0.0, float("-inf")
  offset = float(candidates[best])
  if 0 < best < len(candidates) - 1 and np.all(np.isfinite(scores[best - 1:best + 2])):
    y0, y1, y2 = scores[best - 1:best + 2]
    denom = y0 - 2 * y1 + y2
    if denom < 0:
      offset += float(np.clip(0.5 * (y0 - y2) / denom, -0.5, 0.5)) * (candidates[1] - candidates[0])
  return offset, float(scores[best])


def pair_slices(pre_z: np.ndarray, post_z: np.ndarray, offset_mm: float) -> list[int | None]:
  """For each non-contrast slice, the index of the contrast slice at its corrected table position.

  None where no contrast slice lies within half a (contrast) slice spacing of ``pre_z + offset_mm``.
  """
  step = float(np.median(np.abs(np.diff(post_z)))) if len(post_z) > 1 else np.inf
  out: list[int | None] = []
  for z in pre_z:
    j = int(np.argmin(np.abs(post_z - (z + offset_mm))))
    out.append(j if abs(post_z[j] - (z + offset_mm)) <= step / 2 + 1e-6 else None)
  return out


def windowed(hu: np.ndarray, window: tuple[float, float] = ECC_WINDOW_HU) -> np.ndarray:
  """float32 image in [0, 1] over the HU window."""
  lo, hi = window
  out = hu.astype(np.float32)
  out -= lo
  out *= 1.0 / (hi - lo)
  return np.clip(out, 0.0, 1.0, out=out)


def body_mask(hu: np.ndarray, padding: np.ndarray | None = None, threshold_hu: float = -500.0) -> np.ndarray:
  """uint8 (H, W) mask of the body: the region above ``threshold_hu`` with the largest outline, holes filled."""
  above = (hu > threshold_hu).astype(np.uint8)
  if padding is not None:
    above[padding] = 0
  # Outer outlines only: filling the largest one keeps the body and fills its holes (lungs, bowel gas) at once.
  contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  filled = np.zeros(hu.shape, np.uint8)
  if contours:
    largest = max(range(len(contours)), key=lambda i: (cv2.contourArea(contours[i]), len(contours[i])))
    cv2.drawContours(filled, contours, largest, 1, thickness=cv2.FILLED)
  return filled


def _shift_warp(warp: np.ndarray, origin: np.ndarray) -> np.ndarray:
  """A warp found on crops that start at ``origin`` (x, y) in both images, in full-image pixels."""
  a = warp[:, :2]
  b = warp[:, 2] + origin - a @ origin
  return np.concatenate([a, b[:, None]], axis=1)


def max_displacement(warp: np.ndarray, mask: np.ndarray) -> float:
  """Largest |warp(p) - p| over the pixels of ``mask`` (attained on its convex hull, as the map is affine)."""
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  if not contours:
    h, w = mask.shape
    points = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
  else:
    points = cv2.convexHull(np.concatenate(contours)).reshape(-1, 2).astype(float)
  moved = points @ warp[:, :2].T + warp[:, 2]
  return float(np.max(np.linalg.norm(moved - points, axis=1)))


def align_slice(pre_hu: np.ndarray, post_hu: np.ndarray, mask: np.ndarray,
                window: tuple[float, float] = ECC_WINDOW_HU, ecc_size: int = 128, margin_px: int = 16,
                iterations: int = 50, eps: float = 1e-4, fill_hu: int = -1024) -> SliceAlignment:
  """Affine ECC alignment of one contrast slice onto its non-contrast slice.

  Args:
    pre_hu: int16 (H, W) non-contrast slice (the template).
    post_hu: int16 (H, W) contrast slice on the same pixel grid.
    mask: uint8 (H, W) body mask of ``pre_hu``; ECC runs on its bounding box plus ``margin_px``.
    window: HU window of the images ECC sees.
    ecc_size: ECC runs on the crop downsampled so that its longer side is about this many pixels (0: no
      downsampling).
    iterations, eps: ECC stopping criteria.
    fill_hu: HU given to contrast pixels that come from outside the contrast image.

  Raises:
    AlignmentFailed: ECC did not converge.
  """
  h, w = pre_hu.shape
  bx, by, bw, bh = cv2.boundingRect(mask)
  if bw and bh:
    x0, x1 = max(0, bx - margin_px), min(w, bx + bw + margin_px)
    y0, y1 = max(0, by - margin_px), min(h, by + bh + margin_px)
  else:
    x0, x1, y0, y1 = 0, w, 0, h
  a = windowed(pre_hu[y0:y1, x0:x1], window)
  b = windowed(post_hu[y0:y1, x0:x1], window)
  factor = max(1.0, max(a.shape) / ecc_size) if ecc_size else 1.0
  if factor > 1.0:
    size = (max(8, round(a.shape[1] / factor)), max(8, round(a.shape[0] / factor)))
    fx, fy = a.shape[1] / size[0], a.shape[0] / size[1]
    factor = (fx + fy) / 2
    a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
    b = cv2.resize(b, size, interpolation=cv2.INTER_AREA)
  # Start from the translation that phase correlation finds, so ECC converges from large shifts too.
  (dx, dy), _ = cv2.phaseCorrelate(a, b)
  warp = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
  try:
    cc, warp = cv2.findTransformECC(a, b, warp, cv2.MOTION_AFFINE,
                                    (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps), None, 1)
  except cv2.error:
    raise AlignmentFailed("ECC alignment did not converge") from None
  full = warp.astype(np.float64)
  if factor > 1.0:
    full = _scale_warp(full, fx, fy)
  full = _shift_warp(full, np.array([x0, y0], float))
  aligned = cv2.warpAffine(post_hu.astype(np.float32), full, (w, h),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=float(fill_hu))
  centre = np.array([(w - 1) / 2, (h - 1) / 2])
  shift = full[:, :2] @ centre + full[:, 2] - centre
  moments = cv2.moments(mask[y0:y1, x0:x1], binaryImage=True)
  body_centre = (np.array([moments["m10"] / moments["m00"] + x0, moments["m01"] / moments["m00"] + y0])
                 if moments["m00"] else centre)
  moved = full[:, :2] @ body_centre + full[:, 2] - body_centre
  return SliceAlignment(
      post_hu=np.rint(aligned, out=aligned).astype(np.int16),  # a blend of int16 values and fill_hu: in range
      warp=full,
      shift_px=(float(shift[0]), float(shift[1])),
      misalignment_px=float(np.linalg.norm(moved)),
      max_displacement_px=max_displacement(full, mask),
      ecc_score=float(cc),
  )


def _scale_warp(warp: np.ndarray, fx: float, fy: float) -> np.ndarray:
  """A warp found on images downsampled (INTER_AREA) by (fx, fy), in original pixels: p_small = (p + 0.5) / f - 0.5."""
  f = np.diag([fx, fy])
  f_inv = np.diag([1 / fx, 1 / fy])
  a = f @ warp[:, :2] @ f_inv
  half = np.array([0.5, 0.5])
  # p' = F (A (F^-1 (p + h) - h) + b + h) - h
  b = f @ (-warp[:, :2] @ half + warp[:, 2] + half) + a @ half - half
  return np.concatenate([a, b[:, None]], axis=1)
