"""npsam.utils.transforms.ResizeLongestSide against the official
segment_anything.utils.transforms.ResizeLongestSide (whose apply_image goes
through the test stub of torchvision, i.e. Pillow, as torchvision does)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import npsam
import oracle
from npsam.utils.transforms import ResizeLongestSide

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"
PHOTOS = ["truck.jpg", "dog.jpg", "groceries.jpg"]


def official(target_length=1024):
    oracle.segment_anything()
    from segment_anything.utils.transforms import ResizeLongestSide as Official

    return Official(target_length)


def test_get_preprocess_shape_equals_official_for_every_size_up_to_2048():
    sizes = np.arange(1, 2049)
    for long_side in (1024, 256, 64, 1):
        for oldh, oldw in [(s, t) for s in sizes for t in (1, 7, 534, 1200, 2048)]:
            ours = ResizeLongestSide.get_preprocess_shape(int(oldh), int(oldw), long_side)
            theirs = official().get_preprocess_shape(int(oldh), int(oldw), long_side)
            assert ours == theirs, (oldh, oldw, long_side, ours, theirs)


@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    dtype=st.sampled_from([np.float64, np.float32, np.int64, np.int32, np.uint16]),
    h=st.integers(1, 4000), w=st.integers(1, 4000),
    target=st.sampled_from([1024, 512, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_apply_coords_and_boxes_equal_official_exactly(shape, dtype, h, w, target, seed):
    rng = np.random.default_rng(seed)
    coords = (rng.random((*shape, 2)) * max(h, w)).astype(dtype)
    boxes = (rng.random((shape[0], 4)) * max(h, w)).astype(dtype)
    ours, theirs = ResizeLongestSide(target), official(target)
    got, want = ours.apply_coords(coords, (h, w)), theirs.apply_coords(coords, (h, w))
    assert got.dtype == want.dtype == np.float64 and got.shape == want.shape
    assert np.array_equal(got, want), f"coords {dtype} {(h, w)}: ours {got}, official {want}"
    got, want = ours.apply_boxes(boxes, (h, w)), theirs.apply_boxes(boxes, (h, w))
    assert got.dtype == want.dtype == np.float64 and got.shape == want.shape
    assert np.array_equal(got, want), f"boxes {dtype} {(h, w)}: ours {got}, official {want}"


def test_apply_coords_copies_and_keeps_float64():
    coords = np.array([[500.0, 375.0], [1125.0, 625.0]])
    out = ResizeLongestSide(1024).apply_coords(coords, (1200, 1800))
    assert out.dtype == np.float64 and not np.shares_memory(out, coords)
    assert np.array_equal(coords, [[500.0, 375.0], [1125.0, 625.0]])  # input untouched
    assert np.array_equal(out, official().apply_coords(coords, (1200, 1800)))
    # the official notebook's box, a 1-D [4]
    box = np.array([425, 600, 700, 875])
    assert np.array_equal(ResizeLongestSide(1024).apply_boxes(box, (1200, 1800)),
                          official().apply_boxes(box, (1200, 1800)))


# Both paths: the reference (pil_resize_bilinear, NumPy) and the fast layer (Pillow itself)
PATHS = pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])


@PATHS
@pytest.mark.parametrize("name", PHOTOS)
def test_apply_image_real_photos_equal_official_byte_for_byte(name, reference):
    image = np.array(Image.open(IMAGES / name).convert("RGB"))
    with npsam.reference(reference):
        ours = ResizeLongestSide(1024).apply_image(image)
    theirs = official().apply_image(image)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{name}: {np.count_nonzero(ours != theirs)} bytes differ"
    assert ours.flags.writeable and ours.flags.c_contiguous


@PATHS
@given(h=st.integers(1, 300), w=st.integers(1, 300), target=st.sampled_from([1024, 256, 37]),
       seed=st.integers(0, 2**32 - 1))
def test_apply_image_random_images_equal_official_byte_for_byte(h, w, target, seed, reference):
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if min(ResizeLongestSide.get_preprocess_shape(h, w, target)) == 0:
        with pytest.raises(ValueError):
            official(target).apply_image(image)
        with pytest.raises(ValueError), npsam.reference(reference):
            ResizeLongestSide(target).apply_image(image)
        return
    with npsam.reference(reference):
        ours = ResizeLongestSide(target).apply_image(image)
    theirs = official(target).apply_image(image)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs), f"{(h, w)} -> {target}"


@given(h=st.integers(1, 120), w=st.integers(1, 120), channels=st.sampled_from([1, 3]), flip=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_apply_image_fast_path_equals_the_reference(h, w, channels, flip, seed):
    """Tall and wide, one channel or three, strided views (a BGR photo reversed):
    the Pillow call and the NumPy mirror agree byte for byte."""
    image = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    image = image[..., ::-1] if flip else image
    fast_out = ResizeLongestSide(64).apply_image(image)
    with npsam.reference():
        ref_out = ResizeLongestSide(64).apply_image(image)
    assert fast_out.shape == ref_out.shape and np.array_equal(fast_out, ref_out), (h, w, channels)


def test_apply_image_fast_path_is_pillow_and_registered():
    from npsam import fast
    from npsam.fast import transforms as fast_transforms

    fast._load()
    assert fast._IMPLEMENTATIONS[(ResizeLongestSide, "apply_image")] is fast_transforms.apply_image
    assert fast_transforms.pillow_image_module() is not None  # Pillow 13 is what the tests run with


@pytest.mark.parametrize(
    "method,args,match",
    [
        ("apply_coords", (np.zeros((3, 3)), (10, 10)), "coords must be \\[..., 2\\]"),
        ("apply_coords", (np.float64(1.0), (10, 10)), "coords must be \\[..., 2\\]"),
        ("apply_coords", (np.zeros((3, 2)), (10,)), "original_size"),
        ("apply_coords", (np.zeros((3, 2)), (0, 10)), "original_size"),
        ("apply_coords", (np.zeros((3, 2)), (10.5, 10)), "original_size"),
        ("apply_boxes", (np.zeros((3, 2)), (10, 10)), "boxes must be \\[..., 4\\]"),
        ("apply_boxes", (np.zeros((2, 5)), (10, 10)), "boxes must be \\[..., 4\\]"),
        ("apply_image", (np.zeros((10, 10), np.uint8),), "image must be \\[H, W, C\\]"),
        ("apply_image", (np.zeros((10, 10, 3), np.float32),), "uint8"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(method, args, match):
    with pytest.raises(ValueError, match=match):
        getattr(ResizeLongestSide(1024), method)(*args)


def test_bad_target_length():
    for bad in (0, -3, 10.5):
        with pytest.raises(ValueError, match="target_length"):
            ResizeLongestSide(bad)
