"""npsam/io/image_io.py: reading photos as the official notebooks do (cv2.imread
then BGR -> RGB), checking image arrays, writing PNGs that Pillow reads back
identically."""

import os
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from npsam.io.image_io import check_image, encode_png, load_image, save_png

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"
PHOTOS = ["truck.jpg", "dog.jpg", "groceries.jpg"]


def cv2_rgb(path):
    """How the official notebooks read a photo."""
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# --- load_image --------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_load_image_equals_the_official_notebooks_cv2_read(name):
    ours = load_image(IMAGES / name)
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3
    assert np.array_equal(ours, cv2_rgb(IMAGES / name))


def test_load_image_applies_exif_orientation_like_cv2(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.shape == (60, 40, 3)
    assert np.array_equal(upright, cv2_rgb(path))
    as_stored = load_image(path, exif_transpose=False)
    assert as_stored.shape == (40, 60, 3)
    assert np.array_equal(np.rot90(as_stored, k=-1), upright)


def test_load_image_converts_grayscale_and_rgba_to_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert np.array_equal(load_image(tmp_path / "g.png"), np.repeat(gray[..., None], 3, axis=2))
    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgba[..., :3])


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)
    with pytest.raises(IsADirectoryError, match=str(tmp_path.name)):
        load_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        load_image(text)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes((IMAGES / "dog.jpg").read_bytes()[:2000])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(truncated)


def test_load_image_without_pillow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r'pip install "npsam\[image\]"'):
        load_image(IMAGES / "dog.jpg")


# --- check_image -------------------------------------------------------------


def test_check_image_returns_rgb_and_reverses_bgr():
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert np.array_equal(check_image(image), image)
    assert np.array_equal(check_image(image, "RGB"), image)
    assert np.array_equal(check_image(image[..., ::-1], "BGR"), image)  # as SamPredictor.set_image


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((5, 6), np.uint8), "grayscale.*\\(5, 6\\).*convert"),
        (np.zeros((5, 6, 1), np.uint8), "grayscale.*\\(5, 6, 1\\)"),
        (np.zeros((5, 6, 4), np.uint8), "RGBA.*convert"),
        (np.zeros((5, 6, 2), np.uint8), "image must be \\[H, W, 3\\].*\\(5, 6, 2\\)"),
        (np.zeros((2, 5, 6, 3), np.uint8), "image must be \\[H, W, 3\\].*\\(2, 5, 6, 3\\)"),
        (np.zeros((5, 6, 3), np.float32), "uint8, got dtype float32"),
        (np.zeros((5, 6, 3), np.int64), "uint8, got dtype int64"),
        (np.zeros((0, 6, 3), np.uint8), "empty"),
        (np.zeros((5, 0, 3), np.uint8), "empty"),
    ],
)
def test_check_image_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match="image") as info:
        check_image(image)
    assert info.match(match)


def test_check_image_rejects_bad_format():
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR', got 'rgb'"):
        check_image(np.zeros((2, 2, 3), np.uint8), "rgb")


# --- save_png ----------------------------------------------------------------


@given(
    h=st.integers(1, 40), w=st.integers(1, 40),
    kind=st.sampled_from(["bool", "gray", "rgb", "rgba"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_save_png_reads_back_identically_in_pillow(tmp_path_factory, h, w, kind, seed):
    rng = np.random.default_rng(seed)
    array = {
        "bool": lambda: rng.random((h, w)) > 0.5,
        "gray": lambda: rng.integers(0, 256, (h, w), dtype=np.uint8),
        "rgb": lambda: rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "rgba": lambda: rng.integers(0, 256, (h, w, 4), dtype=np.uint8),
    }[kind]()
    path = tmp_path_factory.mktemp("png") / "out.png"
    save_png(path, array)
    with Image.open(path) as img:
        img.verify()  # checks the CRCs
    with Image.open(path) as img:
        assert img.mode == {"bool": "1", "gray": "L", "rgb": "RGB", "rgba": "RGBA"}[kind]
        back = np.array(img)
    assert back.dtype == array.dtype and np.array_equal(back, array)
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(bool) if kind == "bool" else back, array)


def _idat(data: bytes) -> bytes:
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    return zlib.decompress(data[idat + 4:idat + 4 + length])


def test_encode_png_layout():
    data = encode_png(np.array([[0, 255], [1, 3]], dtype=np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    # 8-bit rows: filter byte 2 ("Up"), then each byte minus the one above (mod 256);
    # the first row's "above" is zeros
    assert _idat(data) == b"\x02\x00\xff" + b"\x02\x01\x04"
    # 1-bit masks: filter byte 0, then the packed row (the server reads these rows back as they are)
    assert _idat(encode_png(np.array([[True, False, True], [False, False, True]]))) == b"\x00\xa0\x00\x20"


def test_photo_png_decodes_to_the_same_pixels_as_pillows_own_png(tmp_path):
    """A real photo (the overlays' content): npsam's PNG and the one Pillow writes
    decode, in Pillow and OpenCV, to the photo's pixels."""
    photo = load_image(IMAGES / "dog.jpg")  # [H, W, 3]
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    save_png(ours, photo)
    Image.fromarray(photo).save(theirs)
    with Image.open(ours) as a, Image.open(theirs) as b:
        assert a.mode == b.mode == "RGB"
        assert np.array_equal(np.array(a), photo) and np.array_equal(np.array(b), photo)
    assert np.array_equal(cv2.imread(str(ours), cv2.IMREAD_UNCHANGED)[..., ::-1], photo)


def test_save_png_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "mask.png"
    save_png(path, np.ones((3, 3), bool))
    save_png(path, np.zeros((2, 5), np.uint8))  # overwrite
    assert np.array_equal(np.array(Image.open(path)), np.zeros((2, 5), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["mask.png"]
    assert (path.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "array",
    [np.zeros((3, 3), np.float32), np.zeros((3, 3, 2), np.uint8), np.zeros((3, 3, 3), np.uint16),
     np.zeros((3,), np.uint8), np.zeros((0, 3), np.uint8), np.zeros((3, 3, 3), bool)],
)
def test_save_png_rejects_bad_arrays_and_writes_nothing(tmp_path, array):
    with pytest.raises(ValueError, match="array"):
        save_png(tmp_path / "x.png", array)
    assert os.listdir(tmp_path) == []
