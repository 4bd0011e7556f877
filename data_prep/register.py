"""Volume alignment options of the converter beyond the paper's pipeline (issue 12).

The paper's pipeline (`data_prep.align`, the default): the craniocaudal offset of the contrast series is estimated,
each non-contrast slice is paired with the contrast slice nearest to its corrected table position (within half a
slice), and the pair is aligned in-plane by affine ECC; pairs whose rigid shift exceeds 6 px are dropped. Two
options, each chosen by a converter flag and recorded in the manifest's settings:

* ``through_plane='resample'`` (`--through_plane=resample`): instead of the nearest slice, the contrast volume is
  resampled linearly along z onto the corrected non-contrast table positions, so that a sub-slice offset (up to
  half a slice, 2.5 mm at 5 mm slices) no longer leaves a through-plane mismatch.
* ``through_plane='local'`` (`--through_plane=local`): the nearest slice's affine ECC warp is applied (bicubic) to
  it and to the contrast slices within ``local_reach_mm`` of it, each also shifted by ``local_shift_mm`` in the
  four in-plane directions, and each region of the slice takes whichever of these candidates matches the
  non-contrast slice best (per-pixel absolute difference of the HU clipped to ``local_clip_hu``, smoothed by a
  Gaussian of ``local_sigma_mm``; another candidate must beat the nearest slice by ``local_margin_hu``). Breathing
  moves liver, spleen and kidneys along z by up to 10 mm, each organ its own distance: the nearest slice then cuts
  each of them at another level than the non-contrast slice does, and no in-plane or smooth 3-D warp of it shows
  the right cross-section. Picking the level per region does, to within half a slice, without interpolating
  between slices. Each region keeps real pixels of one contrast slice: no blend, no warp beyond the affine one.
* ``deformable='bspline'`` or ``'demons'`` (`--deformable=...`): after the per-slice affine step, a 3-D
  deformable registration (SimpleITK) of the contrast volume onto the non-contrast one inside the body, on volumes
  downsampled in-plane to about ``deformable_size`` pixels, with few iterations; the transform is then applied to
  the full-resolution contrast volume. 'bspline': a B-spline transform (control points every ``grid_mm``) under
  Mattes mutual information; 'demons': fast symmetric-forces demons, its field smoothed by a Gaussian of
  ``grid_mm / 4``. Both see HU clipped to ``clip_hu`` (-200..60 HU), which flattens the enhancement (an enhanced
  aorta and its non-contrast self both look like soft tissue), so that contrast does not drive the warp. This
  undoes the breathing shift of liver, spleen and kidneys (craniocaudal, several mm) and the
  bowel's local motion, which no in-plane rigid or affine transform can. The 6 px exclusion rule then applies to
  the residual: the rigid shift that a second ECC pass still finds between the registered and the non-contrast
  slice.

`align_volume` runs the whole chain on one (non-contrast, contrast) volume pair and can carry other volumes on the
contrast grid along the same transforms (the phantom's organ masks, for `benchmarks/align_bench.py` and the tests).
Conventions as in `data_prep.align`: slice 0 is the most cranial, table positions decrease with the slice index,
and a positive offset means the anatomy is at a higher table position in the contrast series.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import scipy.ndimage

from data_prep import align

THROUGH_PLANE = ("nearest", "resample", "local")
DEFORMABLE = ("none", "bspline", "demons")


@dataclasses.dataclass(frozen=True)
class Options:
  """How a contrast volume is brought onto the non-contrast grid (defaults: the paper's pipeline).

  Attributes:
    through_plane: 'nearest' (the nearest contrast slice within half a slice) or 'resample' (linear along z).
    deformable: 'none', 'bspline' or 'demons' (3-D, after the per-slice affine step).
    ecc_size: the affine ECC runs on the body crop downsampled to about this many pixels.
    deformable_size: the B-spline registration runs on slices downsampled to about this many pixels.
    grid_mm: B-spline control point spacing (mm), in-plane and along z; demons smooth with sigma grid_mm / 4.
    iterations: L-BFGS-B iterations per resolution level of the B-spline registration (demons: 5x as many).
    metric: 'mi' (Mattes mutual information) or 'mse' (mean squares on the clipped HU).
    clip_hu: the HU range the B-spline metric sees; the top at 60 HU flattens the enhancement (an arterial aorta
      at 200 HU and its non-contrast 40 HU both look like soft tissue), so that it cannot pull the transform.
    local_reach_mm: 'local': how far (mm, either side; at least one slice) from the nearest slice a region may take
      its level (breathing moves the liver up to about 10 mm between scans).
    local_sigma_mm: 'local': the Gaussian that smooths each candidate's difference map (the size of a region).
    local_margin_hu: 'local': how much lower (HU, mean absolute difference) another candidate's smoothed difference
      must be than the nearest slice's for a pixel to take it (noise alone must not switch).
    local_shift_mm: 'local': each level is also tried shifted by this much left, right, up and down (0: not), for
      the residual of ECC's one affine warp per slice on organs that moved apart from the body (~0.4 px).
    local_clip_hu: 'local': the HU range the comparison sees. Its top at 0 HU hides every enhancement (non-contrast
      soft tissue is 20-60 HU), so that the choice follows the organs' outlines against fat and air and cannot
      favour a level where an organ looks less enhanced (a top of 60 HU did: arterial kidney cortex kept 0.47 of
      its enhancement against 0.60; benchmarks/RESULTS.md).
  """

  through_plane: str = "nearest"
  deformable: str = "none"
  ecc_size: int = 128
  deformable_size: int = 48
  grid_mm: float = 60.0
  iterations: int = 10
  metric: str = "mi"
  clip_hu: tuple[float, float] = (-200.0, 60.0)
  local_reach_mm: float = 10.0
  local_sigma_mm: float = 5.0
  local_margin_hu: float = 3.0
  local_shift_mm: float = 1.5
  local_clip_hu: tuple[float, float] = (-200.0, 0.0)

  def check(self) -> None:
    if self.through_plane not in THROUGH_PLANE:
      raise ValueError(f"--through_plane must be one of {THROUGH_PLANE}, got {self.through_plane!r}")
    if self.deformable not in DEFORMABLE:
      raise ValueError(f"--deformable must be one of {DEFORMABLE}, got {self.deformable!r}")
    if not self.local_reach_mm > 0 or not self.local_sigma_mm > 0 or self.local_margin_hu < 0:
      raise ValueError(f"local through-plane settings: reach {self.local_reach_mm} mm must be > 0, sigma "
                       f"{self.local_sigma_mm} mm > 0, margin {self.local_margin_hu} HU >= 0")
    if self.metric not in ("mi", "mse"):
      raise ValueError(f"the B-spline metric must be 'mi' or 'mse', got {self.metric!r}")

  @property
  def is_paper(self) -> bool:
    return self.through_plane == "nearest" and self.deformable == "none"


@dataclasses.dataclass
class SlicePair:
  """One non-contrast slice's outcome: its aligned contrast slice, or why it has none."""

  index: int
  post_hu: np.ndarray | None = None  # int16 (H, W) on the non-contrast grid
  misalignment_px: float = float("nan")  # rigid shift the affine step corrected (body centroid), px
  residual_px: float = float("nan")  # with the deformable step: the rigid shift left after it (else nan)
  max_displacement_px: float = float("nan")
  shift_px: tuple[float, float] = (float("nan"), float("nan"))
  ecc_score: float = float("nan")
  excluded: str | None = None  # reason, when the slice has no pair
  has_partner: bool = True  # False: no contrast data at its corrected table position
  levels_changed: float = float("nan")  # through_plane='local': share of body pixels that took another candidate
  # (a neighbouring slice, or a shifted one) than the nearest slice

  @property
  def rule_px(self) -> float:
    """What the exclusion rule tests: the residual with the deformable step, else the corrected shift."""
    return self.misalignment_px if np.isnan(self.residual_px) else self.residual_px


@dataclasses.dataclass
class VolumeAlignment:
  """`align_volume`'s result: one `SlicePair` per non-contrast slice, and the carried volumes, aligned."""

  pairs: list[SlicePair]
  carried: list[np.ndarray]  # float32 (S, H, W) each, on the non-contrast grid (nan-free; 0 where unpaired)
  deformable_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ through-plane
def through_plane_positions(pre_z: np.ndarray, post_z: np.ndarray, offset_mm: float) -> np.ndarray:
  """(S1,) fractional contrast slice index at each corrected non-contrast table position; nan where it lies more
  than half a slice beyond the contrast series (the same slices `align.pair_slices` leaves unpaired)."""
  order = np.argsort(post_z)
  z_sorted, index_sorted = post_z[order], np.arange(len(post_z), dtype=np.float64)[order]
  step = float(np.median(np.abs(np.diff(post_z)))) if len(post_z) > 1 else np.inf
  target = np.asarray(pre_z, np.float64) + offset_mm
  if len(post_z) == 1:
    return np.where(np.abs(target - post_z[0]) <= step / 2 + 1e-6, 0.0, np.nan)
  u = np.interp(target, z_sorted, index_sorted)  # clamps at the ends: the edge slice within half a slice
  outside = (target < z_sorted[0] - step / 2 - 1e-6) | (target > z_sorted[-1] + step / 2 + 1e-6)
  return np.where(outside, np.nan, u)


def resample_slice(volume: np.ndarray, u: float) -> np.ndarray:
  """float32 (H, W): `volume` (S, H, W) linearly interpolated at fractional slice index `u`."""
  lo = int(np.clip(np.floor(u), 0, len(volume) - 1))
  hi = min(lo + 1, len(volume) - 1)
  w = float(u - lo) if hi > lo else 0.0
  out = volume[lo].astype(np.float32) * (1.0 - w)
  if w:
    out += volume[hi].astype(np.float32) * w
  return out


def resample_mask(masks: np.ndarray, u: float) -> np.ndarray:
  """float32 (H, W) in {0, 1}: binary `masks` (S, H, W) at fractional slice index `u` by shape-based
  interpolation (linear interpolation of the signed distance maps), the geometry a linearly resampled image
  shows."""
  lo = int(np.clip(np.floor(u), 0, len(masks) - 1))
  hi = min(lo + 1, len(masks) - 1)
  w = float(u - lo) if hi > lo else 0.0
  a, b = masks[lo] > 0.5, masks[hi] > 0.5
  if w == 0.0 or np.array_equal(a, b):
    return a.astype(np.float32)
  return ((1.0 - w) * _signed_distance(a) + w * _signed_distance(b) < 0).astype(np.float32)


LOCAL_WORK_MM = 1.5  # the 'local' choice is made on images with pixels of at least this size (then upsampled)


def local_levels(pre_hu: np.ndarray, candidates: list[np.ndarray], centre: int, body_mask: np.ndarray,
                 pixel_spacing_mm: float, options: Options) -> np.ndarray:
  """int (H, W): for each pixel, which of `candidates` (contrast slices at neighbouring levels, on the non-contrast
  grid; `centre` the nearest one) matches the non-contrast slice best in its region (`Options.local_*`). Outside
  the body every pixel keeps the nearest slice."""
  lo, hi = options.local_clip_hu
  reference = np.clip(pre_hu.astype(np.float32), lo, hi)
  sigma = options.local_sigma_mm / pixel_spacing_mm
  inside = body_mask > 0
  weight = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), sigma) + 1e-6
  best = np.full(pre_hu.shape, np.inf, np.float32)
  choice = np.full(pre_hu.shape, centre, np.int32)
  for k, c in enumerate(candidates):
    diff = np.abs(np.clip(c.astype(np.float32), lo, hi) - reference) * inside
    cost = cv2.GaussianBlur(diff, (0, 0), sigma) / weight  # the mean difference over the body part of the region
    if k != centre:
      cost += options.local_margin_hu
    better = cost < best
    best[better] = cost[better]
    choice[better] = k
  return np.where(inside, choice, centre)


def _scaled_warp(warp: np.ndarray, fx: float, fy: float) -> np.ndarray:
  """An inverse-map affine warp of full-resolution pixels, for images downsampled by (fx, fy) (pixel centres)."""
  d = np.array([fx, fy])
  half = np.array([0.5, 0.5])
  a = warp[:, :2] / d[:, None] * d[None, :]
  t = (warp[:, :2] @ (d * half - half) + warp[:, 2] + half) / d - half
  return np.concatenate([a, t[:, None]], axis=1)


def local_slice(pre_slice: np.ndarray, post_hu: np.ndarray, levels: list[tuple[int, float, float]], centre: int,
                warp: np.ndarray, body_mask: np.ndarray, pixel_spacing_mm: float, options: Options, fill_hu: int,
                carry: list[np.ndarray] = (), carry_binary: list[bool] = ()
                ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """'local' for one non-contrast slice: the choice among `levels` ((contrast slice, dx, dy) after `warp`) made on
  images of at least `LOCAL_WORK_MM` pixels, then each pixel filled from its candidate warped at full resolution
  (bicubic: a thin enhancing rim keeps more of its contrast than under bilinear). Returns the int16 contrast slice,
  the choice (H, W), and the carried volumes' slices moved the same way (bicubic as the contrast slice; bilinear for
  those flagged in `carry_binary`, masks)."""
  h, w = pre_slice.shape
  factor = max(1.0, LOCAL_WORK_MM / pixel_spacing_mm)
  small = (max(8, round(w / factor)), max(8, round(h / factor)))
  fx, fy = w / small[0], h / small[1]

  def moved(image, k_warp, size, interpolation, border):
    return cv2.warpAffine(image.astype(np.float32), k_warp, size, flags=interpolation | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=float(border))

  def shifted(m, dx, dy):
    m = m.copy()
    m[:, 2] += (dx, dy)  # WARP_INVERSE_MAP: samples the source (dx, dy) px further: the image moves by -(dx, dy)
    return m

  full = warp.astype(np.float64)
  if factor > 1.0:
    low = _scaled_warp(full, fx, fy)
    shrink = lambda image: cv2.resize(image.astype(np.float32), small, interpolation=cv2.INTER_AREA)  # noqa: E731
    sources = {k: shrink(post_hu[k]) for k in {k for k, _, _ in levels}}
    candidates = [moved(sources[k], shifted(low, dx / fx, dy / fy), small, cv2.INTER_LINEAR, fill_hu)
                  for k, dx, dy in levels]
    choice = local_levels(shrink(pre_slice), candidates, centre, shrink(body_mask) > 0.5,
                          pixel_spacing_mm * (fx + fy) / 2, options)
    choice = cv2.resize(choice.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    choice[body_mask == 0] = centre
  else:
    candidates = [moved(post_hu[k], shifted(full, dx, dy), (w, h), cv2.INTER_CUBIC, fill_hu) for k, dx, dy in levels]
    choice = local_levels(pre_slice, candidates, centre, body_mask, pixel_spacing_mm, options)
  out = np.zeros((h, w), np.float32)
  carried = [np.zeros((h, w), np.float32) for _ in carry]
  for c in np.unique(choice):
    k, dx, dy = levels[c]
    m = shifted(full, dx, dy)
    where = choice == c
    image = candidates[c] if factor == 1.0 else moved(post_hu[k], m, (w, h), cv2.INTER_CUBIC, fill_hu)
    out[where] = image[where]
    for volume, dst, binary in zip(carry, carried, carry_binary or [True] * len(carry)):
      dst[where] = moved(volume[k], m, (w, h), cv2.INTER_LINEAR if binary else cv2.INTER_CUBIC, 0.0)[where]
  return np.clip(np.rint(out), -32768, 32767).astype(np.int16), choice, carried


def _signed_distance(mask: np.ndarray) -> np.ndarray:
  if not mask.any():
    return np.full(mask.shape, 1e6, np.float32)
  if mask.all():
    return np.full(mask.shape, -1e6, np.float32)
  inside = scipy.ndimage.distance_transform_edt(mask)
  outside = scipy.ndimage.distance_transform_edt(~mask)
  return (outside - inside).astype(np.float32)


# ------------------------------------------------------------------------------------------------ deformable
def _small_volume(volume: np.ndarray, factor: float, size: tuple[int, int]) -> np.ndarray:
  if factor <= 1.0:
    return volume.astype(np.float32)
  return np.stack([cv2.resize(s.astype(np.float32), size, interpolation=cv2.INTER_AREA) for s in volume])


def bspline_transform(pre_hu: np.ndarray, post_hu: np.ndarray, body_mask: np.ndarray, pixel_spacing_mm: float,
                      slice_spacing_mm: float, options: Options = Options(), seed: int = 0):
  """3-D B-spline transform (SimpleITK) taking non-contrast points to contrast points, in a physical frame where
  voxel (column, row, slice) sits at (column * px, row * px, slice * dz) mm.

  Args:
    pre_hu: (S, H, W) non-contrast volume (the fixed image); ``post_hu`` the contrast volume already on its grid
      (paired along z and affinely aligned in-plane).
    body_mask: (S, H, W) the non-contrast body mask (the metric's region).
    pixel_spacing_mm, slice_spacing_mm: the voxel size.
    options: `deformable_size`, `grid_mm`, `iterations`.
    seed: of the metric's sampling (the result is deterministic for a given seed).
  """
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel

  s, h, w = pre_hu.shape
  factor = max(1.0, max(h, w) / options.deformable_size)
  small = (max(8, round(w / factor)), max(8, round(h / factor)))
  fx = w / small[0]
  lo, hi = options.clip_hu

  def image(volume, clip=True):
    v = _small_volume(np.clip(volume, lo, hi) if clip else volume, factor, small)
    img = sitk.GetImageFromArray(np.ascontiguousarray(v, np.float32))
    img.SetSpacing((fx * pixel_spacing_mm, h / small[1] * pixel_spacing_mm, slice_spacing_mm))
    # Area-averaged pixel i covers full pixels [i f, (i + 1) f): its centre is at (i + 0.5) f - 0.5.
    img.SetOrigin(((0.5 * fx - 0.5) * pixel_spacing_mm, (0.5 * h / small[1] - 0.5) * pixel_spacing_mm, 0.0))
    return img

  fixed, moving = image(pre_hu), image(post_hu)
  mask = sitk.Cast(image(body_mask.astype(np.float32), clip=False) > 0.5, sitk.sitkUInt8)
  extent = np.array([w * pixel_spacing_mm, h * pixel_spacing_mm, max(s - 1, 1) * slice_spacing_mm])
  mesh = [int(max(1, round(e / options.grid_mm))) for e in extent]
  transform = sitk.BSplineTransformInitializer(fixed, mesh)
  reg = sitk.ImageRegistrationMethod()
  if options.metric == "mi":
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
  else:
    reg.SetMetricAsMeanSquares()
  reg.SetMetricSamplingStrategy(reg.REGULAR)
  reg.SetMetricSamplingPercentage(0.5, seed)
  reg.SetNumberOfThreads(1)  # the metric's per-thread sums make multithreaded results differ from run to run
  reg.SetMetricFixedMask(mask)
  reg.SetInterpolator(sitk.sitkLinear)
  reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(options.iterations),
                           maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * options.iterations)
  reg.SetShrinkFactorsPerLevel([2, 1])
  reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
  reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
  reg.SetInitialTransform(transform, inPlace=True)
  reg.Execute(fixed, moving)
  return transform


def demons_transform(pre_hu: np.ndarray, post_hu: np.ndarray, body_mask: np.ndarray, pixel_spacing_mm: float,
                     slice_spacing_mm: float, options: Options = Options()):
  """3-D demons registration (SimpleITK fast symmetric forces) as a displacement-field transform, in the frame of
  `bspline_transform`. Demons compares intensities directly, so both volumes are clipped to `options.clip_hu`,
  whose top (60 HU) flattens the enhancement; outside the body both are set to the bottom of the range. The field
  is smoothed by a Gaussian of `options.grid_mm / 4` mm (its regularisation)."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel

  s, h, w = pre_hu.shape
  factor = max(1.0, max(h, w) / options.deformable_size)
  small = (max(8, round(w / factor)), max(8, round(h / factor)))
  fx, fy = w / small[0], h / small[1]
  lo, hi = options.clip_hu

  def image(volume):
    v = _small_volume(np.where(body_mask > 0, np.clip(volume, lo, hi), lo), factor, small)
    img = sitk.GetImageFromArray(np.ascontiguousarray(v, np.float32))
    img.SetSpacing((fx * pixel_spacing_mm, fy * pixel_spacing_mm, slice_spacing_mm))
    img.SetOrigin(((0.5 * fx - 0.5) * pixel_spacing_mm, (0.5 * fy - 0.5) * pixel_spacing_mm, 0.0))
    return img

  fixed, moving = image(pre_hu), image(post_hu)
  demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
  demons.SetNumberOfIterations(int(options.iterations) * 5)
  demons.SetSmoothDisplacementField(True)
  sigma_px = options.grid_mm / 4.0 / np.array([fx * pixel_spacing_mm, fy * pixel_spacing_mm, slice_spacing_mm])
  demons.SetStandardDeviations([float(x) for x in sigma_px])
  demons.SetUseImageSpacing(False)
  field = demons.Execute(fixed, moving)
  return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def apply_transform(transform, volume: np.ndarray, pixel_spacing_mm: float, slice_spacing_mm: float,
                    fill: float, nearest: bool = False) -> np.ndarray:
  """float32 (S, H, W): ``volume`` (on the non-contrast grid, moving image) resampled through ``transform``."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel

  img = sitk.GetImageFromArray(np.ascontiguousarray(volume, np.float32))
  img.SetSpacing((pixel_spacing_mm, pixel_spacing_mm, slice_spacing_mm))
  out = sitk.Resample(img, img, transform, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, float(fill),
                      sitk.sitkFloat32)
  return sitk.GetArrayFromImage(out)


def displacement_mm(transform, shape: tuple[int, int, int], pixel_spacing_mm: float, slice_spacing_mm: float,
                    step: int = 8) -> np.ndarray:
  """(S, H // step, W // step, 3) the transform's displacement (x, y, z) in mm on a coarse grid of voxel centres."""
  s, h, w = shape
  out = np.zeros((s, len(range(0, h, step)), len(range(0, w, step)), 3), np.float32)
  for k in range(s):
    for a, r in enumerate(range(0, h, step)):
      for b, c in enumerate(range(0, w, step)):
        p = (c * pixel_spacing_mm, r * pixel_spacing_mm, k * slice_spacing_mm)
        out[k, a, b] = np.subtract(transform.TransformPoint(p), p)
  return out


# ------------------------------------------------------------------------------------------------ the chain
def align_volume(pre_hu: np.ndarray, pre_z: np.ndarray, post_hu: np.ndarray, post_z: np.ndarray,
                 body_masks: list[np.ndarray], offset_mm: float, pixel_spacing_mm: float,
                 options: Options = Options(), carry: list[np.ndarray] = (),
                 fill_hu: int = -1024, carry_images: list[np.ndarray] = ()) -> VolumeAlignment:
  """Brings a contrast volume onto the non-contrast grid with the chosen options (module docstring).

  Args:
    pre_hu: int16 (S1, H, W) non-contrast volume; ``pre_z`` its table positions (decreasing).
    post_hu: int16 (S2, H, W) contrast volume on the same in-plane grid; ``post_z`` its table positions.
    body_masks: uint8 (H, W) non-contrast body mask per slice (ECC's and the B-spline metric's region).
    offset_mm: the through-plane offset (`align.estimate_z_offset`).
    pixel_spacing_mm: in-plane spacing (the B-spline grid and the physical frame).
    options: the alignment options.
    carry: volumes (S2, H, W) on the contrast grid to move with the same transforms (binary masks: shape-based
      through-plane interpolation, linear elsewhere).
    fill_hu: HU of contrast pixels that come from outside the contrast image.
    carry_images: further volumes (S2, H, W) to move the same way, interpolated as the contrast slices are (e.g. the
      phantom's noise-free HU; linear, bicubic in-plane with 'local'); returned after `carry`'s in
      `VolumeAlignment.carried`.

  Returns:
    The per-slice pairs (excluded ones with their reason, the exclusion rule not yet applied) and the carried
    volumes.
  """
  import time  # pylint: disable=import-outside-toplevel

  options.check()
  n = len(pre_hu)
  binary = [True] * len(carry) + [False] * len(carry_images)
  carry = list(carry) + list(carry_images)
  if options.through_plane in ("nearest", "local"):
    nearest = align.pair_slices(pre_z, post_z, offset_mm)
    u = np.array([np.nan if j is None else float(j) for j in nearest])
  else:
    u = through_plane_positions(pre_z, post_z, offset_mm)
  post_dz = float(np.median(np.abs(np.diff(post_z)))) if len(post_z) > 1 else np.inf
  pairs = [SlicePair(i) for i in range(n)]
  stacked = np.full(pre_hu.shape, fill_hu, np.float32)
  carried = [np.zeros(pre_hu.shape, np.float32) for _ in carry]
  for i in range(n):
    if np.isnan(u[i]):
      pairs[i].excluded = "no contrast slice within half a slice of the corrected table position"
      pairs[i].has_partner = False
      continue
    slice_hu = resample_slice(post_hu, u[i])
    try:
      result = align.align_slice(pre_hu[i], np.rint(slice_hu).astype(np.int16), body_masks[i],
                                 ecc_size=options.ecc_size, fill_hu=fill_hu)
    except align.AlignmentFailed as e:
      pairs[i].excluded = str(e)
      continue
    p = pairs[i]
    p.post_hu, p.misalignment_px, p.max_displacement_px = result.post_hu, result.misalignment_px, \
        result.max_displacement_px
    p.shift_px, p.ecc_score = result.shift_px, result.ecc_score
    if options.through_plane == "local":
      j = int(u[i])
      reach = max(1, int(round(options.local_reach_mm / post_dz)))
      step = options.local_shift_mm / pixel_spacing_mm  # px; ECC's one affine warp leaves ~0.4 px on small organs
      shifts = [(0.0, 0.0)] + ([(step, 0.0), (-step, 0.0), (0.0, step), (0.0, -step)] if step > 0 else [])
      levels = [(k, dx, dy) for k in range(j - reach, j + reach + 1) if 0 <= k < len(post_hu) for dx, dy in shifts]
      centre = levels.index((j, 0.0, 0.0))
      p.post_hu, choice, moved = local_slice(pre_hu[i], post_hu, levels, centre, result.warp, body_masks[i],
                                             pixel_spacing_mm, options, fill_hu, carry, binary)
      p.levels_changed = float(np.mean(choice[body_masks[i] > 0] != centre)) if body_masks[i].any() else 0.0
      stacked[i] = p.post_hu
      for out, m in zip(carried, moved):
        out[i] = m
      continue
    stacked[i] = p.post_hu
    h, w = pre_hu.shape[1:]
    for volume, out, mask in zip(carry, carried, binary):
      moved = (resample_mask(volume, u[i]) if options.through_plane == "resample" and mask
               else resample_slice(volume, u[i]))
      out[i] = cv2.warpAffine(moved, result.warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
  seconds = 0.0
  paired = [p.index for p in pairs if p.excluded is None]
  if options.deformable != "none" and len(paired) >= 2:
    t0 = time.perf_counter()
    dz = float(np.median(np.abs(np.diff(pre_z)))) if len(pre_z) > 1 else 1.0
    # Unpaired slices (edges) take their nearest paired neighbour, so that they do not pull the transform.
    fill_from = np.array([paired[int(np.argmin(np.abs(np.array(paired) - i)))] for i in range(n)])
    moving = stacked[fill_from]
    make = bspline_transform if options.deformable == "bspline" else demons_transform
    transform = make(pre_hu, moving, np.stack(body_masks), pixel_spacing_mm, dz, options)
    registered = apply_transform(transform, moving, pixel_spacing_mm, dz, fill_hu)
    for k, out in enumerate(carried):
      carried[k] = apply_transform(transform, out[fill_from], pixel_spacing_mm, dz, 0.0)
    for i in paired:
      p = pairs[i]
      p.post_hu = np.clip(np.rint(registered[i]), -32768, 32767).astype(np.int16)
      try:
        check = align.align_slice(pre_hu[i], p.post_hu, body_masks[i], ecc_size=options.ecc_size, fill_hu=fill_hu)
        p.residual_px = check.misalignment_px
      except align.AlignmentFailed:
        p.residual_px = float("inf")
    seconds = time.perf_counter() - t0
  return VolumeAlignment(pairs=pairs, carried=carried, deformable_seconds=seconds)
