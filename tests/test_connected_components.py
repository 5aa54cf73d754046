"""npsam.kernels.connected_components against OpenCV's
cv2.connectedComponentsWithStats (8-connectivity), every output exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, strategies as st

from npsam.kernels.connected_components import connectedComponentsWithStats


def _assert_like_opencv(image: np.ndarray) -> None:
    n, labels, stats, centroids = connectedComponentsWithStats(image, 8)
    n_cv, labels_cv, stats_cv, centroids_cv = cv2.connectedComponentsWithStats(image, 8)
    assert n == n_cv
    assert labels.dtype == labels_cv.dtype and stats.dtype == stats_cv.dtype
    np.testing.assert_array_equal(labels, labels_cv, err_msg="labels (OpenCV's numbering)")
    np.testing.assert_array_equal(stats, stats_cv, err_msg="stats (left, top, width, height, area)")
    # centroids: OpenCV sums in double in another order; exact sums of integers here
    np.testing.assert_allclose(centroids, centroids_cv, rtol=1e-12, equal_nan=True)


@given(h=st.integers(1, 40), w=st.integers(1, 40), p=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]),
       cell=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_matches_opencv(h, w, p, cell, seed):
    rng = np.random.default_rng(seed)
    coarse = rng.random((-(-h // cell), -(-w // cell))) < p
    image = np.kron(coarse, np.ones((cell, cell), dtype=bool))[:h, :w].astype(np.uint8)
    _assert_like_opencv(image)


def test_matches_opencv_on_a_large_noisy_image():
    image = (np.random.default_rng(0).random((700, 900)) < 0.45).astype(np.uint8)  # thousands of components
    _assert_like_opencv(image)


def test_empty_and_full_images():
    _assert_like_opencv(np.zeros((5, 7), np.uint8))  # label 0 only
    _assert_like_opencv(np.ones((5, 7), np.uint8))  # no background: OpenCV's unset label-0 stats


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="image"):
        connectedComponentsWithStats(np.zeros((2, 3, 4), np.uint8), 8)
    with pytest.raises(AssertionError, match="8-connectivity"):
        connectedComponentsWithStats(np.zeros((2, 3), np.uint8), 4)
