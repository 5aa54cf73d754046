"""Reading photos, checking image arrays, writing PNGs.

- ``load_image``: a file to an [H, W, 3] uint8 RGB array (Pillow, imported
  only here; ``pip install "npsam[image]"``).
- ``check_image``: validates an [H, W, 3] uint8 array and returns it as RGB,
  as the official ``SamPredictor.set_image`` expects.
- ``save_png``: writes masks and images as PNG with NumPy and zlib only
  (see ``encode_png`` for how, and why not through Pillow).

Dimension letters: H, W image height and width.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from .files import atomic_write

IMAGE_FORMATS = ("RGB", "BGR")


def load_image(path, exif_transpose: bool = True) -> np.ndarray:
    """Read an image file as an [H, W, 3] uint8 RGB array.

    NOTE(reference): the official notebooks and scripts/amg.py read photos
    with ``cv2.imread`` then convert BGR to RGB. ``cv2.imread`` turns the
    image upright by its EXIF Orientation tag, so by default so does this
    (``exif_transpose=False`` keeps the stored pixel order). The three example
    photos carry no Orientation tag, and Pillow and OpenCV decode them to the
    same bytes.
    """
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise ImportError('reading images needs Pillow: pip install "npsam[image]"') from None

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"image path is a directory, not a file: {path!r}")
    try:
        with Image.open(path) as img:
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")  # [H, W] any mode -> [H, W, 3] RGB
            array = np.array(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path!r}: {error}") from error
    return array


def check_image(image, image_format: str = "RGB") -> np.ndarray:
    """Validate an [H, W, 3] uint8 image and return it in RGB order.

    NOTE(reference): SamPredictor.set_image reverses the channels when
    image_format differs from the model's "RGB": image[..., ::-1].
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(
            f"image must be [H, W, 3] uint8 RGB, got a grayscale image of shape {image.shape}; "
            "convert it to RGB first (e.g. np.repeat(gray[..., None], 3, axis=2))"
        )
    if image.ndim == 3 and image.shape[2] == 4:
        raise ValueError(
            f"image must be [H, W, 3] uint8 RGB, got 4 channels (RGBA) of shape {image.shape}; "
            "convert it to RGB first (e.g. drop the alpha channel: image[..., :3])"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be [H, W, 3] uint8, got dtype {image.dtype}; "
            "scale and convert it first (e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be [H, W, 3] with H, W >= 1, got an empty image of shape {image.shape}")
    if image_format == "BGR":
        image = image[..., ::-1]  # [H, W, 3] BGR -> RGB
    return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


# How encode_png compresses. 8-bit images (the overlays: photos) get PNG's "Up"
# filter on every row and zlib level 1: on truck.jpg's 1800x1200 overlay that
# is 58 ms and 2.24 MB, against 186 ms and 2.58 MB unfiltered at level 6 (and
# Pillow's adaptive filters: 405 ms and 1.99 MB at its default level 6, 124 ms
# and 2.15 MB at level 1). 1-bit masks stay unfiltered at level 6: about 1 ms
# for a photo-sized mask, and npsam's server reads their rows back unfiltered.
UP_FILTER, NO_FILTER = 2, 0
IMAGE_LEVEL, MASK_LEVEL = 1, 6


def encode_png(array) -> bytes:
    """The bytes of a PNG holding ``array``: [H, W] bool (1-bit grayscale),
    [H, W] uint8 (grayscale), [H, W, 3] uint8 (RGB) or [H, W, 4] uint8 (RGBA)."""
    array = np.asarray(array)
    if array.ndim == 2 and array.dtype == np.bool_:
        bit_depth, color_type, filter_type, level = 1, 0, NO_FILTER, MASK_LEVEL
        rows = np.packbits(array, axis=1)  # [H, W] bool -> [H, ceil(W / 8)], most significant bit first
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        bit_depth, filter_type, level = 8, UP_FILTER, IMAGE_LEVEL
        color_type = 0 if array.ndim == 2 else {3: 2, 4: 6}[array.shape[2]]
        rows = array.reshape(array.shape[0], -1)  # [H, W(, 3 or 4)] -> [H, W * channels]
    else:
        raise ValueError(
            "array must be [H, W] bool or uint8, [H, W, 3] or [H, W, 4] uint8, "
            f"got {array.dtype} of shape {array.shape}"
        )
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"array must not be empty, got shape {array.shape}")
    # Each scanline starts with its filter type. "Up" stores each byte minus the
    # byte above it, modulo 256 (uint8 arithmetic); the first row's "above" is zeros.
    raw = np.empty((height, 1 + rows.shape[1]), dtype=np.uint8)  # [H, 1 + row bytes]
    raw[:, 0] = filter_type
    if filter_type == UP_FILTER:
        raw[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # [H - 1, row bytes]
    else:
        raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, level))
        + _png_chunk(b"IEND", b"")
    )


def save_png(path, array) -> None:
    """Write ``array`` as a PNG at ``path``, through a temporary file in the
    same folder renamed at the end (never a half-written file)."""
    data = encode_png(array)
    atomic_write(path, lambda f: f.write(data))


def encode_indexed_png(indices, palette) -> bytes:
    """The bytes of a palette PNG: ``indices`` [H, W] (bool, or uint8 below
    len(palette)) naming for each pixel an RGBA colour of ``palette`` [K, 4]
    uint8 (K <= 256). A bool mask with a transparent colour 0 makes a mask
    overlay a browser draws as it is; bool indices are written 1 bit per pixel."""
    indices = np.asarray(indices)
    palette = np.asarray(palette)
    if palette.dtype != np.uint8 or palette.ndim != 2 or palette.shape[1] != 4 or not 1 <= palette.shape[0] <= 256:
        raise ValueError(f"palette: expected [K, 4] uint8 RGBA colours with 1 <= K <= 256, "
                         f"got {palette.dtype} of shape {palette.shape}")
    if indices.ndim != 2 or indices.shape[0] == 0 or indices.shape[1] == 0:
        raise ValueError(f"indices: expected a non-empty [H, W] array, got shape {indices.shape}")
    if indices.dtype == np.bool_:
        if palette.shape[0] < 2:
            raise ValueError("palette: a bool mask needs 2 colours (False, True), got 1")
        bit_depth, rows = 1, np.packbits(indices, axis=1)  # [H, W] -> [H, ceil(W / 8)]
    elif indices.dtype == np.uint8:
        if int(indices.max()) >= palette.shape[0]:
            raise ValueError(f"indices: expected values below {palette.shape[0]} (the palette's size), "
                             f"got {int(indices.max())}")
        bit_depth, rows = 8, indices
    else:
        raise ValueError(f"indices: expected bool or uint8, got {indices.dtype}")
    height, width = indices.shape
    raw = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)  # [H, 1 + row bytes], filter 0
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 3, 0, 0, 0)  # colour type 3: palette
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"PLTE", palette[:, :3].tobytes())
        + _png_chunk(b"tRNS", palette[:, 3].tobytes())
        + _png_chunk(b"IDAT", zlib.compress(np.ascontiguousarray(raw).tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )
