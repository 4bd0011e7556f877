"""The quality benchmark in its tiny mode: smoke config, a few training steps, the table and its oracle row."""

import json
import math
import os

import numpy as np
import pytest
from scipy import ndimage

from benchmarks import quality
from configs import arterial as configs_arterial
from vcect_jax import evaluate
from vcect_jax import hu
from vcect_jax import input_pipeline


def test_tiny_quality_run_oracle_beats_identity(smoke, tmp_path):
  smoke.train.steps = 2
  smoke.train.eval_every = 2
  smoke.train.checkpoint_every = 2
  out = quality.run(smoke, str(tmp_path / "run"), split="test")
  scores = out["scores"]
  assert set(scores) == {evaluate.MODEL, evaluate.IDENTITY, quality.ORACLE, quality.WINDOWED}
  organs = quality.enhancing_organs(scores, smoke.phase)
  assert organs, "the smoke phantom's test case has no enhancing organ"
  assert set(organs) <= set(quality.phase_organs(smoke.phase))
  # At the smoke size (12 mm pixels) on moving pairs a breathing organ's label can miss it in the contrast slice
  # (liver, spleen: the oracle fills it with whatever the contrast slice shows there), so on the smoke's own split
  # the oracle is held to beating identity in the aorta, the arterial phase's key organ; on the aligned held-out
  # pairs below, in every enhancing organ.
  assert scores[quality.ORACLE]["aorta/mae"] < scores[evaluate.IDENTITY]["aorta/mae"]
  for organ in organs:
    if math.isfinite(scores[evaluate.IDENTITY][f"{organ}/ratio"]):  # nan in cases where it enhances < 10 HU
      assert math.isclose(scores[quality.ORACLE][f"{organ}/ratio"], 1.0, abs_tol=1e-6), organ
      assert abs(scores[evaluate.IDENTITY][f"{organ}/ratio"]) < 1e-9, organ
    # Pooled over the split's voxels: the oracle fills each label with the real slice's mean there, so its sum of
    # enhancement is the real one; identity adds none (nan: the pairs show under 10 HU in this organ).
    if math.isfinite(scores[evaluate.IDENTITY][f"{organ}/ratio_pooled"]):
      assert math.isclose(scores[quality.ORACLE][f"{organ}/ratio_pooled"], 1.0, abs_tol=1e-3), organ
      assert abs(scores[evaluate.IDENTITY][f"{organ}/ratio_pooled"]) < 1e-9, organ
  assert math.isclose(scores[quality.ORACLE]["aorta/ratio_pooled"], 1.0, abs_tol=1e-3)  # the key organ: finite
  assert "enhancement ratio, pooled" in out["table"]
  assert out["table"].splitlines()[0].startswith("| metric | model | identity | oracle |")
  assert out["eval"]["cases"] >= 1 and np.isfinite(scores[evaluate.MODEL]["hu/mae"])

  # The same model scored on a held-out phantom of another seed: every case of it in the test split, and the
  # benchmark's rows (eval mode's too, which run() cross-checks) are those of the held-out records.
  heldout_root = str(tmp_path / "heldout")
  heldout = quality.heldout_dataset(smoke, seed=smoke.data.phantom.seed + 1, out_dir=heldout_root, cases=3,
                                    motion_scale=0.0)
  with open(os.path.join(heldout, "manifest.json")) as f:
    splits = json.load(f)["phases"][smoke.phase]["splits"]
  assert splits["train"]["cases"] == splits["validation"]["cases"] == 0 and splits["test"]["cases"] >= 1
  stamp = os.path.join(heldout, "manifest.json")
  before = os.stat(stamp).st_mtime_ns
  assert quality.heldout_dataset(smoke, smoke.data.phantom.seed + 1, heldout_root, cases=3, motion_scale=0.0) == heldout
  assert os.stat(stamp).st_mtime_ns == before, "a held-out set with the same settings is made again"
  held = quality.run(smoke, str(tmp_path / "run"), split="test", train=False, test_data_dir=heldout)
  assert held["test_data_dir"] == heldout and held["eval"]["cases"] == splits["test"]["cases"]
  # Aligned pairs: the oracle beats identity on the enhancing organs' mean and in the aorta (at 12-mm pixels the
  # liver's label at the dome holds lung's partial volume, whose spread the oracle's one mean cannot follow).
  held_scores, held_organs = held["scores"], quality.enhancing_organs(held["scores"], smoke.phase)
  assert "aorta" in held_organs and len(held_organs) >= 3, held_organs
  mean = lambda m: np.mean([held_scores[m][f"{o}/mae"] for o in held_organs])  # noqa: E731
  assert mean(quality.ORACLE) < mean(evaluate.IDENTITY)
  assert held_scores[quality.ORACLE]["aorta/mae"] < 0.5 * held_scores[evaluate.IDENTITY]["aorta/mae"]
  window = hu.Window.from_config(smoke.data.window)
  direct = quality.score_split(input_pipeline.load_source(heldout, smoke.phase, "test"), None, window)
  for key in ("hu/mae", "hu/psnr", "aorta/mae"):
    assert math.isclose(held["scores"][evaluate.IDENTITY][key], direct[evaluate.IDENTITY][key]), key
  assert held["scores"][evaluate.IDENTITY]["hu/mae"] != scores[evaluate.IDENTITY]["hu/mae"]


def test_heldout_set_of_more_slices(tmp_path):
  """`--test_slices`: the held-out phantom's series have that many slices (its settings record it) and its test
  split holds more pairs than the config's height gives; without --test_seed the option is refused."""
  smoke = configs_arterial.get_config("smoke")
  slices = 2 * smoke.data.phantom.slices
  heldout = quality.heldout_dataset(smoke, seed=smoke.data.phantom.seed + 1, out_dir=str(tmp_path / "tall"),
                                    cases=2, slices=slices)
  with open(tmp_path / "tall" / "settings.json") as f:
    assert json.load(f)["phantom"]["slices"] == slices
  series = tmp_path / "tall" / "dicom" / "case_0000" / smoke.phase
  assert len([f for f in os.listdir(series) if not f.startswith(".")]) == slices
  with open(os.path.join(heldout, "manifest.json")) as f:
    examples = json.load(f)["phases"][smoke.phase]["splits"]["test"]["examples"]
  assert examples > 2 * smoke.data.phantom.slices
  with pytest.raises(SystemExit):
    quality.main(["--seed=1", f"--workdir={tmp_path / 'w'}", "--variant=smoke", "--test_slices=12"])


def test_heldout_set_of_aligned_pairs(tmp_path):
  """`--test_motion_scale=0`: a held-out phantom whose contrast series lie on the non-contrast anatomy, so that a
  pair differs only by enhancement and noise. Identity's error inside an enhancing organ is then its enhancement
  (every voxel off by about the same amount), where on the moving phantom of the same seed misaligned tissue adds
  to it; and its whole-body error, on the moving phantom mostly misalignment, drops. The option needs --test_seed."""
  smoke = configs_arterial.get_config("smoke")
  window = hu.Window.from_config(smoke.data.window)
  seed = smoke.data.phantom.seed + 1
  scores = {}
  for scale in (1.0, 0.0):
    root = str(tmp_path / f"scale{scale:g}")
    heldout = quality.heldout_dataset(smoke, seed=seed, out_dir=root, cases=3, motion_scale=scale)
    with open(os.path.join(root, "settings.json")) as f:
      assert json.load(f).get("motion_scale", 1.0) == scale
    series = quality.noise_free_truth(heldout, (smoke.phase, "non_contrast"))
    assert (series is None) == (scale != 0.0)    # a truth on the non-contrast grid exists without motion only
    truth, pre_truth = (series[smoke.phase], series["non_contrast"]) if series else (None, None)
    aligned = quality.score_split(input_pipeline.load_source(heldout, smoke.phase, "test"), None, window,
                                  truth=truth, pre_truth=pre_truth)
    scores[scale] = aligned[evaluate.IDENTITY]   # the loop ends on scale 0: `aligned` is the aligned set's
  excess = {}
  for scale, identity in scores.items():
    organs = [o for o in quality.phase_organs(smoke.phase) if abs(identity.get(f"{o}/enhancement", 0.0)) >= 20]
    excess[scale] = {o: identity[f"{o}/mae"] - abs(identity[f"{o}/enhancement"]) for o in organs}
  assert "aorta" in excess[0.0] and len(excess[0.0]) >= 3
  assert max(excess[0.0].values()) < 3.0, excess[0.0]        # noise only
  assert max(excess[1.0].values()) > 20.0, excess[1.0]       # misaligned tissue
  assert scores[0.0]["hu/mae"] < 0.5 * scores[1.0]["hu/mae"]
  # The real slice through the model's window: the arterial aorta (~300 HU) is clipped at 230 HU, so even a perfect
  # model reaches only part of its enhancement; organs inside the window keep all of it.
  windowed = aligned[quality.WINDOWED]
  assert 0.3 < windowed["aorta/ratio_pooled"] < 0.9
  assert windowed["hu/mae"] < scores[0.0]["hu/mae"]
  for organ in excess[0.0]:
    assert windowed[f"{organ}/ratio_pooled"] <= 1.0 + 1e-6, organ
  assert "real in window" in quality.table(aligned, smoke.phase).splitlines()[0]
  # The truth without noise: the same case, slice and phase as each record, so that it differs from the real slice
  # by the noise only: far below identity in every enhancing organ, all of the enhancement, no error against itself.
  true = aligned[quality.TRUTH]
  assert true["hu/mae_truth"] == 0.0 and 2.0 < true["hu/mae"] < 0.5 * scores[0.0]["hu/mae"]   # the noise only
  for organ in excess[0.0]:
    assert true[f"{organ}/mae"] < 0.5 * scores[0.0][f"{organ}/mae"], organ
    assert 0.8 < true[f"{organ}/ratio_pooled"] < 1.25, organ   # the converter resamples the real slice (12-mm pixels)
    assert true[f"{organ}/mae_truth"] == 0.0 and scores[0.0][f"{organ}/mae_truth"] > 10.0, organ
  assert "aorta MAE against the truth without noise (HU)" in quality.table(aligned, smoke.phase)
  # Identity passes the non-contrast slice's own noise on as it is (slope 1); the truth has none to pass on. At 32 px
  # no organ has an interior; the same phantom's records at 64 px (its own pixels) have the liver's.
  assert "identity: input noise kept" in quality.parts_table(aligned, smoke.phase)
  wide = smoke.copy_and_resolve_references()
  wide.data.image_size = 64
  heldout64 = quality.heldout_dataset(wide, seed=seed, out_dir=str(tmp_path / "wide"), cases=3, motion_scale=0.0)
  series64 = quality.noise_free_truth(heldout64, (smoke.phase, "non_contrast"))
  at64 = quality.score_split(input_pipeline.load_source(heldout64, smoke.phase, "test"), None, window,
                             truth=series64[smoke.phase], pre_truth=series64["non_contrast"])
  kept = [o for o in quality.ENHANCING_ORGANS if math.isfinite(at64[evaluate.IDENTITY].get(f"{o}/noise_kept",
                                                                                             math.nan))]
  assert "liver" in kept
  for organ in kept:
    assert abs(at64[evaluate.IDENTITY][f"{organ}/noise_kept"] - 1.0) < 0.05, organ
    assert at64[quality.TRUTH][f"{organ}/noise_kept"] == 0.0, organ
  source = input_pipeline.load_source(heldout, smoke.phase, "test")
  truth = quality.noise_free_truth(heldout, (smoke.phase,))[smoke.phase]
  for case in evaluate.iter_cases(source):   # the air around the body: one value without noise, noisy in the real
    air = ~ndimage.binary_dilation(case.body_mask.astype(bool), structure=np.ones((1, 5, 5)))
    assert air.sum() > 100 and np.ptp(truth[case.case_id][case.slice_index][air]) == 0.0
    assert np.ptp(case.post_hu[air]) > 10.0
  other = quality.score_split(source, None, window, truth=quality.noise_free_truth(heldout, ("delayed",))["delayed"])
  assert other[quality.TRUTH]["aorta/mae"] > 3 * true["aorta/mae"]    # another phase's truth is no floor
  renamed = {"not-a-case": v for v in truth.values()}
  with pytest.raises(ValueError, match="not in the noise-free truth"):
    quality.score_split(source, None, window, truth=renamed)
  with pytest.raises(SystemExit):
    quality.main(["--seed=1", f"--workdir={tmp_path / 'w'}", "--variant=smoke", "--test_motion_scale=0"])


def test_phase_organs_follow_the_phantoms_enhancement_table():
  # The collecting system does not enhance before the delayed phase (12 HU throughout), nor the bladder, whose
  # contrast layers in only in the delayed phase; both are scored there.
  arterial, portal, delayed = (quality.phase_organs(p) for p in ("arterial", "portal", "delayed"))
  assert {"aorta", "kidney_cortex", "portal_vein", "liver", "spleen"} <= set(arterial)
  assert "collecting_system" not in arterial and "bladder" not in arterial
  assert "collecting_system" not in portal and "bladder" not in portal and "kidney_cortex" in portal
  assert {"collecting_system", "bladder", "aorta"} <= set(delayed)


def test_oracle_fills_organs_of_the_non_contrast_labels():
  labels = np.zeros((1, 4, 4), np.uint8)
  labels[0, :2, :2] = 7  # aorta
  post = np.arange(16, dtype=np.int16).reshape(1, 4, 4) * 10
  case = evaluate.Case(case_id="c", slice_index=np.array([0]), pre_hu=np.zeros((1, 3, 4, 4), np.int16),
                       post_hu=post, body_mask=np.ones((1, 4, 4), np.uint8), labels=labels, pixel_spacing_mm=1.0,
                       slice_spacing_mm=math.nan)
  oracle = quality.oracle_hu(case)
  np.testing.assert_allclose(oracle[0, :2, :2], np.mean([0, 10, 40, 50]))
  np.testing.assert_array_equal(oracle[0, 2:], post[0, 2:])


def test_goal_lines_give_the_multiples_of_identity():
  scores = {evaluate.MODEL: {"liver/mae": 13.0}, evaluate.IDENTITY: {"liver/mae": 26.0},
            quality.TRUTH: {"liver/mae": 5.2}}
  assert quality._goal_detail(scores, "liver MAE <= 0.5x identity") == " (model 0.50x, truth without noise 0.20x)"
  del scores[quality.TRUTH]
  assert quality._goal_detail(scores, "liver MAE <= 0.5x identity") == " (model 0.50x)"
  assert quality._goal_detail(scores, "PSNR >= identity") == ""


def test_error_parts_tell_noise_patches_and_rim_apart():
  """An organ whose error is half the input's noise plus a bright patch, and a rim off by 30 HU: the parts find
  each, and the identity-like error (the noise itself) keeps all of the noise and no patch."""
  rng = np.random.default_rng(0)
  labels = np.zeros((2, 48, 48), np.uint8)
  labels[:, 8:40, 8:40] = quality.metrics.ORGAN_LABELS["liver"]
  noise = rng.normal(0.0, 8.0, labels.shape).astype(np.float32)
  patch = np.zeros(labels.shape, np.float32)
  patch[:, 12:24, 12:24] = 20.0
  rim = (labels > 0) & ~ndimage.binary_erosion(labels > 0, np.ones((1, 3, 3), bool), iterations=quality.RIM_PX)
  error = 0.5 * noise + patch + 30.0 * rim
  parts = quality.error_parts(error, quality.organ_regions(labels), noise)
  assert abs(parts["liver/noise_kept"] - 0.5) < 0.05
  assert parts["liver/smooth_sd_truth"] > 5.0
  assert parts["liver/rim_mae_truth"] > parts["liver/interior_mae_truth"] + 20.0
  assert math.isnan(parts["aorta/interior_mae_truth"])    # absent organ
  plain = quality.error_parts(noise, quality.organ_regions(labels), noise)
  assert abs(plain["liver/noise_kept"] - 1.0) < 1e-6 and plain["liver/smooth_sd_truth"] < 2.0


def test_error_parts_find_a_halo_painted_near_the_edge():
  """An organ painted 6 HU too bright 2-4 px in from its edge and 1 HU deeper (what misaligned training pairs
  teach): the two mean errors tell the halo from an even offset; a halo-free error reads the same in both."""
  labels = np.zeros((2, 48, 48), np.uint8)
  labels[:, 8:40, 8:40] = quality.metrics.ORGAN_LABELS["liver"]
  organ = labels > 0
  square = np.ones((1, 3, 3), bool)
  interior = ndimage.binary_erosion(organ, square, iterations=quality.RIM_PX)
  deep = ndimage.binary_erosion(organ, square, iterations=quality.DEEP_PX)
  error = np.where(deep, 1.0, np.where(interior, 6.0, 0.0)).astype(np.float32)
  parts = quality.error_parts(error, quality.organ_regions(labels))
  assert abs(parts["liver/near_edge_bias_truth"] - 6.0) < 1e-6 and abs(parts["liver/deep_bias_truth"] - 1.0) < 1e-6
  even = quality.error_parts(np.full(labels.shape, 2.0, np.float32), quality.organ_regions(labels))
  assert even["liver/near_edge_bias_truth"] == even["liver/deep_bias_truth"] == 2.0
  assert math.isnan(parts["kidney_cortex/deep_bias_truth"])   # absent organ
