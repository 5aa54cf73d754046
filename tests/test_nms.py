"""npsam.kernels.nms against torchvision's NMS semantics: the oracle's stub
of torchvision.ops.boxes and a torch-free transcription of its CPU kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import oracle

from npsam.kernels import nms

oracle.segment_anything()
from torchvision.ops import boxes as tv_boxes  # noqa: E402  (the oracle stub)



def _kernel_nms(boxes, scores, thr):
    """Torch-free transcription of torchvision's CPU nms kernel, one scalar at a time."""
    t = boxes.dtype.type
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])  # Python's sort is stable
    area = [t(b[2] - b[0]) * t(b[3] - b[1]) for b in boxes]
    suppressed, keep = [False] * len(boxes), []
    for _i, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[_i + 1:]:
            if suppressed[j]:
                continue
            w = max(t(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            h = max(t(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = w * h
            with np.errstate(invalid="ignore"):  # two empty boxes: 0/0, never suppresses
                ovr = inter / (area[i] + area[j] - inter)
            if float(ovr) > thr:
                suppressed[j] = True
    return keep


def _boxes_and_scores(draw, max_n, ties):
    n = draw(st.integers(0, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xy = rng.integers(0, 60, (n, 2))
    wh = rng.integers(0 if draw(st.booleans()) else 1, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.integers(0, 4, n) / 4 if ties else rng.random(n)
    return boxes, scores


@given(data=st.data(), ties=st.booleans(), thr=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95, 1.0]))
def test_nms_matches_kernel_transcription_float32(data, ties, thr):
    boxes, scores = _boxes_and_scores(data.draw, 40, ties)
    boxes, scores = boxes.astype(np.float32), scores.astype(np.float32)
    ours = nms.nms(boxes, scores, thr)
    assert ours.dtype == np.int64
    assert ours.tolist() == _kernel_nms(boxes, scores, thr)
    # batched: boxes only suppress their own category; integer boxes keep the offsets exact.
    idxs = np.random.default_rng(len(boxes)).integers(0, 3, len(boxes))
    expected = []
    for c in np.unique(idxs):
        sel = np.flatnonzero(idxs == c)
        expected += sel[_kernel_nms(boxes[sel], scores[sel], thr)].tolist()
    expected = sorted(sorted(expected), key=lambda i: -scores[i])  # stable: ties by index
    assert nms.batched_nms(boxes, scores, idxs, thr).tolist() == expected


@given(data=st.data(), ties=st.booleans(), thr=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
       n_cat=st.integers(1, 4), many=st.booleans())
def test_batched_nms_matches_torchvision_stub(data, ties, thr, n_cat, many):
    # The oracle's stub computes IoU in float64; with float64 boxes the arithmetic is the same.
    boxes, scores = _boxes_and_scores(data.draw, 1500 if many else 60, ties)
    if many:  # above 1000 boxes torchvision takes its per-category path
        boxes = np.concatenate([boxes] * (1 + 1100 // max(len(boxes), 1)))[:1100] * 3
        scores = np.random.default_rng(len(boxes)).integers(0, 50, len(boxes)) / 50.0
    boxes = boxes.astype(np.float64)
    idxs = np.random.default_rng(7).integers(0, n_cat, len(boxes))
    ours = nms.batched_nms(boxes, scores, idxs, thr)
    theirs = tv_boxes.batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(idxs), thr).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(nms.box_area(boxes), tv_boxes.box_area(torch.as_tensor(boxes)).numpy())


def test_nms_ties_go_by_index():
    boxes = np.array([[0, 0, 10, 10]] * 3 + [[50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.5, 0.9, 0.9, 0.9], dtype=np.float32)
    assert nms.nms(boxes, scores, 0.5).tolist() == [1, 3]
    assert nms.batched_nms(boxes, scores, np.array([0, 0, 1, 0]), 0.5).tolist() == [1, 2, 3]


def test_nms_rejects_bad_input():
    with pytest.raises(ValueError, match="boxes"):
        nms.nms(np.zeros((3, 5), np.float32), np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="boxes"):
        nms.nms(np.zeros((3, 4), np.int64), np.zeros(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms.nms(np.zeros((3, 4), np.float32), np.zeros(2, np.float32), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        nms.batched_nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32), np.zeros(2), 0.5)
