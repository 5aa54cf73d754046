"""npsam/kernels/resize.py against its references: Pillow's BILINEAR resize (byte for
byte) and torch.nn.functional.interpolate(mode="bilinear", align_corners=False)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from npsam.kernels.resize import (interpolate_bilinear, pil_resize_bilinear, precompute_coeffs, source_index_and_lambda,
                          upscale_crop_resize)
from npsam.utils.transforms import ResizeLongestSide
from tolerances import DECODER_F32, DECODER_F64, assert_close

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"
PHOTOS = ["truck.jpg", "dog.jpg", "groceries.jpg"]


def pillow_resize(image: np.ndarray, size) -> np.ndarray:
    """What the official apply_image computes: PIL's resize((w, h), BILINEAR)."""
    h, w = size
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    out = np.array(pil.resize((w, h), Image.BILINEAR))
    return out[..., None] if image.shape[2] == 1 else out


def assert_same_bytes(ours, theirs, what):
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape, f"{what}: {ours.dtype} {ours.shape} vs {theirs.shape}"
    if not np.array_equal(ours, theirs):
        bad = np.argwhere(ours != theirs)
        idx = tuple(bad[0])
        raise AssertionError(f"{what}: {len(bad)} bytes differ; first at {idx}: ours {ours[idx]}, Pillow {theirs[idx]}")


# --- pil_resize_bilinear ------------------------------------------------------


@st.composite
def image_and_size(draw):
    h = draw(st.integers(1, 300))
    w = draw(st.integers(1, 300))
    c = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["noise", "binary", "smooth"]))
    if kind == "noise":
        image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    elif kind == "binary":  # extremes exercise the clip to [0, 255]
        image = (rng.random((h, w, c)) > 0.5).astype(np.uint8) * 255
    else:
        image = (np.linspace(0, 255, h)[:, None, None] * np.linspace(0, 1, w)[None, :, None]).astype(np.uint8)
        image = np.repeat(image, c, axis=2)
    target = draw(st.sampled_from(["longest_1024", "longest_small", "any", "one_axis"]))
    if target == "longest_1024":
        size = ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    elif target == "longest_small":
        size = ResizeLongestSide.get_preprocess_shape(h, w, draw(st.integers(1, 64)))
    elif target == "any":
        size = (draw(st.integers(1, 400)), draw(st.integers(1, 400)))
    else:  # only one dimension changes: Pillow skips the other pass
        size = (h, draw(st.integers(1, 400))) if draw(st.booleans()) else (draw(st.integers(1, 400)), w)
    return image, size


@given(image_and_size())
def test_pil_resize_bilinear_equals_pillow_byte_for_byte(case):
    image, size = case
    if min(size) == 0:  # a tiny target long side can round a side to 0: both refuse
        with pytest.raises(ValueError, match="height and width must be > 0"):
            pillow_resize(image, size)
        with pytest.raises(ValueError, match="size must be two positive integers"):
            pil_resize_bilinear(image, size)
        return
    assert_same_bytes(pil_resize_bilinear(image, size), pillow_resize(image, size), f"{image.shape} -> {size}")


@pytest.mark.parametrize(
    "shape,size",
    [
        ((35, 13, 3), (6, 26)),  # height shrinks > 2x more than width: Pillow 13 runs the vertical pass first
        ((33, 29, 1), (5, 32)),
        ((2500, 1000, 3), ResizeLongestSide.get_preprocess_shape(2500, 1000, 1024)),  # a tall photo for SAM
        ((1000, 2500, 3), ResizeLongestSide.get_preprocess_shape(1000, 2500, 1024)),  # a wide one
        ((19, 30, 3), (20, 38)),  # growing height: horizontal first
        ((1, 1, 3), (1024, 1024)),
        ((1, 300, 1), (4, 1024)),
        ((300, 1, 3), (1024, 4)),
        ((4000, 3, 1), (1024, 1)),  # a 1-pixel-wide output of a large reduction (support ~4, 9 taps)
        ((9, 3000, 3), (2, 10)),  # 301-tap filter
    ],
)
def test_pil_resize_bilinear_pass_order_and_extreme_sizes(shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert_same_bytes(pil_resize_bilinear(image, size), pillow_resize(image, size), f"{shape} -> {size}")


@pytest.mark.parametrize("name", PHOTOS)
def test_pil_resize_bilinear_real_photos_to_longest_side_1024(name):
    image = np.array(Image.open(IMAGES / name).convert("RGB"))
    size = ResizeLongestSide.get_preprocess_shape(image.shape[0], image.shape[1], 1024)
    assert_same_bytes(pil_resize_bilinear(image, size), pillow_resize(image, size), name)


def test_pil_resize_bilinear_same_size_is_a_copy():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = pil_resize_bilinear(image, (5, 7))
    assert np.array_equal(out, image)
    assert not np.shares_memory(out, image)


def test_precompute_coeffs_are_normalised_fixed_point():
    # Each output pixel's weights are a partition of unity in 22-bit fixed point.
    for in_size, out_size in [(256, 1024), (1800, 1024), (7, 3), (3, 7), (1000, 1)]:
        xmin, kk = precompute_coeffs(in_size, out_size)
        sums = kk.sum(axis=1, dtype=np.int64)
        assert np.all(np.abs(sums - (1 << 22)) <= kk.shape[1]), (in_size, out_size, sums.min(), sums.max())
        assert xmin.min() >= 0 and xmin.max() < in_size


@pytest.mark.parametrize(
    "image,size,match",
    [
        (np.zeros((4, 4), np.uint8), (2, 2), "image must be \\[H, W, C\\]"),
        (np.zeros((4, 4, 4), np.uint8), (2, 2), "C = 1 or 3"),
        (np.zeros((4, 4, 3), np.float32), (2, 2), "uint8"),
        (np.zeros((0, 4, 3), np.uint8), (2, 2), "empty"),
        (np.zeros((4, 4, 3), np.uint8), (0, 2), "size"),
        (np.zeros((4, 4, 3), np.uint8), (2.5, 2), "size"),
        (np.zeros((4, 4, 3), np.uint8), (2,), "size"),
    ],
)
def test_pil_resize_bilinear_rejects_bad_input(image, size, match):
    with pytest.raises(ValueError, match=match):
        pil_resize_bilinear(image, size)


# --- interpolate_bilinear ----------------------------------------------------

DTYPES = [(np.float32, DECODER_F32), (np.float64, DECODER_F64)]
dtype_param = pytest.mark.parametrize("dtype,tol", DTYPES, ids=["f32", "f64"])


def torch_interpolate(x, size):
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size, mode="bilinear", align_corners=False).numpy()


@dtype_param
@given(
    b=st.integers(1, 2), c=st.integers(1, 3),
    in_h=st.integers(1, 80), in_w=st.integers(1, 80),
    out_h=st.integers(1, 200), out_w=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
)
def test_interpolate_bilinear_matches_torch(dtype, tol, b, c, in_h, in_w, out_h, out_w, seed):
    x = (np.random.default_rng(seed).standard_normal((b, c, in_h, in_w)) * 20).astype(dtype)
    ours = interpolate_bilinear(x, (out_h, out_w))
    assert ours.dtype == dtype
    assert_close(ours, torch_interpolate(x, (out_h, out_w)), tol, f"{x.shape} -> {(out_h, out_w)}")


@dtype_param
@given(
    in_h=st.integers(1, 40), in_w=st.integers(1, 40),
    out_h=st.integers(1, 90), out_w=st.integers(1, 90),
    data=st.data(),
)
def test_interpolate_bilinear_crop_is_the_slice_bit_for_bit(dtype, tol, in_h, in_w, out_h, out_w, data):
    # crop=(h0, w0) computes only out[..., :h0, :w0] (postprocess_masks cuts the padding away)
    h0, w0 = data.draw(st.integers(1, out_h)), data.draw(st.integers(1, out_w))
    x = (np.random.default_rng(in_h * 100 + in_w).standard_normal((1, 2, in_h, in_w)) * 20).astype(dtype)
    got = interpolate_bilinear(x, (out_h, out_w), crop=(h0, w0))
    assert got.shape == (1, 2, h0, w0) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, interpolate_bilinear(x, (out_h, out_w))[..., :h0, :w0])


def test_interpolate_bilinear_rejects_a_crop_larger_than_the_size():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"crop must fit in size \(8, 8\), got \(9, 8\)"):
        interpolate_bilinear(x, (8, 8), crop=(9, 8))
    with pytest.raises(ValueError, match=r"crop must be two positive integers"):
        interpolate_bilinear(x, (8, 8), crop=(0, 8))


@dtype_param
def test_interpolate_bilinear_sam_postprocess_shapes(dtype, tol):
    # Sam.postprocess_masks: low-res masks to 1024x1024, crop the padding, then to the photo size.
    rng = np.random.default_rng(0)
    low_res = (rng.standard_normal((1, 3, 256, 256)) * 20).astype(dtype)
    ours = interpolate_bilinear(low_res, (1024, 1024))
    theirs = torch_interpolate(low_res, (1024, 1024))
    assert_close(ours, theirs, tol, "256 -> 1024")
    for photo in [(1200, 1800), (534, 800), (1800, 1200)]:
        h, w = ResizeLongestSide.get_preprocess_shape(*photo, 1024)
        crop = theirs[..., :h, :w]  # a strided view, as official
        assert_close(interpolate_bilinear(crop, photo), torch_interpolate(crop, photo), tol, f"crop {h}x{w} -> {photo}")


@dtype_param
@pytest.mark.parametrize("in_size,out_size", [(256, 1024), (683, 1200), (1024, 683), (7, 13), (3, 1000), (100, 37), (5, 5)])
def test_source_index_and_lambda_equal_torch_weights_exactly(dtype, tol, in_size, out_size):
    # Interpolating the rows of an identity matrix along the width gives
    # torch's weight of every input pixel for every output pixel, exactly.
    eye = np.eye(in_size, dtype=dtype).reshape(in_size, 1, 1, in_size)
    weights = torch_interpolate(eye, (1, out_size))[:, 0, 0, :]  # [in, out]
    index0, index1, lambda0, lambda1 = source_index_and_lambda(in_size, out_size, dtype)
    ours = np.zeros_like(weights)
    cols = np.arange(out_size)
    ours[index0, cols] += lambda0
    ours[index1, cols] += lambda1
    # (where index0 == index1 at the border, torch's value is lambda0 + lambda1 too)
    assert np.array_equal(ours, weights), f"first differing weight at {np.argwhere(ours != weights)[0]}"


def test_interpolate_bilinear_out_argument_and_same_size():
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 20)).astype(np.float32)
    for size in [(64, 64), (16, 64), (64, 20), (16, 20)]:
        out = np.full((2, 3, *size), np.nan, dtype=np.float32)
        got = interpolate_bilinear(x, size, out=out)
        assert got is out
        assert_close(out, torch_interpolate(x, size), DECODER_F32, f"out= {size}")
    same = interpolate_bilinear(x, (16, 20))
    assert np.array_equal(same, x) and not np.shares_memory(same, x)


@pytest.mark.parametrize(
    "x,size,kwargs,match",
    [
        (np.zeros((3, 4, 4), np.float32), (2, 2), {}, "x must be \\[B, C, H, W\\]"),
        (np.zeros((1, 1, 4, 4), np.float16), (2, 2), {}, "float32 or float64"),
        (np.zeros((1, 1, 4, 4), np.int64), (2, 2), {}, "float32 or float64"),
        (np.zeros((1, 1, 0, 4), np.float32), (2, 2), {}, "non-empty"),
        (np.zeros((1, 1, 4, 4), np.float32), (0, 2), {}, "size"),
        (np.zeros((1, 1, 4, 4), np.float32), (2, 2), {"out": np.zeros((1, 1, 2, 3), np.float32)}, "out"),
        (np.zeros((1, 1, 4, 4), np.float32), (2, 2), {"out": np.zeros((1, 1, 2, 2), np.float64)}, "out"),
    ],
)
def test_interpolate_bilinear_rejects_bad_input(x, size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        interpolate_bilinear(x, size, **kwargs)


# --- upscale_crop_resize (Sam.postprocess_masks, SamOnnxModel.mask_postprocessing) ---


def torch_postprocess(x, size, crop, out_size):
    """The official mask postprocessing: resize, slice the crop, resize."""
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size, mode="bilinear", align_corners=False)
    t = t[..., : crop[0], : crop[1]]
    return F.interpolate(t, out_size, mode="bilinear", align_corners=False).numpy()


@dtype_param
@given(
    in_h=st.integers(1, 40), in_w=st.integers(1, 40),
    size_h=st.integers(1, 160), size_w=st.integers(1, 160),
    out_h=st.integers(1, 200), out_w=st.integers(1, 200),
    data=st.data(),
)
def test_upscale_crop_resize_matches_torch(dtype, tol, in_h, in_w, size_h, size_w, out_h, out_w, data):
    crop = data.draw(st.integers(1, size_h)), data.draw(st.integers(1, size_w))
    x = (np.random.default_rng(in_h * 1000 + in_w).standard_normal((2, 3, in_h, in_w)) * 20).astype(dtype)
    ours = upscale_crop_resize(x, (size_h, size_w), crop, (out_h, out_w))
    assert ours.dtype == dtype and ours.shape == (2, 3, out_h, out_w) and ours.flags.c_contiguous
    what = f"{x.shape} -> {(size_h, size_w)} crop {crop} -> {(out_h, out_w)}"
    assert_close(ours, torch_postprocess(x, (size_h, size_w), crop, (out_h, out_w)), tol, what)


@dtype_param
@pytest.mark.parametrize("photo", [(1200, 1800), (534, 800), (1800, 1200), (1024, 1024), (300, 4000)])
def test_upscale_crop_resize_sam_postprocess_shapes(dtype, tol, photo):
    # 256x256 low-res logits -> 1024 -> crop the padding -> the photo (a strided view in, as official)
    low_res = (np.random.default_rng(1).standard_normal((1, 4, 256, 256)) * 20).astype(dtype)[:, 1:]
    crop = ResizeLongestSide.get_preprocess_shape(*photo, 1024)
    ours = upscale_crop_resize(low_res, (1024, 1024), crop, photo)
    assert_close(ours, torch_postprocess(low_res, (1024, 1024), crop, photo), tol, f"{crop} -> {photo}")
    # and the two resizes it replaces, within the same bound
    two = interpolate_bilinear(interpolate_bilinear(low_res, (1024, 1024), crop=crop), photo)
    assert_close(ours, two, tol, f"{crop} -> {photo}, against npsam's two resizes")


@dtype_param
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "huge"])
def test_upscale_crop_resize_non_finite_input_is_the_two_resizes(dtype, tol, bad):
    # A matrix product would spread inf or NaN over a whole band block: such
    # inputs (and values near overflow) take the two resizes, bit for bit, and
    # mark the same pixels non-finite as torch.
    x = (np.random.default_rng(2).standard_normal((1, 2, 64, 64)) * 20).astype(dtype)
    x[0, 1, 30, 7] = np.finfo(dtype).max / 2 if bad == "huge" else bad
    ours = upscale_crop_resize(x, (256, 256), (171, 256), (300, 450))
    two = interpolate_bilinear(interpolate_bilinear(x, (256, 256), crop=(171, 256)), (300, 450))
    np.testing.assert_array_equal(ours, two)
    theirs = torch_postprocess(x, (256, 256), (171, 256), (300, 450))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    assert np.all(np.isfinite(ours[0, 0]))  # the other mask is untouched


@pytest.mark.parametrize(
    "x,args,match",
    [
        (np.zeros((3, 4, 4), np.float32), ((8, 8), (8, 8), (5, 5)), "x must be \\[B, C, H, W\\]"),
        (np.zeros((1, 1, 4, 4), np.float16), ((8, 8), (8, 8), (5, 5)), "float32 or float64"),
        (np.zeros((1, 1, 0, 4), np.float32), ((8, 8), (8, 8), (5, 5)), "non-empty"),
        (np.zeros((1, 1, 4, 4), np.float32), ((8, 8), (9, 8), (5, 5)), r"crop must fit in size \(8, 8\), got \(9, 8\)"),
        (np.zeros((1, 1, 4, 4), np.float32), ((8, 8), (0, 8), (5, 5)), "crop must be two positive integers"),
        (np.zeros((1, 1, 4, 4), np.float32), ((8, 8), (8, 8), (5, -1)), "out_size must be two positive integers"),
    ],
)
def test_upscale_crop_resize_rejects_bad_input(x, args, match):
    with pytest.raises(ValueError, match=match):
        upscale_crop_resize(x, *args)
