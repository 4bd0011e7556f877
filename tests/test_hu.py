"""The window and its inverse (`vcect_jax.hu`): round trip inside the window, clipping outside, numpy and jax."""

import jax.numpy as jnp
import numpy as np
import pytest

from vcect_jax import hu


def test_round_trip_inside_the_window_and_clipping_outside():
  window = hu.Window(level=30.0, width=400.0)
  assert (window.low, window.high) == (-170.0, 230.0)
  values = np.array([-1000.0, -170.0, 0.0, 30.0, 229.0, 230.0, 1500.0], np.float32)
  model = hu.hu_to_model(values, window)
  np.testing.assert_allclose(model, [-1, -1, -0.15, 0, 0.995, 1, 1], atol=1e-6)
  back = hu.model_to_hu(model, window)
  np.testing.assert_allclose(back, np.clip(values, -170, 230), atol=1e-4)
  unclipped = hu.hu_to_unit(values, window, clip=False)
  np.testing.assert_allclose(hu.model_to_hu(hu.unit_to_model(unclipped), window), values, rtol=1e-6, atol=1e-3)


def test_jax_and_numpy_agree_and_types_follow_the_input():
  values = np.linspace(-300, 400, 11).astype(np.float32)
  as_np = hu.hu_to_model(values)
  as_jax = hu.hu_to_model(jnp.asarray(values))
  assert isinstance(as_np, np.ndarray) and not isinstance(as_jax, np.ndarray)
  np.testing.assert_allclose(np.asarray(as_jax), as_np, atol=1e-6)


def test_window_from_config_and_invalid_width():
  import ml_collections  # pylint: disable=import-outside-toplevel

  window = hu.Window.from_config(ml_collections.ConfigDict({"level": 40, "width": 350}))
  assert (window.low, window.high) == (-135.0, 215.0)
  with pytest.raises(ValueError, match="width"):
    hu.Window(width=0)


def test_window_label_names_width_then_level():
  assert hu.Window().label == "W400/L30"
  assert hu.Window(level=130.0, width=600.0).label == "W600/L130"
  assert hu.Window(level=-600.0, width=1500.0).label == "W1500/L-600"
