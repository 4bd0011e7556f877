"""Image-quality metrics used during training-time validation (in jax.numpy, per image).

  psnr:   on unit-window images ([0, 1] over W400/L30), data range 1.
  ssim:   Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03 (Wang et al. 2004), data range 1, mean over the image.
  mae_hu: mean absolute error in HU inside the body mask. The network can only produce values inside the window,
          so both images are clipped to the window first: this measures what the model is able to express.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(pred: jnp.ndarray, target: jnp.ndarray, data_range: float = 1.0) -> jnp.ndarray:
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


def ssim(pred: jnp.ndarray, target: jnp.ndarray, data_range: float = 1.0, window: int = 11,
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


def mae_hu(pred_hu: jnp.ndarray, target_hu: jnp.ndarray, mask: jnp.ndarray, low: float,
           high: float) -> jnp.ndarray:
  """(B, H, W) -> (B,) masked MAE in HU after clipping both images to [low, high]."""
  err = jnp.abs(jnp.clip(pred_hu, low, high) - jnp.clip(target_hu, low, high)) * mask
  return jnp.sum(err, axis=(1, 2)) / jnp.maximum(jnp.sum(mask, axis=(1, 2)), 1.0)
