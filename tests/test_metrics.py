"""Evaluation metrics against scikit-image, the authors' formulas and hand-computed cases; the jnp batch metrics."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import skimage.metrics as skm

from vcect_jax import hu
from vcect_jax import metrics

TOL = 1e-4


# ------------------------------------------------------------------------------------------------ test images
def _ct_like_pair(size=64, seed=0):
  """A CT-like (real, virtual, body_mask) slice triple in HU: air, fat, soft tissue, an enhancing aorta, bone."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
  body = (xx / 0.85) ** 2 + (yy / 0.65) ** 2 < 1
  real = np.full((size, size), -1000.0)
  real[body] = -100.0                                           # fat
  real[(xx / 0.7) ** 2 + (yy / 0.5) ** 2 < 1] = 45.0            # soft tissue
  real[(xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.3 ** 2] = 105.0    # liver
  real[(xx + 0.05) ** 2 + (yy - 0.2) ** 2 < 0.08 ** 2] = 320.0  # arterial aorta (above the window)
  real[(xx + 0.05) ** 2 + (yy - 0.4) ** 2 < 0.1 ** 2] = 700.0   # vertebra
  noise = scipy.ndimage.gaussian_filter(rng.normal(size=(size, size)), 1.0) * 30.0
  real = real + noise * body
  virtual = real + scipy.ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0) * 60.0 * body
  return real.astype(np.float64), virtual.astype(np.float64), body.astype(np.uint8)


def _random_8bit_pair(seed=0, shape=(48, 56)):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, shape).astype(np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
  return a, b


def _skimage_ssim(a, b, data_range, full=False):
  return skm.structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), data_range=data_range,
                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=full)


# ------------------------------------------------------------------------------------------------ paper mode
def _paper_pairs():
  real, virtual, _ = _ct_like_pair()
  window = hu.Window()
  return [_random_8bit_pair(0), _random_8bit_pair(1, (32, 32)),
          (metrics.window_8bit(virtual, window), metrics.window_8bit(real, window))]


@pytest.mark.parametrize("pair", range(3), ids=["random", "random_small", "ct_like"])
def test_paper_mode_agrees_with_skimage(pair):
  v8, r8 = _paper_pairs()[pair]
  assert abs(metrics.paper_psnr(v8, r8) - skm.peak_signal_noise_ratio(r8, v8, data_range=255)) < TOL
  assert abs(metrics.paper_ssim(v8, r8) - _skimage_ssim(v8, r8, 255)) < TOL
  assert abs(metrics.paper_mse(v8, r8) - skm.mean_squared_error(r8, v8)) < TOL


def _authors_psnr(img1, img2):
  """The authors' formula written out: PSNR with peak 255 on 8-bit images."""
  mse = np.mean((img1.astype(np.float64) - img2.astype(np.float64)) ** 2)
  if mse == 0:
    return float("inf")
  return 20 * math.log10(255.0 / math.sqrt(mse))


def _authors_ssim(img1, img2):
  """The authors' SSIM written out: Gaussian 11 x 11 / sigma 1.5, C1 = (0.01*255)^2, C2 = (0.03*255)^2, mean
  over the valid windows."""
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  x = np.arange(11) - 5
  g = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
  g /= g.sum()
  window = np.outer(g, g)
  img1, img2 = img1.astype(np.float64), img2.astype(np.float64)
  f = lambda im: scipy.signal.convolve2d(im, window, mode="valid")  # noqa: E731
  mu1, mu2 = f(img1), f(img2)
  s1, s2, s12 = f(img1 ** 2) - mu1 ** 2, f(img2 ** 2) - mu2 ** 2, f(img1 * img2) - mu1 * mu2
  ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
  return ssim_map.mean()


def _authors_snu(virtual, real):
  virtual, real = virtual.astype(np.float64), real.astype(np.float64)
  return abs((virtual.max() - virtual.min()) / virtual.mean() - (real.max() - real.min()) / real.mean())


@pytest.mark.parametrize("pair", range(3), ids=["random", "random_small", "ct_like"])
def test_paper_mode_agrees_with_the_authors_formulas(pair):
  v8, r8 = _paper_pairs()[pair]
  assert abs(metrics.paper_psnr(v8, r8) - _authors_psnr(v8, r8)) < 1e-9
  assert abs(metrics.paper_ssim(v8, r8) - _authors_ssim(v8, r8)) < 1e-9
  assert abs(metrics.paper_snu(v8, r8) - _authors_snu(v8, r8)) < 1e-12
  assert metrics.paper_mse(v8, r8) == pytest.approx(np.mean((v8.astype(float) - r8) ** 2), abs=1e-9)


def test_window_8bit_maps_the_window_to_0_255():
  window = hu.Window(level=30, width=400)  # -170 .. 230 HU
  np.testing.assert_array_equal(metrics.window_8bit(np.array([-1000, -170, 30, 230, 3000]), window),
                                [0, 0, 128, 255, 255])  # 127.5 rounds to even: 128


def test_paper_metrics_of_one_hu_slice():
  real, virtual, _ = _ct_like_pair()
  m = metrics.paper_metrics(virtual, real)
  v8, r8 = metrics.window_8bit(virtual), metrics.window_8bit(real)
  assert m["psnr"] == metrics.paper_psnr(v8, r8)
  assert set(m) == {"psnr", "ssim", "mse", "mae", "snu"}


def test_paper_snu_by_hand():
  real = np.array([[10, 30], [30, 30]], np.uint8)        # (30 - 10) / 25 = 0.8
  virtual = np.array([[20, 20], [20, 40]], np.uint8)     # (40 - 20) / 25 = 0.8
  assert metrics.paper_snu(virtual, real) == pytest.approx(0.0)
  virtual = np.array([[0, 50], [50, 100]], np.uint8)     # 100 / 50 = 2.0
  assert metrics.paper_snu(virtual, real) == pytest.approx(1.2)
  assert math.isnan(metrics.paper_snu(np.zeros((2, 2), np.uint8), real))


# ------------------------------------------------------------------------------------------------ HU mode
def _hu_pairs():
  rng = np.random.default_rng(3)
  real_r = rng.uniform(-1500, 3500, (40, 40))
  virtual_r = real_r + rng.normal(0, 200, (40, 40))
  mask_r = np.zeros((40, 40), np.uint8)
  mask_r[6:34, 4:36] = 1
  real, virtual, body = _ct_like_pair(seed=1)
  return [(virtual_r, real_r, mask_r), (virtual, real, body)]


@pytest.mark.parametrize("pair", range(2), ids=["random", "ct_like"])
def test_hu_mode_agrees_with_skimage(pair):
  virtual, real, mask = _hu_pairs()[pair]
  inside = mask > 0
  v, r = np.clip(virtual, -1024, 3071), np.clip(real, -1024, 3071)
  assert abs(metrics.hu_psnr(virtual, real, mask)
             - skm.peak_signal_noise_ratio(r[inside], v[inside], data_range=4095)) < TOL
  assert abs(metrics.hu_mse(virtual, real, mask) - skm.mean_squared_error(r[inside], v[inside])) < TOL
  # Whole image (no mask): skimage's own mean SSIM of the clipped images.
  assert abs(metrics.hu_ssim(virtual, real) - _skimage_ssim(v, r, 4095)) < TOL
  # Inside the mask: skimage's SSIM map of the masked images (-1024 outside), averaged over the cropped mask.
  vm, rm = np.where(inside, v, -1024), np.where(inside, r, -1024)
  _, ssim_map = _skimage_ssim(vm, rm, 4095, full=True)
  expected = ssim_map[5:-5, 5:-5][inside[5:-5, 5:-5]].mean()
  assert abs(metrics.hu_ssim(virtual, real, mask) - expected) < TOL
  assert metrics.hu_ssim(virtual, real, mask) < 1.0


def test_hu_mode_volume_pools_voxels():
  virtual, real, mask = _hu_pairs()[1]
  vol_v, vol_r = np.stack([virtual, real, virtual + 5]), np.stack([real, real, real])
  vol_m = np.stack([mask, np.zeros_like(mask), mask])
  m = metrics.hu_metrics(vol_v, vol_r, vol_m)
  inside = vol_m > 0
  assert m["mae"] == pytest.approx(np.mean(np.abs(np.clip(vol_v, -1024, 3071) - vol_r)[inside]))
  per_slice = [metrics.hu_ssim(vol_v[s], vol_r[s], vol_m[s]) for s in (0, 2)]
  assert m["ssim"] == pytest.approx(np.mean(per_slice))  # equal mask sizes: pooling = mean of the two slices
  assert m["psnr"] == pytest.approx(10 * np.log10(4095 ** 2 / m["mse"]))


def test_mae_hu_by_hand():
  real = np.array([[0.0, 100.0], [-2000.0, 50.0]])
  virtual = np.array([[10.0, 80.0], [-1024.0, 5000.0]])
  mask = np.array([[1, 1], [1, 0]])
  # |10 - 0| + |80 - 100| + |-1024 - (-1024)| (clipped) over 3 voxels; the unmasked 5000 does not count.
  assert metrics.mae_hu(virtual, real, mask) == pytest.approx(10.0)
  assert metrics.mae_hu(virtual, real) == pytest.approx((10 + 20 + 0 + 3021) / 4)


def test_identical_images_and_empty_masks():
  real, _, body = _ct_like_pair()
  assert metrics.hu_psnr(real, real, body) == math.inf
  assert metrics.paper_psnr(metrics.window_8bit(real), metrics.window_8bit(real)) == math.inf
  assert metrics.hu_ssim(real, real, body) == pytest.approx(1.0)
  assert metrics.paper_ssim(metrics.window_8bit(real), metrics.window_8bit(real)) == pytest.approx(1.0)
  empty = np.zeros_like(body)
  m = metrics.hu_metrics(real + 1, real, empty)
  assert all(math.isnan(m[k]) for k in ("mae", "mse", "psnr", "ssim"))
  organs = metrics.organ_enhancement(real, real, real, np.zeros(real.shape, np.uint8))
  assert organs["liver"]["voxels"] == 0 and math.isnan(organs["liver"]["enhancement_ratio"])
  tp = metrics.through_plane(np.stack([real, real]), np.stack([real, real]), np.zeros((2,) + real.shape))
  assert math.isnan(tp["excess"])


# ------------------------------------------------------------------------------------------------ beyond the paper
def test_organ_labels_match_the_phantom():
  from data_prep.phantom.anatomy import LABEL_IDS
  for name, value in metrics.ORGAN_LABELS.items():
    assert LABEL_IDS[name] == value, name


def test_organ_enhancement_by_hand():
  labels = np.array([[7, 7, 11, 11], [0, 0, 11, 11]], np.uint8)   # aorta: 2 px, liver: 4 px
  pre = np.array([[40, 40, 60, 60], [0, 0, 60, 60]], float)
  real = np.array([[300, 340, 100, 110], [0, 0, 90, 100]], float)  # aorta 320 (+280), liver 100 (+40)
  virtual = np.array([[180, 180, 80, 80], [0, 0, 80, 80]], float)  # aorta 180 (+140), liver 80 (+20)
  out = metrics.organ_enhancement(virtual, real, pre, labels)
  assert out["aorta"] == pytest.approx({"voxels": 2, "pre_mean": 40.0, "real_mean": 320.0, "virtual_mean": 180.0,
                                        "error": -140.0, "enhancement_ratio": 0.5})
  assert out["liver"]["enhancement_ratio"] == pytest.approx(0.5)
  # Clipped to W400/L30 (high 230): the aorta's reachable enhancement is 230 - 40 = 190.
  windowed = metrics.organ_enhancement(virtual, real, pre, labels, window=hu.Window())
  assert windowed["aorta"]["enhancement_ratio"] == pytest.approx(140 / 190)
  # No enhancement to learn (real = pre): nan, not a division by ~0.
  assert math.isnan(metrics.organ_enhancement(virtual, pre, pre, labels)["liver"]["enhancement_ratio"])
  # The identity baseline learns nothing.
  assert metrics.organ_enhancement(pre, real, pre, labels)["aorta"]["enhancement_ratio"] == 0.0


def test_homogeneous_rois_centre_and_periphery():
  region = np.zeros((40, 40), bool)
  region[5:30, 8:35] = True
  rois = metrics.homogeneous_rois(region, size=5)
  assert len(rois) == 5
  assert all(r.sum() == 25 and not (r & ~region).any() for r in rois)
  assert sum(r.astype(int) for r in rois).max() == 1                 # no overlap
  centre = np.argwhere(rois[0]).mean(0)
  assert np.allclose(centre, [17, 21], atol=1)                       # the deepest point of the rectangle
  extremes = [np.argwhere(r).mean(0) for r in rois[1:]]
  assert extremes[0][0] == 7 and extremes[1][0] == 27                # top and bottom rows of the region
  assert extremes[2][1] == 10 and extremes[3][1] == 32               # left and right columns
  assert metrics.homogeneous_rois(region, size=30) == []
  assert len(metrics.homogeneous_rois(region, size=5, count=3)) == 3


def test_roi_snu_by_hand():
  image = np.zeros((10, 10))
  image[:5] = 50.0
  image[0, 0] = 70.0
  a = np.zeros((10, 10), bool)
  a[0:2, 0:2] = True      # mean (70 + 3 * 50) / 4 = 55
  b = np.zeros((10, 10), bool)
  b[6:8, 6:8] = True      # mean 0
  c = np.zeros((10, 10), bool)
  c[2:4, 4:6] = True      # mean 50
  assert metrics.roi_snu(image, [a, b, c]) == pytest.approx(55.0)
  assert math.isnan(metrics.roi_snu(image, [a]))


def test_through_plane_by_hand():
  mask = np.ones((3, 2, 2))
  real = np.stack([np.full((2, 2), 40.0), np.full((2, 2), 50.0), np.full((2, 2), 40.0)])  # steps of 10
  virtual = np.stack([np.full((2, 2), 40.0), np.full((2, 2), 70.0), np.full((2, 2), 40.0)])  # steps of 30
  out = metrics.through_plane(virtual, real, mask)
  assert out == pytest.approx({"virtual": 30.0, "real": 10.0, "excess": 20.0, "pairs": 2})
  # Slices 0 and 2 of the series are not neighbours (slice 1 was dropped): only one pair counts.
  out = metrics.through_plane(virtual, real, mask, slice_index=np.array([3, 4, 6]))
  assert out["pairs"] == 1 and out["excess"] == pytest.approx(20.0)
  # Voxels outside the body on either slice do not count.
  mask[1, 0, 0] = 0
  virtual[1, 0, 0] = 1000.0
  assert metrics.through_plane(virtual, real, mask)["virtual"] == pytest.approx(30.0)
  # Clipped to the window, contrast above it is no flicker.
  virtual[1] = 500.0
  real[1] = 500.0
  assert metrics.through_plane(virtual, real, np.ones((3, 2, 2)), window=hu.Window())["excess"] == 0.0


# ------------------------------------------------------------------------------------------------ jnp batch metrics
def test_batch_psnr_and_ssim_agree_with_skimage():
  """The training-time jnp metrics on unit-window images: batch_ssim averages the 'valid' windows, which is the
  region scikit-image averages too, so the full images compare directly (float32: 1e-4)."""
  pairs = [_ct_like_pair(seed=s) for s in (0, 1)]
  real = np.stack([hu.hu_to_unit(r) for r, _, _ in pairs]).astype(np.float32)
  virtual = np.stack([hu.hu_to_unit(v) for _, v, _ in pairs]).astype(np.float32)
  psnr = np.asarray(metrics.batch_psnr(jnp.asarray(virtual), jnp.asarray(real)))
  ssim = np.asarray(metrics.batch_ssim(jnp.asarray(virtual), jnp.asarray(real)))
  for i in range(2):
    assert abs(psnr[i] - skm.peak_signal_noise_ratio(real[i], virtual[i], data_range=1.0)) < TOL
    assert abs(ssim[i] - _skimage_ssim(virtual[i], real[i], 1.0)) < TOL
  mask = np.stack([b for _, _, b in pairs]).astype(np.float32)
  hu_real = np.stack([r for r, _, _ in pairs]).astype(np.float32)
  hu_virtual = np.stack([v for _, v, _ in pairs]).astype(np.float32)
  mae = np.asarray(metrics.batch_mae_hu(hu_virtual, hu_real, mask, -170.0, 230.0))
  expected = metrics.mae_hu(np.clip(hu_virtual[0], -170, 230), np.clip(hu_real[0], -170, 230), mask[0])
  assert abs(mae[0] - expected) < 1e-3
