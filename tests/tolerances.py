"""Every tolerance the tests use, in one place, and the one comparison helper.

Nobody loosens a bound here to make a test pass: if a bound cannot be met,
the closing note says so with the measured figure.

Errors are "scaled": worst |ours - theirs| divided by max(1, max |theirs|),
so a bound means absolute error for O(1) values and relative error for large
logits.
"""

from __future__ import annotations

import numpy as np

# Prompt encoder + mask decoder (and every kernel) against the official code.
DECODER_F32 = 1e-5
DECODER_F64 = 1e-12

# The reference path (``with npsam.reference():``) computes the official
# association: every intermediate of the prompt encoder and mask decoder in
# float64 against the official modules' (forward hooks), far tighter than
# DECODER_F64, which the fast path's reassociated products need.
REFERENCE_PATH_F64 = 1e-14

# Image encoders (ViT, TinyViT) against the official code: deeper networks.
ENCODER_F32 = 1e-4
ENCODER_F64 = 1e-10
# The encoders' reference path (npsam.reference()) against the official modules,
# every intermediate, float64: it computes the official association, so only
# the kernels' own summation orders (BLAS, torch's convolutions) separate them.
REFERENCE_ENCODER_F64 = 1e-14

# erf: float64 relative error against math.erf; float32 in ulps.
ERF_F64_REL = 1e-15
ERF_F32_ULPS = 2

# Real weights against onnxruntime running the official exports.
ORT_LOWRES_LOGITS = 1e-4  # decoder low-res logits (scaled)
ORT_IOU = 1e-5  # decoder IoU predictions (absolute)
ORT_ENCODER = 1e-4  # TinyViT embedding vs encoder.onnx (scaled)

# Masks from whole pipelines (thresholded logits) agree by IoU.
MASK_IOU = 0.999
# A stability score is the IoU of a mask thresholded at +offset with the same
# mask at -offset: the pixels a rounding difference flips move it as they move
# a mask's IoU, so it gets the same bar (absolute).
STABILITY_SCORE = 1 - MASK_IOU


def scaled_error(ours, theirs) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    if ours.size == 0:
        return 0.0
    return float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))


def assert_close(ours, theirs, tol: float, what: str = "value") -> float:
    """Assert scaled error <= tol; on failure print ours and theirs at the
    first element that exceeds it. Returns the scaled error."""
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape ours {ours.shape} != theirs {theirs.shape}"
    assert np.all(np.isfinite(ours)) == np.all(np.isfinite(theirs)), f"{what}: non-finite values differ"
    err = scaled_error(ours, theirs)
    if not err <= tol:
        o = ours.astype(np.float64)
        t = theirs.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(t))))
        bad = np.argwhere(np.abs(o - t) / scale > tol)
        idx = tuple(bad[0])
        raise AssertionError(
            f"{what}: scaled error {err:.3e} > {tol:.1e}; first differing element at {idx}: "
            f"ours {o[idx]!r}, theirs {t[idx]!r} ({len(bad)} elements differ, scale {scale:.3g})"
        )
    return err


def mask_iou(a, b) -> float:
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
