"""Regression tests for the hostile and broken weight files of issue 19.

Every case in tests/hostile.py is read in a capped worker process (2 GB of
address space, 60 s; tests/fuzz_worker.py) and must give one CheckpointError
naming what is wrong, never another exception, a blow-up or a poisoned
process; then in process for what the error says. Valid files that were
refused or mis-read (0-d bfloat16), weights that load but cannot be right
(integer, NaN, inf), format detection by content, names escaped, and the
command line's one line with exit status 2.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

import hostile
from fuzz_readers import Worker
from random_weights import random_state_dict
from npsam.build_sam import sam_model_registry
from npsam.io.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    _SAFE_GLOBALS,
    load_safetensors,
    load_torch_checkpoint,
    save_safetensors,
)


def torch_cases() -> dict:
    """name -> (bytes, text expected in the error), read by load_torch_checkpoint."""
    cases = {
        "BUILD on torch.FloatStorage": (hostile.poisoning_zip(), "applies BUILD to torch.FloatStorage"),
        "BUILD on _rebuild_tensor_v2": (hostile.build_on_function_zip(), "applies BUILD to torch._utils._rebuild_tensor_v2"),
        "1000 zip entries alias one storage": (hostile.aliased_storages_zip(), "aliases the data of another entry"),
        "BadZipFile (CRC)": (hostile.zip_with_pkl_field("crc"), "not a readable zip"),
        "NotImplementedError (compression 99)": (hostile.zip_with_pkl_field("compression 99"), "zip feature"),
        "NotImplementedError (zip version 7.5)": (hostile.zip_with_pkl_field("version 7.5"), "zip feature"),
        "RuntimeError (encrypted entry)": (hostile.zip_with_pkl_field("encrypted"), "zip feature"),
        "OSError (negative seek)": (hostile.zip_with_pkl_field("negative seek"), "OSError"),
        "zlib.error": (hostile.zip_with_corrupt_compressed_pkl(zipfile.ZIP_DEFLATED), "corrupt compressed data"),
        "LZMAError": (hostile.zip_with_corrupt_compressed_pkl(zipfile.ZIP_LZMA), "corrupt compressed data"),
        "persistent id of 100,000 ints": (hostile.torch_zip(hostile.huge_list_pid_pickle()), "[1, 1, 1, 1, 1, 1, ...]"),
        "stride 2**63": (hostile.torch_zip(hostile.huge_size_pickle((2,), (2**63,)), {"0": bytes(48)}), "tensor stride"),
        "size 2**65": (hostile.torch_zip(hostile.huge_size_pickle((2**65,), (1,)), {"0": bytes(48)}), "tensor size"),
        "33 dimensions": (hostile.torch_zip(hostile.huge_size_pickle((1,) * 33, (1,) * 33), {"0": bytes(48)}), "at most 32"),
        "a million one-byte dicts": (hostile.torch_zip(hostile.many_opcodes_pickle()), "opcodes in one pickle"),
        "legacy: a million one-byte dicts": (hostile.legacy_file(hostile.many_opcodes_pickle()), "opcodes in one pickle"),
        "data.pkl deflated 500 to 1": (hostile.deflated_pkl_bomb_zip(), "16 times the file"),
    }
    for name, pkl in hostile.long_length_pickles().items():
        expected = "memo index" if "PUT" in name else "frame of" if "FRAME" in name else "truncated or corrupt pickle"
        cases[f"zip: {name}"] = (hostile.torch_zip(pkl), expected)
        cases[f"legacy: {name}"] = (hostile.legacy_file(pkl), expected)
    return cases


CASES = {("torch", k): v for k, v in torch_cases().items()}
CASES.update({("safetensors", k): v for k, v in hostile.safetensors_cases().items()})
CASES.update({("onnx", k): v for k, v in hostile.onnx_cases().items()})


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    good = folder / "good.pth"
    good.write_bytes(hostile.float32_checkpoint())
    # 60 s per file, not the fuzzer's 10: the largest files here take a few
    # seconds on a busy machine before their limit is reached; what is tested
    # is the clean refusal.
    worker = Worker(good, folder, case_seconds=60)
    yield worker
    worker.close()


@pytest.mark.parametrize("reader, name", sorted(CASES), ids=[f"{r}: {n}" for r, n in sorted(CASES)])
def test_hostile_file_is_refused_cleanly_within_bounds(worker, reader, name):
    data, expected = CASES[reader, name]
    result = worker.run(reader, data)
    assert result["outcome"] == "refused", f"{name}: {result}"
    assert expected in result["detail"], f"{name}: {result['detail']}"
    assert len(result["detail"]) < 1000, f"{name}: a message of {len(result['detail'])} characters"


def test_hostile_files_by_content_detection(worker):
    """The same files through the reader that detects the format (npsam convert's);
    the few large ones (megabytes of opcodes or nodes) only through their own reader above."""
    for (reader, name), (data, _) in CASES.items():
        if len(data) > 1_000_000:
            continue
        result = worker.run("any", data)
        assert result["outcome"] == "refused", f"{reader}: {name}: {result}"


def test_a_hostile_checkpoint_does_not_poison_later_loads(tmp_path):
    """The 277-byte zip of the issue BUILDs name = 'BFloat16Storage' on the shared
    torch.FloatStorage stand-in; a float32 checkpoint loaded afterwards in the
    same process must still read as float32."""
    good = tmp_path / "good.pth"
    values = torch.tensor([1.5, -2.0, 3.25, 1e-3])
    torch.save({"w": values}, good)
    for i, data in enumerate([hostile.poisoning_zip(), hostile.build_on_function_zip()]):
        (tmp_path / f"evil{i}.pth").write_bytes(data)
        with pytest.raises(CheckpointError, match="BUILD"):
            load_torch_checkpoint(tmp_path / f"evil{i}.pth")
    stand_in = _SAFE_GLOBALS[("torch", "FloatStorage")]
    assert stand_in.name == "FloatStorage" and stand_in.dtype == np.float32
    with pytest.raises(CheckpointError):
        stand_in.name = "BFloat16Storage"  # nor from Python
    got = load_torch_checkpoint(good)["w"]
    assert got.dtype == np.float32 and got.tobytes() == values.numpy().tobytes()


def test_messages_from_huge_lists_stay_short(tmp_path):
    path = tmp_path / "many.pth"
    torch.save({f"k{i}": i for i in range(100_000)}, path)  # 100,000 entries that are not tensors
    with pytest.raises(CheckpointError, match=r"got 100000 other entries: 'k0': int, .* and 99995 more") as info:
        load_torch_checkpoint(path)
    assert len(str(info.value)) < 500


# --------------------------------------------------------------------------
# Valid files that were refused or mis-read
# --------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_zero_d_bfloat16_torch(tmp_path, legacy):
    path = tmp_path / "bf16.pth"
    torch.save({"x": torch.tensor(1.5, dtype=torch.bfloat16), "y": torch.tensor(-0.25)}, path,
               _use_new_zipfile_serialization=not legacy)
    got = load_torch_checkpoint(path)
    for key, value in (("x", 1.5), ("y", -0.25)):
        assert type(got[key]) is np.ndarray and got[key].shape == () and got[key].dtype == np.float32, key
        assert got[key] == value


def test_zero_d_safetensors_are_0d_arrays(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "zero_d.safetensors"
    save_file({"bf": torch.tensor(1.5, dtype=torch.bfloat16), "f": torch.tensor(2.5),
               "i": torch.tensor(7, dtype=torch.int64)}, str(path))
    got, _ = load_safetensors(path)
    for key, value in (("bf", 1.5), ("f", 2.5), ("i", 7)):
        assert type(got[key]) is np.ndarray and got[key].shape == (), f"{key}: {type(got[key])}"
        assert got[key] == value
    assert got["bf"].dtype == np.float32


# --------------------------------------------------------------------------
# Weights that load but cannot be right
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def decoder_state():
    return random_state_dict("vit_b")


def test_registry_refuses_integer_and_bool_weights(decoder_state):
    state = dict(decoder_state)
    bad = sorted(k for k in state if k.startswith("mask_decoder.output_hypernetworks_mlps"))[:7]
    for i, key in enumerate(bad):
        state[key] = state[key].astype(np.int8 if i % 2 else np.bool_)
    with pytest.raises(CheckpointError, match="7 keys hold integer or bool values") as info:
        sam_model_registry["vit_b"](checkpoint=state)
    message = str(info.value)
    assert "and 2 more" in message and f"{bad[0]} (bool)" in message and f"{bad[1]} (int8)" in message


def test_registry_refuses_nan_and_inf_weights(decoder_state, tmp_path):
    state = dict(decoder_state)
    nan_key, inf_key = "mask_decoder.iou_token.weight", "prompt_encoder.no_mask_embed.weight"
    state[nan_key] = state[nan_key].copy()
    state[nan_key][0, 3] = np.nan
    state[inf_key] = state[inf_key].copy()
    state[inf_key][0, -1] = -np.inf
    path = tmp_path / "nan.safetensors"
    save_safetensors(path, state)
    for checkpoint in (state, str(path)):
        with pytest.raises(CheckpointError, match="2 keys hold NaN or infinite values") as info:
            sam_model_registry["vit_b"](checkpoint=checkpoint)
        assert nan_key in str(info.value) and inf_key in str(info.value)
    # Control: the same weights, finite, build.
    sam_model_registry["vit_b"](checkpoint=decoder_state)


def test_convert_refuses_integer_weights_and_writes_nothing(decoder_state, tmp_path):
    from npsam.io.convert import convert

    state = dict(decoder_state)
    key = "mask_decoder.mask_tokens.weight"
    state[key] = (state[key] * 100).astype(np.int8)
    src, dst = tmp_path / "int.safetensors", tmp_path / "out.safetensors"
    save_safetensors(src, state)
    with pytest.raises(CheckpointError, match=f"{key} \\(int8\\)"):
        convert(src, dst)
    assert not dst.exists()


# --------------------------------------------------------------------------
# Formats told by content; names escaped
# --------------------------------------------------------------------------

def test_formats_are_told_by_content(tmp_path, decoder_state):
    text = tmp_path / "weights.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="looks like text"):
        sam_model_registry["vit_b"](checkpoint=str(text))
    with pytest.raises(CheckpointError, match="not a torch.save file.*looks like text"):
        load_torch_checkpoint(text)
    st = tmp_path / "weights.bin"
    save_safetensors(st, decoder_state)
    with pytest.raises(CheckpointError, match="this is a safetensors file"):
        load_torch_checkpoint(st)
    assert sam_model_registry["vit_b"](checkpoint=str(st)) is not None  # the name does not matter
    pth = tmp_path / "weights.safetensors"
    pth.write_bytes(hostile.float32_checkpoint())
    with pytest.raises(CheckpointError, match=r"not a safetensors file: this is a torch.save checkpoint \(zip\)"):
        load_safetensors(pth)
    onnx = tmp_path / "model.pth"
    onnx.write_bytes(hostile.field(1, 7) + hostile.field(7, b""))
    with pytest.raises(CheckpointError, match="is an ONNX export; convert it first"):
        sam_model_registry["vit_b"](checkpoint=str(onnx))


def test_names_from_a_file_reach_the_terminal_escaped(tmp_path, decoder_state):
    evil = "mask_decoder.\x1b[2J\x00evil"
    path = tmp_path / "names.safetensors"
    save_safetensors(path, {**decoder_state, evil: np.zeros(2, np.float32)})
    with pytest.raises(ValueError) as info:
        sam_model_registry["vit_b"](checkpoint=str(path))
    assert "\\x1b[2J\\x00evil" in str(info.value)
    pkl = b"\x80\x02cos\x1b[2J\nsys\x00tem\n."
    (tmp_path / "global.pth").write_bytes(hostile.torch_zip(pkl))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_checkpoint(tmp_path / "global.pth")
    assert "'os\\x1b[2J.sys\\x00tem'" in str(info.value)
    for message in (str(info.value),):
        assert "\x1b" not in message and "\x00" not in message


# --------------------------------------------------------------------------
# The command line: one line, exit status 2
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BUILD on torch.FloatStorage", "RuntimeError (encrypted entry)", "zlib.error",
                                  "zip: BINBYTES8 2**62", "1000 zip entries alias one storage", "text"])
def test_command_line_gives_one_line_and_status_2(tmp_path, capsys, name):
    from npsam.tools.cli import main

    if name == "text":  # a text file named .pth: told by its content
        data, expected = b"this is not a checkpoint\n", "looks like text"
    else:
        data, expected = CASES["torch", name]
    src = tmp_path / "bad.pth"
    src.write_bytes(data)
    for argv, prog in ((["convert", str(src), str(tmp_path / "out.safetensors")], "npsam convert"),
                       (["info", str(src)], "npsam info")):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), captured.err
        assert expected in lines[0] and "Traceback" not in captured.err
    assert not (tmp_path / "out.safetensors").exists()
