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

Both are separable: a pass along one axis, then along the other (the order
is the reference's), each a few gathers and multiply-adds (one per filter
tap), never a Python loop over pixels.

Dimension letters:
  B batch, C channels, H, W input height and width, h, w output height and
  width, o output length along the axis being resampled, K taps of the
  resampling filter (2 for ``interpolate_bilinear``), R rows in a block.
"""

from __future__ import annotations

import numpy as np

from ..fast import threads

# NOTE(reference): Resample.c keeps 8 bits for the result and 2 for overflow
# and sign out of a 32-bit int: PRECISION_BITS = 32 - 8 - 2.
PRECISION_BITS = 32 - 8 - 2

# NOTE(reference): Pillow's BILINEAR filter is the triangle 1 - |x| on
# |x| < 1 (support 1.0), stretched by the downscale factor (antialiasing).
BILINEAR_SUPPORT = 1.0


def check_size(size, name: str = "size") -> tuple[int, int]:
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
    new_h, new_w = check_size(size)

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


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dekker's error-free product of float64 arrays: a * b == p + e exactly."""
    split = 134217729.0  # 2**27 + 1 (Veltkamp)
    p = a * b
    t = split * a
    a_hi = t - (t - a)
    a_lo = a - a_hi
    t = split * b
    b_hi = t - (t - b)
    b_lo = b - b_hi
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def _fma_minus_half(scale, b: np.ndarray) -> np.ndarray:
    """scale * b - 0.5 rounded once to b's dtype (a fused multiply-add),
    exact wherever the result is >= 0, the only place it is used.

    float32: the product of two float32 is exact in float64, and for a
    product >= 0.5 so is subtracting 0.5, so one final rounding is left.
    float64: with p + e == scale * b exactly, p - 0.5 is exact for p >= 0.5
    (Sterbenz), and fl((p - 0.5) + e) is the single rounding of the exact value.
    A negative result keeps its sign, which is all the clamp at 0 needs.
    """
    if b.dtype == np.float32:
        return (np.float64(scale) * b.astype(np.float64) - 0.5).astype(np.float32)
    p, e = _two_product(np.full(b.shape, scale, dtype=np.float64), b)
    return (p - 0.5) + e


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
    # NOTE(reference): area_pixel_compute_source_index: the pixel-centre
    # shift scale * (dst + 0.5) - 0.5, clamped at 0 below (linear modes only).
    # PyTorch's x86 CPU kernels are compiled with FMA, and the compiler fuses
    # this into one fused multiply-add (one rounding): measured, it matches
    # F.interpolate's weights exactly where the two-rounding form does not.
    real = _fma_minus_half(scale, dst.astype(dtype) + dtype.type(0.5))  # [o]
    real = np.maximum(real, dtype.type(0))  # [o]
    # NOTE(reference): guard_index_and_lambda floors with floorf, i.e. after
    # rounding to float32 even for double inputs; lambda is then clamped to [0, 1].
    index0 = np.minimum(np.floor(real.astype(np.float32)).astype(np.intp), in_size - 1)  # [o]
    lambda1 = np.clip(real - index0.astype(dtype), 0, 1).astype(dtype)  # [o]
    index1 = index0 + (index0 < in_size - 1)  # [o]
    lambda0 = (dtype.type(1) - lambda1).astype(dtype)  # [o]
    return index0, index1, lambda0, lambda1


# Rows per block in the passes below: a block of about 64K values stays in
# cache, and reusing small temporaries avoids page-faulting fresh 12 MB ones.
_BLOCK_VALUES = 1 << 16


def _interpolate_axis(x: np.ndarray, axis: int, out: np.ndarray, size: int | None = None) -> np.ndarray:
    """Linear interpolation of x along ``axis`` (-1 width or -2 height) to
    ``size`` (default out.shape[axis]), of which ``out`` takes the first
    out.shape[axis]: out = x[index0] * lambda0 + x[index1] * lambda1, a product
    and a sum each rounded in x's dtype (ATen's Interpolate<1>: t0 * w0, then
    += t1 * w1), computed a block of output rows at a time."""
    n = out.shape[axis]
    index0, index1, lambda0, lambda1 = (a[:n] for a in source_index_and_lambda(x.shape[axis], size or n, x.dtype))
    rows = out.shape[-2]
    block = max(1, _BLOCK_VALUES // max(1, out.shape[0] * out.shape[1] * out.shape[-1]))
    threads.parallel_rows(lambda start, stop: _interpolate_rows(x, axis, out, index0, index1, lambda0, lambda1,
                                                            start * block, min(rows, stop * block), block),
                      -(-rows // block))
    return out


def _interpolate_rows(x, axis, out, index0, index1, lambda0, lambda1, start, stop, block) -> None:
    """_interpolate_axis for output rows [start, stop), ``block`` rows at a time."""
    for r in range(start, stop, block):
        rs = slice(r, min(r + block, stop))
        dst = out[..., rs, :]  # [B, C, R, o]
        # (np.take is several times faster than fancy indexing along the last axis)
        if axis == -1:
            src = x[..., rs, :]  # [B, C, R, W]
            np.multiply(np.take(src, index0, axis=-1, mode="clip"), lambda0, out=dst)  # [B, C, R, W] -> [B, C, R, w]
            right = np.take(src, index1, axis=-1, mode="clip")  # [B, C, R, W] -> [B, C, R, w]
            right *= lambda1
        else:
            np.multiply(np.take(x, index0[rs], axis=-2, mode="clip"), lambda0[rs, None], out=dst)  # [B, C, H, w] -> [B, C, R, w]
            right = np.take(x, index1[rs], axis=-2, mode="clip")  # [B, C, H, w] -> [B, C, R, w]
            right *= lambda1[rs, None]
        dst += right


def _check_images(x) -> np.ndarray:
    """x as a float32 or float64 [B, C, H, W] array with a non-empty image."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have a non-empty image, got shape {x.shape}")
    return x


def _check_crop(crop, size: tuple[int, int]) -> tuple[int, int]:
    """crop (h0, w0) as two positive ints that fit in ``size`` (h, w)."""
    h0, w0 = check_size(crop, "crop")
    if h0 > size[0] or w0 > size[1]:
        raise ValueError(f"crop must fit in size {tuple(size)}, got {(h0, w0)}")
    return h0, w0


def interpolate_bilinear(x: np.ndarray, size, out: np.ndarray | None = None, crop=None) -> np.ndarray:
    """Mirror of ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
    on the CPU (ATen's generic separable kernel: width inside, height outside).

    x: [B, C, H, W] float32 or float64 (any strides, e.g. a crop);
    size: (h, w); out: optional preallocated [B, C, h, w] array of x's dtype.
    Returns [B, C, h, w] in x's dtype. ``crop`` (h0, w0) returns only the
    top-left [..., :h0, :w0] of that, as a C-contiguous array (out [B, C, h0, w0]),
    and the rest is never computed: postprocess_masks crops the padding away.

    The indices and weights equal PyTorch's bit for bit; each blend rounds
    its products and sum separately, where PyTorch's compiled kernels fuse
    some of them, so values may differ in the last bit (about 1e-7 relative
    in float32, 1e-16 in float64).
    """
    x = _check_images(x)
    h, w = check_size(size)
    B, C, H, W = x.shape
    h0, w0 = (h, w) if crop is None else _check_crop(crop, (h, w))
    if out is not None and (out.shape != (B, C, h0, w0) or out.dtype != x.dtype or not out.flags.writeable):
        raise ValueError(f"out must be a writeable {x.dtype} array of shape {(B, C, h0, w0)}, "
                         f"got {out.dtype} {out.shape}")

    # Width first: ATen's Interpolate<2> interpolates each of the two rows
    # along the width, then blends the two results along the height.
    if out is None:
        out = np.empty((B, C, h0, w0), dtype=x.dtype)
    if w != W and h != H:
        x = _interpolate_axis(x, -1, np.empty((B, C, H, w0), dtype=x.dtype), w)  # [B, C, H, W] -> [B, C, H, w0]
        return _interpolate_axis(x, -2, out, h)  # [B, C, H, w0] -> [B, C, h0, w0]
    if w != W:
        return _interpolate_axis(x[..., :h0, :], -1, out, w)  # [B, C, H, W] -> [B, C, h0, w0]
    if h != H:
        return _interpolate_axis(x[..., :w0], -2, out, h)  # [B, C, H, W] -> [B, C, h0, w0]
    # NOTE(reference): an unchanged size is a copy (lambda0 = 1, lambda1 = 0).
    out[...] = x[..., :h0, :w0]
    return out


# --------------------------------------------------------------------------
# SAM's mask postprocessing: two bilinear resizes as one separable map
# --------------------------------------------------------------------------
# Sam.postprocess_masks and SamOnnxModel upscale the 256x256 low-res logits to
# the square encoder input (1024), cut the padding away and resize the rest to
# the photo. Along each axis that is linear, out = A2 (A1 x)[:crop], so the two
# resizes are one matrix per axis, A = A2 A1[:crop] (a band: every output pixel
# blends at most four neighbouring input pixels), and
#     out = A_h @ x @ A_w^T
# never builds the 1024-sized intermediate. Each band runs as a few matrix
# products on blocks of output rows or columns, against only the input pixels
# the block reads.
#
# NOTE(numerics): the same mathematics as the two resizes, rounded differently:
# a blend of up to 16 input values, each weight the exact product of ATen's
# weights rounded once, instead of two rounded blends of two. Differences are a
# few ulps of the neighbouring values (tests/test_resize.py bounds them against
# F.interpolate). A product also multiplies the band's zero weights, so an inf
# or NaN would spread over a whole block where ATen spreads it to the
# neighbours that blend it: such inputs (and values near the overflow
# threshold) take the two resizes instead.

# Output rows (height pass) or columns (width pass) per matrix product: the
# band of a block reads about block * in / out + 2 input pixels.
_BAND_BLOCK = 64
_PLANS = {}  # (in, size, crop, out, dtype) -> _axis_plan(...), a few per photo size
_PLANS_MAX = 16


def _axis_plan(in_size: int, size: int, crop: int, out_size: int, dtype):
    """The two resizes along one axis as one matrix: in_size -> size, keep the
    first ``crop``, -> out_size. Returns A [out_size, in_size] (``dtype``, band
    rows) and the blocks [(o0, o1, i0, i1)]: output pixels o0:o1 read only input
    pixels i0:i1."""
    key = (in_size, size, crop, out_size, np.dtype(dtype))
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    # The first resize, its first ``crop`` outputs: A1 [crop, in_size] (ATen's weights)
    j0, j1, m0, m1 = (a[:crop] for a in source_index_and_lambda(in_size, size, dtype))
    a1 = np.zeros((crop, in_size))  # float64: the products below are exact
    rows = np.arange(crop)
    a1[rows, j0] = m0
    a1[rows, j1] += m1  # j0 == j1 at the last pixel: ATen blends it with itself
    # The second resize blends two rows of A1: A = A2 A1 [out_size, in_size]
    k0, k1, n0, n1 = source_index_and_lambda(crop, out_size, dtype)
    a = a1[k0] * n0.astype(np.float64)[:, None] + a1[k1] * n1.astype(np.float64)[:, None]
    nonzero = a != 0
    first = np.argmax(nonzero, axis=1)  # [out_size]: first input pixel each output reads
    last = in_size - np.argmax(nonzero[:, ::-1], axis=1)  # one past the last
    blocks = [(o0, min(o0 + _BAND_BLOCK, out_size), int(first[o0:o0 + _BAND_BLOCK].min()),
               int(last[o0:o0 + _BAND_BLOCK].max())) for o0 in range(0, out_size, _BAND_BLOCK)]
    a = a.astype(dtype)
    a.flags.writeable = False
    plan = (a, blocks)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan
    return plan


def upscale_crop_resize(x: np.ndarray, size, crop, out_size) -> np.ndarray:
    """``interpolate_bilinear(interpolate_bilinear(x, size, crop=crop), out_size)``,
    the mask postprocessing of Sam.postprocess_masks and SamOnnxModel, as one
    separable map (see above): x [B, C, H, W] float32 or float64 -> [B, C, h, w]
    with (h, w) = out_size.

    Values differ from the two resizes by a few ulps of the neighbouring
    values; non-finite inputs (and |x| near the overflow threshold) give
    exactly the two resizes.
    """
    x = _check_images(x)
    size, out_size = check_size(size), check_size(out_size, "out_size")
    crop = _check_crop(crop, size)
    limit = np.finfo(x.dtype).max / 4
    if x.size == 0 or not (-limit < x.min() and x.max() < limit):  # NaN fails both
        return interpolate_bilinear(interpolate_bilinear(x, size, crop=crop), out_size)

    B, C, H, W = x.shape
    (h, w), dtype = out_size, x.dtype
    a_h, blocks_h = _axis_plan(H, size[0], crop[0], h, dtype)  # [h, H]
    a_w, blocks_w = _axis_plan(W, size[1], crop[1], w, dtype)  # [w, W]
    r0, r1 = min(b[2] for b in blocks_h), max(b[3] for b in blocks_h)  # the input rows any output reads
    xs = x.reshape(B * C, H, W)[:, r0:r1]  # [P, Hr, W]
    # Width first, as ATen: z[p] = xs[p] @ A_w^T, in image order, so that the
    # height pass reads whole rows of it (a product with a plain operand: twice
    # as fast at photo size as with a transposed one)
    z = np.empty((B * C, r1 - r0, w), dtype)  # [P, Hr, w]
    out = np.empty((B, C, h, w), dtype)
    out_p = out.reshape(B * C, h, w)

    def width(start, stop):
        for o0, o1, i0, i1 in blocks_w[start:stop]:
            # [P, Hr, K] @ [K, o] -> [P, Hr, o]
            np.matmul(xs[:, :, i0:i1], a_w[o0:o1, i0:i1].T, out=z[:, :, o0:o1])

    def height(start, stop):
        for o0, o1, i0, i1 in blocks_h[start:stop]:
            # [o, K] @ [P, K, w] -> [P, o, w]
            np.matmul(a_h[o0:o1, i0:i1], z[:, i0 - r0:i1 - r0], out=out_p[:, o0:o1])

    with threads.single_threaded_blas():
        threads.parallel_rows(width, len(blocks_w), threads=threads.row_threads())
        threads.parallel_rows(height, len(blocks_h), threads=threads.row_threads())
    return out
