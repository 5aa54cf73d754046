"""Fast-only kernels: the fast layer's versions of npsam.kernels.ops, and
kernels no reference module needs.

Each says which reference kernel it stands for and why its result is equal
(bit for bit) or within the tolerances. They work in blocks that stay in cache,
spread over the worker threads of :mod:`npsam.fast.threads`, in place where
the caller owns the array, and take their large temporaries from per-thread
work arrays.

Dimension letters as in :mod:`npsam.kernels.ops`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..kernels import ops as reference
from .threads import (CHUNK, blocks, image_rows, parallel_blocks, parallel_rows, row_threads, scratch,
                      single_threaded_blas)

# GELU in float32 as x * sigmoid(z), evaluated without branches.
# gelu(x) = x * Phi(x), Phi the normal CDF, and Phi(x) = sigmoid(z(x)) with
#     z(x) = logit(Phi(x)) = log(Phi(x) / Phi(-x)) = 2 atanh(erf(x / sqrt 2)),
# odd and smooth, so z(x) = x * P(x^2). P is a degree-6 polynomial fitted by
# scripts/fit_gelu.py on x^2 <= 36, weighted so the fit minimises the error it
# causes in gelu measured in ulps of x (about 0.24 of one). Then
#     gelu(x) = x / (1 + exp(-x * P(x^2)))
# is 17 passes over a block (exp taken as exp2, see _GELU_NEG_P32), where erf
# needs more than 30. x^2 is not clamped
# at 36: P has no real roots and a positive leading coefficient, so z only
# grows beyond the fit (|z| >= 23.6 for |x| >= 6, where the sigmoid is within
# 6e-11 of 0 or 1, far below an ulp of x from the exact gelu; exactly 0 or 1
# once exp(-z) underflows or overflows, x / inf = -0 for large negative x).
# Huge |x| makes x^2 = inf and P = inf, never NaN. (A clamp cost a fifth of
# the time: np.minimum is the slowest pass; so does x * x against np.square.)
# tests/test_fast_kernels.py checks it against the exact GELU on every 397th
# float32 in [-10, 10] (never less accurate than torch's float32 GELU: 1.74 ulps
# of x at worst where torch has 4.84) and at the extremes.
_GELU_P = (3.5123425082250996e-09, -2.645267134887992e-07, 7.929489234396613e-06, -0.00011061238942065956,
           -6.518994679117022e-05, 0.07266616914429459, 1.5957698829214784)  # highest degree first
# -P * log2(e), so that the last product gives -z * log2(e) and exp2 of it is
# exp(-z): np.exp2 runs twice as fast as np.exp on float32 (0.22 against 0.45
# ns per value here), and the scaling costs nothing once folded in.
_GELU_NEG_P32 = tuple(np.float32(-c * math.log2(math.e)) for c in _GELU_P)


def _gelu_f32_block(x: np.ndarray, out: np.ndarray) -> None:
    """out[:] = gelu(x) for one cache-sized block of float32 (out may be x)."""
    c = _GELU_NEG_P32
    buf = scratch("gelu", (max(2 * x.size, 2 * CHUNK),), np.float32)
    u = buf[: x.size].reshape(x.shape)
    p = buf[x.size: 2 * x.size].reshape(x.shape)
    # x^2 and exp(-z) overflow to inf on purpose for huge |x|; x = -inf gives
    # -inf / inf = NaN, as torch's gelu(-inf)
    with np.errstate(over="ignore", invalid="ignore"):
        np.square(x, out=u)
        np.multiply(u, c[0], out=p)
        p += c[1]
        for ci in c[2:]:  # Horner: p = -P(u)
            p *= u
            p += ci
        p *= x  # -z(x) * log2(e)
        np.exp2(p, out=p)  # exp(-z(x))
        p += np.float32(1)
        np.divide(x, p, out=out)  # x * sigmoid(z)


def gelu(x: np.ndarray, out: Optional[np.ndarray] = None, precise: bool = False) -> np.ndarray:
    """Stands for :func:`npsam.kernels.ops.gelu` (the exact erf GELU); ``out`` may be ``x``.

    float32 goes through the sigmoid form above in cache-sized blocks spread
    over threads: within the tolerances of the exact GELU (never less accurate
    than torch's float32 GELU, tests/test_fast_kernels.py). float64, and float32
    when ``precise``, is the reference kernel itself (bit for bit).
    """
    x = np.asarray(x)
    if x.dtype != np.float32 or precise:
        y = reference.gelu(x, precise=precise)
        if out is None:
            return y
        out[...] = y
        return out
    if out is None:
        out = np.empty(x.shape, np.float32)  # C order whatever x's layout (empty_like would keep a transpose's)
    if not out.flags.c_contiguous:  # (a strided out, or x itself strided): via a C-order result
        out[...] = gelu(x)
        return out
    xf, of = np.ascontiguousarray(x).reshape(-1), out.reshape(-1)  # x copied only if it is strided

    parallel_rows(lambda start, stop: gelu_block(xf[start:stop], of[start:stop]), xf.size, min_rows=CHUNK)
    return out


def gelu_block(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """gelu on one block, no threads, no checks (out may be x; both C-contiguous),
    CHUNK elements at a time (temporaries far beyond the L2 cache run at half speed)."""
    if x.dtype != np.float32:
        out[...] = gelu(x)
        return out
    xf, of = x.reshape(-1), out.reshape(-1)
    for lo, hi in blocks(0, xf.size, CHUNK):
        _gelu_f32_block(xf[lo:hi], of[lo:hi])
    return out


# NOTE(numerics): exp(x - max) underflows to subnormal floats for x - max below
# about -87 (float32) or -708 (float64), and x86 runs arithmetic that reads or
# makes subnormals many times slower (microcode assists). A weight need not be
# subnormal itself to cost that: the product p @ v makes p * v, subnormal when
# p is near the smallest normal and |v| < 1. With p at exp(-87) (just above the
# smallest normal float32) on 90% of a row, [256, 4096] @ [4096, 64] took 7.8 ms
# against 1.3-1.5; on 99%, 43 ms. So x - max is clamped at EXP_FLOOR, half
# the log of the smallest normal rounded up to a whole number (-43 for float32,
# -354 for float64): every weight is at least exp(-43) = 2.1e-19 or
# exp(-354) = 2.4e-154, above sqrt(tiny), so p * v stays normal for every |v|
# above sqrt(tiny) too. The clamp raises weights below the floor to it; even
# 2^20 of them add less than 2.2e-13 to a row whose largest weight is 1, far
# below what float32 arithmetic on the softmax can see. (MobileSAM's weights,
# 20 prompts on each of the three photos, with and without a mask input: 0.6%
# of the decoder's logits fall below the floor, and every output came out bit
# for bit as with the old floor of -87, about the smallest normal's log.)
EXP_FLOOR = {np.dtype(t): t(np.ceil(np.log(np.finfo(t).tiny) / 2)) for t in (np.float32, np.float64)}


def exp_below_max_(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """In place: x = exp(max(x - m, EXP_FLOOR)), ``m`` broadcasting to x (a max).

    NOTE(numerics): np.exp itself runs ten times slower on a block whose results
    underflow (293 against 29 us for 64K floats), so the clamp comes first. It
    takes the floor as a row as long as x's last axis: np.maximum has no vector
    loop for a scalar operand (37 against 11 us for 64K floats).
    """
    x -= m
    np.maximum(x, _floor(EXP_FLOOR, x), out=x)
    return np.exp(x, out=x)


_FLOOR_ROWS = {}  # (floor, length, dtype) -> a read-only row of that floor


def _floor(floors: dict, x: np.ndarray):
    """floors[x.dtype] as the operand of np.maximum on x: a row as long as x's
    last axis (cached) from 32 values on, the scalar below that."""
    floor, n = floors[x.dtype], x.shape[-1]
    if n < 32:
        return floor
    key = (float(floor), n, x.dtype)
    row = _FLOOR_ROWS.get(key)
    if row is None:
        row = _FLOOR_ROWS[key] = np.full(n, floor)
        row.flags.writeable = False
    return row

# The same floor for powers of two: half the base-2 log of the smallest normal
# (-63 for float32, -511 for float64), so 2^floor is sqrt(tiny) and p * v
# stays normal for every |v| above it, as above.
EXP2_FLOOR = {np.dtype(t): t(np.ceil(np.log2(np.finfo(t).tiny) / 2)) for t in (np.float32, np.float64)}


def exp2_sums_(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """In place over ``axis``: x = 2^max(x - max(x), EXP2_FLOOR); returns the
    sums over that axis. A softmax whose logits were scaled by log2(e) leaves
    these weights unnormalised, for a product that divides its few results by
    the sums instead of every weight, or for one pass that multiplies them by
    the sums' inverses (np.exp2 runs at twice np.exp's speed on float32: 0.22
    against 0.45 ns a value). Over axis 0 of a [K, M] array the max and the
    sum are K whole-row vector operations, however short K is."""
    x -= x.max(axis=axis, keepdims=True)
    np.maximum(x, _floor(EXP2_FLOOR, x), out=x)
    np.exp2(x, out=x)
    return x.sum(axis=axis)


def softmax_(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stands for :func:`npsam.kernels.ops.softmax`, in place, with the weights
    floored at exp(EXP_FLOOR) (see above: within the tolerances). Reducing a
    short axis that is not the last (axis 1 of [A, N, R] with R long and
    contiguous) costs N whole-row vector operations instead of one slow loop
    per element."""
    exp_below_max_(x, x.max(axis=axis, keepdims=True))
    x /= x.sum(axis=axis, keepdims=True)
    return x


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax_ on a copy of ``x``."""
    return softmax_(np.array(x, copy=True), axis)


# ---------------------------------------------------------------------------
# A row broadcast over the rows of a block
# ---------------------------------------------------------------------------
# NumPy applies a ufunc to x [n, E] and a row [E] broadcast over x's rows at
# half the speed of a pass with no broadcast or with a scalar when E is short
# (0.15-0.34 against 0.06-0.10 ns a value here, for E from 32 to 4096; the
# per-channel taps of a depthwise convolution, a bias, LayerNorm's weight and
# bias). Viewed as [n/k, k*E] against the row tiled k times, with k*E at least
# WIDE_ROW, it runs at the plain pass's speed: 0.10-0.11 ns.
WIDE_ROW = 8192


def wide_row(row: np.ndarray) -> np.ndarray:
    """``row`` [..., E] tiled along its last axis to at least WIDE_ROW values
    (k*E), for row_op (rows [..., E] give [..., k*E]: depthwise taps); the row
    itself when E is that long already. Make it once per call of a fused pass,
    not once per block: tiling costs about 6 us."""
    k = -(-WIDE_ROW // row.shape[-1])
    return row if k == 1 else np.tile(row, (1,) * (row.ndim - 1) + (k,))


def row_op(ufunc: np.ufunc, x: np.ndarray, row: np.ndarray, out: np.ndarray,
           wide: Optional[np.ndarray] = None) -> np.ndarray:
    """out = ufunc(x, row) for x and out [n, E] (out may be x) and row [E]
    broadcast over the rows: the same values as the broadcast, element by
    element, faster (see WIDE_ROW). ``wide``: wide_row(row), made by the
    caller once for many blocks; else made here for a block long enough to
    pay for it (8 * WIDE_ROW values), and a shorter block broadcasts as it is."""
    n, e = x.shape
    if wide is None and x.size < 8 * WIDE_ROW:
        return ufunc(x, row, out=out)
    wide = wide_row(row) if wide is None else wide
    k = wide.shape[0] // e
    m = n // k * k  # rows in whole groups of k
    if k == 1 or m == 0 or not (x.flags.c_contiguous and out.flags.c_contiguous):
        return ufunc(x, row, out=out)
    ufunc(x[:m].reshape(-1, k * e), wide, out=out[:m].reshape(-1, k * e))  # views: both C-contiguous
    if m < n:
        ufunc(x[m:], row, out=out[m:])
    return out


def column_max(x: np.ndarray) -> np.ndarray:
    """x.max(axis=0) for x [R, K] with K short (the decoder's [R, h*T] logits):
    the same values (a max is exact), 6x as fast. NumPy reduces axis 0 as R
    vector operations of K values (82 us for [2048, 56]); folded as
    [32, R/32, K] the first max is 31 operations on whole [R/32, K] blocks,
    then R/32 short ones (13 us)."""
    r, k = x.shape
    m = r // 32 * 32
    if m == 0:
        return x.max(axis=0)
    out = x[:m].reshape(32, -1, k).max(axis=0).max(axis=0)  # [32, R/32, K] -> [R/32, K] -> [K]
    if m < r:
        np.maximum(out, x[m:].max(axis=0), out=out)
    return out


# ---------------------------------------------------------------------------
# Linear and normalisation
# ---------------------------------------------------------------------------
# A few rows (the decoder's tokens) read the whole weight for little work;
# how BLAS is best asked depends on the weight's size: see linear().
FEW_ROWS = 64
LARGE_WEIGHT = 1 << 18  # elements (1 MB in float32)


def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None,
           weight_t: Optional[np.ndarray] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Stands for :func:`npsam.kernels.ops.linear`: x @ weight.T + bias, weight in
    PyTorch's (out, in) layout; the same products, so equal within the
    tolerances (BLAS may order a dot product's terms differently by layout).

    For FEW_ROWS rows of x or fewer: a weight of LARGE_WEIGHT elements or more is
    the left operand of weight @ x.T, which BLAS runs fastest (the transformer
    MLP's 256x2048: 185 against 285 us for 8 rows); a smaller one is read from
    ``weight_t``, weight.T as a C-contiguous array if the caller keeps one (the
    decoder's modules derive them when they load: see fast/transformer.py),
    which BLAS reads a third faster than the transposed view.

    The leading dimensions are flattened into one matrix product (a 3-D @ 2-D
    matmul would make one small BLAS call per leading index). ``out``, a
    C-contiguous [..., O] array, receives the result (no copy of it)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [..., C] -> [R, C]
    assert out is None or out.flags.c_contiguous, "linear: out must be C-contiguous (reshaped as a view)"
    o2 = None if out is None else out.reshape(-1, weight.shape[0])  # [..., O] -> [R, O], a view
    few = x2.shape[0] <= FEW_ROWS
    if few and weight.size >= LARGE_WEIGHT:
        y = np.matmul(weight, x2.T).T  # ([O, C] @ [C, R]).T -> [R, O]
        if o2 is not None:
            # copied, not computed in place: BLAS writing the F-ordered o2.T swaps
            # the operands, another order of the sums, so another rounding
            o2[...] = y
            y = o2
    else:
        w_t = weight_t if few and weight_t is not None else weight.T
        y = np.matmul(x2, w_t, out=o2)  # [R, C] @ [C, O] -> [R, O]
    y = y.reshape(lead + (weight.shape[0],))  # -> [..., O]
    if bias is not None:
        y += bias
    return y


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
               out: Optional[np.ndarray] = None, add: Optional[np.ndarray] = None) -> np.ndarray:
    """Stands for :func:`npsam.kernels.ops.layer_norm` (F.layer_norm over the last
    dimension, biased variance) of ``x``, or of ``x + add`` (a residual of the
    same shape); ``out`` may be ``x``. Within the tolerances: the row sums are
    matrix-vector products and 1/sqrt(var + eps) multiplies.

    Works on blocks of rows (each block stays in cache through its six passes)
    spread over threads; row sums are matrix-vector products.
    """
    x = np.asarray(x)
    if out is None:
        out = np.empty(x.shape, x.dtype)  # C order whatever x's layout (empty_like would keep a transpose's)
    c = x.shape[-1]
    xr = np.ascontiguousarray(x).reshape(-1, c)  # [..., C] -> [R, C]
    orow = out.reshape(-1, c)
    ar = None if add is None else np.ascontiguousarray(np.broadcast_to(add, x.shape)).reshape(-1, c)
    if not np.shares_memory(orow, out):
        y = layer_norm(xr if ar is None else xr + ar, weight, bias, eps)
        out[...] = y.reshape(out.shape)
        return out
    rows = max(1, CHUNK // c)
    wide = wide_rows(weight, bias)

    def block(lo, hi):  # row sums are BLAS products: blocks fixed by ``rows``, never by threads
        layer_norm_rows(xr[lo:hi], weight, bias, eps, orow[lo:hi], None if ar is None else ar[lo:hi], wide=wide)

    parallel_blocks(block, xr.shape[0], rows)
    return out


def layer_norm_rows(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray,
                    add: Optional[np.ndarray] = None, centred: bool = False,
                    stats: Optional[tuple] = None, wide: Optional[tuple] = None) -> np.ndarray:
    """layer_norm on one block of rows, no threads, no checks: x, out (may be x)
    and add [r, C] C-contiguous. Row sums are matrix-vector products.
    ``centred``: x's rows have mean 0 already (by construction: see
    fast/mask_decoder.py, upscaling_weights), so the mean is not subtracted.
    ``stats``: (mean, rstd), two arrays of at most r values, given the first
    rows' mean and 1 / sqrt(var + eps) as this computation used them.
    ``wide``: (wide_row(weight), wide_row(bias)), made once by a caller that
    normalises many blocks (see row_op), else made here when a block is long."""
    c = x.shape[-1]
    dt = x.dtype.type
    if add is not None:
        x = np.add(x, add, out=out)
    if centred:
        if out is not x:
            out[...] = x
        mean = None
    else:
        mean = x @ ones(c, x.dtype)  # [r, C] -> [r]
        mean *= dt(1.0 / c)
        np.subtract(x, mean[:, None], out=out)  # xc = x - mean
    var = _row_dots(out, out)  # [r, C] -> [r]
    var *= dt(1.0 / c)
    var += dt(eps)
    np.sqrt(var, out=var)
    np.divide(1, var, out=var)
    if stats is not None:
        mean_out, rstd_out = stats
        mean_out[...] = 0 if mean is None else mean[:len(mean_out)]
        rstd_out[...] = var[:len(rstd_out)]
    out *= var[:, None]
    wide_w, wide_b = (None, None) if wide is None else wide
    row_op(np.multiply, out, weight, out, wide_w)
    row_op(np.add, out, bias, out, wide_b)
    return out


def wide_rows(*rows: np.ndarray) -> tuple:
    """wide_row of each row: layer_norm_rows' ``wide`` from (weight, bias)."""
    return tuple(wide_row(r) for r in rows)


_ONES = {}

# Each row's dot product with itself (LayerNorm's variance): NumPy 2's vecdot
# runs the SIMD dot product per row, twice as fast as einsum's loop here
# (45-51 against 80-96 us for [2048, 256] float32); NumPy 1.x takes einsum.
if hasattr(np, "vecdot"):
    def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.vecdot(a, b)
else:  # pragma: no cover - NumPy < 2
    def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.einsum("rc,rc->r", a, b)


def ones(c: int, dtype) -> np.ndarray:
    """A read-only vector of c ones (cached): ``x @ ones`` sums x's rows, ``ones
    @ x`` its columns, as BLAS matrix-vector products (a sixth of the time of
    x.sum(axis=0) over [2048, 56])."""
    key = (c, np.dtype(dtype))
    v = _ONES.get(key)
    if v is None:
        v = np.ones(c, dtype)
        v.flags.writeable = False
        v = _ONES[key] = v
    return v


# ---------------------------------------------------------------------------
# Whole-array passes
# ---------------------------------------------------------------------------
def same_contents(a: np.ndarray, b: np.ndarray) -> bool:
    """np.array_equal(a, b) (False for another shape or dtype, or a NaN), in
    blocks over threads: the decoder compares a kept 4 MB image embedding with
    the one it is given on every call. C-contiguous arrays are not copied."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    af, bf = a.reshape(-1), b.reshape(-1)
    unequal = []

    def work(start, stop):
        for lo, hi in blocks(start, stop, CHUNK):
            if not np.array_equal(af[lo:hi], bf[lo:hi]):
                unequal.append((lo, hi))
                return

    parallel_rows(work, af.size, min_rows=CHUNK)
    return not unequal


def transpose(x: np.ndarray, block: int = 256, add: Optional[np.ndarray] = None) -> np.ndarray:
    """x.T as a new C-contiguous array, [M, N] -> [N, M], copied in blocks of
    ``block`` output rows (each block's source columns stay in cache) over threads.
    With ``add`` [M]: x.T + add in the same pass (x + add[:, None], transposed)."""
    out = np.empty((x.shape[1], x.shape[0]), x.dtype)

    def work(start, stop):
        for lo, hi in blocks(start, stop, block):
            if add is None:
                out[lo:hi] = x[:, lo:hi].T
            else:
                np.add(x[:, lo:hi].T, add, out=out[lo:hi])

    parallel_rows(work, out.shape[0], min_rows=block)
    return out


# ---------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------
# im2col elements per block of output rows in conv2d (4 MB in float32). Larger
# than the reference kernel's blocks: each block's product then has hundreds
# of pixels as columns, where BLAS runs near its peak (SAM's neck 3x3 conv,
# 64 pixels per row, got 1 row per block in the reference kernel's 1 MB).
CONV_COLS_ELEMENTS = 1 << 20


def _tap_range(k_off: int, stride: int, padding: int, n_in: int, n_out: int):
    """Output positions o (in [0, n_out)) whose input o*stride + k_off - padding
    falls inside [0, n_in): the range [lo, hi)."""
    lo = max(0, -(-(padding - k_off) // stride))
    hi = min(n_out, (n_in - 1 - k_off + padding) // stride + 1)
    return lo, max(lo, hi)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None, stride: int = 1,
           padding: int = 0, act=None, channels_last: bool = False) -> np.ndarray:
    """Stands for :func:`npsam.kernels.ops.conv2d` with groups == 1 (then ``act``,
    an in-place activation on each block's fresh output, if given). With
    ``channels_last`` the result is the [B, O, Ho, Wo] view of a [B, Ho, Wo, O]
    array, each block's product taken as cols^T @ weight^T.

    The same im2col products per block of output rows as the reference kernel,
    with the columns read straight from the unpadded input (the taps that fall
    on the zero border written as zeros) instead of from a padded copy of the
    whole input, and larger blocks (CONV_COLS_ELEMENTS). The products are cut
    into other blocks of rows than the reference kernel's, which BLAS may sum
    in another order: within the tolerances. Blocks are fixed by the sizes,
    never by the number of threads; BLAS runs single-threaded in each.

    An input that is the [B, C, H, W] view of channels-last memory (the fast
    TinyViT stem's first convolution gives one) is read channels-last: its
    columns are gathered as [rows, Wo, K, K, C], each tap a copy of whole
    pixels (C contiguous values) rather than of single values, and the result
    is channels-last too."""
    b, c, h, w = x.shape
    o, cg, k, _ = weight.shape
    assert cg == c, "conv2d: groups == 1 only (depthwise: kernels.ops.depthwise_conv2d)"
    nhwc = c > 1 and is_channels_last(x)
    channels_last = channels_last or nhwc
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    if nhwc:  # columns [r, Wo, K, K, C]; [r*Wo, K*K*C] @ [K*K*C, O]
        wk = np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(k * k * c, o)
    else:  # columns [C, K, K, r, Wo]; [O, C*K*K] @ [C*K*K, r*Wo], or its transpose for channels-last
        wk = weight.reshape(o, c * k * k)
    y = np.empty((b, ho * wo, o) if channels_last else (b, o, ho * wo), dtype=x.dtype)
    rows = max(1, min(ho, CONV_COLS_ELEMENTS // (c * k * k * wo)))  # output rows per block
    per_image = -(-ho // rows)
    col_ranges = [_tap_range(kj, stride, padding, w, wo) for kj in range(k)]
    image = x.transpose(0, 2, 3, 1)  # [B, H, W, C] views: the gather below is written once for both layouts
    wide_bias = None if bias is None or not channels_last else wide_row(bias)

    def work(start, stop):
        for job in range(start, stop):
            bi, r0, r1 = image_rows(job, per_image, rows, ho)
            if nhwc:
                cols = scratch("conv2d.cols", (r1 - r0, wo, k, k, c), x.dtype)
                tap = lambda ki, kj: cols[:, :, ki, kj]  # noqa: E731  [r, Wo, C]
            else:
                cols = scratch("conv2d.cols", (c, k, k, r1 - r0, wo), x.dtype)
                tap = lambda ki, kj: cols[:, ki, kj].transpose(1, 2, 0)  # noqa: E731  [r, Wo, C], a view
            _gather_columns(image[bi], tap, r0, r1, ho, stride, padding, col_ranges)
            if nhwc:
                out = y[bi, r0 * wo:r1 * wo]  # [r*Wo, O]
                np.matmul(cols.reshape(-1, k * k * c), wk, out=out)  # [r*Wo, K*K*C] @ [K*K*C, O]
            elif channels_last:
                out = y[bi, r0 * wo:r1 * wo]  # [r*Wo, O]
                np.matmul(cols.reshape(c * k * k, -1).T, wk.T, out=out)  # [r*Wo, C*K*K] @ [C*K*K, O]
            else:
                out = y[bi, :, r0 * wo:r1 * wo]  # [O, r*Wo]
                np.matmul(wk, cols.reshape(c * k * k, -1), out=out)  # [O, C*K*K] @ [C*K*K, r*Wo]
            if bias is not None and channels_last:
                row_op(np.add, out, bias, out, wide_bias)
            elif bias is not None:
                out += bias[:, None]
            if act is not None:
                act(out)

    with single_threaded_blas():
        parallel_rows(work, b * per_image, threads=row_threads())
    if channels_last:
        return y.reshape(b, ho, wo, o).transpose(0, 3, 1, 2)  # [B, Ho, Wo, O] -> its [B, O, Ho, Wo] view
    return y.reshape(b, o, ho, wo)  # -> [B, O, Ho, Wo]


def is_channels_last(x: np.ndarray) -> bool:
    """x [B, C, H, W] is the view of C-contiguous [B, H, W, C] memory (and not
    C-contiguous itself): what the fast TinyViT stem, MBConv and the encoders'
    token layouts hand to a convolution."""
    return x.ndim == 4 and not x.flags.c_contiguous and x.transpose(0, 2, 3, 1).flags.c_contiguous


def _gather_columns(image: np.ndarray, tap, r0: int, r1: int, ho: int, stride: int, padding: int,
                    col_ranges) -> None:
    """im2col for output rows [r0, r1): for every tap (ki, kj), tap(ki, kj)
    (a [r, Wo, C] view into the columns) gets image [H, W, C] (any strides)
    at rows i*stride + ki - padding and columns j*stride + kj - padding, and
    zeros where those fall on the border."""
    h = image.shape[0]
    k = len(col_ranges)
    wo = tap(0, 0).shape[1]
    for ki in range(k):
        i_lo, i_hi = _tap_range(ki, stride, padding, h, ho)
        i_lo, i_hi = min(max(i_lo, r0), r1), max(min(i_hi, r1), r0)
        for kj in range(k):
            j_lo, j_hi = col_ranges[kj]
            dst = tap(ki, kj)
            if i_lo > r0:
                dst[: i_lo - r0] = 0
            if i_hi < r1:
                dst[i_hi - r0:] = 0
            if j_lo > 0:
                dst[:, :j_lo] = 0
            if j_hi < wo:
                dst[:, j_hi:] = 0
            if i_hi > i_lo and j_hi > j_lo:
                y0, x0 = i_lo * stride + ki - padding, j_lo * stride + kj - padding
                dst[i_lo - r0:i_hi - r0, j_lo:j_hi] = image[y0:y0 + stride * (i_hi - i_lo):stride,
                                                            x0:x0 + stride * (j_hi - j_lo):stride]
