"""The quality benchmark in its tiny mode: smoke config, a few training steps, the table and its oracle row."""

import math

import numpy as np

from benchmarks import quality
from vcect_jax import evaluate


def test_tiny_quality_run_oracle_beats_identity(smoke, tmp_path):
  smoke.train.steps = 2
  smoke.train.eval_every = 2
  smoke.train.checkpoint_every = 2
  out = quality.run(smoke, str(tmp_path / "run"), split="test")
  scores = out["scores"]
  assert set(scores) == {evaluate.MODEL, evaluate.IDENTITY, quality.ORACLE}
  organs = quality.enhancing_organs(scores)
  assert organs, "the smoke phantom's test case has no enhancing organ"
  # At the smoke size (12 mm pixels) a small organ's label can miss it in the contrast slice, so the oracle is
  # held to beating identity on the organs' mean and in the aorta, the arterial phase's key organ.
  mean = lambda m: np.mean([scores[m][f"{o}/mae"] for o in organs])  # noqa: E731
  assert mean(quality.ORACLE) < mean(evaluate.IDENTITY)
  assert scores[quality.ORACLE]["aorta/mae"] < scores[evaluate.IDENTITY]["aorta/mae"]
  for organ in organs:
    assert math.isclose(scores[quality.ORACLE][f"{organ}/ratio"], 1.0, abs_tol=1e-6), organ
    assert abs(scores[evaluate.IDENTITY][f"{organ}/ratio"]) < 1e-9, organ
  assert out["table"].splitlines()[0].startswith("| metric | model | identity | oracle |")
  assert out["eval"]["cases"] >= 1 and np.isfinite(scores[evaluate.MODEL]["hu/mae"])


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
