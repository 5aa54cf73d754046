"""The two resizes SAM uses, reproduced exactly in NumPy.

- ``pil_resize_bilinear``: the image resize of ``ResizeLongestSide.apply_image``,
  which goes through torchvision's ``resize`` on a PIL image, i.e.
  ``img.resize((w, h), Image.BILINEAR)``. Mirror of Pillow's
  ``libImaging/Resample.c`` (``precompute_coeffs``, ``normalize_coeffs_8bpc``,
  ``ImagingResampleHorizontal_8bpc`` / ``ImagingResampleVertical_8bpc``,
  ``ImagingResampleInner``, as of Pillow 13.0): equal to Pillow byte for byte.
- ``interpolate_bilinear``: ``F.interpolate(x, size, mode="bilinear",
  align_corners=False)`` as ATen computes it on the CPU (``UpSample.h``:
  ``area_pixel_compute_scale``, ``area_pixel_compute_source_index``,
  ``guard_index_and_lambda``), used by ``Sam.postprocess_masks``.

Both are separable: a pass along the width, then a pass along the height,
each a few gathers and multiply-adds (one per filter tap), never a Python
loop over pixels.

Dimension letters:
  B batch, C channels, H, W input height and width, h, w output height and
  width, K taps of the resampling filter (2 for ``interpolate_bilinear``).
"""

from __future__ import annotations

import numpy as np

# NOTE(reference): Resample.c keeps 8 bits for the result and 2 for overflow
# and sign out of a 32-bit int: PRECISION_BITS = 32 - 8 - 2.
PRECISION_BITS = 32 - 8 - 2

# NOTE(reference): Pillow's BILINEAR filter is the triangle 1 - |x| on
# |x| < 1 (support 1.0), stretched by the downscale factor (antialiasing).
BILINEAR_SUPPORT = 1.0


def _check_size(size, name: str = "size") -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (height, width), got {size!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(size):
        raise ValueError(f"{name} must be two positive integers (height, width), got {size!r}")
    return h, w


# --------------------------------------------------------------------------
# Pillow's 8-bit bilinear resampling
# --------------------------------------------------------------------------


def _bilinear_filter(x: np.ndarray) -> np.ndarray:
    """Mirror of Resample.c: bilinear_filter (1 - |x| for |x| < 1, else 0)."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def precompute_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mirror of Resample.c: precompute_coeffs then normalize_coeffs_8bpc, for
    the BILINEAR filter on the whole input (box = (0, in_size)).

    Returns ``xmin`` [o] (first input pixel of each output pixel) and the
    fixed-point weights ``kk`` [o, K] (int32, zero past each pixel's taps).
    The index ``xmin + k`` of a zero weight is clamped into the input, so a
    gather of it is harmless.
    """
    # NOTE(reference): in0 and in1 are C floats (the box); in1 - in0 = in_size
    # exactly for any image size below 2**24, then the division is in double.
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = BILINEAR_SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1  # K

    xx = np.arange(out_size, dtype=np.float64)  # [o]
    center = 0.0 + (xx + 0.5) * scale  # [o]
    ss = 1.0 / filterscale
    # NOTE(reference): "(int)(center - support + 0.5)" truncates toward zero
    # (not floor); negative values are then clamped to 0 either way.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.intp)  # [o]
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.intp) - xmin  # [o]

    x = np.arange(ksize)  # [K]
    valid = x[None, :] < xmax[:, None]  # [o, K]
    # NOTE(reference): the filter argument is (x + xmin - center + 0.5) * ss,
    # multiplied by 1/filterscale rather than divided by filterscale.
    arg = ((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss  # [o, K]
    k = np.where(valid, _bilinear_filter(arg), 0.0)  # [o, K]

    # The weights' sum, accumulated tap by tap in C's order (NumPy's
    # pairwise sum would round differently once K >= 8).
    ww = np.zeros(out_size)  # [o]
    for t in range(ksize):
        ww += k[:, t]
    k = k / np.where(ww != 0.0, ww, 1.0)[:, None]  # [o, K]

    # NOTE(reference): normalize_coeffs_8bpc rounds half away from zero by
    # "(int)(+-0.5 + k * (1 << PRECISION_BITS))" (a C cast truncates).
    fixed = k * (1 << PRECISION_BITS)  # [o, K]
    kk = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int32)  # [o, K]
    return xmin, kk


def _resample_axis_8bpc(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """Mirror of Resample.c: ImagingResampleHorizontal_8bpc (axis=1) and
    ImagingResampleVertical_8bpc (axis=0) on an [H, W, C] uint8 image."""
    in_size = image.shape[axis]
    xmin, kk = precompute_coeffs(in_size, out_size)  # [o], [o, K]
    ksize = kk.shape[1]

    shape = list(image.shape)
    shape[axis] = out_size
    weight_shape = [1, 1, 1]
    weight_shape[axis] = out_size
    # NOTE(reference): the accumulator is a C int that starts at
    # 1 << (PRECISION_BITS - 1), the rounding half. int32 cannot overflow:
    # the weights sum to at most 2**22 + K/2, so |acc| < 256 * (2**22 + K) < 2**31.
    acc = np.full(shape, 1 << (PRECISION_BITS - 1), dtype=np.int32)  # [H, o, C] or [o, W, C]
    for t in range(ksize):
        index = np.minimum(xmin + t, in_size - 1)  # [o]
        tap = np.take(image, index, axis=axis, mode="clip").astype(np.int32)  # [H, W, C] -> [H, o, C] (or [o, W, C])
        tap *= kk[:, t].reshape(weight_shape)
        acc += tap

    # NOTE(reference): clip8 looks up acc >> PRECISION_BITS (an arithmetic
    # shift, i.e. floor) in a table that saturates to [0, 255].
    acc >>= PRECISION_BITS
    return np.clip(acc, 0, 255).astype(np.uint8)


def pil_resize_bilinear(image: np.ndarray, size) -> np.ndarray:
    """Mirror of Pillow's ``Image.resize((new_w, new_h), Image.BILINEAR)`` on
    an 8-bit image (modes "L" and "RGB"): equal byte for byte.

    image: [H, W, C] uint8 with C = 1 or 3; size: (new_h, new_w).
    Returns [new_h, new_w, C] uint8.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be [H, W, C] with C = 1 or 3, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    # Only "L" and "RGB" are reproduced: Pillow premultiplies alpha for RGBA.
    new_h, new_w = _check_size(size)

    # NOTE(reference): Image.resize returns a copy when the size is
    # unchanged, and ImagingResampleInner skips a pass whose dimension is
    # unchanged. resize()'s default reducing_gap=None means no "reduce"
    # pre-step, so there is nothing else.
    H, W = image.shape[:2]
    # NOTE(reference): since Pillow 13 (python-pillow/Pillow#9549) the
    # vertical pass runs first when the height shrinks by more than twice as
    # many pixels as the width; before, the horizontal pass always ran first.
    # Each pass rounds to uint8, so the order changes some pixels by 1. For
    # ResizeLongestSide this only happens for photos about twice as tall as wide.
    horizontal_first = not ((H - new_h) > 0 and (H - new_h) > (W - new_w) * 2)
    out = image
    if horizontal_first:
        if new_w != W:
            out = _resample_axis_8bpc(out, axis=1, out_size=new_w)  # [H, W, C] -> [H, w, C]
        if new_h != H:
            out = _resample_axis_8bpc(out, axis=0, out_size=new_h)  # [H, w, C] -> [h, w, C]
    else:
        if new_h != H:
            out = _resample_axis_8bpc(out, axis=0, out_size=new_h)  # [H, W, C] -> [h, W, C]
        if new_w != W:
            out = _resample_axis_8bpc(out, axis=1, out_size=new_w)  # [h, W, C] -> [h, w, C]
    return out.copy() if out is image else out


# --------------------------------------------------------------------------
# PyTorch's bilinear interpolation (align_corners=False)
# --------------------------------------------------------------------------


def source_index_and_lambda(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mirror of ATen UpSample.h: compute_source_index_and_lambda for every
    output index, align_corners=False, no scale_factor.

    Returns input_index0, input_index1 [o] (intp) and lambda0, lambda1 [o]
    (``dtype``). For float32 and float64 the opmath type is the dtype itself,
    so everything is computed in ``dtype``, as ATen does.
    """
    dtype = np.dtype(dtype)
    dst = np.arange(out_size)  # [o]
    if in_size == out_size:
        # NOTE(reference): same size is a plain copy (lambda0 = 1, lambda1 = 0).
        return dst, dst, np.ones(out_size, dtype), np.zeros(out_size, dtype)
    # NOTE(reference): compute_scales_value: static_cast<scalar_t>(input_size) / output_size,
    # a division in the opmath type (float32 for float32 tensors).
    scale = dtype.type(in_size) / dtype.type(out_size)
    half = dtype.type(0.5)
    # NOTE(reference): area_pixel_compute_source_index: the pixel-centre
    # shift scale * (dst + 0.5) - 0.5, clamped at 0 below (linear modes only).
    real = scale * (dst.astype(dtype) + half) - half  # [o]
    real = np.maximum(real, dtype.type(0))  # [o]
    # NOTE(reference): guard_index_and_lambda floors with floorf, i.e. after
    # rounding to float32 even for double inputs; lambda is then clamped to [0, 1].
    index0 = np.minimum(np.floor(real.astype(np.float32)).astype(np.intp), in_size - 1)  # [o]
    lambda1 = np.clip(real - index0.astype(dtype), 0, 1).astype(dtype)  # [o]
    index1 = index0 + (index0 < in_size - 1)  # [o]
    lambda0 = (dtype.type(1) - lambda1).astype(dtype)  # [o]
    return index0, index1, lambda0, lambda1


def _interpolate_axis(x: np.ndarray, axis: int, out_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Linear interpolation of x along ``axis`` (-1 or -2) to ``out_size``:
    out = x[index0] * lambda0 + x[index1] * lambda1, in that order of
    rounding, as ATen's Interpolate<1> does (t0 * w0, then += t1 * w1)."""
    in_size = x.shape[axis]
    index0, index1, lambda0, lambda1 = source_index_and_lambda(in_size, out_size, x.dtype)
    shape = (-1, 1) if axis == -2 else (-1,)
    if out is None:
        out = np.take(x, index0, axis=axis, mode="clip")  # [..., in, ...] -> [..., o, ...]
    else:
        np.take(x, index0, axis=axis, out=out, mode="clip")
    out *= lambda0.reshape(shape)
    right = np.take(x, index1, axis=axis, mode="clip")  # [..., in, ...] -> [..., o, ...]
    right *= lambda1.reshape(shape)
    out += right
    return out


def interpolate_bilinear(x: np.ndarray, size, out: np.ndarray | None = None) -> np.ndarray:
    """Mirror of ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
    on the CPU (ATen's generic separable kernel: width inside, height outside).

    x: [B, C, H, W] float32 or float64 (any strides, e.g. a crop);
    size: (h, w); out: optional preallocated [B, C, h, w] array of x's dtype.
    Returns [B, C, h, w] in x's dtype.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have a non-empty image, got shape {x.shape}")
    h, w = _check_size(size)
    B, C, H, W = x.shape
    if out is not None and (out.shape != (B, C, h, w) or out.dtype != x.dtype or not out.flags.writeable):
        raise ValueError(f"out must be a writeable {x.dtype} array of shape {(B, C, h, w)}, "
                         f"got {out.dtype} {out.shape}")

    # Width first: ATen's Interpolate<2> interpolates each of the two rows
    # along the width, then blends the two results along the height.
    if w != W:
        x = _interpolate_axis(x, -1, w, out=out if h == H else None)  # [B, C, H, W] -> [B, C, H, w]
    if h != H:
        x = _interpolate_axis(x, -2, h, out=out)  # [B, C, H, w] -> [B, C, h, w]
    if h == H and w == W:
        if out is None:
            return x.copy()
        out[...] = x
        return out
    return x
