"""Image-quality metrics: jax.numpy ones for training-time validation, numpy ones for evaluation.

Training-time validation (jax.numpy, per image of a batch; used by `train`):
  batch_psnr:   on unit-window images ([0, 1] over W400/L30), data range 1.
  batch_ssim:   Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03 (Wang et al. 2004), data range 1, mean over the
                'valid' windows (those wholly inside the image; the same as scikit-image's mean).
  batch_mae_hu: mean absolute error in HU inside the body mask. The network can only produce values inside the
                window, so both images are clipped to the window first: this measures what the model is able to
                express.

Evaluation (numpy, whole slices and volumes; used by `evaluate`), each function documenting its data range:
  paper mode:  `paper_psnr`, `paper_ssim`, `paper_mse`, `paper_mae`, `paper_snu` on 8-bit windowed images
               (`window_8bit`), the authors' definitions behind the paper's Tables 1 and 2; `paper_metrics`.
  HU mode:     `hu_psnr`, `hu_ssim`, `hu_mse`, `mae_hu` in HU clipped to [-1024, 3071] inside the body mask
               (SynthRAD conventions), on slices or volumes; `hu_metrics`.
  beyond:      `organ_enhancement` (mean HU per organ, enhancement ratio), `homogeneous_rois` + `roi_snu`
               (ROI-based non-uniformity), `through_plane` (slice-to-slice flicker of the virtual series).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import skimage.metrics

from vcect_jax import hu


def batch_psnr(pred: jnp.ndarray, target: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
  """(B, H, W) -> (B,) PSNR in dB."""
  mse = jnp.mean(jnp.square(pred - target), axis=(1, 2))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> jnp.ndarray:
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  g = jnp.exp(-0.5 * jnp.square(x / sigma))
  g = g / jnp.sum(g)
  return jnp.outer(g, g)


def _filter(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """'valid' 2-D filtering of (B, H, W) images."""
  return jax.lax.conv_general_dilated(x[:, None], kernel[None, None], (1, 1), "VALID")[:, 0]


def batch_ssim(pred: jnp.ndarray, target: jnp.ndarray, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> jnp.ndarray:
  """(B, H, W) -> (B,) mean SSIM over valid windows."""
  k = _gaussian_kernel(window, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = _filter(pred, k), _filter(target, k)
  sxx = _filter(pred * pred, k) - mu_x**2
  syy = _filter(target * target, k) - mu_y**2
  sxy = _filter(pred * target, k) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2))


def batch_mae_hu(pred_hu: jnp.ndarray, target_hu: jnp.ndarray, mask: jnp.ndarray, low: float,
           high: float) -> jnp.ndarray:
  """(B, H, W) -> (B,) masked MAE in HU after clipping both images to [low, high]."""
  err = jnp.abs(jnp.clip(pred_hu, low, high) - jnp.clip(target_hu, low, high)) * mask
  return jnp.sum(err, axis=(1, 2)) / jnp.maximum(jnp.sum(mask, axis=(1, 2)), 1.0)


# ================================================================================================================
# Evaluation metrics (numpy, on the host): whole slices and volumes, in two modes.
#
# Paper mode reproduces the authors' definitions (Liu et al. 2022, Tables 1 and 2) so that numbers can be put next
# to theirs: images are windowed (W400/L30 here; the authors used per-slice min-max) and quantised to 8 bits, and
# PSNR, SSIM, MSE and SNU are computed on the whole 8-bit image.
#
# HU mode follows the SynthRAD challenges: HU clipped to [-1024, 3071], voxels outside the body mask set to -1024,
# errors averaged inside the body mask only.
#
# Conventions shared by every function below:
#   * arguments are (virtual, real) in that order; `real` is the acquired contrast-enhanced image;
#   * results are Python floats;
#   * identical images give PSNR = inf (no cap: a table then shows "inf", which is what happened);
#   * an empty mask (or nothing to average) gives nan, never an exception, so that one odd slice does not stop the
#     evaluation of a whole split; the aggregations in `evaluate` skip nan values and count what they averaged.
# ================================================================================================================

HU_CLIP = (-1024.0, 3071.0)       # SynthRAD: air to the top of the 12-bit range
HU_DATA_RANGE = HU_CLIP[1] - HU_CLIP[0]  # 4095 HU: PSNR's peak and SSIM's data range in HU mode
PAPER_PEAK = 255.0                # 8-bit images: PSNR's peak and SSIM's data range in paper mode
SSIM_SIGMA = 1.5                  # Gaussian window, sigma 1.5 px, truncated at 3.5 sigma: 11 x 11 (Wang et al. 2004)
SSIM_WIN = 11
SSIM_PAD = (SSIM_WIN - 1) // 2    # border whose SSIM windows would leave the image: left out of every mean

# Organ label values of the phantom (`data_prep/phantom/anatomy.py`, LABEL_NAMES; tests keep the two in step),
# for the per-organ enhancement of the issue: vessels, parenchyma and the urinary tract.
ORGAN_LABELS = {
    "aorta": 7,
    "ivc": 8,
    "portal_vein": 9,
    "liver": 11,
    "spleen": 13,
    "pancreas": 14,
    "kidney_cortex": 15,
    "kidney_medulla": 16,
    "collecting_system": 17,
    "bladder": 19,
}


# ---------------------------------------------------------------------------------------------- value spaces
def window_8bit(image_hu: np.ndarray, window: hu.Window = hu.Window()) -> np.ndarray:
  """HU -> the 8-bit windowed image of paper mode: `round(255 * unit)`, uint8, values outside the window clipped.

  The authors computed their metrics on 8-bit PNGs; rounding (not truncation) keeps the mapping symmetric.
  """
  unit = hu.hu_to_unit(np.asarray(image_hu, np.float64), window)
  return np.round(unit * PAPER_PEAK).astype(np.uint8)


def clip_hu(image_hu: np.ndarray, body_mask: np.ndarray | None = None) -> np.ndarray:
  """HU mode's preparation: float64, clipped to [-1024, 3071], and -1024 (air) outside the body mask if given."""
  x = np.clip(np.asarray(image_hu, np.float64), *HU_CLIP)
  if body_mask is not None:
    x = np.where(np.asarray(body_mask) > 0, x, HU_CLIP[0])
  return x


def _as_float(image: np.ndarray) -> np.ndarray:
  return np.asarray(image, np.float64)


def _psnr_from_mse(mse: float, peak: float) -> float:
  if np.isnan(mse):
    return math.nan
  if mse == 0.0:
    return math.inf
  return float(10.0 * np.log10(peak**2 / mse))


def _ssim_map(virtual: np.ndarray, real: np.ndarray, data_range: float) -> np.ndarray:
  """(H, W) float64 -> (H, W) SSIM map (scikit-image, Gaussian 11 x 11 / sigma 1.5, population covariance)."""
  _, ssim_map = skimage.metrics.structural_similarity(
      virtual, real, data_range=data_range, gaussian_weights=True, sigma=SSIM_SIGMA,
      use_sample_covariance=False, full=True)
  return ssim_map


def _crop(x: np.ndarray) -> np.ndarray:
  """The interior of the last two axes whose SSIM windows lie wholly inside the image."""
  return x[..., SSIM_PAD:x.shape[-2] - SSIM_PAD, SSIM_PAD:x.shape[-1] - SSIM_PAD]


# ---------------------------------------------------------------------------------------------- paper mode
def paper_mse(virtual_8bit: np.ndarray, real_8bit: np.ndarray) -> float:
  """The paper's "MSE": mean squared difference of two 8-bit images (grey levels^2, range [0, 65025])."""
  return float(np.mean(np.square(_as_float(virtual_8bit) - _as_float(real_8bit))))


def paper_mae(virtual_8bit: np.ndarray, real_8bit: np.ndarray) -> float:
  """Mean absolute difference of two 8-bit images (grey levels, range [0, 255]); not in the paper's tables."""
  return float(np.mean(np.abs(_as_float(virtual_8bit) - _as_float(real_8bit))))


def paper_psnr(virtual_8bit: np.ndarray, real_8bit: np.ndarray) -> float:
  """PSNR in dB of two 8-bit images, peak 255: `10 log10(255^2 / MSE)`; inf for identical images."""
  return _psnr_from_mse(paper_mse(virtual_8bit, real_8bit), PAPER_PEAK)


def paper_ssim(virtual_8bit: np.ndarray, real_8bit: np.ndarray) -> float:
  """SSIM of two 8-bit (H, W) images as the authors define it (Wang et al. 2004).

  Gaussian window 11 x 11, sigma 1.5; C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2 (data range 255); population
  (co)variances; the mean of the SSIM map over the windows that lie wholly inside the image (the 5-pixel border
  is left out, as scikit-image and the usual `calculate_ssim` transcription do; implementations that zero-pad the
  border give slightly lower values). Range [-1, 1], 1 for identical images.
  """
  ssim_map = _ssim_map(_as_float(virtual_8bit), _as_float(real_8bit), PAPER_PEAK)
  return float(_crop(ssim_map).mean(dtype=np.float64))


def paper_snu(virtual_8bit: np.ndarray, real_8bit: np.ndarray) -> float:
  """The paper's spatial non-uniformity: `|(max - min) / mean (virtual) - (max - min) / mean (real)|`.

  Over the whole 8-bit image (dimensionless, >= 0; 0 when both images have the same relative spread). nan when
  either image has mean 0 (an all-black image).
  """
  def spread(image):
    x = _as_float(image)
    mean = x.mean()
    return (x.max() - x.min()) / mean if mean != 0 else math.nan

  return float(abs(spread(virtual_8bit) - spread(real_8bit)))


def paper_metrics(virtual_hu: np.ndarray, real_hu: np.ndarray, window: hu.Window = hu.Window()) -> dict:
  """Paper mode on one (H, W) slice given in HU: windowed to 8 bits, then PSNR, SSIM, MSE, MAE and SNU."""
  v8, r8 = window_8bit(virtual_hu, window), window_8bit(real_hu, window)
  return {"psnr": paper_psnr(v8, r8), "ssim": paper_ssim(v8, r8), "mse": paper_mse(v8, r8),
          "mae": paper_mae(v8, r8), "snu": paper_snu(v8, r8)}


# ---------------------------------------------------------------------------------------------- HU mode
def _masked(body_mask: np.ndarray | None, shape) -> np.ndarray:
  return np.ones(shape, bool) if body_mask is None else np.asarray(body_mask) > 0


def hu_mse(virtual_hu: np.ndarray, real_hu: np.ndarray, body_mask: np.ndarray | None = None) -> float:
  """Mean squared error in HU^2 inside the body mask, after clipping both to [-1024, 3071]; nan if the mask is
  empty. Any shape (a slice or a volume: the mean pools every voxel of the mask)."""
  mask = _masked(body_mask, np.shape(real_hu))
  if not mask.any():
    return math.nan
  diff = clip_hu(virtual_hu)[mask] - clip_hu(real_hu)[mask]
  return float(np.mean(np.square(diff)))


def mae_hu(virtual_hu: np.ndarray, real_hu: np.ndarray, body_mask: np.ndarray | None = None) -> float:
  """Mean absolute error in HU inside the body mask, after clipping both to [-1024, 3071] (SynthRAD's MAE);
  nan if the mask is empty. Any shape; a volume pools every voxel of the mask."""
  mask = _masked(body_mask, np.shape(real_hu))
  if not mask.any():
    return math.nan
  return float(np.mean(np.abs(clip_hu(virtual_hu)[mask] - clip_hu(real_hu)[mask])))


def hu_psnr(virtual_hu: np.ndarray, real_hu: np.ndarray, body_mask: np.ndarray | None = None,
            data_range: float = HU_DATA_RANGE) -> float:
  """PSNR in dB inside the body mask: `10 log10(data_range^2 / MSE)`, MSE as in `hu_mse`.

  The data range is the stated population range, 4095 HU (SynthRAD's `use_population_range`), not the range of
  the images, so that cases are comparable. inf for identical images, nan for an empty mask.
  """
  return _psnr_from_mse(hu_mse(virtual_hu, real_hu, body_mask), data_range)


def hu_ssim(virtual_hu: np.ndarray, real_hu: np.ndarray, body_mask: np.ndarray | None = None,
            data_range: float = HU_DATA_RANGE) -> float:
  """SSIM inside the body mask, scikit-image conventions, on an (H, W) slice or an (S, H, W) volume.

  Both images are clipped to [-1024, 3071] with -1024 outside the mask (`clip_hu`); each slice's SSIM map is
  computed with `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=4095)`, and the result is the mean of the map over the mask voxels
  that are not within 5 px (the window radius) of the image border. A volume pools the maps of all its slices
  (2-D windows: with slices of several mm, 3-D windows would mix anatomy 5 cm apart). Range [-1, 1]; nan if
  no mask voxel is left.
  """
  mask = _masked(body_mask, np.shape(real_hu))
  virtual, real = clip_hu(virtual_hu, mask), clip_hu(real_hu, mask)
  if virtual.ndim == 2:
    virtual, real, mask = virtual[None], real[None], mask[None]
  total, count = 0.0, 0
  for v, r, m in zip(virtual, real, mask):
    inside = _crop(m)
    if not inside.any():
      continue
    total += float(_crop(_ssim_map(v, r, data_range))[inside].sum(dtype=np.float64))
    count += int(inside.sum())
  return total / count if count else math.nan


def hu_metrics(virtual_hu: np.ndarray, real_hu: np.ndarray, body_mask: np.ndarray | None) -> dict:
  """HU mode on a slice or a volume: MAE (HU), MSE (HU^2), PSNR (dB, range 4095) and SSIM, inside the mask."""
  mse = hu_mse(virtual_hu, real_hu, body_mask)
  return {"mae": mae_hu(virtual_hu, real_hu, body_mask), "mse": mse, "psnr": _psnr_from_mse(mse, HU_DATA_RANGE),
          "ssim": hu_ssim(virtual_hu, real_hu, body_mask)}


# ---------------------------------------------------------------------------------------------- beyond the paper
def organ_enhancement(virtual_hu: np.ndarray, real_hu: np.ndarray, pre_hu: np.ndarray, labels: np.ndarray,
                      organs: dict[str, int] | None = None, window: hu.Window | None = None,
                      min_enhancement_hu: float = 10.0) -> dict[str, dict]:
  """Mean HU per organ of the virtual, real and non-contrast images, and how much of the enhancement was learned.

  Args:
    virtual_hu, real_hu, pre_hu: images of one slice or volume in HU, same shape (the non-contrast image is the
      current slice the model saw).
    labels: organ labels (uint8) of the same shape; the non-contrast labels serve all three, the real image being
      aligned to the non-contrast one.
    organs: name -> label value (default `ORGAN_LABELS`, the phantom's).
    window: if given, the three images are clipped to the window first (`enhancement_ratio` then measures what
      the model can express: an arterial aorta at 320 HU cannot be reached through a W400/L30 window).
    min_enhancement_hu: organs whose real enhancement `|real_mean - pre_mean|` is below this get a nan ratio
      (there is no enhancement to learn; the ratio would divide noise by noise).

  Returns:
    name -> {voxels, pre_mean, real_mean, virtual_mean, error (virtual_mean - real_mean, HU),
    enhancement_ratio = (virtual_mean - pre_mean) / (real_mean - pre_mean)} (1: enhancement learned, 0: none, as
    the identity baseline). Organs absent from `labels` get voxels 0 and nan everywhere else.
  """
  organs = ORGAN_LABELS if organs is None else organs
  images = [np.asarray(x, np.float64) for x in (virtual_hu, real_hu, pre_hu)]
  if window is not None:
    images = [np.clip(x, window.low, window.high) for x in images]
  virtual, real, pre = images
  labels = np.asarray(labels)
  out = {}
  for name, value in organs.items():
    inside = labels == value
    n = int(inside.sum())
    if not n:
      out[name] = {"voxels": 0, "pre_mean": math.nan, "real_mean": math.nan, "virtual_mean": math.nan,
                   "error": math.nan, "enhancement_ratio": math.nan}
      continue
    v, r, p = (float(x[inside].mean()) for x in (virtual, real, pre))
    ratio = (v - p) / (r - p) if abs(r - p) >= min_enhancement_hu else math.nan
    out[name] = {"voxels": n, "pre_mean": p, "real_mean": r, "virtual_mean": v, "error": v - r,
                 "enhancement_ratio": ratio}
  return out


def homogeneous_rois(region_mask: np.ndarray, size: int, count: int = 5) -> list[np.ndarray]:
  """Square ROIs of `size` x `size` px inside a homogeneous region of one slice: the centre plus the periphery.

  The first ROI is centred on the point deepest inside the region (maximum of the distance transform); the others
  on the region's extreme points up, down, left and right (among the centres whose square fits wholly inside the
  region), each kept only if it does not overlap an earlier ROI. This mirrors the phantom practice of CT
  image-quality tests (one centre and four peripheral ROIs) on a patient organ.

  Args:
    region_mask: (H, W) bool, e.g. the liver on one slice.
    size: ROI side in pixels (>= 1).
    count: at most this many ROIs (1 to 5).

  Returns:
    A list of (H, W) bool masks, possibly empty (no square fits) or shorter than `count`.
  """
  region = np.asarray(region_mask) > 0
  size = max(int(size), 1)
  fits = _square_fits(region, size)
  if not fits.any():
    return []
  depth = scipy.ndimage.distance_transform_edt(region)
  rows, cols = np.nonzero(fits)
  offset = (size - 1) // 2  # (rows, cols) are top-left corners; the ROI centres lie `offset` further on
  deepest = int(np.argmax(depth[rows + offset, cols + offset]))
  corners = [(rows[deepest], cols[deepest])]
  to_centre = np.abs(rows - rows[deepest]) + np.abs(cols - cols[deepest])
  for key in (rows, -rows, cols, -cols):  # up, down, left, right; ties: the one nearest the centre ROI
    i = int(np.lexsort((to_centre, key))[0])
    corners.append((rows[i], cols[i]))
  rois, taken = [], np.zeros_like(region)
  for r, c in corners:
    roi = np.zeros_like(region)
    roi[r:r + size, c:c + size] = True
    if (roi & taken).any():
      continue
    rois.append(roi)
    taken |= roi
    if len(rois) == count:
      break
  return rois


def _square_fits(region: np.ndarray, size: int) -> np.ndarray:
  """(H, W) bool: True at (r, c) when the square region[r:r+size, c:c+size] lies wholly inside the region."""
  h, w = region.shape
  fits = np.zeros_like(region)
  if size > h or size > w:
    return fits
  # Summed-area table: the count of region pixels in each size x size square.
  sat = np.pad(np.cumsum(np.cumsum(region.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
  sums = sat[size:, size:] - sat[:-size, size:] - sat[size:, :-size] + sat[:-size, :-size]
  fits[:h - size + 1, :w - size + 1] = sums == size * size
  return fits


def roi_snu(image_hu: np.ndarray, rois: list[np.ndarray]) -> float:
  """ROI-based spatial non-uniformity in HU: the largest minus the smallest of the ROI means.

  The convention of CT image-quality work (a homogeneous object, one centre and several peripheral ROIs, e.g.
  from `homogeneous_rois`): 0 for a perfectly uniform region. nan with fewer than two ROIs.
  """
  if len(rois) < 2:
    return math.nan
  image = np.asarray(image_hu, np.float64)
  means = [float(image[np.asarray(roi, bool)].mean()) for roi in rois]
  return max(means) - min(means)


def through_plane(virtual_hu: np.ndarray, real_hu: np.ndarray, body_mask: np.ndarray,
                  slice_index: np.ndarray | None = None, window: hu.Window | None = None) -> dict:
  """Slice-to-slice flicker of the virtual series compared with the real one.

  For every pair of neighbouring slices (s, s+1) the mean absolute HU difference inside the body (voxels in the
  body on both slices) is computed for the virtual and for the real series, and averaged over pairs weighted by
  their voxel counts.

  Args:
    virtual_hu, real_hu: (S, H, W) volumes in HU, slices in table order.
    body_mask: (S, H, W).
    slice_index: (S,) slice numbers; only pairs whose numbers differ by exactly 1 count (the converter may drop a
      misaligned slice, and slices that are not neighbours differ by more than flicker). None: all pairs.
    window: if given, both series are clipped to it first, so that contrast the model cannot express (above the
      window) does not count as a difference.

  Returns:
    {"virtual": HU, "real": HU, "excess": virtual - real (> 0: the virtual series flickers more than anatomy and
    noise explain), "pairs": number of pairs}; nan values when no pair qualifies.
  """
  virtual, real = np.asarray(virtual_hu, np.float64), np.asarray(real_hu, np.float64)
  if window is not None:
    virtual, real = (np.clip(x, window.low, window.high) for x in (virtual, real))
  mask = np.asarray(body_mask) > 0
  pairs = np.arange(len(mask) - 1)
  if slice_index is not None:
    pairs = pairs[np.diff(np.asarray(slice_index)) == 1]
  both = mask[pairs] & mask[pairs + 1]
  n = int(both.sum())
  if not n:
    return {"virtual": math.nan, "real": math.nan, "excess": math.nan, "pairs": int(len(pairs))}
  dv = float(np.abs(virtual[pairs + 1] - virtual[pairs])[both].mean())
  dr = float(np.abs(real[pairs + 1] - real[pairs])[both].mean())
  return {"virtual": dv, "real": dr, "excess": dv - dr, "pairs": int(len(pairs))}
