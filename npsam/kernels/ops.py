"""Kernels: the few tensor operations SAM needs, in NumPy.

Each mirrors a ``torch.nn.functional`` call of the official code and says so,
with its mathematics (exact erf GELU, softmax with the max subtracted, ...).
They work in the dtype of their input (float32 by default, float64 for
cross-checking) and never upcast silently. The fast layer's versions (the
float32 polynomial GELU, the floored in-place softmax, blocked LayerNorm,
few-row linear) are in :mod:`npsam.fast.ops`.

Dimension letters:
    B  batch            N  tokens (sequence length)     C  channels
    H, W  height, width  h  heads                        D  channels per head
    O  output channels   K  kernel size
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from ..fast.threads import (  # the convolutions' blocks over threads and work arrays
    image_rows, parallel_rows, row_threads, scratch, single_threaded_blas)

# ---------------------------------------------------------------------------
# erf and GELU
# ---------------------------------------------------------------------------
# NumPy has no erf. This is Sun's fdlibm s_erf.c (double) and s_erff.c (float),
# vectorised: the same four ranges, the same rational approximations, the same
# split of exp(-x^2) into exp(-z^2 - 0.5625) * exp((z - x)(z + x) + R/S) with z
# the upper half of x's bits, so both are within 1 ulp of the true erf.
# Coefficients are listed highest degree first (Horner order).
_ERF64 = dict(
    erx=8.45062911510467529297e-01,
    pp=(-2.37630166566501626084e-05, -5.77027029648944159157e-03, -2.84817495755985104766e-02,
        -3.25042107247001499370e-01, 1.28379167095512558561e-01),
    qq=(-3.96022827877536812320e-06, 1.32494738004321644526e-04, 5.08130628187576562776e-03,
        6.50222499887672944485e-02, 3.97917223959155352819e-01, 1.0),
    pa=(-2.16637559486879084300e-03, 3.54783043256182359371e-02, -1.10894694282396677476e-01,
        3.18346619901161753674e-01, -3.72207876035701323847e-01, 4.14856118683748331666e-01,
        -2.36211856075265944077e-03),
    qa=(1.19844998467991074170e-02, 1.36370839120290507362e-02, 1.26171219808761642112e-01,
        7.18286544141962662868e-02, 5.40397917702171048937e-01, 1.06420880400844228286e-01, 1.0),
    ra=(-9.81432934416914548592e+00, -8.12874355063065934246e+01, -1.84605092906711035994e+02,
        -1.62396669462573470355e+02, -6.23753324503260060396e+01, -1.05586262253232909814e+01,
        -6.93858572707181764372e-01, -9.86494403484714822705e-03),
    sa=(-6.04244152148580987438e-02, 6.57024977031928170135e+00, 1.08635005541779435134e+02,
        4.29008140027567833386e+02, 6.45387271733267880336e+02, 4.34565877475229228821e+02,
        1.37657754143519042600e+02, 1.96512716674392571292e+01, 1.0),
    rb=(-4.83519191608651397019e+02, -1.02509513161107724954e+03, -6.37566443368389627722e+02,
        -1.60636384855821916062e+02, -1.77579549177547519889e+01, -7.99283237680523006574e-01,
        -9.86494292470009928597e-03),
    sb=(-2.24409524465858183362e+01, 4.74528541206955367215e+02, 2.55305040643316442583e+03,
        3.19985821950859553908e+03, 1.53672958608443695994e+03, 3.25792512996573918826e+02,
        3.03380607434824582924e+01, 1.0),
)
_ERF32 = dict(
    erx=8.4506291151e-01,
    pp=(-2.3763017452e-05, -5.7702702470e-03, -2.8481749818e-02, -3.2504209876e-01, 1.2837916613e-01),
    qq=(-3.9602282413e-06, 1.3249473704e-04, 5.0813062117e-03, 6.5022252500e-02, 3.9791721106e-01, 1.0),
    pa=(-2.1663755178e-03, 3.5478305072e-02, -1.1089469492e-01, 3.1834661961e-01, -3.7220788002e-01,
        4.1485610604e-01, -2.3621185683e-03),
    qa=(1.1984500103e-02, 1.3637083583e-02, 1.2617121637e-01, 7.1828655899e-02, 5.4039794207e-01,
        1.0642088205e-01, 1.0),
    ra=(-9.8143291473e+00, -8.1287437439e+01, -1.8460508728e+02, -1.6239666748e+02, -6.2375331879e+01,
        -1.0558626175e+01, -6.9385856390e-01, -9.8649440333e-03),
    sa=(-6.0424413532e-02, 6.5702495575e+00, 1.0863500214e+02, 4.2900814819e+02, 6.4538726807e+02,
        4.3456588745e+02, 1.3765776062e+02, 1.9651271820e+01, 1.0),
    rb=(-4.8351919556e+02, -1.0250950928e+03, -6.3756646729e+02, -1.6063638306e+02, -1.7757955551e+01,
        -7.9928326607e-01, -9.8649431020e-03),
    sb=(-2.2440952301e+01, 4.7452853394e+02, 2.5530502930e+03, 3.1998581543e+03, 1.5367296143e+03,
        3.2579251099e+02, 3.0338060379e+01, 1.0),
)
# float32 constants stored as float32 so every step of Horner stays in float32
_ERF32 = {k: (np.float32(v) if isinstance(v, float) else tuple(np.float32(c) for c in v)) for k, v in _ERF32.items()}


def _horner(z: np.ndarray, coeffs) -> np.ndarray:
    acc = np.full_like(z, coeffs[0])
    for c in coeffs[1:]:
        acc *= z
        acc += c
    return acc


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, elementwise, in the dtype of ``x`` (float32 or float64).

    Mirror of ``torch.erf`` (the official GELU calls it through ``nn.GELU()``).
    """
    x = np.asarray(x)
    if x.dtype == np.float64:
        c, ftype, itype, zmask = _ERF64, np.float64, np.uint64, np.uint64(0xFFFFFFFF00000000)
    elif x.dtype == np.float32:
        c, ftype, itype, zmask = _ERF32, np.float32, np.uint32, np.uint32(0xFFFFF000)
    else:
        raise ValueError(f"erf: x must be float32 or float64, got {x.dtype}")
    one = ftype(1.0)
    ax = np.abs(x)
    out = np.empty_like(x)
    # |x| < 0.84375: erf(x) = x + x * P(x^2) / Q(x^2)
    m = ax < 0.84375
    if m.any():
        xs = x[m]
        z = xs * xs
        out[m] = xs + xs * (_horner(z, c["pp"]) / _horner(z, c["qq"]))
    # 0.84375 <= |x| < 1.25: erf(x) = sign(x) * (erx + P(s) / Q(s)), s = |x| - 1
    m = (ax >= 0.84375) & (ax < 1.25)
    if m.any():
        s = ax[m] - one
        out[m] = np.copysign(c["erx"] + _horner(s, c["pa"]) / _horner(s, c["qa"]), x[m])
    # 1.25 <= |x| < 6: erf(x) = sign(x) * (1 - exp(-x^2 - 0.5625 + R/S) / |x|)
    m = (ax >= 1.25) & (ax < 6.0)
    if m.any():
        a = ax[m]
        s = one / (a * a)
        near = a < 1.0 / 0.35
        r_over_s = np.where(
            near,
            _horner(s, c["ra"]) / _horner(s, c["sa"]),
            _horner(s, c["rb"]) / _horner(s, c["sb"]),
        )
        z = (a.view(itype) & zmask).view(ftype)  # x with its low bits cleared: z*z is exact
        r = np.exp(-z * z - ftype(0.5625)) * np.exp((z - a) * (z + a) + r_over_s)
        out[m] = np.copysign(one - r / a, x[m])
    # |x| >= 6 (and inf): erf = sign(x) * 1; NaN stays NaN
    m = ax >= 6.0
    if m.any():
        out[m] = np.copysign(one, x[m])
    m = np.isnan(x)
    if m.any():
        out[m] = np.nan
    return out


def gelu(x: np.ndarray, precise: bool = False) -> np.ndarray:
    """Mirror of ``nn.GELU()`` (approximate="none"): x * 0.5 * (1 + erf(x / sqrt(2))),
    elementwise, in the dtype of x. NOTE(reference): SAM uses the exact erf
    form; the tanh approximation differs by up to ~5e-4. ``precise``: a float32
    x is evaluated in float64 and rounded once (for small arrays whose errors
    reach far, see PromptEncoder's mask downscaling)."""
    x = np.asarray(x)
    xe = x.astype(np.float64) if precise and x.dtype == np.float32 else x
    t = xe.dtype.type
    return (xe * t(0.5) * (t(1) + erf(xe * t(math.sqrt(0.5))))).astype(x.dtype, copy=False)


def relu(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Mirror of F.relu; ``out`` may be ``x``."""
    return np.maximum(x, 0, out=out)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Mirror of torch.sigmoid, stable for large |x|."""
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1 / (1 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1 + e)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mirror of torch.softmax: exp(x - max) / sum, the max subtracted for stability."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------
# Linear and normalisation
# ---------------------------------------------------------------------------
def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """Mirror of F.linear: x @ weight.T + bias, weight in PyTorch's (out, in) layout."""
    y = x @ weight.T  # [..., C] @ [C, O] -> [..., O]
    return y if bias is None else y + bias


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Mirror of F.layer_norm over the last dimension (biased variance)."""
    mean = x.mean(axis=-1, keepdims=True)  # [..., C] -> [..., 1]
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # [..., C] -> [..., 1]
    return xc / np.sqrt(var + x.dtype.type(eps)) * weight + bias


def layer_norm_2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Mirror of modeling/common.py: LayerNorm2d.forward, normalising over C of [B, C, H, W].

    NOTE(reference): eps is 1e-6 here, not nn.LayerNorm's 1e-5.
    """
    u = x.mean(axis=1, keepdims=True)  # [B, C, H, W] -> [B, 1, H, W]
    xc = x - u
    s = np.mean(xc * xc, axis=1, keepdims=True)  # [B, C, H, W] -> [B, 1, H, W]
    xc /= np.sqrt(s + x.dtype.type(eps))
    return weight[:, None, None] * xc + bias[:, None, None]


# ---------------------------------------------------------------------------
# Convolutions: only what SAM uses
# ---------------------------------------------------------------------------
def conv_transpose2d_2x2(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Mirror of F.conv_transpose2d with kernel 2, stride 2, no padding.

    Each input pixel writes its own 2x2 output block, so the whole convolution is
    one matrix product followed by interleaving. weight is PyTorch's
    (C_in, C_out, 2, 2) layout.
    """
    b, c, h, w = x.shape
    cin, o, kh, kw = weight.shape
    assert (kh, kw) == (2, 2) and cin == c, "only the 2x2 stride-2 transposed conv SAM uses"
    xt = x.reshape(b, c, h * w).transpose(0, 2, 1)  # [B, C, H, W] -> [B, HW, C]
    y = xt @ weight.reshape(c, o * 4)  # [B, HW, C] @ [C, O*2*2] -> [B, HW, O*2*2]
    y = y.reshape(b, h, w, o, 2, 2).transpose(0, 3, 1, 4, 2, 5)  # -> [B, O, H, 2, W, 2]
    y = y.reshape(b, o, 2 * h, 2 * w)  # -> [B, O, 2H, 2W]
    y += bias[:, None, None]
    return y


def conv2d_patchify(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    """Mirror of F.conv2d with kernel == stride and no padding (2x2 stride 2 in the
    mask downscaling, 16x16 stride 16 in the ViT patch embedding, 1x1 convs).

    Non-overlapping patches make it one matrix product. weight is (O, C, K, K).
    """
    b, c, h, w = x.shape
    o, cin, k, k2 = weight.shape
    assert cin == c and k == k2 and h % k == 0 and w % k == 0, "kernel == stride, no padding"
    hp, wp = h // k, w // k
    p = x.reshape(b, c, hp, k, wp, k).transpose(0, 2, 4, 1, 3, 5)  # -> [B, H/K, W/K, C, K, K]
    p = p.reshape(b, hp * wp, c * k * k)  # -> [B, H/K*W/K, C*K*K]
    y = p @ weight.reshape(o, c * k * k).T  # -> [B, H/K*W/K, O]
    if bias is not None:
        y += bias
    return y.transpose(0, 2, 1).reshape(b, o, hp, wp)  # -> [B, O, H/K, W/K]


# Elements of im2col columns per block of output rows in conv2d (1 MB in
# float32): a block's columns are written and read while in cache. On 2 threads,
# TinyViT's first convs (3 -> 32 at 1024x1024 and 32 -> 64 at 512x512, 3x3 stride 2)
# take 16 and 32 ms against 22 and 63 ms with whole-image columns (and 119 and
# 134 ms for the [Ho, Wo, C, K, K] layout this replaced); SAM's neck 3x3 conv
# (256 -> 256 at 64x64) 29 against 70 ms.
CONV_COLS_ELEMENTS = 1 << 18


def conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray] = None,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> np.ndarray:
    """Mirror of F.conv2d for square kernels, dilation 1.

    groups == 1 is an im2col matrix product per block of output rows;
    groups == C is :func:`depthwise_conv2d`.
    """
    b, c, h, w = x.shape
    o, cg, k, _ = weight.shape
    if groups != 1:
        assert groups == c == o and cg == 1, "only groups == 1 or depthwise (groups == C == O)"
        return depthwise_conv2d(x, weight, bias, stride, padding)
    assert cg == c
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))  # -> [B, C, H+2p, W+2p]
    hp, wp = x.shape[2], x.shape[3]
    ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
    if k == stride and padding == 0:
        return conv2d_patchify(x[:, :, : ho * k, : wo * k], weight, bias)
    # im2col in NCHW order, so the product gives [O, pixels] with no transpose:
    # cols[c, ki, kj, i, j] = x[c, i*s + ki, j*s + kj] for the block's output rows i
    w2 = weight.reshape(o, c * k * k)  # [O, C*K*K]
    y = np.empty((b, o, ho * wo), dtype=x.dtype)
    rows = max(1, CONV_COLS_ELEMENTS // (c * k * k * wo))  # output rows per block
    per_image = -(-ho // rows)

    def work(start, stop):
        for j in range(start, stop):
            bi, r0, r1 = image_rows(j, per_image, rows, ho)
            cols = scratch("conv2d.cols", (c, k, k, r1 - r0, wo), x.dtype)
            for ki in range(k):
                for kj in range(k):
                    cols[:, ki, kj] = x[bi, :, ki + stride * r0 : ki + stride * r1 : stride, kj : kj + stride * wo : stride]
            out = y[bi, :, r0 * wo : r1 * wo]  # [O, R*Wo]
            np.matmul(w2, cols.reshape(c * k * k, -1), out=out)  # [O, C*K*K] @ [C*K*K, R*Wo]
            if bias is not None:
                out += bias[:, None]

    with single_threaded_blas():  # blocks over our threads, BLAS on one thread in each
        parallel_rows(work, b * per_image, threads=row_threads())
    return y.reshape(b, o, ho, wo)  # -> [B, O, Ho, Wo]


def depthwise_conv2d(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: int = 1,
                     padding: int = 0) -> np.ndarray:
    """Mirror of F.conv2d with groups == C == O (TinyViT's MBConv, local and
    PatchMerging convs): weight [C, 1, K, K], x [B, C, H, W] -> [B, C, Ho, Wo].

    The K*K shifted, weighted copies of each channel are summed (first tap,
    the others in (ki, kj) order, then the bias), a block of channels at a time
    (their planes stay in cache) over threads. With stride 1 each channel's
    padded plane is read as one flat vector: on the padded width Wp, tap
    (ki, kj) of output pixel q = i*Wp + j is input pixel q + ki*Wp + kj, so
    every tap is one long contiguous slice, and the K-1 extra columns of each
    output row are dropped at the end (a plane of 64x64 pixels: 2.9 against
    7.0 ms for 160 channels, one channel per step on one thread).
    """
    b, c, h, w = x.shape
    k = weight.shape[-1]
    assert weight.shape == (c, 1, k, k), "depthwise: weight must be [C, 1, K, K]"
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    flat = stride == 1
    # stride 1: one more zero row at the bottom, read (only) by the dropped columns of the last output row
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding + flat), (padding, padding)))  # -> [B, C, Hp, Wp]
    hp, wp = xp.shape[2], xp.shape[3]
    y = np.empty((b, c, ho, wo), dtype=x.dtype)
    row = wp if flat else wo  # output row length while summing
    per = max(1, DEPTHWISE_ELEMENTS // (ho * row))  # channels per block
    per_image = -(-c // per)
    xf = xp.reshape(b, c, hp * wp)

    def taps(bi, c0, c1):  # (ki, kj, [n, ...] input view of that tap)
        for ki in range(k):
            for kj in range(k):
                if flat:
                    off = ki * wp + kj
                    yield ki, kj, xf[bi, c0:c1, off : off + ho * wp]  # [n, Ho*Wp]
                else:
                    yield ki, kj, xp[bi, c0:c1, ki : ki + stride * ho : stride, kj : kj + stride * wo : stride]

    def work(start, stop):
        shape = (per, ho * wp) if flat else (per, ho, wo)
        acc, tmp = scratch("depthwise.acc", shape, x.dtype), scratch("depthwise.tmp", shape, x.dtype)
        for j in range(start, stop):
            bi, c0, c1 = image_rows(j, per_image, per, c)  # image bi, channels c0:c1
            a, t = acc[: c1 - c0], tmp[: c1 - c0]
            tail = (None,) * (a.ndim - 1)  # the per-channel weight broadcasts over the pixels
            for ki, kj, src in taps(bi, c0, c1):
                wt = weight[(slice(c0, c1), 0, ki, kj) + tail]
                if ki == kj == 0:
                    np.multiply(src, wt, out=a)
                else:
                    np.multiply(src, wt, out=t)
                    a += t
            if bias is not None:
                a += bias[(slice(c0, c1),) + tail]
            y[bi, c0:c1] = a.reshape(c1 - c0, ho, row)[:, :, :wo]

    parallel_rows(work, b * per_image)
    return y


DEPTHWISE_ELEMENTS = 1 << 17  # output elements per block of channels in depthwise_conv2d


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------
def scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """softmax(q @ k^T / sqrt(D) [+ bias]) @ v over the last two dims.

    q [..., Nq, D], k [..., Nk, D], v [..., Nk, Dv] -> [..., Nq, Dv].
    NOTE(reference): the official Attention divides the logits by sqrt(D) after
    the product (modeling/transformer.py), rather than scaling q first.
    """
    attn = q @ k.swapaxes(-1, -2)  # [..., Nq, D] @ [..., D, Nk] -> [..., Nq, Nk]
    attn /= q.dtype.type(math.sqrt(q.shape[-1]))
    if bias is not None:
        attn += bias
    attn = softmax(attn, axis=-1)
    return attn @ v  # [..., Nq, Nk] @ [..., Nk, Dv] -> [..., Nq, Dv]


def separate_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """Mirror of Attention._separate_heads: [B, N, C] -> [B, h, N, C/h]."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)  # -> [B, h, N, C/h]


def recombine_heads(x: np.ndarray) -> np.ndarray:
    """Mirror of Attention._recombine_heads: [B, h, N, D] -> [B, N, h*D]."""
    b, nh, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, nh * d)  # -> [B, N, h*D]


def pairs(x) -> Tuple[int, int]:
    return (int(x[0]), int(x[1]))
