"""The converter's registration options (data_prep/register.py): a known deformation of a tiny phantom is undone."""

import numpy as np
import pytest
import scipy.ndimage

from data_prep import align
from data_prep import register
from data_prep.phantom import anatomy
from data_prep.phantom import cases

SIZE, SLICES, SPACING, THICKNESS = 96, 10, 4.0, 5.0
ORGANS = ("liver", "spleen", "kidney_cortex", "aorta")


@pytest.fixture(scope="module")
def deformed():
  """A tiny phantom's non-contrast volume and labels, and the same warped by a known smooth in-plane field that
  varies along z (no affine map per slice undoes it): moving(p) = fixed(p + d(p))."""
  case = cases.synthesize_case(0, 5, SIZE, SLICES, THICKNESS, SPACING)
  pre, labels = case.hu["non_contrast"], case.labels["non_contrast"]
  k, r, c = np.meshgrid(np.arange(SLICES), np.arange(SIZE), np.arange(SIZE), indexing="ij")
  # Displacement in pixels: up to 10 mm, half a body wide, changing sign across the body and along z.
  dx = 2.5 * np.sin(4 * np.pi * r / SIZE) * np.cos(np.pi * k / (SLICES - 1))
  dy = 2.0 * np.sin(4 * np.pi * c / SIZE) * np.cos(np.pi * k / (SLICES - 1))
  coords = np.stack([k, r + dy, c + dx]).astype(np.float64)
  moving = scipy.ndimage.map_coordinates(pre.astype(np.float32), coords, order=1, mode="nearest")
  moving_labels = scipy.ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
  return {"case": case, "pre": pre, "labels": labels, "moving": np.rint(moving).astype(np.int16),
          "moving_labels": moving_labels, "d_px": np.stack([dx, dy], -1)}


def _dice(a, b):
  return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _mean_dice(warped_masks, labels):
  return np.mean([_dice(w > 0.5, labels == anatomy.LABEL_IDS[o]) for w, o in zip(warped_masks, ORGANS)])


# Demons with a finer field (sigma 7.5 mm) than the converter's default, for this deformation's 19 cm wavelength on a
# 96 px volume; the B-spline at its defaults (10 iterations) recovers less of it, but still some.
@pytest.mark.parametrize("method, grid_mm, dice_gain, error_ratio",
                         [("demons", 30.0, 0.04, 0.75)])  # B-spline: see benchmarks/align_bench.py (its Dice gain
                         # here is within its run-to-run spread, so it is measured there, not asserted)
def test_deformable_recovers_known_deformation(deformed, method, grid_mm, dice_gain, error_ratio):
  pre, moving = deformed["pre"], deformed["moving"]
  z = deformed["case"].slice_z["non_contrast"]
  masks = [align.body_mask(s) for s in pre]
  carry = [(deformed["moving_labels"] == anatomy.LABEL_IDS[o]).astype(np.float32) for o in ORGANS]
  paper = register.align_volume(pre, z, moving, z, masks, 0.0, SPACING, register.Options(), carry=carry)
  options = register.Options(deformable=method, grid_mm=grid_mm)
  deformable = register.align_volume(pre, z, moving, z, masks, 0.0, SPACING, options, carry=carry)
  before = _mean_dice(carry, deformed["labels"])
  after_paper = _mean_dice(paper.carried, deformed["labels"])
  after = _mean_dice(deformable.carried, deformed["labels"])
  assert after > max(before, after_paper) + dice_gain, (before, after_paper, after)
  assert all(p.excluded is None and p.residual_px < 1.0 for p in deformable.pairs)

  # The transform alone (no affine step first): its displacement approximates -d inside the body.
  make = register.bspline_transform if method == "bspline" else register.demons_transform
  transform = make(pre, moving, np.stack(masks), SPACING, THICKNESS, options)
  step = 8
  found = register.displacement_mm(transform, pre.shape, SPACING, THICKNESS, step=step)[..., :2]
  truth = -deformed["d_px"][:, ::step, ::step] * SPACING
  body = np.stack(masks)[:, ::step, ::step] > 0
  error_before = np.linalg.norm(truth, axis=-1)[body].mean()
  error_after = np.linalg.norm(found - truth, axis=-1)[body].mean()
  assert error_after < error_ratio * error_before, (error_before, error_after)


def test_through_plane_resampling_positions():
  pre_z = np.array([10.0, 5.0, 0.0, -5.0])
  post_z = np.array([12.0, 7.0, 2.0, -3.0])
  u = register.through_plane_positions(pre_z, post_z, 1.0)  # targets 11, 6, 1, -4
  np.testing.assert_allclose(u, [0.2, 1.2, 2.2, 3.0])  # the last one clamps: within half a slice of -3
  assert np.isnan(register.through_plane_positions(pre_z, post_z, 10.0)[0])  # 20 mm: beyond the series
  volume = np.stack([np.full((2, 2), v, np.int16) for v in (0, 100, 200, 300)])
  np.testing.assert_allclose(register.resample_slice(volume, 1.25), 125.0)


def test_default_options_match_the_paper_pipeline(deformed):
  """The register chain with default options is the converter's default path: nearest slice + affine ECC."""
  pre, moving = deformed["pre"], deformed["moving"]
  z = deformed["case"].slice_z["non_contrast"]
  masks = [align.body_mask(s) for s in pre]
  result = register.align_volume(pre, z, moving, z + 1.0, masks, 1.0, SPACING)
  for i, j in enumerate(align.pair_slices(z, z + 1.0, 1.0)):
    expected = align.align_slice(pre[i], moving[j], masks[i])
    np.testing.assert_array_equal(result.pairs[i].post_hu, expected.post_hu)
    assert result.pairs[i].misalignment_px == pytest.approx(expected.misalignment_px)


def test_converter_flags_change_the_cache_and_are_recorded(tmp_path):
  import dataclasses
  import json

  from data_prep import convert
  from data_prep import phantom
  from data_prep.convert.plan import Settings

  base = Settings(input=str(tmp_path), output=str(tmp_path / "out"))
  assert base.fingerprint(b"k") != dataclasses.replace(base, deformable="demons").fingerprint(b"k")
  assert base.fingerprint(b"k") != dataclasses.replace(base, through_plane="resample").fingerprint(b"k")
  assert base.fingerprint(b"k") != dataclasses.replace(base, through_plane="local").fingerprint(b"k")
  assert base.registration_options().is_paper

  phantom.generate(tmp_path / "dicom", cases=1, seed=3, size=64, slices=6, slice_thickness=5.0, pixel_spacing=6.0)
  out = tmp_path / "converted"
  status = convert.main(["--input", str(tmp_path / "dicom"), "--output", str(out), "--image_size", "32",
                         "--phases", "arterial", "--deformable", "demons", "--through_plane", "resample"])
  assert status == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["settings"]["deformable"] == "demons"
  assert manifest["settings"]["through_plane"] == "resample"
  stats = next(iter(manifest["phases"]["arterial"]["cases"].values()))
  assert stats["examples"] >= 4 and stats["residual_px_max"] < 6.0

  out = tmp_path / "converted_local"
  assert convert.main(["--input", str(tmp_path / "dicom"), "--output", str(out), "--image_size", "32",
                       "--phases", "arterial", "--through_plane", "local"]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["settings"]["through_plane"] == "local"
  stats = next(iter(manifest["phases"]["arterial"]["cases"].values()))
  assert stats["examples"] >= 4 and 0.0 <= stats["levels_changed_mean"] <= 1.0


def test_local_levels_undo_a_regional_through_plane_shift(deformed):
  """`through_plane='local'`: the left half of the body moved one slice along z (as breathing moves some organs and
  not others); each region takes the contrast level that shows its own anatomy, where the nearest slice shows the
  left half one slice off."""
  pre, labels = deformed["pre"], deformed["labels"]
  z = deformed["case"].slice_z["non_contrast"]
  masks = [align.body_mask(s) for s in pre]
  half = SIZE // 2
  moved = np.concatenate([pre[1:], pre[-1:]])            # contrast slice k shows non-contrast level k + 1 ...
  moving = pre.copy()
  moving[:, :, :half] = moved[:, :, :half]                # ... in the left half only
  moved_labels = np.concatenate([labels[1:], labels[-1:]])
  moving_labels = labels.copy()
  moving_labels[:, :, :half] = moved_labels[:, :, :half]
  carry = [(moving_labels == anatomy.LABEL_IDS[o]).astype(np.float32) for o in ORGANS]
  paper = register.align_volume(pre, z, moving, z, masks, 0.0, SPACING, register.Options(), carry=carry)
  local = register.align_volume(pre, z, moving, z, masks, 0.0, SPACING, register.Options(through_plane="local"),
                                carry=carry)
  inner = slice(1, SLICES - 1)  # the first slice has no level above it in the contrast series
  left = np.zeros(pre.shape[1:], bool)
  left[:, :half - 6] = True  # away from the seam, which the region's smoothing blurs (sigma 2.5 px)
  soft = lambda hu: np.clip(hu.astype(float), -200, 60)  # what the choice sees: bone looks like soft tissue  # noqa: E731
  errors = {"local": [], "paper": []}
  for k in range(1, SLICES - 1):
    assert local.pairs[k].excluded is None
    assert 0.25 < local.pairs[k].levels_changed < 0.75, local.pairs[k].levels_changed
    body_left = left & (masks[k] > 0)
    for name, result in (("local", local), ("paper", paper)):
      errors[name].append(np.abs(soft(result.pairs[k].post_hu) - soft(pre[k]))[body_left].mean())
  # Not zero: both halves share one affine ECC warp, which the two levels pull apart (interpolation, a slight shear).
  assert np.mean(errors["local"]) < 0.5 * np.mean(errors["paper"]), errors
  dice_paper = _mean_dice([c[inner] for c in paper.carried], labels[inner])
  dice_local = _mean_dice([c[inner] for c in local.carried], labels[inner])
  assert dice_local > dice_paper + 0.05 and dice_local > 0.9, (dice_paper, dice_local)


def test_local_levels_keep_the_nearest_slice_without_motion(deformed):
  """With no motion, noise alone hardly switches a region's level or shift (the margin): 'local' gives the nearest
  slice, as the paper's pipeline does (up to the interpolation of ECC's near-identity warp: bicubic, not bilinear)."""
  pre = deformed["pre"]
  z = deformed["case"].slice_z["non_contrast"]
  masks = [align.body_mask(s) for s in pre]
  noisy = np.rint(pre + np.random.default_rng(0).normal(0, 12, pre.shape)).astype(np.int16)
  paper = register.align_volume(pre, z, noisy, z, masks, 0.0, SPACING, register.Options())
  local = register.align_volume(pre, z, noisy, z, masks, 0.0, SPACING, register.Options(through_plane="local"))
  for i, (a, b) in enumerate(zip(paper.pairs, local.pairs)):
    body = masks[i] > 0
    assert b.levels_changed < 0.05, b.levels_changed
    assert np.abs(b.post_hu.astype(float) - a.post_hu)[body].mean() < 2.0  # noise of SD 12 HU, interpolated
    assert np.abs(b.post_hu.astype(float) - noisy[i])[body].mean() < 2.0
  with pytest.raises(ValueError, match="reach"):
    register.align_volume(pre, z, noisy, z, masks, 0.0, SPACING, register.Options(through_plane="local",
                                                                                   local_reach_mm=0.0))


def test_align_bench_enhancement_kept_is_one_without_motion_and_less_with_it(capsys):
  from benchmarks import align_bench  # pylint: disable=import-outside-toplevel

  geometry = (64, 8, 5.0, 6.0)
  still = cases.synthesize_case(0, 3, *geometry, motion_scale=0.0)
  moving = cases.synthesize_case(0, 3, *geometry)
  def kept(case, organ="liver", record_size=0):
    out = align_bench.measure_case(case, register.Options(), still=still, record_size=record_size)
    return [out[p]["enhancement"][organ][0] / out[p]["enhancement"][organ][1] for p in align_bench.PHASES]
  np.testing.assert_allclose(kept(still), 1.0, atol=0.06)  # the true enhancement, but for ECC's interpolation
  np.testing.assert_allclose(kept(still, record_size=32), 1.0, atol=0.1)   # the same on the records' pixels
  assert min(kept(moving, "kidney_cortex")) < 0.9   # breathing moved the kidneys: part of their enhancement is lost
  # Measured on the records' pixels (area-averaged HU, nearest labels), another figure than on the phantom's own.
  assert not np.allclose(kept(moving, "kidney_cortex", record_size=32), kept(moving, "kidney_cortex"), atol=1e-3)
  align_bench.main(["--cases", "1", "--size", "64", "--slices", "8", "--pixel_spacing", "6", "--options", "paper,local",
                    "--record_size", "32"])
  printed = capsys.readouterr().out
  assert "| local | arterial |" in printed and "| paper |" in printed and "at 32 px (the records)" in printed
  assert "pair error at 32 px" in printed and "pair halo at 32 px" in printed


def test_align_bench_edge_bands():
  from benchmarks import align_bench  # pylint: disable=import-outside-toplevel

  mask = np.zeros((32, 32), bool)
  mask[6:26, 6:26] = True   # 20 x 20: 2 px in leaves 16 x 16, 4 px in 12 x 12
  near, deep = align_bench.edge_bands(mask)
  assert deep.sum() == 144 and near.sum() == 256 - 144 and not (near & deep).any()
  assert deep[6 + 4:26 - 4, 6 + 4:26 - 4].all() and not near[6:8].any()
  empty = align_bench.edge_bands(np.zeros((8, 8), bool))
  assert not empty[0].any() and not empty[1].any()


def test_align_bench_pair_error_is_near_zero_without_motion_and_large_with_it():
  from benchmarks import align_bench  # pylint: disable=import-outside-toplevel

  geometry = (64, 8, 5.0, 6.0)
  truth = (cases.synthesize_case(0, 3, *geometry, noise=False),
           cases.synthesize_case(0, 3, *geometry, motion_scale=0.0, noise=False))
  halos = []
  def error(case, truth):
    out = align_bench.measure_case(case, register.Options(), truth=truth)
    halos.append([out[p]["pair_halo"]["liver"] for p in align_bench.PHASES])
    return {p: out[p]["pair_error"]["liver"][0] / out[p]["pair_error"]["liver"][1] for p in align_bench.PHASES}
  still = error(cases.synthesize_case(0, 3, *geometry, motion_scale=0.0), (truth[1], truth[1]))
  moving = error(cases.synthesize_case(0, 3, *geometry), truth)
  assert max(still.values()) < 3.0, still  # noise-free, motion-free pairs: ECC's interpolation only (HU)
  assert min(moving.values()) > 10.0, moving  # breathing moved the liver: the nearest slice cuts it elsewhere
  for near, n_near, deep, n_deep in halos[0]:   # motion-free pairs: no bias near the liver's edge (or deeper)
    assert n_near > 0 and abs(near / n_near) < 3.0 and (n_deep == 0 or abs(deep / n_deep) < 3.0)
  # With breathing the nearest slice cuts the liver elsewhere: its pairs are biased near the edge.
  assert max(abs(near / n_near) for near, n_near, _, _ in halos[1]) > 5.0, halos[1]


def test_phantom_without_noise_differs_only_by_the_noise():
  geometry = (64, 6, 5.0, 6.0)
  noisy, clean = cases.synthesize_case(1, 4, *geometry), cases.synthesize_case(1, 4, *geometry, noise=False)
  for phase in noisy.hu:
    np.testing.assert_array_equal(noisy.labels[phase], clean.labels[phase])
    assert clean.noise_sd[phase] == 0.0 and noisy.noise_sd[phase] >= 10.0
    residual = noisy.hu[phase].astype(np.float32) - clean.hu[phase]
    assert abs(float(residual.mean())) < 1.0 and 0.5 * noisy.noise_sd[phase] < float(residual.std()) < 1.5 * \
        noisy.noise_sd[phase]
