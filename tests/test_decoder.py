"""Tier 2: the prompt encoder and mask decoder against the official modules,
random weights (LayerNorms and embeddings perturbed too), hypothesis inputs,
on both paths: the fast layer (the default) and ``with npsam.reference():``."""

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npsam
import oracle
from npsam.modeling.mask_decoder import MLP, MaskDecoder
from npsam.modeling.prompt_encoder import PromptEncoder
from npsam.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from tolerances import DECODER_F32, DECODER_F64, assert_close

oracle.segment_anything()
from segment_anything.modeling import mask_decoder as sa_md  # noqa: E402
from segment_anything.modeling import prompt_encoder as sa_pe  # noqa: E402
from segment_anything.modeling import transformer as sa_tr  # noqa: E402

DTYPES = {"f32": (np.float32, torch.float32, DECODER_F32), "f64": (np.float64, torch.float64, DECODER_F64)}
PATHS = pytest.mark.parametrize("path", ["fast", "reference"])
EMBED, GRID, IMG = 256, 64, 1024


def official_modules(tdtype, seed=0):
    pe = sa_pe.PromptEncoder(embed_dim=EMBED, image_embedding_size=(GRID, GRID), input_image_size=(IMG, IMG),
                             mask_in_chans=16)
    md = sa_md.MaskDecoder(num_multimask_outputs=3,
                           transformer=sa_tr.TwoWayTransformer(depth=2, embedding_dim=EMBED, mlp_dim=2048, num_heads=8),
                           transformer_dim=EMBED, iou_head_depth=3, iou_head_hidden_dim=256)
    oracle.randomize_(pe, seed)
    oracle.randomize_(md, seed + 1)
    pe, md = pe.to(tdtype).eval(), md.to(tdtype).eval()
    oracle.float64_pe(pe.pe_layer)  # identical in float32; lets the reference run in float64
    return pe, md


def ours_from(official_pe, official_md, dtype):
    pe = PromptEncoder(embed_dim=EMBED, image_embedding_size=(GRID, GRID), input_image_size=(IMG, IMG),
                       mask_in_chans=16).set_names("prompt_encoder")
    md = MaskDecoder(num_multimask_outputs=3,
                     transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED, mlp_dim=2048, num_heads=8),
                     transformer_dim=EMBED, iou_head_depth=3, iou_head_hidden_dim=256).set_names("mask_decoder")
    pe.load_state_dict(oracle.state_dict_numpy(official_pe), dtype=dtype)
    md.load_state_dict(oracle.state_dict_numpy(official_md), dtype=dtype)
    return pe, md


@functools.lru_cache(maxsize=None)
def build_models(name):
    dtype, tdtype, tol = DTYPES[name]
    ref_pe, ref_md = official_modules(tdtype)
    pe, md = ours_from(ref_pe, ref_md, dtype)
    emb = np.random.default_rng(7).standard_normal((1, EMBED, GRID, GRID)).astype(dtype)
    return dict(dtype=dtype, tdtype=tdtype, tol=tol, ref_pe=ref_pe, ref_md=ref_md, pe=pe, md=md, emb=emb)


@pytest.fixture(scope="module", params=sorted(DTYPES))
def models(request):
    return build_models(request.param)


@st.composite
def prompts(draw, max_batch=8):
    """0 to many points with labels -1/0/1, optional boxes and mask inputs, coordinates
    outside the image too."""
    b = draw(st.integers(1, max_batch))
    n = draw(st.integers(0, 6))
    has_box = draw(st.booleans())
    if n == 0 and not has_box and draw(st.booleans()):
        n = 1
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    points = None
    if n > 0 or not has_box:
        coords = rng.uniform(-300, IMG + 300, size=(b, n, 2))
        labels = rng.integers(-1, 2, size=(b, n))
        points = (coords, labels)
    boxes = None
    if has_box:
        xy = rng.uniform(-100, IMG + 100, size=(b, 2, 2))
        boxes = np.concatenate([xy.min(1), xy.max(1)], axis=1)
    masks = rng.standard_normal((b, 1, 4 * GRID, 4 * GRID)) * 5 if draw(st.booleans()) else None
    if points is not None and n == 0 and boxes is None and masks is None:
        points = None  # nothing at all: batch size 1
    return points, boxes, masks, draw(st.booleans())


def run_official(m, points, boxes, masks, multimask):
    td = m["tdtype"]
    with torch.no_grad():
        tp = None if points is None else (torch.as_tensor(points[0], dtype=td), torch.as_tensor(points[1]))
        sparse, dense = m["ref_pe"](points=tp, boxes=None if boxes is None else torch.as_tensor(boxes, dtype=td),
                                    masks=None if masks is None else torch.as_tensor(masks, dtype=td))
        lowres, iou = m["ref_md"](image_embeddings=torch.as_tensor(m["emb"]), image_pe=m["ref_pe"].get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)
    return sparse.detach().numpy(), dense.detach().numpy(), lowres.detach().numpy(), iou.detach().numpy()


# float64 runs fewer examples: the same input space, but each example costs ~10x
# (float64 attention over up to 8 x 4096 image tokens, on both sides).
# The reference path runs fewer examples again: the plain official computation
# (a copy of the image per prompt, the exact erf GELU over every upscaled pixel)
# costs about twice the fast path and the official code together.
@settings(max_examples=25)
@given(p=prompts())
def test_prompt_encoder_and_mask_decoder_match_official_f32(p):
    check_prompt_encoder_and_mask_decoder(build_models("f32"), p)


@settings(max_examples=10)
@given(p=prompts())
def test_prompt_encoder_and_mask_decoder_match_official_f64(p):
    check_prompt_encoder_and_mask_decoder(build_models("f64"), p)


@settings(max_examples=10)
@given(p=prompts())
def test_prompt_encoder_and_mask_decoder_match_official_f32_reference_path(p):
    with npsam.reference():
        check_prompt_encoder_and_mask_decoder(build_models("f32"), p)


@settings(max_examples=5)
@given(p=prompts())
def test_prompt_encoder_and_mask_decoder_match_official_f64_reference_path(p):
    with npsam.reference():
        check_prompt_encoder_and_mask_decoder(build_models("f64"), p)


def check_prompt_encoder_and_mask_decoder(m, p):
    points, boxes, masks, multimask = p
    r_sparse, r_dense, r_masks, r_iou = run_official(m, points, boxes, masks, multimask)
    sparse, dense = m["pe"](points=points, boxes=boxes, masks=masks)
    assert_close(sparse, r_sparse, m["tol"], "sparse_embeddings")
    assert_close(dense, r_dense, m["tol"], "dense_embeddings")
    lowres, iou = m["md"](image_embeddings=m["emb"], image_pe=m["pe"].get_dense_pe(), sparse_prompt_embeddings=sparse,
                          dense_prompt_embeddings=dense, multimask_output=multimask)
    assert lowres.dtype == m["dtype"] and iou.dtype == m["dtype"]
    assert lowres.shape == r_masks.shape and iou.shape == r_iou.shape
    assert_close(lowres, r_masks, m["tol"], "low_res_masks")
    assert_close(iou, r_iou, m["tol"], "iou_predictions")


def test_oracle_float32_is_well_conditioned_on_these_weights():
    """The float32 bar only means something if the reference itself is accurate in
    float32 on the random weights: its own float32-vs-float64 drift must sit well
    inside the bar (a badly drawn network fails here, not in the comparison)."""
    r32, r64 = official_modules(torch.float32), official_modules(torch.float64)
    emb = np.random.default_rng(7).standard_normal((1, EMBED, GRID, GRID))
    points = (np.array([[[500.0, 375.0], [1125.0, 625.0]]]), np.array([[1, 0]]))
    boxes = np.array([[425.0, 600.0, 700.0, 875.0]])
    out32 = run_official(dict(tdtype=torch.float32, ref_pe=r32[0], ref_md=r32[1], emb=emb.astype(np.float32)),
                         points, boxes, None, True)
    out64 = run_official(dict(tdtype=torch.float64, ref_pe=r64[0], ref_md=r64[1], emb=emb), points, boxes, None, True)
    assert_close(out32[2], out64[2], DECODER_F32 / 4, "official float32 vs float64 low-res masks")


@PATHS
def test_dense_pe_matches_official(models, path):
    m = models
    ref = m["ref_pe"].get_dense_pe().numpy()
    with npsam.reference(path == "reference"):
        got = m["pe"].get_dense_pe()
    assert got.shape == (1, EMBED, GRID, GRID)
    assert_close(got, ref, m["tol"], "get_dense_pe")


@PATHS
@settings(max_examples=15)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), t=st.integers(1, 9), hw=st.integers(1, 40),
       downsample=st.sampled_from([1, 2]), skip=st.booleans())
def test_attention_and_block_match_official(models, path, seed, b, t, hw, downsample, skip):
    with npsam.reference(path == "reference"):
        check_attention_and_block(models, seed, b, t, hw, downsample, skip)


def check_attention_and_block(models, seed, b, t, hw, downsample, skip):
    dtype, td, tol = models["dtype"], models["tdtype"], models["tol"]
    rng = np.random.default_rng(seed)
    ref_attn = oracle.randomize_(sa_tr.Attention(64, 4, downsample_rate=downsample), seed).to(td)
    attn = Attention(64, 4, downsample_rate=downsample)
    attn.load_state_dict(oracle.state_dict_numpy(ref_attn), dtype=dtype)
    q, k, v = (rng.standard_normal((b, n, 64)).astype(dtype) for n in (t, hw, hw))
    with torch.no_grad():
        ref = ref_attn(torch.as_tensor(q), torch.as_tensor(k), torch.as_tensor(v)).numpy()
    assert_close(attn(q, k, v), ref, tol, "Attention")

    ref_blk = oracle.randomize_(sa_tr.TwoWayAttentionBlock(64, 4, mlp_dim=96, skip_first_layer_pe=skip), seed).to(td)
    blk = TwoWayAttentionBlock(64, 4, mlp_dim=96, skip_first_layer_pe=skip)
    blk.load_state_dict(oracle.state_dict_numpy(ref_blk), dtype=dtype)
    qpe, kpe = rng.standard_normal((b, t, 64)).astype(dtype), rng.standard_normal((b, hw, 64)).astype(dtype)
    with torch.no_grad():
        rq, rk = ref_blk(queries=torch.as_tensor(q), keys=torch.as_tensor(k), query_pe=torch.as_tensor(qpe),
                         key_pe=torch.as_tensor(kpe))
    oq, ok = blk(queries=q, keys=k, query_pe=qpe, key_pe=kpe)
    assert_close(oq, rq.numpy(), tol, "TwoWayAttentionBlock queries")
    assert_close(ok, rk.numpy(), tol, "TwoWayAttentionBlock keys")


@PATHS
@settings(max_examples=15)
@given(seed=st.integers(0, 2**31), layers=st.integers(1, 4), sigmoid=st.booleans(), lead=st.integers(1, 5))
def test_mlp_matches_official(models, path, seed, layers, sigmoid, lead):
    dtype, td, tol = models["dtype"], models["tdtype"], models["tol"]
    ref = oracle.randomize_(sa_md.MLP(32, 48, 7, layers, sigmoid_output=sigmoid), seed).to(td)
    ours = MLP(32, 48, 7, layers, sigmoid_output=sigmoid)
    ours.load_state_dict(oracle.state_dict_numpy(ref), dtype=dtype)
    x = np.random.default_rng(seed).standard_normal((lead, 32)).astype(dtype)
    with torch.no_grad(), npsam.reference(path == "reference"):
        assert_close(ours(x), ref(torch.as_tensor(x)).numpy(), tol, "MLP")


@PATHS
def test_mask_decoder_intermediates_match_official(models, path):
    """Transformer outputs and the upscaled embedding, compared via forward hooks."""
    with npsam.reference(path == "reference"):
        check_mask_decoder_intermediates(models)


def check_mask_decoder_intermediates(m):
    captured = {}
    hooks = [mod.register_forward_hook(lambda mod_, i, o, name=name: captured.__setitem__(name, o))
             for name, mod in (("transformer", m["ref_md"].transformer), ("output_upscaling", m["ref_md"].output_upscaling))]
    try:
        points = (np.array([[[500.0, 375.0], [1125.0, 625.0]]]), np.array([[1, 0]]))
        run_official(m, points, None, None, True)
    finally:
        for h in hooks:
            h.remove()
    sparse, dense = m["pe"](points=points, boxes=None, masks=None)
    src = m["emb"] + dense
    hs, keys = m["md"].transformer(src, m["pe"].get_dense_pe(), np.concatenate(
        [np.concatenate([m["md"].iou_token.weight, m["md"].mask_tokens.weight])[None], sparse], axis=1))
    assert_close(hs, captured["transformer"][0].numpy(), m["tol"], "transformer queries")
    assert_close(keys, captured["transformer"][1].numpy(), m["tol"], "transformer keys")
    up = m["md"].output_upscaling(keys.transpose(0, 2, 1).reshape(1, EMBED, GRID, GRID))
    assert_close(up, captured["output_upscaling"].numpy(), m["tol"], "output_upscaling")
