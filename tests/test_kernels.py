"""Tier 1: every kernel of npsam/kernels/ops.py against torch.nn.functional, under
hypothesis; the fast layer's kernels that stand for one of them (npsam/fast/ops.py)
against the same torch calls."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import oracle
from npsam.fast import ops as fast_ops
from npsam.kernels import ops
from tolerances import DECODER_F32, DECODER_F64, ERF_F32_ULPS, ERF_F64_REL, assert_close, scaled_error

DTYPES = [(np.float32, DECODER_F32), (np.float64, DECODER_F64)]
dtype_param = pytest.mark.parametrize("dtype,tol", DTYPES, ids=["f32", "f64"])
# The reference kernel and its fast twin, for kernels that have one.
both = pytest.mark.parametrize("k", [ops, fast_ops], ids=["reference", "fast"])


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def T(x):
    return torch.from_numpy(np.ascontiguousarray(x))


# --- erf and GELU -------------------------------------------------------------
def test_erf_float64_within_1e15_relative_of_math_erf_everywhere():
    x = np.concatenate([
        np.linspace(-7, 7, 400_001),  # every range of the fdlibm split
        np.array([0.84375, 1.25, 1 / 0.35, 6.0, -0.84375, -1.25, -6.0, 28.0, 1e-300, -1e-300, 5e-324]),
        np.geomspace(1e-300, 10, 20_001), -np.geomspace(1e-300, 10, 20_001),
    ])
    ref = np.array([math.erf(v) for v in x])
    got = ops.erf(x)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    worst = int(np.argmax(rel))
    assert rel[worst] <= ERF_F64_REL, f"erf({x[worst]!r}): ours {got[worst]!r}, math.erf {ref[worst]!r}"


def test_erf_float32_within_ulps_of_exact():
    x = np.concatenate([np.linspace(-7, 7, 400_001), np.geomspace(1e-30, 10, 20_001)]).astype(np.float32)
    exact = np.array([math.erf(float(v)) for v in x])
    got = ops.erf(x).astype(np.float64)
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    worst = int(np.argmax(ulps))
    assert ulps[worst] <= ERF_F32_ULPS, f"erf({x[worst]!r}): ours {got[worst]!r}, exact {exact[worst]!r}"


def test_erf_special_values():
    for dtype in (np.float32, np.float64):
        got = ops.erf(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=dtype))
        assert got[0] == 1 and got[1] == -1 and np.isnan(got[2])
        assert got[3] == 0 and np.signbit(got[4])


@both
@dtype_param
@given(seed=st.integers(0, 2**31), n=st.integers(1, 5000), scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]),
       precise=st.booleans())
def test_gelu_is_exact_erf_gelu(k, dtype, tol, seed, n, scale, precise):
    x = rand(np.random.default_rng(seed), (n,), dtype, scale)
    assert_close(k.gelu(x, precise=precise), F.gelu(T(x)).numpy(), tol, "gelu")


def test_gelu_is_not_the_tanh_approximation():
    # The tanh form differs by ~1e-4 near |x| ~ 2; our exact GELU must not.
    x = np.linspace(-4, 4, 10001)
    exact = F.gelu(T(x)).numpy()
    tanh = F.gelu(T(x), approximate="tanh").numpy()
    assert np.abs(exact - tanh).max() > 1e-4
    assert_close(ops.gelu(x), exact, DECODER_F64, "gelu")


# --- elementwise, softmax, linear, norms -------------------------------------------
@both
@dtype_param
@given(seed=st.integers(0, 2**31), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_softmax(k, dtype, tol, seed, shape):
    x = rand(np.random.default_rng(seed), shape, dtype, 20.0)
    x_before = x.copy()
    assert_close(k.softmax(x, -1), torch.softmax(T(x), -1).numpy(), tol, "softmax")
    np.testing.assert_array_equal(x, x_before)  # the input is left alone


@dtype_param
@given(seed=st.integers(0, 2**31), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_relu_sigmoid_softmax(dtype, tol, seed, shape):
    x = rand(np.random.default_rng(seed), shape, dtype, 20.0)
    assert_close(ops.relu(x), F.relu(T(x)).numpy(), tol, "relu")
    y = x.copy()
    assert ops.relu(y, out=y) is y and np.array_equal(y, ops.relu(x))  # in place
    assert_close(ops.sigmoid(x), torch.sigmoid(T(x)).numpy(), tol, "sigmoid")
    assert_close(ops.softmax(x.copy(), -1), torch.softmax(T(x), -1).numpy(), tol, "softmax")


@both
@dtype_param
@given(seed=st.integers(0, 2**31), lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       cin=st.integers(1, 64), cout=st.integers(1, 64), bias=st.booleans())
def test_linear(k, dtype, tol, seed, lead, cin, cout, bias):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, lead + [cin], dtype), rand(rng, (cout, cin), dtype)
    b = rand(rng, (cout,), dtype) if bias else None
    ref = F.linear(T(x), T(w), None if b is None else T(b)).numpy()
    assert_close(k.linear(x, w, b), ref, tol, "linear")
    if k is fast_ops:  # with a kept weight.T, as the decoder's modules pass it
        assert_close(k.linear(x, w, b, np.ascontiguousarray(w.T)), ref, tol, "linear(weight_t)")


@given(seed=st.integers(0, 2**31), rows=st.integers(1, 80), bias=st.booleans(), few_rows_orientation=st.booleans())
def test_linear_into_out(seed, rows, bias, few_rows_orientation):
    """fast_ops.linear(..., out=) writes the result into out, bit for bit what it
    returns without out, in both orientations (weight @ x.T for a few rows and a
    large weight, forced here by lowering LARGE_WEIGHT; x @ weight.T otherwise)."""
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (rows, 24), np.float32), rand(rng, (40, 24), np.float32)
    b = rand(rng, (40,), np.float32) if bias else None
    saved = fast_ops.LARGE_WEIGHT
    fast_ops.LARGE_WEIGHT = 1 if few_rows_orientation else saved
    try:
        expected = fast_ops.linear(x, w, b)
        out = np.full((rows + 3, 40), np.nan, np.float32)  # a block of rows of a larger array
        got = fast_ops.linear(x, w, b, out=out[2:2 + rows])
    finally:
        fast_ops.LARGE_WEIGHT = saved
    assert np.shares_memory(got, out)
    np.testing.assert_array_equal(out[2:2 + rows], expected)
    assert np.isnan(out[:2]).all() and np.isnan(out[2 + rows:]).all()  # nothing written outside


@both
@dtype_param
@given(seed=st.integers(0, 2**31), lead=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       c=st.integers(2, 300), eps=st.sampled_from([1e-5, 1e-6]), offset=st.sampled_from([0.0, 5.0]))
def test_layer_norm(k, dtype, tol, seed, lead, c, eps, offset):
    rng = np.random.default_rng(seed)
    x = rand(rng, lead + [c], dtype, 3.0) + dtype(offset)
    w, b = 1 + rand(rng, (c,), dtype, 0.2), rand(rng, (c,), dtype)
    ref = F.layer_norm(T(x), (c,), T(w), T(b), eps).numpy()
    # A row whose spread is tiny next to its offset (a few channels, a large
    # offset) is ill-conditioned: torch's own float32 result is then 1e-4 from
    # the exact one, and two float32 summation orders cannot agree to the bar.
    # Only rows where the reference itself is good to a quarter of the bar can
    # check the bar (as tests/test_decoder.py does for the decoder).
    exact = F.layer_norm(T(x).double(), (c,), T(w).double(), T(b).double(), eps).numpy()
    assume(scaled_error(ref, exact) <= tol / 4)
    assert_close(k.layer_norm(x, w, b, eps), ref, tol, "layer_norm")


@dtype_param
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 9), w=st.integers(1, 9))
def test_layer_norm_2d_matches_official(dtype, tol, seed, b, c, h, w):
    oracle.segment_anything()
    from segment_anything.modeling.common import LayerNorm2d

    rng = np.random.default_rng(seed)
    x = rand(rng, (b, c, h, w), dtype, 2.0)
    ref_mod = LayerNorm2d(c).to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        ref_mod.weight.copy_(T(1 + rand(rng, (c,), dtype, 0.2)))
        ref_mod.bias.copy_(T(rand(rng, (c,), dtype)))
        ref = ref_mod(T(x)).numpy()
    got = ops.layer_norm_2d(x, ref_mod.weight.detach().numpy(), ref_mod.bias.detach().numpy(), 1e-6)
    assert_close(got, ref, tol, "layer_norm_2d")


# --- convolutions ------------------------------------------------------------------
@dtype_param
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), cin=st.integers(1, 32), cout=st.integers(1, 32),
       h=st.integers(1, 12), w=st.integers(1, 12))
def test_conv_transpose2d_2x2(dtype, tol, seed, b, cin, cout, h, w):
    rng = np.random.default_rng(seed)
    x, wt, bias = rand(rng, (b, cin, h, w), dtype), rand(rng, (cin, cout, 2, 2), dtype), rand(rng, (cout,), dtype)
    ref = F.conv_transpose2d(T(x), T(wt), T(bias), stride=2).numpy()
    assert_close(ops.conv_transpose2d_2x2(x, wt, bias), ref, tol, "conv_transpose2d")


@dtype_param
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), cin=st.integers(1, 16), cout=st.integers(1, 16),
       k=st.sampled_from([1, 2, 4]), hk=st.integers(1, 6), wk=st.integers(1, 6), bias=st.booleans())
def test_conv2d_patchify(dtype, tol, seed, b, cin, cout, k, hk, wk, bias):
    rng = np.random.default_rng(seed)
    x, wt = rand(rng, (b, cin, hk * k, wk * k), dtype), rand(rng, (cout, cin, k, k), dtype)
    bb = rand(rng, (cout,), dtype) if bias else None
    ref = F.conv2d(T(x), T(wt), None if bb is None else T(bb), stride=k).numpy()
    assert_close(ops.conv2d_patchify(x, wt, bb), ref, tol, "conv2d_patchify")


@dtype_param
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), c=st.integers(1, 12), o=st.integers(1, 12),
       k=st.sampled_from([1, 2, 3, 5]), stride=st.sampled_from([1, 2]), padding=st.integers(0, 2),
       h=st.integers(5, 14), w=st.integers(5, 14), depthwise=st.booleans(), small_blocks=st.booleans())
def test_conv2d_general_and_depthwise(dtype, tol, seed, b, c, o, k, stride, padding, h, w, depthwise,
                                      small_blocks):
    """``small_blocks``: blocks of a few output rows (im2col) or channels
    (depthwise), so that an image takes several, over both threads, the last
    one ragged; otherwise these sizes fit one block."""
    rng = np.random.default_rng(seed)
    groups, o = (c, c) if depthwise else (1, o)
    x, wt, bias = rand(rng, (b, c, h, w), dtype), rand(rng, (o, c // groups, k, k), dtype), rand(rng, (o,), dtype)
    ref = F.conv2d(T(x), T(wt), T(bias), stride=stride, padding=padding, groups=groups).numpy()
    saved = ops.CONV_COLS_ELEMENTS, ops.DEPTHWISE_ELEMENTS
    if small_blocks:
        ops.CONV_COLS_ELEMENTS, ops.DEPTHWISE_ELEMENTS = 3 * c * k * k * w, 2 * h * (w + 2 * padding)
    try:
        got = ops.conv2d(x, wt, bias, stride, padding, groups)
    finally:
        ops.CONV_COLS_ELEMENTS, ops.DEPTHWISE_ELEMENTS = saved
    assert_close(got, ref, tol, "conv2d")


# --- attention -----------------------------------------------------------------------
@dtype_param
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), h=st.integers(1, 4), nq=st.integers(1, 20),
       nk=st.integers(1, 40), d=st.integers(1, 16))
def test_scaled_dot_product_attention(dtype, tol, seed, b, h, nq, nk, d):
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (b, h, nq, d), dtype, 2), rand(rng, (b, h, nk, d), dtype, 2), rand(rng, (b, h, nk, d), dtype)
    ref = F.scaled_dot_product_attention(T(q), T(k), T(v)).numpy()
    assert_close(ops.scaled_dot_product_attention(q, k, v), ref, tol, "attention")
