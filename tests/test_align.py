"""Tests of data_prep.align on analytic series with known motion."""

import numpy as np
import pytest

from data_prep import align
from tests import convert_fixtures as cf


@pytest.mark.parametrize("size,spacing", [(128, 3.0), (512, 0.75)])
@pytest.mark.parametrize("shift,rotation,table_shift", [((2.3, -1.7), 1.5, 5.0), ((-4.1, 3.2), -2.0, -7.0)])
def test_recovers_in_plane_and_through_plane_motion(size, spacing, shift, rotation, table_shift):
  z = (np.arange(10)[::-1] - 5) * 5.0 + 100
  pre = cf.anatomy(z, size, spacing, "non_contrast")
  post = cf.anatomy(z, size, spacing, "arterial", shift, rotation, table_shift, seed=3)
  offset, _ = align.estimate_z_offset(pre, z, post, z)
  assert abs(offset - table_shift) <= 2.5
  pairs = align.pair_slices(z, z, offset)
  assert sum(p is not None for p in pairs) >= 8
  i = 5
  r = align.align_slice(pre[i], post[pairs[i]], align.body_mask(pre[i]))
  np.testing.assert_allclose(r.shift_px, shift, atol=0.5)
  assert r.ecc_score > 0.9 and abs(r.misalignment_px - np.hypot(*shift)) < 1.5 and r.max_displacement_px >= r.misalignment_px


def test_pair_slices_half_slice_tolerance():
  pre_z = np.array([10.0, 5.0, 0.0])
  post_z = np.array([12.0, 7.0, 2.0])
  assert align.pair_slices(pre_z, post_z, 2.0) == [0, 1, 2]
  assert align.pair_slices(pre_z, post_z, -3.0) == [1, 2, None]  # 10-3=7 -> 1; 5-3=2 -> 2; 0-3=-3 -> none
