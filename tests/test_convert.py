"""npsam.io.convert: official checkpoints (written by torch here) converted without
torch, bit for bit; model detection; strict key/shape checks; the command's
errors and exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import oracle
from npsam.io.checkpoint import CheckpointError
from npsam.io.convert import (
    StateDictMismatchError,
    check_state_dict,
    convert,
    detect_folded_bn,
    detect_model,
    expected_state_shapes,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Official models and their shapes
# --------------------------------------------------------------------------

def fold_conv2d_bn(model: torch.nn.Module, prefix: str = "") -> dict:
    """The state_dict with every MobileSAM Conv2d_BN replaced by its official ``fuse()``."""
    Conv2d_BN = oracle.mobile_sam().modeling.tiny_vit_sam.Conv2d_BN
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, Conv2d_BN):
            for key in [k for k in state if k.startswith(f"{prefix}{name}.c.") or k.startswith(f"{prefix}{name}.bn.")]:
                del state[key]
            with torch.no_grad():
                fused = module.fuse()
            state[f"{prefix}{name}.weight"] = fused.weight.detach().clone()
            state[f"{prefix}{name}.bias"] = fused.bias.detach().clone()
    return state


@pytest.fixture(scope="module")
def tiny_model():
    """The official MobileSAM (TinyViT) with random weights."""
    model = oracle.mobile_sam().build_sam.sam_model_registry["vit_t"]()
    oracle.randomize_(model, seed=2)
    return model.eval()


@pytest.fixture(scope="module")
def official_shapes(tiny_model):
    """model type -> official state_dict shapes (vit_t: unfused and folded)."""
    sa = oracle.segment_anything()
    shapes = {}
    for model_type in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):  # shapes without the memory
            model = sa.build_sam.sam_model_registry[model_type]()
        shapes[model_type] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tiny = tiny_model
    shapes["vit_t"] = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    shapes["vit_t_folded"] = {k: tuple(v.shape) for k, v in fold_conv2d_bn(tiny).items()}
    return shapes


def run_convert_without_torch(*argv: str) -> subprocess.CompletedProcess:
    """`python -m npsam.io.convert ARGV` in a process where importing torch fails."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from npsam.io.convert import main\n"
        "status = main(sys.argv[1:])\n"
        "assert sys.modules.get('torch') is None, 'torch was imported'\n"
        "sys.exit(status)\n"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


def assert_same_state(ours: dict, theirs: dict, what: str) -> None:
    assert sorted(ours) == sorted(theirs), f"{what}: keys differ: {sorted(set(ours) ^ set(theirs))[:10]}"
    for key, value in theirs.items():
        value = value.detach().numpy() if isinstance(value, torch.Tensor) else value
        got = ours[key]
        assert got.dtype == value.dtype and got.shape == value.shape, (
            f"{what}: {key}: ours {got.dtype}{got.shape}, theirs {value.dtype}{value.shape}")
        assert got.tobytes() == value.tobytes(), f"{what}: {key}: values differ"


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    """The official ViT-B SAM with random weights, saved by torch.save: (path, state_dict)."""
    model = oracle.segment_anything().build_sam.sam_model_registry["vit_b"]()
    oracle.randomize_(model, seed=1)
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b.pth"
    state = model.state_dict()
    torch.save(state, path)
    del model
    return path, {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def vit_t(tiny_model):
    """MobileSAM's state_dict, unfused and folded."""
    return dict(tiny_model.state_dict()), fold_conv2d_bn(tiny_model)


# --------------------------------------------------------------------------
# Official checkpoints, converted without torch
# --------------------------------------------------------------------------

def test_vit_b_converted_without_torch_bit_for_bit(vit_b, tmp_path):
    src, state = vit_b
    dst = tmp_path / "sam_vit_b.safetensors"
    result = run_convert_without_torch(str(src), str(dst))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "vit_b" in result.stdout
    assert_same_state(load_file(dst), state, "vit_b")
    with open(dst, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    import npsam

    metadata = header["__metadata__"]
    assert metadata["format"] == "npsam" and metadata["model_type"] == "vit_b"
    assert metadata["source_sha256"] == sha256(src) and metadata["source_name"] == "sam_vit_b.pth"
    assert metadata["npsam_version"] == npsam.__version__
    assert metadata["parts"] == "image_encoder,prompt_encoder,mask_decoder"
    assert [p.name for p in tmp_path.iterdir()] == ["sam_vit_b.safetensors"]


def test_vit_b_parts_and_dtypes(vit_b, tmp_path):
    src, state = vit_b
    decoder = tmp_path / "decoder.safetensors"
    report = convert(src, decoder, parts="prompt_encoder,mask_decoder")
    kept = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    assert report["model_type"] == "vit_b" and report["tensors"] == len(kept)
    assert report["parameters"] == sum(v.size for v in kept.values())
    assert_same_state(load_file(decoder), kept, "decoder part")
    # The decoder-only file converts again, detected as such.
    again = convert(decoder, tmp_path / "again.safetensors", dtype="float64")
    assert again["model_type"] == "decoder" and again["parts"] == ["prompt_encoder", "mask_decoder"]
    assert_same_state(load_file(tmp_path / "again.safetensors"),
                      {k: v.astype(np.float64) for k, v in kept.items()}, "decoder float64")
    half = tmp_path / "half.safetensors"
    convert(src, half, parts=["image_encoder"], dtype="float16")
    encoder = {k: v.astype(np.float16) for k, v in state.items() if k.startswith("image_encoder.")}
    assert_same_state(load_file(half), encoder, "encoder float16")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mobile_sam_converted_without_torch(vit_t, tmp_path, legacy):
    unfused, folded = vit_t
    for name, state, is_folded in [("unfused", unfused, False), ("folded", folded, True)]:
        src, dst = tmp_path / f"mobile_sam_{name}.pt", tmp_path / f"{name}.safetensors"
        torch.save(state, src, _use_new_zipfile_serialization=not legacy)
        result = run_convert_without_torch(str(src), str(dst))
        assert result.returncode == 0, result.stderr
        assert "vit_t" in result.stdout and ("BatchNorm folded" in result.stdout) == is_folded
        assert_same_state(load_file(dst), state, name)


def test_mobile_sam_float16_keeps_integer_buffers(vit_t, tmp_path):
    unfused, _ = vit_t
    torch.save({"model": unfused}, tmp_path / "wrapped.pt")
    report = convert(tmp_path / "wrapped.pt", tmp_path / "half.safetensors", dtype="float16")
    assert report["model_type"] == "vit_t" and report["folded_bn"] is False
    out = load_file(tmp_path / "half.safetensors")
    nbt = [k for k in out if k.endswith("num_batches_tracked")]
    assert nbt and all(out[k].dtype == np.int64 and out[k].shape == () for k in nbt)
    assert all(out[k].dtype == np.float16 for k in out if k not in nbt)
    key = "image_encoder.patch_embed.seq.0.c.weight"
    assert out[key].tobytes() == unfused[key].numpy().astype(np.float16).tobytes()


def test_wrappers_prefix_and_pixel_buffers(vit_t, tmp_path):
    unfused, _ = vit_t
    pixels = {"pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1),
              "pixel_std": torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)}
    state = {**unfused, **pixels}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    convert(tmp_path / "ddp.pth", tmp_path / "full.safetensors")
    assert_same_state(load_file(tmp_path / "full.safetensors"), state, "module. prefix with pixel buffers")
    # Decoder-only output: the image-preprocessing buffers go with the image encoder.
    convert(tmp_path / "ddp.pth", tmp_path / "dec.safetensors", parts="mask_decoder,prompt_encoder")
    out = load_file(tmp_path / "dec.safetensors")
    assert "pixel_mean" not in out and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in out)


# --------------------------------------------------------------------------
# Detection and strict checking
# --------------------------------------------------------------------------

def zeros_like_shapes(shapes: dict) -> dict:
    """Arrays of the given shapes that take no memory (read-only broadcasts)."""
    return {k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()}


def test_detect_each_model(official_shapes):
    for model_type in ("vit_b", "vit_l", "vit_h", "vit_t"):
        state = zeros_like_shapes(official_shapes[model_type])
        assert detect_model(state) == model_type
        assert detect_folded_bn(state) is False or model_type != "vit_t"
        expected = expected_state_shapes(model_type)
        check_state_dict(state, model_type, expected, ("image_encoder", "prompt_encoder", "mask_decoder"))
    folded = zeros_like_shapes(official_shapes["vit_t_folded"])
    assert detect_model(folded) == "vit_t" and detect_folded_bn(folded) is True
    check_state_dict(folded, "vit_t", expected_state_shapes("vit_t", folded_bn=True), ("image_encoder",))
    decoder = {k: v for k, v in official_shapes["vit_h"].items() if not k.startswith("image_encoder.")}
    assert detect_model(zeros_like_shapes(decoder)) == "decoder"
    assert expected_state_shapes("decoder") == decoder


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h", "vit_t", "vit_t_folded"])
def test_expected_shapes_are_the_official_ones(official_shapes, model_type):
    """What the converter checks against (npsam.build_sam.expected_shapes) is the official state_dict."""
    ours = expected_state_shapes(model_type.replace("_folded", ""), folded_bn=model_type.endswith("_folded"))
    pixels = {k: ours.pop(k) for k in ("pixel_mean", "pixel_std") if k in ours}
    assert ours == official_shapes[model_type]
    assert all(v == (3, 1, 1) for v in pixels.values())


def test_optional_keys_may_be_absent(vit_t, tmp_path):
    """TinyViT's classifier head (unused by SAM; absent from encoder ONNX exports) may be left out."""
    _, folded = vit_t
    headless = {k: v for k, v in folded.items() if not k.startswith(("image_encoder.head.", "image_encoder.norm_head."))}
    assert len(headless) == len(folded) - 4
    torch.save(headless, tmp_path / "headless.pt")
    report = convert(tmp_path / "headless.pt", tmp_path / "out.safetensors")
    assert report["model_type"] == "vit_t" and report["folded_bn"] is True
    assert_same_state(load_file(tmp_path / "out.safetensors"), headless, "headless")


def test_not_sam_at_all():
    with pytest.raises(CheckpointError, match="not a SAM or MobileSAM state_dict.*fc.weight"):
        detect_model({"fc.weight": np.zeros((2, 2))})
    with pytest.raises(CheckpointError, match=r"\(512, 3, 16, 16\)"):
        detect_model({"image_encoder.patch_embed.proj.weight": np.zeros((512, 3, 16, 16))})


def test_mismatches_listed_together(official_shapes, vit_b, tmp_path):
    state = zeros_like_shapes(official_shapes["vit_b"])
    del state["mask_decoder.iou_token.weight"], state["image_encoder.neck.0.weight"]
    state["mask_decoder.extra.weight"] = np.zeros(3)
    state["image_encoder.pos_embed"] = np.zeros((1, 32, 32, 768))
    with pytest.raises(StateDictMismatchError) as info:
        check_state_dict(state, "vit_b", expected_state_shapes("vit_b"), ("image_encoder", "prompt_encoder", "mask_decoder"))
    message = str(info.value)
    assert "expected model vit_b" in message
    assert "2 missing: image_encoder.neck.0.weight, mask_decoder.iou_token.weight" in message
    assert "1 unexpected: mask_decoder.extra.weight" in message
    assert "1 wrong shape: image_encoder.pos_embed [1, 32, 32, 768] (expected [1, 64, 64, 768])" in message
    # Long lists are cut, with counts.
    blocks = {k: v for k, v in state.items() if not k.startswith("image_encoder.blocks.")}
    with pytest.raises(StateDictMismatchError, match=r"\d+ missing: .*, \.\.\. and \d+ more") as info:
        check_state_dict(blocks, "vit_b", expected_state_shapes("vit_b"), ("image_encoder",))
    assert info.value.missing == sorted(k for k in set(official_shapes["vit_b"]) - set(blocks)
                                        if k.startswith("image_encoder."))
    # A decoder-only file checked as vit_b: the image encoder is missing.
    decoder = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    decoder.pop("mask_decoder.extra.weight")
    from npsam.io.checkpoint import save_safetensors

    save_safetensors(tmp_path / "dec.safetensors", {k: np.ascontiguousarray(v) for k, v in decoder.items()})
    with pytest.raises(StateDictMismatchError, match="expected model vit_b:\n  \\d+ missing: image_encoder"):
        convert(tmp_path / "dec.safetensors", tmp_path / "out.safetensors", model_type="vit_b")
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_arguments(vit_b, tmp_path):
    src, _ = vit_b
    for kwargs, match in [({"dtype": "int8"}, "dtype"), ({"parts": "image_encoder,neck"}, "parts"),
                          ({"parts": []}, "parts"), ({"model_type": "vit_x"}, "model_type")]:
        with pytest.raises(ValueError, match=match):
            convert(src, tmp_path / "out.safetensors", **kwargs)
    with pytest.raises(ValueError, match="dst"):
        convert(src, src)
    with pytest.raises(ValueError, match="src"):
        convert(tmp_path / "missing.pth", tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_onnx_is_dispatched_to_onnx_import(tmp_path):
    # protobuf field 1 (ir_version 8), then garbage: routed to npsam.io.onnx_import, which rejects it.
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + b"\xff" * 64)
    with pytest.raises(ValueError, match="neither a SamOnnxModel export"):
        convert(tmp_path / "bad.onnx", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------
# The command on bad files: one error line, exit status 2, no output
# --------------------------------------------------------------------------

def corrupt_sources(folder, vit_t_state) -> dict:
    """name -> (path, text expected in the error)."""
    good = folder / "good.pt"
    decoder = {k: v for k, v in vit_t_state.items() if not k.startswith("image_encoder.")}
    torch.save(decoder, good)
    data = good.read_bytes()
    cases = {}
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (folder / "truncated.pt", "not a readable zip")
    (folder / "text.pt").write_text("hello, I am not a checkpoint\n")
    cases["text"] = (folder / "text.pt", "is not a torch.save checkpoint (zip or pickle), a safetensors file or an ONNX file: the file looks like text")
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(folder / "nopkl.pt", "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("data.pkl"):
                zout.writestr(info.filename, zin.read(info.filename))
    cases["no data.pkl"] = (folder / "nopkl.pt", "data.pkl")
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(folder / "short.pt", "w") as zout:
        for info in zin.infolist():
            content = zin.read(info.filename)
            zout.writestr(info.filename, content[:-4] if info.filename.endswith("/data/0") else content)
    cases["short storage"] = (folder / "short.pt", "truncated or corrupt")
    header = json.dumps({"a": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
    (folder / "lying.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    cases["lying safetensors"] = (folder / "lying.safetensors", "file not fully covered")
    marker = folder / "pwned"
    evil = (b"\x80\x02cposix\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little")
            + f"touch {marker}".encode() + b"\x85R.")
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(folder / "evil.pt", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, evil if info.filename.endswith("data.pkl") else zin.read(info.filename))
    cases["malicious"] = (folder / "evil.pt", "'posix.system'")
    torch.save({"model": [1, 2]}, folder / "list.pt")
    cases["not a dict of tensors"] = (folder / "list.pt", "expected a dict of tensors")
    return cases


def test_command_errors_on_corrupt_files(vit_t, tmp_path):
    sources = tmp_path / "src"
    sources.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "existing.safetensors").write_bytes(b"keep me")
    for name, (path, match) in corrupt_sources(sources, vit_t[0]).items():
        # An existing output is left as it was (checked on two cases, to keep the test short).
        targets = [out / "new.safetensors"] + [out / "existing.safetensors"] * (name in ("malicious", "short storage"))
        for dst in targets:
            result = run_convert_without_torch(str(path), str(dst))
            assert result.returncode == 2, f"{name}: status {result.returncode}, {result.stderr}"
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("npsam convert: error: "), f"{name}: {result.stderr}"
            assert match in lines[0], f"{name}: {lines[0]}"
            assert result.stdout == ""
        assert sorted(p.name for p in out.iterdir()) == ["existing.safetensors"], name
        assert (out / "existing.safetensors").read_bytes() == b"keep me"
    assert not (sources / "pwned").exists()
