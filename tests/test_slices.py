"""Tests of `data_prep.slices`: the slice geometry shared by conversion, pretext sources and inference."""

import numpy as np
import pytest

from data_prep import slices


def test_resize_then_unresize_recovers_a_non_square_image():
  # A smooth 60 x 90 image: padded to 90 x 90 (rows), resized to 45, back to 90 and cropped to 60 x 90.
  y, x = np.mgrid[0:60, 0:90]
  img = (100 * np.sin(x / 15.0) + 80 * np.cos(y / 12.0)).astype(np.float32)
  small = slices.resize_square(img, 45, nearest=False, fill=0.0)
  assert small.shape == (45, 45)
  # The padding is centred: 15 rows of fill above and below, i.e. 7.5 rows of the small image.
  assert np.all(small[:7] == 0) and np.all(small[-7:] == 0)
  back = slices.unresize_square(small, (60, 90))
  assert back.shape == (60, 90) and back.dtype == np.float32
  inner = (slice(2, -2), slice(2, -2))  # the border mixes with the padding
  assert np.abs(back[inner] - img[inner]).max() < 12.0
  assert np.abs(back[inner] - img[inner]).mean() < 3.0


def test_masks_use_nearest_neighbour_both_ways():
  mask = np.zeros((40, 20), np.uint8)
  mask[10:30, 4:14] = 3  # edges on even pixels of the padded image: the 2x round trip is exact
  small = slices.resize_square(mask, 20, nearest=True, fill=0)
  assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 3}
  back = slices.unresize_square(small, (40, 20), nearest=True)
  assert back.shape == (40, 20) and set(np.unique(back)) == {0, 3}
  np.testing.assert_array_equal(back, mask)


def test_resize_stacks_and_keeps_the_size_unchanged():
  vol = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
  assert slices.resize_square(vol, 8, False, -1024) is vol  # already square at the size: untouched
  out = slices.resize_square(vol, 4, False, -1024)
  assert out.shape == (2, 4, 4) and out.dtype == np.int16
  np.testing.assert_array_equal(out[1], slices.resize_square(vol[1], 4, False, -1024))
  # Area averaging of 2 x 2 blocks.
  assert out[0, 0, 0] == round(np.mean(vol[0, :2, :2]))


def test_int16_hu_is_rounded_and_clipped_to_the_int16_range():
  hu = np.full((4, 4), 32767, np.int16)
  hu[:, :2] = -32768
  out = slices.resize_square(hu, 2, False, -1024)
  assert out.dtype == np.int16
  np.testing.assert_array_equal(out, [[-32768, 32767], [-32768, 32767]])
  # Rounding, not truncation: the mean of 0 and 1 (0.5) rounds to even, of 1 and 2 (1.5) to 2.
  ramp = np.array([[1, 2], [1, 2]], np.int16)
  assert slices.resize_square(ramp, 1, False, 0)[0, 0] == 2


def test_spacing_after_resize_follows_the_longer_side():
  assert slices.resized_spacing_mm(0.75, (512, 512), 256) == pytest.approx(1.5)
  assert slices.resized_spacing_mm(0.8, (400, 512), 128) == pytest.approx(3.2)
  assert slices.resized_spacing_mm(0.8, (512, 400), 128) == pytest.approx(3.2)
  assert slices.resized_spacing_mm(1.0, (64, 64), 64) == 1.0


def test_triplets_duplicate_the_edge_slices():
  vol = (np.arange(4)[:, None, None] * np.ones((4, 2, 3))).astype(np.int16)
  stacks = slices.triplets(vol)
  assert stacks.shape == (4, 3, 2, 3) and stacks.dtype == np.int16
  assert [list(s[:, 0, 0]) for s in stacks] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
  for i in range(4):
    np.testing.assert_array_equal(stacks[i], vol[slices.triplet_indices(i, 4)])


def test_a_single_slice_gives_three_copies_of_itself():
  vol = np.random.default_rng(0).integers(-1000, 1000, (1, 5, 5)).astype(np.int16)
  stacks = slices.triplets(vol)
  assert stacks.shape == (1, 3, 5, 5)
  for c in range(3):
    np.testing.assert_array_equal(stacks[0, c], vol[0])
  assert slices.triplet_indices(0, 1) == [0, 0, 0]


def test_bad_inputs_raise():
  with pytest.raises(IndexError):
    slices.triplet_indices(4, 4)
  with pytest.raises(ValueError):
    slices.triplets(np.zeros((0, 4, 4)))
  with pytest.raises(ValueError):
    slices.triplets(np.zeros((4, 4)))
