"""The fast layer's kernels and passes compute what the reference does.

- float32 GELU (sigmoid form, blocks over threads) against the exact GELU on a dense
  grid of float32 inputs: never less accurate than torch's own float32 GELU;
- threads and blocks change nothing (bit for bit), in place or not;
- LayerNorm with a fused residual, in place;
- the reassociated cross-attentions and the per-pixel upscaling against the
  official modules (one image shared by a batch of prompts too);
- the per-image cache in MaskDecoder is exact and notices changed inputs.
"""

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import npsam
import oracle
from npsam.fast import common as fast_common
from npsam.fast import ops, threads
from npsam.fast import transformer as fast_tr
from npsam.kernels import nn
from npsam.modeling.transformer import Attention
from tolerances import DECODER_F32, DECODER_F64, assert_close

oracle.segment_anything()
from segment_anything.modeling import transformer as sa_tr  # noqa: E402

from test_decoder import EMBED, GRID, official_modules, ours_from, run_official  # noqa: E402

DTYPES = {"f32": (np.float32, torch.float32, DECODER_F32), "f64": (np.float64, torch.float64, DECODER_F64)}


def float32_grid(limit: float, step: int) -> np.ndarray:
    """Every ``step``-th float32 in [-limit, limit] by bit pattern (both signs), 0 excluded."""
    top = np.float32(limit).view(np.uint32)
    x = np.arange(1, top, step, dtype=np.uint32).view(np.float32)
    return np.concatenate([x, -x])


def test_gelu_float32_at_least_as_accurate_as_torch_on_a_dense_grid():
    x = float32_grid(10.0, 397)  # ~5.5M values: every binade of [-10, 10], subnormals included
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * np.frompyfunc(math.erfc, 1, 1)(-x64 / math.sqrt(2)).astype(np.float64)
    ours = ops.gelu(x).astype(np.float64)
    theirs = F.gelu(torch.from_numpy(x)).numpy().astype(np.float64)
    ulp_x = np.spacing(np.abs(x)).astype(np.float64)  # the input's resolution
    ours_err, theirs_err = np.abs(ours - exact), np.abs(theirs - exact)
    worst = int(np.argmax(ours_err / ulp_x))
    assert (ours_err / ulp_x).max() <= (theirs_err / ulp_x).max(), (
        f"gelu({x[worst]!r}): ours {ours[worst]!r}, exact {exact[worst]!r}")
    assert ours_err.max() <= theirs_err.max()
    assert_close(ours, exact, DECODER_F32, "gelu vs exact")


def test_gelu_float32_extremes():
    x = np.array([0.0, -0.0, 1e-38, -1e-38, 1e-45, 30.0, -30.0, 1e30, -1e30, np.nan], np.float32)
    got = ops.gelu(x)
    assert got[0] == 0 and got[1] == 0 and got[5] == 30 and got[6] == 0 and got[7] == 1e30
    assert got[8] == 0 and np.isnan(got[9])
    assert got[2] == np.float32(0.5e-38) and got[3] == np.float32(-0.5e-38)
    # beyond the fit (x^2 > 36 is not clamped) and at overflow: exact limits, no NaN
    # but gelu(-inf) (-inf * 0, as torch); torch's own gives inf at 3e38 and NaN at inf
    x = np.array([6.5, 9.0, 3e38, np.inf, -6.5, -9.0, -3e38, -np.inf], np.float32)
    got = ops.gelu(x)
    assert np.all(got[:3] == x[:3]) and got[3] == np.inf
    assert np.isnan(got[7])
    # the negative tail against the exact values, by the grid test's measure:
    # never further from them than torch's own float32 GELU
    neg = x[4:7].astype(np.float64)
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in neg])
    theirs = F.gelu(torch.from_numpy(x[4:7])).numpy().astype(np.float64)
    assert np.all(np.abs(got[4:7] - exact) <= np.abs(theirs - exact))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_softmax_weights_keep_products_normal_and_match_torch(dtype):
    """Logits spread far beyond exp's range: every weight is at least sqrt(tiny),
    so its product with any |v| in [sqrt(tiny), 1] is a normal float (the slow
    subnormal products the floor exists to avoid), and the softmax still
    matches torch's, which has no floor, within the decoder's tolerance."""
    np_dtype, _, tol = DTYPES[dtype]
    rng = np.random.default_rng(0)
    # one logit 0 and 4095 from -1 down to -1e5, across exp's whole range: the
    # row's weight is mostly the top one's, so a floor set too high shows
    spread = np.concatenate([[0.0], -np.geomspace(1, 1e5, 4095)])
    x = (rng.permuted(np.tile(spread, (8, 1)), axis=1) + rng.normal(0, 5, (8, 1))).astype(np_dtype)
    tiny = np.finfo(np_dtype).tiny
    weights = ops.exp_below_max_(x.copy(), x.max(axis=-1, keepdims=True))
    assert weights.max() == 1 and weights.min() >= np.sqrt(tiny)
    v = np.geomspace(np.sqrt(tiny), 1, 97).astype(np_dtype)
    products = weights.reshape(-1)[:, None] * v  # every weight times every scale of v
    assert np.all(np.abs(products) >= tiny), "a weight times some |v| >= sqrt(tiny) is subnormal"
    assert_close(ops.softmax(x, -1), torch.softmax(torch.from_numpy(x), -1).numpy(), tol, "softmax")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_exp2_sums_give_softmax_weights_kept_normal(dtype):
    """exp2_sums_ on logits scaled by log2(e): the same floor at sqrt(tiny),
    and weights / sums is torch's softmax of the unscaled logits."""
    np_dtype, _, tol = DTYPES[dtype]
    rng = np.random.default_rng(1)
    spread = np.concatenate([[0.0], -np.geomspace(1, 1e5, 4095)])
    x = (rng.permuted(np.tile(spread, (8, 1)), axis=1) + rng.normal(0, 5, (8, 1))).astype(np_dtype)
    tiny = np.finfo(np_dtype).tiny
    weights = (x * np_dtype(np.log2(np.e))).reshape(2, 4, -1)  # [h, T, HW], as the decoder's layer 0
    sums = ops.exp2_sums_(weights)
    assert sums.shape == (2, 4)
    assert weights.max() == 1 and weights.min() >= np.sqrt(tiny)
    np.testing.assert_array_equal(sums, weights.sum(axis=-1))
    expected = torch.softmax(torch.from_numpy(x), -1).numpy().reshape(2, 4, -1)
    assert_close(weights / sums[..., None], expected, tol, "exp2 softmax")
    # over the first axis, keys first (TinyViT's window attention): 64 columns,
    # so that the floor is the cached row, not the scalar
    x64 = np.tile(x, (8, 1))  # [64, 4096]
    cols = np.ascontiguousarray((x64 * np_dtype(np.log2(np.e))).T)  # [4096, 64]
    sums = ops.exp2_sums_(cols, axis=0)
    assert sums.shape == (64,)
    assert cols.max() == 1 and cols.min() >= np.sqrt(tiny)
    np.testing.assert_array_equal(sums, cols.sum(axis=0))
    expected = torch.softmax(torch.from_numpy(x64), -1).numpy().T
    assert_close(cols / sums, expected, tol, "exp2 softmax over the first axis")


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_gelu_threads_blocks_and_in_place_change_nothing(n_threads):
    x = np.random.default_rng(0).standard_normal((3, 70001)).astype(np.float32) * 3
    threads.set_num_threads(1)
    ref = ops.gelu(x)
    try:
        threads.set_num_threads(n_threads)
        np.testing.assert_array_equal(ops.gelu(x), ref)
        np.testing.assert_array_equal(ops.gelu(x[:, ::2]), ref[:, ::2])  # strided input
        y = x.copy()
        assert ops.gelu(y, out=y) is y
        np.testing.assert_array_equal(y, ref)
        t = ops.gelu(x.T)  # a transposed input gives a C-order result
        assert t.flags.c_contiguous
        np.testing.assert_array_equal(t, ref.T)
        wide = np.zeros((3, 2 * x.shape[1]), np.float32)
        assert ops.gelu(x, out=wide[:, ::2]).base is wide  # a strided out
        np.testing.assert_array_equal(wide[:, ::2], ref)
        ops.gelu(wide[:, 1::2], out=wide[:, 1::2])  # in place on a strided view: gelu(0) = 0
        np.testing.assert_array_equal(wide[:, 1::2], 0)
        ops.gelu(wide[:, ::2], out=wide[:, ::2])  # ... and on the strided results themselves
        np.testing.assert_array_equal(wide[:, ::2], ops.gelu(ref))
    finally:
        threads.set_num_threads(threads.NUM_THREADS if n_threads == 1 else 2)


def test_set_num_threads_rejects_bad_values():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="set_num_threads"):
            threads.set_num_threads(bad)


def test_parallel_rows_covers_each_row_once_and_nests_inline():
    seen = np.zeros(1001, np.int64)

    def inner(lo, hi):
        seen[lo:hi] += 1

    def outer(lo, hi):
        threads.parallel_rows(inner, 0)  # nothing to do
        for a, b in threads.blocks(lo, hi, 7):
            threads.parallel_rows(lambda s, e: inner(a + s, a + e), b - a)  # nested: inline

    threads.parallel_rows(outer, seen.size)
    assert np.all(seen == 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [1, 3, 64, 256, 300])
def test_layer_norm_with_residual_in_place(dtype, c):
    rng = np.random.default_rng(c)
    x, r = rng.standard_normal((5, 77, c)).astype(dtype) * 3, rng.standard_normal((5, 77, c)).astype(dtype)
    w, b = (1 + 0.2 * rng.standard_normal(c)).astype(dtype), rng.standard_normal(c).astype(dtype)
    tol = DECODER_F32 if dtype == np.float32 else DECODER_F64
    ref = F.layer_norm(torch.from_numpy(x + r), (c,), torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    assert_close(ops.layer_norm(x, w, b, 1e-5, add=r), ref, tol, "layer_norm(x + r)")
    y = x.copy()
    out = ops.layer_norm(y, w, b, 1e-5, out=y, add=r)
    assert out is y
    assert_close(y, ref, tol, "layer_norm in place")


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 4), t=st.integers(1, 9), hw=st.integers(1, 70),
       shared=st.booleans())
def test_reassociated_cross_attentions_match_official(name, seed, b, t, hw, shared):
    dtype, td, tol = DTYPES[name]
    rng = np.random.default_rng(seed)
    ref = oracle.randomize_(sa_tr.Attention(64, 4, downsample_rate=2), seed).to(td)
    ours = Attention(64, 4, downsample_rate=2)
    ours.load_state_dict(oracle.state_dict_numpy(ref), dtype=dtype)
    tokens = rng.standard_normal((b, t, 64)).astype(dtype)
    image = rng.standard_normal((1 if shared else b, hw, 64)).astype(dtype)
    image_b = np.broadcast_to(image, (b, hw, 64))
    tv, iv = torch.as_tensor(tokens), torch.as_tensor(np.array(image_b))
    with torch.no_grad():
        r_to = ref(tv, iv, iv).numpy()
        r_from = ref(iv, tv, tv).numpy()
    assert_close(fast_tr.attend_to_image(ours, tokens, image, image), r_to, tol, "attend_to_image")
    assert_close(fast_tr.attend_from_image(ours, image, tokens, tokens), r_from, tol, "attend_from_image")


@pytest.fixture(scope="module", params=sorted(DTYPES))
def decoder(request):
    dtype, tdtype, tol = DTYPES[request.param]
    ref_pe, ref_md = official_modules(tdtype)
    pe, md = ours_from(ref_pe, ref_md, dtype)
    emb = np.random.default_rng(7).standard_normal((1, EMBED, GRID, GRID)).astype(dtype)
    return dict(dtype=dtype, tdtype=tdtype, tol=tol, ref_pe=ref_pe, ref_md=ref_md, pe=pe, md=md, emb=emb)


def test_per_pixel_upscaling_equals_the_module_path(decoder):
    """The fast predict_masks (fused passes, upscaling without interleaving) ==
    the reference one (the modules, in the official order)."""
    m = decoder
    sparse, dense = m["pe"](points=(np.array([[[500.0, 375.0]], [[10.0, 900.0]]]), np.array([[1], [0]])),
                            boxes=None, masks=None)
    fast = m["md"].predict_masks(m["emb"], m["pe"].get_dense_pe(), sparse, dense)
    with npsam.reference():
        plain = m["md"].predict_masks(m["emb"], m["pe"].get_dense_pe(), sparse, dense)
    assert_close(fast[0], plain[0], m["tol"], "masks")
    assert_close(fast[1], plain[1], m["tol"], "iou")


def test_per_image_cache_is_exact_and_notices_changes(decoder):
    m = decoder
    points = (np.array([[[500.0, 375.0]]]), np.array([[1]]))
    boxes = np.array([[425.0, 600.0, 700.0, 875.0]])

    def ours(emb):
        sparse, dense = m["pe"](points=points, boxes=boxes, masks=None)
        return m["md"](emb, m["pe"].get_dense_pe(), sparse, dense, True)

    def theirs(emb):
        return run_official(dict(m, emb=emb), points, boxes, None, True)[2:]

    emb = m["emb"].copy()
    first, second = ours(emb), ours(emb)  # the second call is served from the cache
    np.testing.assert_array_equal(first[0], second[0])
    assert_close(second[0], theirs(emb)[0], m["tol"], "cached low_res_masks")
    emb *= 0.5  # same array, new contents: the cache must not answer
    assert_close(ours(emb)[0], theirs(emb)[0], m["tol"], "low_res_masks after an in-place change")
    other = np.random.default_rng(9).standard_normal(emb.shape).astype(m["dtype"])
    assert_close(ours(other)[0], theirs(other)[0], m["tol"], "low_res_masks of another image")


def test_dense_pe_is_computed_once_per_weights(decoder):
    pe = decoder["pe"]
    a, b = pe.get_dense_pe(), pe.get_dense_pe()
    assert a is b and not a.flags.writeable
    sd = pe.state_dict(prefix="prompt_encoder")
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    pe.load_state_dict({**sd, key: sd[key] * 2}, dtype=decoder["dtype"], prefix="prompt_encoder")
    try:
        c = pe.get_dense_pe()
        assert c is not a and not np.array_equal(c, a)
    finally:
        pe.load_state_dict(sd, dtype=decoder["dtype"], prefix="prompt_encoder")
    assert_close(pe.get_dense_pe(), decoder["ref_pe"].get_dense_pe().numpy(), decoder["tol"], "dense pe")


def test_dense_pe_as_a_view_or_a_copy_gives_the_same_masks(decoder):
    """get_dense_pe() is, as official, a permuted read-only view, which the decoder
    takes as rows without a copy; a writeable C-contiguous copy of it (or an
    edit of that copy) takes the copying path."""
    m = decoder
    sparse, dense = m["pe"](points=(np.array([[[500.0, 375.0]]]), np.array([[1]])), boxes=None, masks=None)
    view = m["pe"].get_dense_pe()
    assert not view.flags.c_contiguous and not view.flags.writeable
    copy = np.ascontiguousarray(view)
    copy.flags.writeable = True
    a = m["md"](m["emb"], view, sparse, dense, True)
    b = m["md"](m["emb"], copy, sparse, dense, True)
    np.testing.assert_array_equal(a[0], b[0])
    copy[0, 5, 10, 20] += 1  # the same array, edited in place: the kept rows must not answer
    c = m["md"](m["emb"], copy, sparse, dense, True)
    assert not np.array_equal(c[0], b[0])
    np.testing.assert_array_equal(m["md"](m["emb"], np.array(copy), sparse, dense, True)[0], c[0])


def test_layer0_cache_follows_a_weight_reload(decoder):
    """Layer 0's per-image projections are recomputed when the transformer's
    weights are reloaded (same image array, same dense embedding)."""
    m = decoder
    md = m["md"]
    sparse, dense = m["pe"](points=(np.array([[[500.0, 375.0]]]), np.array([[1]])), boxes=None, masks=None)
    pe = m["pe"].get_dense_pe()
    before = md.predict_masks(m["emb"], pe, sparse, dense)
    key = "mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.weight"
    sd = md.state_dict(prefix="mask_decoder")
    md.load_state_dict({**sd, key: sd[key] * 1.5}, dtype=m["dtype"], prefix="mask_decoder")
    try:
        after = md.predict_masks(m["emb"], pe, sparse, dense)
        fresh_pe, fresh_md = ours_from(m["ref_pe"], m["ref_md"], m["dtype"])
        fresh_md.load_state_dict({**sd, key: sd[key] * 1.5}, dtype=m["dtype"], prefix="mask_decoder")
        expected = fresh_md.predict_masks(m["emb"], pe, sparse, dense)
    finally:
        md.load_state_dict(sd, dtype=m["dtype"], prefix="mask_decoder")
    assert not np.allclose(after[0], before[0])
    np.testing.assert_array_equal(after[0], expected[0])
    np.testing.assert_array_equal(after[1], expected[1])


@pytest.mark.parametrize("rows", [64, 512, 2048, 4096])
def test_fused_decoder_threads_and_blocks_change_nothing_but_rounding(decoder, rows):
    """The fused passes give the same masks on 1 or 2 threads (bit for bit: blocks
    are fixed by ROWS, not by threads) and, within the bar, for any block size."""
    m = decoder
    md = m["md"]
    sparse, dense = m["pe"](points=(np.array([[[500.0, 375.0]], [[10.0, 900.0]]]), np.array([[1], [0]])),
                            boxes=None, masks=None)
    pe = m["pe"].get_dense_pe()
    reference = md.predict_masks(m["emb"], pe, sparse, dense)
    saved_rows, saved_threads = fast_tr.ROWS, threads.NUM_THREADS
    try:
        fast_tr.ROWS = rows
        results = []
        for n in (1, 2):
            threads.set_num_threads(n)
            with threads.single_threaded_blas():  # the same BLAS setting for both thread counts
                results.append(md.predict_masks(m["emb"], pe, sparse, dense))
    finally:
        fast_tr.ROWS = saved_rows
        threads.set_num_threads(saved_threads)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert_close(results[0][0], reference[0], m["tol"], "masks")
    assert_close(results[0][1], reference[1], m["tol"], "iou")


class _Tanh(nn.Module):
    """An activation with no in-place form (no forward_)."""

    def forward(self, x):
        return np.tanh(x)


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU, _Tanh])
@pytest.mark.parametrize("rows", [None, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_mlp_block_equals_the_plain_one(dtype, rows, act, monkeypatch):
    """MLPBlock's fused row pass (lin1 -> activation, in place where it can be ->
    lin2 into the result, per block of rows, over threads) against the plain
    module path, with the default block size (one block per thread here) and
    with small blocks (several, the last ragged); the input is left alone."""
    from npsam.modeling.common import MLPBlock

    rng = np.random.default_rng(5)
    mlp = MLPBlock(64, 256, act)
    mlp.load_state_dict({"lin1.weight": rng.standard_normal((256, 64)) * 0.1, "lin1.bias": rng.standard_normal(256),
                         "lin2.weight": rng.standard_normal((64, 256)) * 0.1, "lin2.bias": rng.standard_normal(64)},
                        dtype=dtype)
    if rows is not None:
        monkeypatch.setattr(fast_common, "ROWS", rows)
    x = rng.standard_normal((3, 333, 64)).astype(dtype)  # 999 rows: with ROWS 128, 3 full blocks and a ragged one per thread
    assert x.shape[0] * x.shape[1] >= 2 * fast_common.MIN_ROWS  # enough rows for the fused pass
    with npsam.reference():
        plain = mlp(x)
    x_before = x.copy()
    with threads.single_threaded_blas():
        assert threads.blas_is_single() == threads.blas_controllable()  # where MLPBlock takes the fused pass
        fused = mlp(x)
    np.testing.assert_array_equal(x, x_before)
    assert fused.shape == plain.shape == (3, 333, 64)
    assert_close(fused, plain, DECODER_F32 if dtype == np.float32 else DECODER_F64, "fused MLPBlock")


def test_parallel_rows_raises_what_a_range_raised_after_all_finished():
    saved = threads.NUM_THREADS
    threads.set_num_threads(2)
    finished = []

    def fn(lo, hi):
        if lo > 0:
            raise ValueError(f"range {lo}:{hi} failed")
        finished.append((lo, hi))

    try:
        with pytest.raises(ValueError, match="range 50:100 failed"):
            threads.parallel_rows(fn, 100)
        assert finished == [(0, 50)]
        threads.parallel_rows(lambda lo, hi: finished.append((lo, hi)), 10)  # the pool still works afterwards
        assert sorted(finished[1:]) == [(0, 5), (5, 10)]
    finally:
        threads.set_num_threads(saved)


def test_openblas_is_found_where_numpy_loaded_it_and_in_numpys_wheel(monkeypatch):
    """NumPy's wheels (what CI installs) bring OpenBLAS: found through the libraries
    the process loaded (Linux), and through the wheel's folder where those cannot
    be read; either way, its thread functions answer."""
    import builtins

    real_open = builtins.open

    def no_maps(path, *args, **kwargs):
        if path == "/proc/self/maps":
            raise OSError("not readable here")
        return real_open(path, *args, **kwargs)

    from_maps = threads._find_openblas()
    monkeypatch.setattr(builtins, "open", no_maps)
    from_wheel = threads._find_openblas()
    monkeypatch.undo()
    for how, found in (("loaded libraries", from_maps), ("the wheel's folder", from_wheel)):
        assert found, f"OpenBLAS not found through {how}"
        _, get = found
        assert isinstance(get(), int) and get() >= 1, how


def test_single_threaded_blas_nests_and_restores_blas_threads():
    get = threads._blas[1] if threads.blas_controllable() else None
    before = get() if get else None
    with threads.single_threaded_blas() as outer:
        assert outer.active == (get is not None) and threads.blas_is_single() == outer.active
        with threads.single_threaded_blas():
            if get:
                assert get() == 1
        if get:
            assert get() == 1  # the outer context is still open
    assert not threads.blas_is_single()
    if get:
        assert get() == before


@pytest.mark.parametrize("n_threads", [1, 2])
def test_same_contents_is_array_equal(n_threads):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    saved = threads.NUM_THREADS
    threads.set_num_threads(n_threads)
    try:
        assert ops.same_contents(a, a.copy())
        for index in [(0, 0, 0, 0), (0, 200, 63, 63), (0, 128, 0, 0)]:  # either thread's half
            b = a.copy()
            b[index] = np.nextafter(b[index], np.float32(np.inf))
            assert not ops.same_contents(a, b)
            b[index] = np.nan
            assert not ops.same_contents(b, b.copy())  # NaN is never equal, as np.array_equal
        assert not ops.same_contents(a, a.astype(np.float64))
        assert not ops.same_contents(a, a.reshape(1, 256, 4096))
        assert ops.same_contents(a[:, ::2], np.ascontiguousarray(a[:, ::2]))  # any layout
    finally:
        threads.set_num_threads(saved)


def test_scratch_is_per_key_per_thread_and_grows():
    a = threads.scratch("test.a", (3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.shares_memory(threads.scratch("test.a", (5, 3), np.float32), a)  # the same memory, reshaped
    assert not np.shares_memory(threads.scratch("test.b", (3, 5), np.float32), a)  # another key, another array
    big = threads.scratch("test.a", (100, 7), np.float32)  # grown
    assert big.shape == (100, 7) and np.shares_memory(threads.scratch("test.a", (2, 2), np.float32), big)
    f64 = threads.scratch("test.a", (4,), np.float64)
    assert f64.dtype == np.float64 and f64.shape == (4,)
    seen = []
    saved = threads.NUM_THREADS
    threads.set_num_threads(2)
    try:
        threads.parallel_rows(lambda lo, hi: seen.append(threads.scratch("test.c", (8,), np.float32)), 2)
    finally:
        threads.set_num_threads(saved)
    assert len(seen) == 2 and not np.shares_memory(seen[0], seen[1])  # one per thread


def test_decoder_work_arrays_are_written_before_they_are_read(decoder):
    """The fused passes take their temporaries from threads.scratch, whose contents
    are left from the last call: NaN in every one of them changes nothing."""
    m = decoder
    md = m["md"]
    sparse, dense = m["pe"](points=(np.array([[[500.0, 375.0]], [[10.0, 900.0]]]), np.array([[1], [0]])),
                            boxes=None, masks=None)
    pe = m["pe"].get_dense_pe()
    saved = threads.NUM_THREADS
    try:
        threads.set_num_threads(1)  # every block on this thread, so all its work arrays are the ones poisoned below
        reference = md.predict_masks(m["emb"], pe, sparse, dense)
        poisoned = [k for k in threads._scratch.__dict__ if k.startswith(("decoder.", "upscale."))]
        assert poisoned, "the fused passes no longer use threads.scratch: this test checks nothing"
        for key in poisoned:
            threads._scratch.__dict__[key].fill(np.nan)
        again = md.predict_masks(m["emb"], pe, sparse, dense)
    finally:
        threads.set_num_threads(saved)
    np.testing.assert_array_equal(again[0], reference[0])
    np.testing.assert_array_equal(again[1], reference[1])


@given(m=st.integers(1, 40), n=st.integers(1, 70), block=st.integers(1, 16), with_add=st.booleans(),
       seed=st.integers(0, 99))
def test_transpose_in_blocks_is_exact(m, n, block, with_add, seed):
    """ops.transpose (blocks of output rows over threads, the last ragged), with
    and without the fused per-row add, equals x.T and (x + add[:, None]).T bit
    for bit: the add is the same float32 sum in either layout."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n)).astype(np.float32)
    add = rng.standard_normal(m).astype(np.float32) if with_add else None
    got = ops.transpose(x, block=block, add=add)
    assert got.flags.c_contiguous and got.shape == (n, m)
    np.testing.assert_array_equal(got, (x if add is None else x + add[:, None]).T)


@given(n=st.integers(1, 300), e=st.sampled_from([1, 3, 32, 49, 64, 256, 9000]), in_place=st.booleans(),
       op=st.sampled_from([np.add, np.multiply]), given_wide=st.booleans(), seed=st.integers(0, 99),
       wide_row=st.sampled_from([64, 8192]))
def test_row_op_is_the_broadcast_bit_for_bit(n, e, in_place, op, given_wide, seed, wide_row):
    """ops.row_op (the rows viewed k at a time against the row tiled k times,
    the ragged last rows broadcast as they are) gives what the broadcast
    op(x, row) gives, element by element: in place or not, with the caller's
    wide row or its own, and when the array is a strided view (the plain
    broadcast then)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, e)).astype(np.float32)
    row = rng.standard_normal(e).astype(np.float32)
    expected = op(x, row)
    with mock.patch.object(ops, "WIDE_ROW", wide_row):
        wide = ops.wide_row(row) if given_wide else None
        assert wide is None or (wide.shape[0] % e == 0 and wide.shape[0] >= wide_row)
        out = x if in_place else np.full_like(x, np.nan)
        assert ops.row_op(op, x, row, out, wide) is out
        np.testing.assert_array_equal(out, expected)
        wide_x = rng.standard_normal((n, 2 * e)).astype(np.float32)
        strided = wide_x[:, ::2]  # not C-contiguous: reshaped, it would be a copy
        expected = op(strided, row)
        np.testing.assert_array_equal(ops.row_op(op, strided, row, strided, wide), expected)
        np.testing.assert_array_equal(wide_x[:, ::2], expected)


@given(r=st.integers(1, 200), k=st.integers(1, 60), nan=st.booleans(), seed=st.integers(0, 99))
def test_column_max_is_the_max_over_rows(r, k, nan, seed):
    """ops.column_max (rows folded 32 at a time, the ragged last rows after)
    equals x.max(axis=0) exactly, a NaN included, and ops.ones sums columns
    as x.sum(axis=0) does within float32 rounding."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((r, k)).astype(np.float32)
    if nan:
        x[rng.integers(r), rng.integers(k)] = np.nan
    np.testing.assert_array_equal(ops.column_max(x), x.max(axis=0))
    if not nan:
        assert_close(ops.ones(r, np.float32) @ x, x.astype(np.float64).sum(axis=0), DECODER_F32, "column sums")
    with pytest.raises(ValueError):
        ops.ones(r, np.float32)[0] = 2  # read-only: shared by every caller
