"""TensorBoard image grids carry the title of each panel."""

import numpy as np

from vcect_jax import summaries
from vcect_jax.methods import contrast
from vcect_jax.methods import dual_path_gan


def test_every_panel_gets_its_title_above_the_unchanged_images():
  rng = np.random.default_rng(0)
  grid = rng.random((2, 32, 4 * 32, 1)).astype(np.float32)  # 32 px panels: too narrow for the titles
  out = summaries.label_panels(grid, contrast.COMPARISON_PANELS)
  scale = out.shape[2] // grid.shape[2]
  header = out.shape[1] - grid.shape[1] * scale
  assert scale >= 2 and header > 0 and out.shape[0] == 2
  np.testing.assert_array_equal(out[:, header::scale, ::scale], grid)
  panel = out.shape[2] // 4
  for i in range(4):  # some text drawn in each panel's part of the strip, and nowhere else than the strip
    assert out[0, :header, i * panel:(i + 1) * panel].max() > 0.5
  titled = [summaries.label_panels(grid, labels)[0, :header] for labels in
            (contrast.COMPARISON_PANELS, ("a", "b", "c", "d"))]
  assert not np.array_equal(*titled)
  assert summaries.label_panels(grid, ()).shape == grid.shape  # untitled grids stay as they are


def test_the_gan_methods_title_their_comparison_grid():
  assert dual_path_gan.DualPathGAN.image_panels["pre_virtual_real_absdiff"] == (
      "non-contrast", "virtual", "real", "|virtual - real|")


def test_importing_the_training_step_keeps_tensorflow_out():
  """clu's writers import TensorFlow; `vcect_jax.train` (the step, used by benchmarks on accelerator machines without
  TensorFlow) imports them only when a run writes summaries."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys; import vcect_jax.train, benchmarks.gpu_bench; "
          "bad = sorted(m for m in ('tensorflow', 'clu.metric_writers') if m in sys.modules); print(bad); "
          "sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr[-2000:]
