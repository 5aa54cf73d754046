"""npsam.modeling.tiny_vit_sam against MobileSAM's official TinyViT (mobile_sam/modeling/tiny_vit_sam.py).

Random weights (BatchNorm statistics included), both checkpoint layouts:
unfolded (the official state_dict as is) and folded (each Conv2d_BN replaced by
what its official ``fuse()`` returns), float32 and float64, on both paths (the
fast layer, and the reference under ``npsam.reference()``). Every stage is
compared (patch_embed, each layer, neck), then the whole forward; and every
intermediate of the reference path against the official modules' (forward
hooks against npsam.trace) in float64.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import oracle
from intermediates import compare_intermediates, official_outputs
from tolerances import ENCODER_F32, ENCODER_F64, REFERENCE_ENCODER_F64, assert_close

import npsam
from npsam.build_sam import CONFIGS, build_modules
from npsam.kernels.nn import WeightsMissingError
from npsam.modeling.tiny_vit_sam import PatchMerging, TinyViT, attention_bias_idxs

oracle.mobile_sam()
from mobile_sam.modeling import tiny_vit_sam as official  # noqa: E402

TOL = {np.float32: ENCODER_F32, np.float64: ENCODER_F64}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
PATHS = ("fast", "reference")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """torch's and NumPy's thread pools fight over the cores when both run in one
    process; one torch thread keeps these small comparisons fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def official_model(cfg: dict, dtype, seed: int) -> torch.nn.Module:
    model = official.TinyViT(**cfg)
    oracle.randomize_(model, seed)
    if dtype == np.float64:
        model = model.double()
    # NOTE(reference): eval() caches `ab` from attention_biases, so it comes after randomizing.
    return model.eval()


def fuse_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Conv2d_BN of the official model by its official fuse(), in place."""
    dtype = next(model.parameters()).dtype
    for path, m in list(model.named_modules()):
        if isinstance(m, official.Conv2d_BN):
            parent, _, attr = path.rpartition(".")
            with default_dtype(dtype):  # fuse() builds a fresh nn.Conv2d in the default dtype
                setattr(model.get_submodule(parent) if parent else model, attr, m.fuse())
    return model


def fused_state_dict(model: torch.nn.Module) -> dict:
    """The official state_dict with every Conv2d_BN replaced by its official fuse()."""
    sd = oracle.state_dict_numpy(model)
    dtype = next(model.parameters()).dtype
    for path, m in model.named_modules():
        if isinstance(m, official.Conv2d_BN):
            # fuse() builds a fresh nn.Conv2d in the default dtype: keep float64 in float64.
            with default_dtype(dtype):
                fused = m.fuse()
            for key in [k for k in sd if k.startswith(path + ".")]:
                del sd[key]
            sd[f"{path}.weight"] = fused.weight.detach().numpy().copy()
            sd[f"{path}.bias"] = fused.bias.detach().numpy().copy()
    return sd


def official_stages(model: torch.nn.Module, x: torch.Tensor) -> list:
    """Mirror of the official forward_features, returning every stage's output.

    NOTE(reference): the official reshapes to a hard-coded 64x64 before the neck
    (1024/16); here the last layer's input_resolution, identical at 1024."""
    outs = []
    with torch.no_grad():
        x = model.patch_embed(x)
        outs.append(x.numpy().copy())
        for layer in model.layers:
            x = layer(x)
            outs.append(x.numpy().copy())
        b, _, c = x.shape
        h, w = model.layers[len(model.layers) - 1].input_resolution
        x = model.neck(x.view(b, h, w, c).permute(0, 3, 1, 2))
        outs.append(x.numpy().copy())
    return outs


def our_stages(model: TinyViT, x: np.ndarray) -> list:
    outs = []
    x = model.patch_embed(x)
    outs.append(x)
    for layer in model.layers:
        x = layer(x)
        outs.append(x)
    b, _, c = x.shape
    h, w = model.layers[len(model.layers) - 1].input_resolution
    outs.append(model.neck(x.reshape(b, h, w, c).transpose(0, 3, 1, 2)))
    return outs


def ours_from(cfg: dict, sd: dict, dtype, folded_bn: bool) -> TinyViT:
    model = TinyViT(**cfg, folded_bn=folded_bn).set_names()
    assert model.state_dict_shapes() == {k: tuple(v.shape) for k, v in sd.items()}
    model.load_state_dict(sd, dtype=dtype)
    assert model.is_loaded()
    return model


def compare(cfg: dict, dtype, seed: int, batch: int, path: str = "fast") -> None:
    torch_model = official_model(cfg, dtype, seed)
    rng = np.random.default_rng(seed)
    s = cfg["img_size"]
    x = rng.standard_normal((batch, 3, s, s)).astype(dtype)
    theirs = official_stages(torch_model, torch.from_numpy(x))
    names = ["patch_embed"] + [f"layers.{i}" for i in range(len(cfg["depths"]))] + ["neck"]
    for folded, sd in ((False, oracle.state_dict_numpy(torch_model)), (True, fused_state_dict(torch_model))):
        ours = ours_from(cfg, sd, dtype, folded)
        with npsam.reference(path == "reference"):
            stages = our_stages(ours, x)
            out = ours(x)
        for name, o, t in zip(names, stages, theirs):
            assert o.dtype == dtype, f"{name}: computed in {o.dtype}, expected {np.dtype(dtype)}"
            assert_close(o, t, TOL[dtype], f"{name} (folded_bn={folded}, {np.dtype(dtype)}, {path})")
        np.testing.assert_array_equal(out, stages[-1])  # forward() is the composition of the stages


# ---------------------------------------------------------------------------
# Small configurations under hypothesis
# ---------------------------------------------------------------------------
@st.composite
def configs(draw):
    """A TinyViT configuration the official code can run.

    NOTE(reference): with 4 layers, layer 3 expects the resolution of layer 2,
    which only holds when the last PatchMerging does not stride: out_dim 320,
    448 or 576. Earlier out_dims must stride, so they stay small."""
    num_layers = draw(st.sampled_from([2, 3, 4]))
    embed_dims, num_heads = [draw(st.sampled_from([8, 16]))], [1]
    for i in range(1, num_layers):
        if i == 3:
            dim = draw(st.sampled_from([320, 448, 576]))
            heads = draw(st.sampled_from([4, 8]))
        else:
            heads = draw(st.integers(1, 3))
            dim = heads * draw(st.sampled_from([4, 8]))
        embed_dims.append(dim)
        num_heads.append(heads)
    return dict(
        img_size=draw(st.sampled_from([64, 96, 128, 160, 192, 224, 256])),
        embed_dims=embed_dims,
        depths=[draw(st.integers(1, 2)) for _ in range(num_layers)],
        num_heads=num_heads,
        window_sizes=[draw(st.sampled_from([2, 3, 4, 5, 7, 8])) for _ in range(num_layers)],
        mlp_ratio=draw(st.sampled_from([2.0, 4.0])),
        mbconv_expand_ratio=draw(st.sampled_from([2.0, 4.0])),
        local_conv_size=draw(st.sampled_from([1, 3, 5])),
    )


@pytest.mark.parametrize("path", PATHS)
@given(cfg=configs(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16),
       batch=st.integers(1, 2))
def test_small_configurations_match_official(path, cfg, dtype, seed, batch):
    compare(cfg, dtype, seed, batch, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_padding_and_single_window_paths(dtype, path):
    # img 64: layer 1 runs at 8x8 (ws 8: one window, no partition), layer 2 at
    # 4x4 (ws 3: padded to 6x6), layer 3 at 4x4 (ws 7: padded to 7x7).
    cfg = dict(img_size=64, embed_dims=[8, 16, 24, 320], depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 4],
               window_sizes=[7, 8, 3, 7])
    compare(cfg, dtype, seed=3, batch=2, path=path)


@pytest.mark.parametrize("folded", [False, True])
@given(cfg=configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2))
def test_reference_intermediates_match_official(folded, cfg, seed, batch):
    """Every module call of the reference path (npsam.trace) against the same
    official module's output (forward hooks), float64, far tighter than the
    fast path's bound: the reference computes the official association,
    BatchNorm included (the official Conv2d_BN's ``c`` and ``bn``), or, for a
    folded checkpoint, the official model after ``fuse()``."""
    torch_model = official_model(cfg, np.float64, seed)
    sd = fused_state_dict(torch_model) if folded else oracle.state_dict_numpy(torch_model)
    if folded:
        fuse_(torch_model)
    ours = ours_from(cfg, sd, np.float64, folded)
    s = cfg["img_size"]
    x = np.random.default_rng(seed).standard_normal((batch, 3, s, s))
    expected = official_outputs(torch_model, lambda: official_stages(torch_model, torch.from_numpy(x)))
    errors = compare_intermediates(expected, ours, lambda: our_stages(ours, x), REFERENCE_ENCODER_F64,
                                   f"TinyViT {cfg} (folded_bn={folded})")
    assert "neck.3" in errors and f"layers.{len(cfg['depths']) - 1}" in errors
    assert ("patch_embed.seq.0.bn" in errors) != folded  # the BatchNorm itself, when the checkpoint has it


# ---------------------------------------------------------------------------
# MobileSAM's configuration
# ---------------------------------------------------------------------------
def official_vit_t_encoder() -> torch.nn.Module:
    return oracle.mobile_sam().build_sam.sam_model_registry["vit_t"]().image_encoder


def test_vit_t_state_dict_layouts():
    enc = official_vit_t_encoder()
    expected = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    ours = build_modules(CONFIGS["vit_t"]).image_encoder
    assert ours.state_dict_shapes() == expected
    assert ours.optional_keys() == {"norm_head.weight", "norm_head.bias", "head.weight", "head.bias"}
    assert "layers.1.blocks.0.attn.attention_bias_idxs" not in expected  # persistent=False
    fused = {k: tuple(v.shape) for k, v in fused_state_dict(enc).items()}
    assert build_modules(CONFIGS["vit_t"], folded_bn=True).image_encoder.state_dict_shapes() == fused
    assert len(expected) - len(fused) == 4 * 27  # 27 Conv2d_BN: c.weight + 5 bn leaves -> weight + bias


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_vit_t_full_resolution_float32(path):
    enc = official_vit_t_encoder()
    oracle.randomize_(enc, 7)
    enc.eval()
    x = np.random.default_rng(7).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    with torch.no_grad():
        theirs = enc(torch.from_numpy(x)).numpy()
    ours = build_modules(CONFIGS["vit_t"]).image_encoder
    ours.load_state_dict(oracle.state_dict_numpy(enc), dtype=np.float32)
    calls = []
    with npsam.reference(path == "reference"):
        out = ours(x, progress=lambda done, total: calls.append((done, total)))
    assert out.shape == (1, 256, 64, 64) and out.dtype == np.float32
    assert_close(out, theirs, ENCODER_F32, f"vit_t image embedding ({path})")
    assert calls == [(i, 12) for i in range(1, 13)]


# ---------------------------------------------------------------------------
# Pieces and errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [(1, 1), (2, 3), (7, 7), (14, 14)])
def test_attention_bias_idxs_match_official(resolution):
    theirs = official.Attention(8, 4, 2, attn_ratio=1, resolution=resolution)
    idxs, num_offsets = attention_bias_idxs(resolution)
    np.testing.assert_array_equal(idxs, theirs.attention_bias_idxs.numpy())
    assert num_offsets == theirs.attention_biases.shape[1]


def test_patch_merging_stride_quirk():
    for out_dim, stride in ((128, 2), (160, 2), (320, 1), (448, 1), (576, 1)):
        theirs = official.PatchMerging((8, 8), 64, out_dim, torch.nn.GELU)
        assert PatchMerging((8, 8), 64, out_dim).conv2.stride == theirs.conv2.c.stride[0] == stride


def test_bad_input_and_missing_weights():
    cfg = dict(img_size=64, embed_dims=[8, 16], depths=[1, 1], num_heads=[1, 2], window_sizes=[7, 4])
    model = TinyViT(**cfg).set_names()
    with pytest.raises(WeightsMissingError):
        model(np.zeros((1, 3, 64, 64), np.float32))
    model.load_state_dict(oracle.state_dict_numpy(official_model(cfg, np.float32, 0)))
    for bad in (np.zeros((1, 3, 64, 32)), np.zeros((3, 64, 64)), np.zeros((1, 1, 64, 64))):
        with pytest.raises(ValueError, match="x: expected"):
            model(bad)
    with pytest.raises(ValueError, match="depths"):
        TinyViT(img_size=64, embed_dims=[8], depths=[1], num_heads=[1], window_sizes=[7])
