"""npsam.modeling.image_encoder against the official ImageEncoderViT (random weights).

Small configurations under hypothesis in float32 and float64 (windows that do
not divide the grid, global blocks, with and without relative and absolute
position embeddings) on both paths (the fast layer, and the reference under
``npsam.reference()``), every intermediate of the reference path against the
official modules' (forward hooks against npsam.trace) in float64, get_rel_pos
with tables of other lengths (the linear interpolation), the pieces (window
partition, decomposed rel-pos, the fast layer's chunked attention), the
official state_dict key/shape sets of vit_b/l/h, and one full ViT-B at
1024x1024 (fast path) with an intermediate after the first global block.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import oracle
from intermediates import compare_intermediates, official_outputs
from tolerances import DECODER_F32, DECODER_F64, ENCODER_F32, ENCODER_F64, REFERENCE_ENCODER_F64, assert_close

import npsam
from npsam.fast import image_encoder as fast
from npsam.modeling import image_encoder as ours
from npsam.build_sam import CONFIGS, build_modules
from random_weights import random_state_dict

oracle.segment_anything()
from segment_anything.modeling import image_encoder as official  # noqa: E402
from segment_anything.build_sam import sam_model_registry  # noqa: E402

torch.set_num_threads(2)
TOL = {np.float32: (torch.float32, ENCODER_F32), np.float64: (torch.float64, ENCODER_F64)}
PATHS = pytest.mark.parametrize("path", ["fast", "reference"])


def _pair(dtype, seed=0, **kwargs):
    """The official encoder with random weights, and ours loaded with them."""
    tdtype, _ = TOL[dtype]
    from functools import partial

    theirs = official.ImageEncoderViT(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs).to(tdtype).eval()
    oracle.randomize_(theirs, seed)
    mine = ours.ImageEncoderViT(norm_eps=1e-6, **kwargs).set_names("image_encoder")
    sd = oracle.state_dict_numpy(theirs)
    assert set(sd) == set(mine.state_dict_shapes())
    assert {k: tuple(v.shape) for k, v in sd.items()} == mine.state_dict_shapes()
    mine.load_state_dict(sd, dtype=dtype)
    return theirs, mine


@st.composite
def vit_configs(draw):
    patch = draw(st.sampled_from([8, 16]))
    grid = draw(st.integers(2, 16).filter(lambda g: 32 <= g * patch <= 128))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8, 12, 16]))
    depth = draw(st.integers(1, 3))
    window = draw(st.sampled_from([0, 2, 3, 4, 5]))
    return dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=heads * max(head_dim, -(-16 // heads)),  # 16..64
        depth=depth,
        num_heads=heads,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 2.5, 4.0])),
        out_chans=draw(st.sampled_from([8, 16, 32])),
        qkv_bias=draw(st.booleans()),
        use_abs_pos=draw(st.booleans()),
        use_rel_pos=draw(st.booleans()),
        window_size=window,
        global_attn_indexes=tuple(draw(st.sets(st.integers(0, depth - 1)))),
    )


def _run_both(theirs, mine, x, dtype):
    tdtype, tol = TOL[dtype]
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x).to(tdtype)).numpy()
    calls = []
    got = mine(x.astype(dtype), progress=lambda done, total: calls.append((done, total)))
    assert got.dtype == dtype
    assert calls == [(i + 1, len(mine.blocks)) for i in range(len(mine.blocks))]
    return got, expected, tol


@PATHS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(cfg=vit_configs(), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_encoder_matches_official(path, dtype, cfg, batch, seed):
    theirs, mine = _pair(dtype, seed, **cfg)
    x = np.random.default_rng(seed).standard_normal((batch, 3, cfg["img_size"], cfg["img_size"]))
    with npsam.reference(path == "reference"):
        got, expected, tol = _run_both(theirs, mine, x, dtype)
    assert_close(got, expected, tol, f"ImageEncoderViT {cfg} ({path})")


@given(cfg=vit_configs(), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_reference_intermediates_match_official(cfg, batch, seed):
    """Every module call of the reference path (npsam.trace) against the same
    official module's output (forward hooks), float64, far tighter than the
    fast path's bound: the reference computes the official association."""
    theirs, mine = _pair(np.float64, seed, **cfg)
    x = np.random.default_rng(seed).standard_normal((batch, 3, cfg["img_size"], cfg["img_size"]))
    expected = official_outputs(theirs, lambda: theirs(torch.from_numpy(x)), prefix="image_encoder.")
    errors = compare_intermediates(expected, mine, lambda: mine(x), REFERENCE_ENCODER_F64, f"ViT {cfg}")
    assert {"image_encoder", "image_encoder.neck.3", f"image_encoder.blocks.{cfg['depth'] - 1}.mlp.act"} <= set(errors)


@PATHS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rel_pos_interpolated_when_grid_differs(path, dtype):
    """Without an absolute embedding the official encoder takes other image sizes;
    its global blocks then interpolate rel_pos tables sized for the pretraining
    grid (4x4 -> 7 rows) to the grid met (6x6 -> 11 rows, and 3x3 -> 5 rows)."""
    cfg = dict(img_size=64, patch_size=16, embed_dim=24, depth=3, num_heads=2, use_abs_pos=False,
               use_rel_pos=True, window_size=3, global_attn_indexes=(1,), out_chans=8)
    theirs, mine = _pair(dtype, 3, **cfg)
    for side in (96, 48):
        x = np.random.default_rng(side).standard_normal((1, 3, side, side))
        with npsam.reference(path == "reference"):
            got, expected, tol = _run_both(theirs, mine, x, dtype)
        assert_close(got, expected, tol, f"encoder at {side}x{side} (rel-pos interpolated)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(length=st.integers(1, 40), q_size=st.integers(1, 24), k_size=st.integers(1, 24), seed=st.integers(0, 99))
def test_get_rel_pos(dtype, length, q_size, k_size, seed):
    """Tables of any length (interpolated unless 2*max(q, k)-1) and q != k (stretched coordinates)."""
    tdtype, _ = TOL[dtype]
    rel_pos = torch.from_numpy(np.random.default_rng(seed).standard_normal((length, 5))).to(tdtype)
    expected = official.get_rel_pos(q_size, k_size, rel_pos).numpy()
    got = ours.get_rel_pos(q_size, k_size, rel_pos.numpy())
    assert_close(got, expected, DECODER_F32 if dtype == np.float32 else DECODER_F64, "get_rel_pos")
    if dtype == np.float32:  # the fused multiply-adds of torch's kernel are mirrored bit for bit
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(q_h=st.integers(1, 9), q_w=st.integers(1, 9), k_h=st.integers(1, 9), k_w=st.integers(1, 9),
       seed=st.integers(0, 99))
def test_add_decomposed_rel_pos(dtype, q_h, q_w, k_h, k_w, seed):
    """Our two halves against the official function, q and k grids differing."""
    tdtype, _ = TOL[dtype]
    rng = np.random.default_rng(seed)
    G, D = 3, 4
    attn = rng.standard_normal((G, q_h * q_w, k_h * k_w)).astype(dtype)
    q = rng.standard_normal((G, q_h * q_w, D)).astype(dtype)
    rph = rng.standard_normal((2 * max(q_h, k_h) - 1, D)).astype(dtype)
    rpw = rng.standard_normal((rng.integers(1, 12), D)).astype(dtype)  # interpolated
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    expected = official.add_decomposed_rel_pos(t(attn), t(q), t(rph), t(rpw), (q_h, q_w), (k_h, k_w)).numpy()
    tol = DECODER_F32 if dtype == np.float32 else DECODER_F64
    got = ours.add_decomposed_rel_pos(attn, q, rph, rpw, (q_h, q_w), (k_h, k_w))
    assert_close(got, expected, tol, "add_decomposed_rel_pos (reference)")
    rel_h, rel_w = fast.decomposed_rel_pos(q, rph, rpw, (q_h, q_w), (k_h, k_w))
    assert rel_h.shape == (G, q_h, q_w, k_h) and rel_w.shape == (G, q_h, q_w, k_w)
    fast_got = fast.add_rel_pos_(attn.copy(), rel_h, rel_w)
    assert_close(fast_got, expected, tol, "decomposed_rel_pos + add_rel_pos_ (fast)")


@given(H=st.integers(1, 12), W=st.integers(1, 12), ws=st.integers(1, 6), B=st.integers(1, 2))
def test_window_partition_roundtrip(H, W, ws, B):
    x = np.random.default_rng(H * 100 + W).standard_normal((B, H, W, 3))
    windows, pad_hw = ours.window_partition(x, ws)
    ref_windows, ref_pad = official.window_partition(torch.from_numpy(x), ws)
    assert pad_hw == ref_pad
    np.testing.assert_array_equal(windows, ref_windows.numpy())
    back = ours.window_unpartition(windows, ws, pad_hw, (H, W))
    np.testing.assert_array_equal(back, x)
    assert back.flags.c_contiguous


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
def test_attention_chunks_agree(chunk):
    """Any chunk budget (query rows one at a time, several maps at once, whole) gives the same result."""
    rng = np.random.default_rng(1)
    G, q_h, q_w, D = 5, 6, 7, 8  # one image of G heads: [1, G, N, D]
    q, k, v = (rng.standard_normal((1, G, q_h * q_w, D)) for _ in range(3))
    rel_h, rel_w = rng.standard_normal((1, G, q_h, q_w, q_h)), rng.standard_normal((1, G, q_h, q_w, q_w))
    logits = q @ k.swapaxes(-1, -2) + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(1, G, q_h * q_w, -1)
    expected = torch.from_numpy(logits).softmax(-1).numpy() @ v
    assert_close(fast.attention(q, k, v, rel_h, rel_w, chunk_elements=chunk), expected, DECODER_F64,
                 f"attention (chunk {chunk})")
    expected = torch.from_numpy(q @ k.swapaxes(-1, -2)).softmax(-1).numpy() @ v
    assert_close(fast.attention(q, k, v, chunk_elements=chunk), expected, DECODER_F64, f"attention, no rel-pos (chunk {chunk})")


@pytest.mark.parametrize("chunk", [1, 300, 1800, 7200, 1 << 22])
def test_attention_strided_batches(chunk):
    """As Attention.forward calls it: q, k, v [B, h, N, D] views of one qkv
    projection [B, N, 3, h, D], the output written into a [B, N, h, D] array
    through its [B, h, N, D] view; steps of several batches, several maps or
    rows of one map."""
    rng = np.random.default_rng(2)
    B, h, q_h, q_w, D = 3, 4, 5, 6, 8
    N = q_h * q_w
    qkv = rng.standard_normal((B, N, 3, h, D))
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # 3 x [B, h, N, D], strided
    rel_h, rel_w = rng.standard_normal((B, h, q_h, q_w, q_h)), rng.standard_normal((B, h, q_h, q_w, q_w))
    out = np.full((B, N, h, D), np.nan)
    got = fast.attention(q, k, v, rel_h, rel_w, chunk_elements=chunk, out=out.transpose(0, 2, 1, 3))
    assert np.shares_memory(got, out)
    logits = q @ k.swapaxes(-1, -2) + (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, h, N, -1)
    expected = torch.from_numpy(logits).softmax(-1).numpy() @ v  # [B, h, N, D]
    assert_close(out, expected.transpose(0, 2, 1, 3), DECODER_F64, f"strided attention (chunk {chunk})")


def test_bad_input_raises():
    _, mine = _pair(np.float32, 0, img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, out_chans=8)
    for bad, what in [(np.zeros((3, 32, 32)), "shape"), (np.zeros((1, 4, 32, 32)), "shape"),
                      (np.zeros((1, 3, 48, 48)), "32x32"), (np.zeros((1, 3, 40, 40)), "multiples")]:
        with pytest.raises(ValueError, match=f"x: .*{what}"):
            mine(bad)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_shapes_match_registry(name):
    mine = build_modules(CONFIGS[name]).image_encoder
    if name == "vit_b":
        theirs = sam_model_registry[name]().image_encoder
    else:
        with torch.device("meta"):
            theirs = sam_model_registry[name]().image_encoder
    expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert mine.state_dict_shapes() == expected
    assert mine.img_size == theirs.img_size == 1024


@pytest.mark.slow
def test_vit_b_full_size():
    """ViT-B at 1024x1024 in float32: the output, and the tokens after the first
    global block (block 2), against the official blocks run one by one."""
    config = CONFIGS["vit_b"]
    sd = random_state_dict("vit_b", parts=("image_encoder",), seed=5)
    sd = {k[len("image_encoder."):]: v for k, v in sd.items()}
    x = np.random.default_rng(5).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    first_global = config.encoder_global_attn_indexes[0]

    theirs = sam_model_registry["vit_b"]().image_encoder.eval()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    with torch.no_grad():
        t = theirs.patch_embed(torch.from_numpy(x)) + theirs.pos_embed
        for i, blk in enumerate(theirs.blocks):
            t = blk(t)
            if i == first_global:
                expected_block = t.numpy().copy()
        expected = theirs.neck(t.permute(0, 3, 1, 2)).numpy().copy()
    del theirs, t
    gc.collect()

    mine = build_modules(config).image_encoder
    mine.load_state_dict(sd, dtype=np.float32)
    del sd
    got = mine(x)  # the fast path
    # its blocks one by one, as the official ones above (ImageEncoderViT.forward's steps)
    t = mine.patch_embed(x) + mine.pos_embed
    for i in range(first_global + 1):
        t = mine.blocks[i](t)
    err_block = assert_close(t, expected_block, ENCODER_F32, f"ViT-B tokens after block {first_global}")
    assert got.shape == (1, 256, 64, 64) and got.dtype == np.float32
    err = assert_close(got, expected, ENCODER_F32, "ViT-B image embedding")
    print(f"ViT-B scaled errors: block {first_global} {err_block:.2e}, embedding {err:.2e}")
