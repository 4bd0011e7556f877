"""What the scanner adds to the ideal HU volume: partial volume (finite resolution) and correlated noise."""

import cv2
import numpy as np

PSF_SIGMA_MM = 0.45  # in-plane blur of the reconstruction
SLICE_PROFILE = (0.12, 0.76, 0.12)  # share of the neighbouring slices in a slice (overlapping profiles)
NOISE_SIGMA_MM = 0.7  # correlation length of the noise
NOISE_SD_RANGE = (10.0, 15.0)
HU_RANGE = (-1024, 3071)


def _blur_slices(volume: np.ndarray, sigma_px: float) -> np.ndarray:
  """Gaussian in-plane blur of every slice, in place; returns the kernel for noise normalisation."""
  size = max(3, 2 * int(np.ceil(3 * sigma_px)) + 1)
  kernel = cv2.getGaussianKernel(size, sigma_px).astype(np.float32)
  for k in range(volume.shape[0]):
    cv2.sepFilter2D(volume[k], -1, kernel, kernel, dst=volume[k], borderType=cv2.BORDER_REFLECT)
  return kernel


def partial_volume(hu: np.ndarray, pixel_spacing: float) -> np.ndarray:
  """Blurs sharp label edges in-plane and mixes in a little of the neighbouring slices. float32 in, float32 out."""
  out = np.array(hu, np.float32, copy=True)
  _blur_slices(out, max(PSF_SIGMA_MM / pixel_spacing, 0.35))
  w_side, w_mid, _ = SLICE_PROFILE
  mixed = out * np.float32(w_mid)
  mixed[1:] += np.float32(w_side) * out[:-1]
  mixed[:-1] += np.float32(w_side) * out[1:]
  mixed[0] += np.float32(w_side) * out[0]
  mixed[-1] += np.float32(w_side) * out[-1]
  return mixed


def add_noise(hu: np.ndarray, rng: np.random.Generator, pixel_spacing: float) -> tuple[np.ndarray, float]:
  """Adds spatially correlated Gaussian noise (filtered white noise) with an SD drawn in 10-15 HU.

  Returns:
    The noisy volume (in place) and the noise SD used.
  """
  sd = float(rng.uniform(*NOISE_SD_RANGE))
  noise = rng.standard_normal(hu.shape, dtype=np.float32)
  kernel = _blur_slices(noise, max(NOISE_SIGMA_MM / pixel_spacing, 0.35))
  gain = float(np.sum(kernel.astype(np.float64) ** 2))  # SD of the filtered unit noise (2D separable kernel)
  noise *= np.float32(sd / gain)
  hu += noise
  return hu, sd


def quantise(hu: np.ndarray) -> np.ndarray:
  """Rounds to integer HU in the range a 12-bit CT stores: int16."""
  return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
