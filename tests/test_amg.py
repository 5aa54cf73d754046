"""npsam.utils.amg against the official segment_anything/utils/amg.py (torch), OpenCV
(through the official remove_small_regions) and pycocotools. The stand-ins it
and the generator call have their own tests: tests/test_nms.py (torchvision's
NMS) and tests/test_connected_components.py (OpenCV's labelling).

Integers, booleans and RLEs must be equal exactly; the float outputs here
(stability score, uncropped float boxes) are computed with the official
arithmetic and compared exactly too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import oracle
from tolerances import MASK_IOU, mask_iou

from npsam.utils import amg

oracle.segment_anything()
from segment_anything.utils import amg as ref  # noqa: E402


def _masks(draw, max_side=24, batch=None):
    """A [B, H, W] bool mask batch: iid noise or upsampled blobs, both densities."""
    b = draw(st.integers(1, 4)) if batch is None else batch
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        return rng.random((b, h, w)) < p
    cell = draw(st.integers(2, 5))
    coarse = rng.random((b, -(-h // cell), -(-w // cell))) < p
    return np.kron(coarse, np.ones((1, cell, cell), dtype=bool))[:, :h, :w].astype(bool)


masks_strategy = st.composite(_masks)


# ---------------------------------------------------------------- MaskData


def test_mask_data_filter_cat_items_match_official():
    rng = np.random.default_rng(0)
    arr = rng.random((6, 3)).astype(np.float32)
    lst = [f"r{i}" for i in range(6)]
    ours = amg.MaskData(a=arr.copy(), l=list(lst))
    theirs = ref.MaskData(a=torch.as_tensor(arr), l=list(lst))
    ours.cat(amg.MaskData(a=arr[:2].copy(), l=lst[:2]))
    theirs.cat(ref.MaskData(a=torch.as_tensor(arr[:2]), l=lst[:2]))
    keep_bool = np.array([1, 0, 1, 1, 0, 1, 1, 0], dtype=bool)
    ours.filter(keep_bool)
    theirs.filter(torch.as_tensor(keep_bool))
    keep_idx = np.array([4, 0, 2])
    ours.filter(keep_idx)
    theirs.filter(torch.as_tensor(keep_idx))
    theirs.to_numpy()
    ours.to_numpy()
    assert [k for k, _ in ours.items()] == [k for k, _ in theirs.items()]
    np.testing.assert_array_equal(ours["a"], theirs["a"])
    assert ours["l"] == theirs["l"]
    ours["b"] = np.arange(3)
    del ours["a"]
    assert [k for k, _ in ours.items()] == ["l", "b"]


def test_mask_data_cat_promotes_like_torch_cat():
    # The official MaskData holds tensors: float32 [0, 4] boxes (no masks in a
    # batch) or float32 [0] crop boxes (no masks in a crop) turn int64 boxes float32.
    cases = [(np.zeros((0, 4), np.float32), np.ones((2, 4), np.int64)),
             (np.ones((2, 4), np.int64), np.zeros((0, 4), np.float32)),
             (np.zeros(0, np.float32), np.ones((2, 4), np.int64)),
             (np.ones((2, 4), np.int64), np.zeros(0, np.float32)),
             (np.zeros(0, np.float32), np.zeros(0, np.float32)),
             (np.ones((1, 2), np.float64), np.ones((2, 2), np.float32))]
    for first, second in cases:
        ours, theirs = amg.MaskData(b=first), ref.MaskData(b=torch.as_tensor(first))
        ours.cat(amg.MaskData(b=second))
        theirs.cat(ref.MaskData(b=torch.as_tensor(second)))
        assert ours["b"].dtype == theirs["b"].numpy().dtype and ours["b"].shape == tuple(theirs["b"].shape)
        np.testing.assert_array_equal(ours["b"], theirs["b"].numpy())


def test_mask_data_cat_copies_rle_records_as_deepcopy_does():
    """The fast twin of cat copies RLE records without deepcopy: the same data
    as the reference cat and the official one, nothing shared with the input
    but the (immutable) counts, and any other item deep-copied."""
    import npsam

    rles = [{"size": [2, 3], "counts": [1, 4, 1]}, {"size": [2, 3], "counts": [0, 6]},
            {"size": [2, 3], "counts": [np.int64(6)]}, {"size": [2, 3], "counts": [[1], 5]},
            ["not", ["an", "rle"]]]
    results = []
    for reference in (False, True):
        first = amg.MaskData(rles=[dict(r) if isinstance(r, dict) else r for r in rles[:1]])
        new = amg.MaskData(rles=rles)
        if reference:
            with npsam.reference():
                first.cat(new)
        else:
            first.cat(new)
        results.append(first["rles"])
        for got, given_ in zip(first["rles"][1:], rles):
            assert got == given_ and got is not given_
            if isinstance(got, dict):
                assert got["counts"] is not given_["counts"] and got["size"] is not given_["size"]
                assert all(a is not b for a, b in zip(got["counts"], given_["counts"]) if isinstance(b, list))
            else:
                assert got[1] is not given_[1]
    theirs = ref.MaskData(rles=list(rles[:1]))
    theirs.cat(ref.MaskData(rles=rles))
    assert results[0] == results[1] == theirs["rles"]
    assert [type(c) for c in results[0][3]["counts"]] == [np.int64]


def test_mask_data_rejects_other_types():
    with pytest.raises(ValueError, match="x"):
        amg.MaskData(x=3)
    with pytest.raises(ValueError, match="keep"):
        amg.MaskData(x=[1, 2]).filter(np.array([0.5, 1.0]))


# ---------------------------------------------------------------- boxes and points


boxes_xyxy = hnp.arrays(np.int64, st.tuples(st.integers(0, 30), st.just(4)), elements=st.integers(0, 400))
crop_boxes = st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(1, 200), st.integers(1, 200)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]
)


@given(boxes=boxes_xyxy, crop_box=crop_boxes, atol=st.sampled_from([0.0, 1.5, 20.0, 33.3]))
def test_is_box_near_crop_edge(boxes, crop_box, atol):
    orig = [0, 0, 420, 410]
    ours = amg.is_box_near_crop_edge(boxes, crop_box, orig, atol=atol)
    theirs = ref.is_box_near_crop_edge(torch.as_tensor(boxes), crop_box, orig, atol=atol).numpy()
    assert ours.dtype == bool
    np.testing.assert_array_equal(ours, theirs)


@given(box=hnp.arrays(st.sampled_from([np.int64, np.float32]), 4, elements=st.integers(-50, 500)))
def test_box_xyxy_to_xywh(box):
    ours = amg.box_xyxy_to_xywh(box)
    theirs = ref.box_xyxy_to_xywh(torch.as_tensor(box)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == theirs.dtype
    assert ours is not box


@given(n=st.integers(0, 50), batch_size=st.integers(1, 20))
def test_batch_iterator(n, batch_size):
    a, b = np.arange(n), list(range(100, 100 + n))
    ours = list(amg.batch_iterator(batch_size, a, b))
    theirs = list(ref.batch_iterator(batch_size, a, b))
    assert len(ours) == len(theirs)
    for (oa, ob), (ta, tb) in zip(ours, theirs):
        np.testing.assert_array_equal(oa, ta)
        assert ob == tb
    with pytest.raises(ValueError, match="args"):
        list(amg.batch_iterator(batch_size, a, b + [1]))


@given(
    pts=hnp.arrays(st.sampled_from([np.float64, np.float32, np.int64]), st.tuples(st.integers(0, 8), st.just(2)),
                   elements=st.integers(0, 1000)),
    crop_box=crop_boxes, channel=st.booleans(),
)
def test_uncrop_points_and_boxes(pts, crop_box, channel):
    boxes = np.concatenate([pts, pts + 3], axis=1)  # [N, 4]
    if channel:
        pts, boxes = pts[:, None], boxes[:, None]
    for ours_fn, ref_fn, x in ((amg.uncrop_points, ref.uncrop_points, pts),
                               (amg.uncrop_boxes_xyxy, ref.uncrop_boxes_xyxy, boxes)):
        ours = ours_fn(x, crop_box)
        theirs = ref_fn(torch.as_tensor(x), crop_box).numpy()
        assert ours.dtype == theirs.dtype, (ours_fn.__name__, ours.dtype, theirs.dtype)
        np.testing.assert_array_equal(ours, theirs)


@given(data=st.data())
def test_uncrop_masks(data):
    orig_h, orig_w = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 30))
    x0, y0 = data.draw(st.integers(0, orig_w - 1)), data.draw(st.integers(0, orig_h - 1))
    x1, y1 = data.draw(st.integers(x0 + 1, orig_w)), data.draw(st.integers(y0 + 1, orig_h))
    masks = np.random.default_rng(data.draw(st.integers(0, 99))).random((3, y1 - y0, x1 - x0)) < 0.5
    ours = amg.uncrop_masks(masks, [x0, y0, x1, y1], orig_h, orig_w)
    theirs = ref.uncrop_masks(torch.as_tensor(masks), [x0, y0, x1, y1], orig_h, orig_w).numpy()
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------- grids and crops


@given(n=st.integers(1, 40), layers=st.integers(0, 3), scale=st.integers(1, 4))
def test_point_grids(n, layers, scale):
    if n < scale**layers:  # the last layer would have no points (the official divides by zero)
        with pytest.raises(ValueError, match="n_per_side"):
            amg.build_all_layer_point_grids(n, layers, scale)
        return
    np.testing.assert_array_equal(amg.build_point_grid(n), ref.build_point_grid(n))
    ours = amg.build_all_layer_point_grids(n, layers, scale)
    theirs = ref.build_all_layer_point_grids(n, layers, scale)
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        np.testing.assert_array_equal(o, t)


@given(h=st.integers(1, 3000), w=st.integers(1, 3000), layers=st.integers(0, 3),
       ratio=st.sampled_from([512 / 1500, 0.0, 0.25, 0.5]))
def test_generate_crop_boxes(h, w, layers, ratio):
    assert amg.generate_crop_boxes((h, w), layers, ratio) == ref.generate_crop_boxes((h, w), layers, ratio)


# ---------------------------------------------------------------- RLE


@given(masks=masks_strategy())
def test_mask_to_rle_and_back(masks):
    ours = amg.mask_to_rle(masks)
    theirs = ref.mask_to_rle_pytorch(torch.as_tensor(masks))
    assert ours == theirs
    assert amg.mask_to_rle_pytorch is amg.mask_to_rle
    for rle, m in zip(ours, masks):
        assert all(type(c) is int for c in rle["counts"]) and all(type(s) is int for s in rle["size"])
        back = amg.rle_to_mask(rle)
        np.testing.assert_array_equal(back, ref.rle_to_mask(rle))
        np.testing.assert_array_equal(back, m)
        assert amg.area_from_rle(rle) == ref.area_from_rle(rle) == int(m.sum())


@given(masks=masks_strategy())
def test_rle_of_mask_is_mask_to_rle(masks):
    """The generator's fast RLE of one mask (found without a transposed copy)
    against the official mask_to_rle_pytorch."""
    from npsam.fast.automatic_mask_generator import rle_of_mask

    theirs = ref.mask_to_rle_pytorch(torch.as_tensor(masks))
    for m, t in zip(masks, theirs):
        ours = rle_of_mask(m)
        assert ours == t
        assert all(type(c) is int for c in ours["counts"]) and all(type(s) is int for s in ours["size"])


def test_rle_of_mask_photo_sized():
    from npsam.fast.automatic_mask_generator import rle_of_mask

    yy, xx = np.mgrid[:1200, :1801]
    blob = ((yy - 600) ** 2 / 300 ** 2 + (xx - 900) ** 2 / 500 ** 2) < 1
    for m in (blob, ~blob, np.zeros_like(blob), np.ones_like(blob), blob ^ (xx % 7 == 0)):
        assert rle_of_mask(m) == ref.mask_to_rle_pytorch(torch.as_tensor(m[None]))[0]


def test_rle_to_mask_rejects_wrong_counts():
    with pytest.raises(ValueError, match="rle"):
        amg.rle_to_mask({"size": [2, 3], "counts": [1, 2]})


@given(masks=masks_strategy(max_side=40, batch=1))
def test_coco_encode_rle_matches_pycocotools(masks):
    rle = amg.mask_to_rle(masks)[0]
    ours = amg.coco_encode_rle(rle)
    assert ours == ref.coco_encode_rle(rle)
    from pycocotools import mask as mask_utils

    np.testing.assert_array_equal(mask_utils.decode({**ours, "counts": ours["counts"].encode()}), masks[0])


# ---------------------------------------------------------------- scores and boxes from masks


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 20), st.integers(1, 20)),
    seed=st.integers(0, 2**32 - 1),
    mask_threshold=st.sampled_from([0.0, 0.3, -1.0]),
    offset=st.sampled_from([1.0, 0.1, 0.7, 2.5]),
    dtype=st.sampled_from([np.float32, np.float64]),
    quantize=st.booleans(),
)
def test_calculate_stability_score(shape, seed, mask_threshold, offset, dtype, quantize):
    logits = np.random.default_rng(seed).normal(0.0, 2.0, shape).astype(dtype)
    if quantize:  # values exactly on the thresholds
        logits = np.round(logits * 10) / 10
    ours = amg.calculate_stability_score(logits, mask_threshold, offset)
    theirs = ref.calculate_stability_score(torch.as_tensor(logits), mask_threshold, offset).numpy()
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)  # the same integer counts, one float32 division


def test_calculate_stability_score_full_size():
    logits = np.random.default_rng(3).normal(0.0, 3.0, (2, 3, 600, 1000)).astype(np.float32)
    ours = amg.calculate_stability_score(logits, 0.0, 1.0)
    theirs = ref.calculate_stability_score(torch.as_tensor(logits), 0.0, 1.0).numpy()
    np.testing.assert_array_equal(ours, theirs)


@given(masks=masks_strategy(max_side=20), lead=st.sampled_from([(), (1,), (2,)]),
       p_empty=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 99))
def test_batched_mask_to_box(masks, lead, p_empty, seed):
    masks = masks & (np.random.default_rng(seed).random((len(masks), 1, 1)) >= p_empty)  # some empty masks
    if lead == ():
        masks = masks[0]
    elif lead == (2,) and len(masks) % 2 == 0:
        masks = masks.reshape(2, -1, *masks.shape[1:])
    ours = amg.batched_mask_to_box(masks)
    theirs = ref.batched_mask_to_box(torch.as_tensor(masks)).numpy()
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_batched_mask_to_box_empty_input():
    for shape in [(0, 5, 6), (2, 0, 4, 4), (3, 0, 7)]:
        masks = np.zeros(shape, dtype=bool)
        ours = amg.batched_mask_to_box(masks)
        theirs = ref.batched_mask_to_box(torch.as_tensor(masks)).numpy()
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape


# ---------------------------------------------------------------- remove_small_regions (OpenCV)


@given(masks=masks_strategy(max_side=40, batch=1), area_thresh=st.sampled_from([0, 1, 2, 3, 5, 10.5, 40, 10_000]),
       mode=st.sampled_from(["holes", "islands"]))
def test_remove_small_regions_matches_opencv(masks, area_thresh, mode):
    mask = masks[0]
    ours, ours_changed = amg.remove_small_regions(mask, area_thresh, mode)
    theirs, theirs_changed = ref.remove_small_regions(mask, area_thresh, mode)
    assert ours_changed == theirs_changed
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_remove_small_regions_keeps_cv2s_first_largest_island():
    # Every island is small and several tie for largest: the official keeps the
    # first in cv2's label order (first 2x2 block in raster order), not raster order of pixels.
    mask = np.zeros((6, 8), dtype=bool)
    mask[1, 0:2] = True  # first 2x2 block (0, 0) but second raster row
    mask[0, 3:5] = True  # first pixel in raster order
    mask[4, 6:8] = True
    ours, _ = amg.remove_small_regions(mask, 10, "islands")
    theirs, _ = ref.remove_small_regions(mask, 10, "islands")
    np.testing.assert_array_equal(ours, theirs)
    assert ours[1, 0] and not ours[0, 3]


def test_remove_small_regions_large_masks():
    rng = np.random.default_rng(0)
    noise = rng.random((1024, 1024)) < 0.45  # tens of thousands of components
    blobs = np.zeros((1000, 1100), dtype=bool)
    for y, x, r in zip(rng.integers(0, 1000, 2000), rng.integers(0, 1100, 2000), rng.integers(1, 12, 2000)):
        blobs[max(0, y - r): y + r, max(0, x - r): x + r] = True
    for mask in (noise, blobs):
        for mode in ("holes", "islands"):
            ours, oc = amg.remove_small_regions(mask, 100, mode)
            theirs, tc = ref.remove_small_regions(mask, 100, mode)
            assert oc == tc
            np.testing.assert_array_equal(ours, theirs)
            assert mask_iou(ours, theirs) >= MASK_IOU


def test_remove_small_regions_rejects_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        amg.remove_small_regions(np.zeros((3, 3), bool), 4, "blobs")
