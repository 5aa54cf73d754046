"""The image encoders' fast layer (npsam/fast/image_encoder.py, npsam/fast/tiny_vit_sam.py)
against the reference modules it replaces, float32 and float64, on hypothesis inputs.

Two comparisons per fast implementation:

- **the whole module**: ``module(x)`` (the fast path, all the way down) against
  ``module(x)`` under ``npsam.reference()`` (the reference path, all the way
  down), within the encoder tolerances: the fast layer reassociates (chunked
  softmax, BatchNorm folded into the convolutions, the float32 GELU);
- **its own step**: the fast implementation against the reference ``forward``
  of the same module with its children on the fast path, which isolates what
  this one implementation changes. Where it only reorders memory or works in
  place (the same operations on the same values) that is bit for bit; where it
  reassociates (ViT attention, folded BatchNorm) it is within the tolerances.

Also: every reference class the fast layer names is registered, the fast path
does not depend on tracing, and folded BatchNorm follows reloaded weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Dict
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from tolerances import ENCODER_F32, ENCODER_F64, assert_close

import npsam
from npsam import fast
from npsam.fast import image_encoder as fast_vit, tiny_vit_sam as fast_tv
from npsam.kernels.nn import Module, WeightsMissingError
from npsam.modeling import image_encoder as vit, tiny_vit_sam as tv
from npsam.tools.trace import trace

TOL = {np.float32: ENCODER_F32, np.float64: ENCODER_F64}
DTYPES = st.sampled_from([np.float32, np.float64])


def load_random(module: Module, seed: int, dtype) -> Module:
    """Random weights for every declared leaf: fan-in scaled normals for
    matrices and kernels, norm scales near 1, BatchNorm variances in [0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in module.set_names().state_dict_shapes().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.zeros(shape, np.int64)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + rng.random(shape)
        elif len(shape) >= 2 and not key.endswith(("rel_pos_h", "rel_pos_w", "attention_biases", "pos_embed")):
            sd[key] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif key.endswith("weight") and len(shape) == 1:
            sd[key] = 1 + 0.2 * rng.standard_normal(shape)
        else:
            sd[key] = 0.2 * rng.standard_normal(shape)
    module.load_state_dict(sd, dtype=dtype)
    assert module.is_loaded()
    return module


def both_paths(module: Module, x: np.ndarray, dtype, what: str, own_bit_for_bit: bool) -> None:
    """The whole module on each path, and its own fast step (see the module docstring)."""
    impl = fast.implementation(module)
    assert impl is not None, f"{type(module).__name__} has no fast implementation"
    with npsam.reference():
        assert fast.implementation(module) is None
        expected = module(x.copy())
    got = module(x.copy())
    assert got.dtype == expected.dtype == dtype, f"{what}: dtypes {got.dtype} / {expected.dtype}"
    assert_close(got, expected, TOL[dtype], f"{what}: fast path against the reference path")
    own = type(module).forward(module, x.copy())  # the reference step, children fast
    if own_bit_for_bit:
        np.testing.assert_array_equal(got, own, err_msg=f"{what}: its own step is not bit for bit")
    else:
        assert_close(got, own, TOL[dtype], f"{what}: its own step")


def tokens(rng, dtype, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------
# ViT (modeling/image_encoder.py)
# ---------------------------------------------------------------------------
@given(dtype=DTYPES, seed=st.integers(0, 2**16), B=st.integers(1, 2), H=st.integers(1, 7), W=st.integers(1, 7),
       heads=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 8]), rel=st.booleans(), bias=st.booleans(),
       chunk=st.sampled_from([1, 60, 700, 1 << 20]))
def test_vit_attention(dtype, seed, B, H, W, heads, head_dim, rel, bias, chunk):
    """Any chunk budget: query rows one grid row at a time, a few maps, or whole batches per step."""
    m = load_random(vit.Attention(heads * head_dim, heads, bias, rel, (H, W)), seed, dtype)
    with mock.patch.object(fast_vit, "ATTENTION_CHUNK_ELEMENTS", chunk):
        both_paths(m, tokens(np.random.default_rng(seed), dtype, B, H, W, heads * head_dim), dtype,
                   f"ViT Attention (chunks of {chunk} logits)", own_bit_for_bit=False)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), B=st.integers(1, 2), grid=st.integers(2, 9),
       window=st.sampled_from([0, 2, 3, 4]), rel=st.booleans(), mlp_ratio=st.sampled_from([1.0, 2.5, 4.0]))
def test_vit_block(dtype, seed, B, grid, window, rel, mlp_ratio):
    dim = 16
    m = load_random(vit.Block(dim, 2, mlp_ratio, use_rel_pos=rel, window_size=window, input_size=(grid, grid)),
                    seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, B, grid, grid, dim)
    both_paths(m, x, dtype, f"ViT Block (window {window})", own_bit_for_bit=True)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), B=st.integers(1, 2), patch=st.sampled_from([2, 4, 8]),
       cells=st.integers(1, 5))
def test_vit_patch_embed(dtype, seed, B, patch, cells):
    m = load_random(vit.PatchEmbed(patch, patch, 3, 12), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, B, 3, patch * cells, patch * cells)
    both_paths(m, x, dtype, "ViT PatchEmbed", own_bit_for_bit=True)
    assert m(x).flags.c_contiguous


@given(dtype=DTYPES, seed=st.integers(0, 2**16), window=st.sampled_from([0, 3, 5]), rel=st.booleans())
def test_vit_whole_encoder(dtype, seed, window, rel):
    m = load_random(vit.ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                        out_chans=16, use_rel_pos=rel, window_size=window,
                                        global_attn_indexes=(1,)), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, 1, 3, 64, 64)
    with npsam.reference():
        expected = m(x)
    assert_close(m(x), expected, TOL[dtype], "ImageEncoderViT: fast path against the reference path")


# ---------------------------------------------------------------------------
# TinyViT (modeling/tiny_vit_sam.py)
# ---------------------------------------------------------------------------
# The fused passes work on blocks of rows (of the image, or of windows) whose
# sizes are module constants; the tests run them with small blocks too, so
# that images of a few pixels span several blocks, a ragged last one included.
BLOCK_SIZES = {"MBCONV_ROWS": (1, 2, 8), "MERGING_ROWS": (1, 3, 4), "MLP_ROWS": (1, 7, 256),
               "ATTENTION_LOGITS": (1, 200, 1 << 18), "LOCAL_CONV_ROWS": (1, 3, 8)}


def blocks_of(name: str):
    return st.sampled_from(BLOCK_SIZES[name])


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans(), ks=st.sampled_from([1, 3, 5]),
       stride=st.sampled_from([1, 2]), depthwise=st.booleans(), side=st.integers(3, 12))
def test_conv2d_bn(dtype, seed, folded, ks, stride, depthwise, side):
    c = 6
    m = load_random(tv.Conv2d_BN(c, c if depthwise else 10, ks, stride, ks // 2, groups=c if depthwise else 1,
                                 folded_bn=folded), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, 2, c, side, side)
    # folded BatchNorm is another association (bit for bit only when the
    # checkpoint was folded already); fast_ops.conv2d cuts a KxK convolution's
    # product into other blocks of rows than the reference kernel
    both_paths(m, x, dtype, f"Conv2d_BN (folded_bn={folded})", own_bit_for_bit=folded and (ks == 1 or depthwise))


@given(dtype=DTYPES, seed=st.integers(0, 2**16), k=st.sampled_from([1, 2, 3, 5]), stride=st.sampled_from([1, 2, 3]),
       padding=st.integers(0, 2), h=st.integers(1, 11), w=st.integers(1, 11), cols=st.sampled_from([1, 50, 1 << 20]),
       channels_last=st.booleans(), nhwc_input=st.booleans())
def test_fast_conv2d_against_the_reference_kernel(dtype, seed, k, stride, padding, h, w, cols, channels_last,
                                                  nhwc_input):
    """fast_ops.conv2d (im2col from the unpadded input, the border taps as
    zeros) against kernels/ops.conv2d on a padded copy, blocks of every size,
    in either layout."""
    from npsam.fast import ops as fast_ops
    from npsam.kernels import ops as ref_ops

    assume(h + 2 * padding >= k and w + 2 * padding >= k)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, h, w)).astype(dtype)
    if nhwc_input:  # the [B, C, H, W] view of channels-last memory, read channels-last
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    weight = rng.standard_normal((4, 3, k, k)).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    with mock.patch.object(fast_ops, "CONV_COLS_ELEMENTS", cols):
        got = fast_ops.conv2d(x, weight, bias, stride, padding, channels_last=channels_last)
    if channels_last or nhwc_input:
        assert got.transpose(0, 2, 3, 1).flags.c_contiguous, "not the view of a channels-last array"
    assert_close(got, ref_ops.conv2d(x, weight, bias, stride, padding), TOL[dtype], "fast conv2d")


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans(), side=st.sampled_from([8, 12, 16]),
       cols=st.sampled_from([1, 1 << 20]))
def test_tiny_patch_embed(dtype, seed, folded, side, cols):
    from npsam.fast import ops as fast_ops

    m = load_random(tv.PatchEmbed(3, 8, side, folded_bn=folded), seed, dtype)
    with mock.patch.object(fast_ops, "CONV_COLS_ELEMENTS", cols):  # blocks of one output row, or whole images
        both_paths(m, tokens(np.random.default_rng(seed), dtype, 2, 3, side, side), dtype, "TinyViT PatchEmbed",
                   own_bit_for_bit=False)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans(), side=st.integers(2, 19),
       expand=st.sampled_from([2.0, 4.0]), rows=blocks_of("MBCONV_ROWS"), layout=st.sampled_from(["NCHW", "NHWC"]))
def test_mbconv(dtype, seed, folded, side, expand, rows, layout):
    """On an NCHW array, and on the [B, C, H, W] view of channels-last memory
    that the fast PatchEmbed and MBConv return."""
    m = load_random(tv.MBConv(8, 8, expand, folded_bn=folded), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, 2, 8, side, side + 1)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    with mock.patch.object(fast_tv, "MBCONV_ROWS", rows):
        both_paths(m, x, dtype, "MBConv", own_bit_for_bit=False)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans(), side=st.integers(2, 17),
       out_dim=st.sampled_from([12, 320]), as_tokens=st.booleans(), rows=blocks_of("MERGING_ROWS"))
def test_patch_merging(dtype, seed, folded, side, out_dim, as_tokens, rows):
    m = load_random(tv.PatchMerging((side, side), 8, out_dim, folded_bn=folded), seed, dtype)
    rng = np.random.default_rng(seed)
    x = tokens(rng, dtype, 2, side * side, 8) if as_tokens else tokens(rng, dtype, 2, 8, side, side)
    with mock.patch.object(fast_tv, "MERGING_ROWS", rows):
        both_paths(m, x, dtype, f"PatchMerging (out_dim {out_dim})", own_bit_for_bit=False)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), n=st.integers(1, 50), hidden=st.sampled_from([8, 24]),
       rows=blocks_of("MLP_ROWS"))
def test_mlp(dtype, seed, n, hidden, rows):
    m = load_random(tv.Mlp(12, hidden), seed, dtype)
    with mock.patch.object(fast_tv, "MLP_ROWS", rows):
        both_paths(m, tokens(np.random.default_rng(seed), dtype, 2, n, 12), dtype, "Mlp", own_bit_for_bit=False)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), ws=st.integers(1, 7), heads=st.integers(1, 3),
       key_dim=st.sampled_from([2, 4, 8]), windows=st.integers(1, 5), logits=blocks_of("ATTENTION_LOGITS"))
def test_tiny_attention(dtype, seed, ws, heads, key_dim, windows, logits):
    m = load_random(tv.Attention(heads * key_dim, key_dim, heads, attn_ratio=1, resolution=(ws, ws)), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, windows, ws * ws, heads * key_dim)
    with mock.patch.object(fast_tv, "ATTENTION_LOGITS", logits):
        both_paths(m, x, dtype, "TinyViT Attention", own_bit_for_bit=False)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans(), side=st.integers(2, 9),
       ws=st.integers(2, 5), local=st.sampled_from([1, 3, 5]), rows=blocks_of("LOCAL_CONV_ROWS"))
def test_tiny_vit_block(dtype, seed, folded, side, ws, local, rows):
    m = load_random(tv.TinyViTBlock(12, (side, side), 3, ws, 2.0, local, folded_bn=folded), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, 2, side * side, 12)
    with mock.patch.object(fast_tv, "LOCAL_CONV_ROWS", rows):
        both_paths(m, x, dtype, f"TinyViTBlock ({side}x{side}, window {ws})", own_bit_for_bit=False)


@given(seed=st.integers(0, 2**16), h=st.integers(1, 16), w=st.integers(1, 16), ws=st.integers(1, 7))
def test_window_partition_and_reverse_are_the_references_data_movement(seed, h, w, ws):
    """window_partition_into is the reference's np.pad + partition, and
    window_reverse_add its reverse + crop + residual sum: bit for bit."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    padded = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    expected = padded.reshape(2, nh, ws, nw, ws, 3).transpose(0, 1, 3, 2, 4, 5)
    windows = np.full((2, nh, nw, ws, ws, 3), np.nan, np.float32)
    fast_tv.window_partition_into(x, ws, windows)
    np.testing.assert_array_equal(windows, expected)
    attn = rng.standard_normal(windows.shape).astype(np.float32)
    back = attn.transpose(0, 1, 3, 2, 4, 5).reshape(2, nh * ws, nw * ws, 3)[:, :h, :w]
    out = np.full((2, h + 2, w + 2, 3), np.nan, np.float32)
    fast_tv.window_reverse_add(attn, x, out[:, 1:h + 1, 1:w + 1])
    np.testing.assert_array_equal(out[:, 1:h + 1, 1:w + 1], x + back)
    assert np.isnan(out[:, 0]).all() and np.isnan(out[:, :, 0]).all(), "wrote outside its view"


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans(), h=st.integers(1, 12), w=st.integers(1, 12),
       k=st.sampled_from([1, 3, 5]), rows=blocks_of("LOCAL_CONV_ROWS"))
def test_channels_last_local_conv_is_the_depthwise_kernel_bit_for_bit(dtype, seed, folded, h, w, k, rows):
    """The local convolution on channels-last tokens sums the same taps in the
    same order as kernels/ops.depthwise_conv2d (through the fast Conv2d_BN):
    bit for bit, whatever the block size."""
    c = 5
    m = load_random(tv.Conv2d_BN(c, c, k, 1, k // 2, groups=c, folded_bn=folded), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, 2, h, w, c)
    p = k // 2
    xp = np.zeros((2, h + 2 * p + 1, w + 2 * p, c), dtype)
    xp[:, p:p + h, p:p + w] = x
    with mock.patch.object(fast_tv, "LOCAL_CONV_ROWS", rows):
        got = fast_tv.local_conv_channels_last(m, xp, h, w)
    expected = m(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, expected)


@given(dtype=DTYPES, seed=st.integers(0, 2**16), folded=st.booleans())
def test_tiny_vit_whole_encoder(dtype, seed, folded):
    m = load_random(tv.TinyViT(img_size=64, embed_dims=[8, 16, 24, 320], depths=[1, 1, 2, 1],
                               num_heads=[1, 2, 3, 4], window_sizes=[7, 8, 3, 7], folded_bn=folded), seed, dtype)
    x = tokens(np.random.default_rng(seed), dtype, 1, 3, 64, 64)
    with npsam.reference():
        expected = m(x)
    assert_close(m(x), expected, TOL[dtype], f"TinyViT (folded_bn={folded}): fast path against the reference path")


# ---------------------------------------------------------------------------
# The registry, tracing, derived values
# ---------------------------------------------------------------------------
REGISTERED: Dict[type, Callable] = {
    vit.PatchEmbed: fast_vit.patch_embed_forward, vit.Block: fast_vit.block_forward,
    vit.Attention: fast_vit.attention_forward, tv.Conv2d_BN: fast_tv.conv2d_bn_forward,
    tv.PatchEmbed: fast_tv.patch_embed_forward, tv.MBConv: fast_tv.mbconv_forward,
    tv.PatchMerging: fast_tv.patch_merging_forward, tv.Mlp: fast_tv.mlp_forward,
    tv.Attention: fast_tv.attention_forward, tv.TinyViTBlock: fast_tv.tiny_vit_block_forward,
}


@pytest.mark.parametrize("cls", list(REGISTERED), ids=lambda c: f"{c.__module__.rsplit('.', 1)[1]}.{c.__name__}")
def test_registered_and_named(cls):
    fn = REGISTERED[cls]
    assert fast._IMPLEMENTATIONS[(cls, "forward")] is fn
    assert fn.replaces == f"{cls.__module__}.{cls.__qualname__}.forward"
    assert "Replaces" in fn.__doc__ and cls.__name__ in fn.__doc__.split("\n")[0]


def test_trace_runs_the_reference_and_leaves_the_fast_path_alone():
    """A trace records the reference's own calls (Conv2d_BN's conv and BatchNorm,
    every GELU) and gives the reference's result; outside it the fast path runs,
    with the same result whether or not a trace was ever opened."""
    m = load_random(tv.MBConv(8, 8, 2.0), 1, np.float64)
    x = tokens(np.random.default_rng(1), np.float64, 1, 8, 5, 5)
    before = m(x.copy())
    with npsam.reference():
        expected = m(x.copy())
    with trace(m) as t:
        traced = m(x.copy())
    np.testing.assert_array_equal(traced, expected)
    assert {"conv1.c", "conv1.bn", "act1", "act2", "act3", "conv3.bn"} <= set(t.names())
    np.testing.assert_array_equal(m(x.copy()), before)


def test_folded_batch_norm_follows_reloaded_weights():
    m = load_random(tv.Conv2d_BN(4, 6, 3, 1, 1), 1, np.float32)
    first = m.derived.weight.copy()
    load_random(m, 2, np.float64)
    assert m.derived.weight.dtype == np.float64 and not np.allclose(m.derived.weight, first)
    x = tokens(np.random.default_rng(0), np.float64, 1, 4, 6, 6)
    with npsam.reference():
        expected = m(x)
    assert_close(m(x), expected, ENCODER_F64, "Conv2d_BN after reloading")


def test_fast_path_without_weights_raises_the_reference_error():
    m = tv.Conv2d_BN(4, 6, 3, 1, 1).set_names("conv")
    with pytest.raises(WeightsMissingError, match="conv.c.weight"):
        m(np.zeros((1, 4, 5, 5), np.float32))


# ---------------------------------------------------------------------------
# The reference files stay close to their official twins
# ---------------------------------------------------------------------------
ENCODER_SIDE = ("modeling/image_encoder.py", "modeling/tiny_vit_sam.py")


def test_encoder_reference_files_are_at_most_1_2x_their_official_twins():
    """Code lines (no blanks, comments, docstrings) of each encoder reference file
    against its official twin (scripts/count_lines.py)."""
    import oracle

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("count_lines", root / "scripts" / "count_lines.py")
    cl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cl)
    official_roots = {"segment_anything": oracle.segment_anything(), "mobile_sam": oracle.mobile_sam()}
    for name in ENCODER_SIDE:
        package, official = cl.PAIRS[name]
        ours = cl.code_lines(root / "npsam" / name)
        theirs = cl.code_lines(Path(official_roots[package].__path__[0]) / official)
        assert ours <= cl.LIMIT * theirs, f"{name}: {ours} code lines, {ours / theirs:.2f}x official {theirs}"
