"""The dual path's quadrant cut (`vcect_jax.dual_path`)."""

import numpy as np
import pytest

from vcect_jax import dual_path


def test_quadrants_then_assemble_gives_the_input_back():
  x = np.random.default_rng(0).normal(size=(3, 8, 6, 2)).astype(np.float32)
  q = dual_path.quadrants(x)
  assert q.shape == (12, 4, 3, 2)
  np.testing.assert_array_equal(dual_path.assemble(q), x)


def test_quadrant_order_is_quadrant_major():
  x = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1)
  q = dual_path.quadrants(x)
  np.testing.assert_array_equal(q[0], x[0, :2, :2])   # top-left of image 0
  np.testing.assert_array_equal(q[1], x[1, :2, :2])   # top-left of image 1
  np.testing.assert_array_equal(q[2], x[0, :2, 2:])   # top-right of image 0
  np.testing.assert_array_equal(q[7], x[1, 2:, 2:])   # bottom-right of image 1


def test_odd_sizes_are_refused():
  with pytest.raises(ValueError, match="even"):
    dual_path.quadrants(np.zeros((1, 5, 4, 1)))
