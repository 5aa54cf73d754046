"""Hostile and broken weight files, built byte by byte (no torch needed).

Each function returns a file's bytes; tests/test_hostile_files.py reads each
one in a capped worker and in process, and expects one CheckpointError (or,
for the valid ones, the right arrays). The cases are the ones fuzzing found
(issue 19): a pickle that BUILDs on a shared stand-in, zip entries aliasing
one storage, lengths of 2**31 to 2**63 in pickles and protobufs, a header
nested 100,000 deep, zip features the standard library raises odd errors for.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib

# NOTE(reference): torch/serialization.py MAGIC_NUMBER and PROTOCOL_VERSION, the first pickles of a legacy file.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# --------------------------------------------------------------------------
# Pickles and torch.save containers
# --------------------------------------------------------------------------

REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
ORDERED_DICT = b"ccollections\nOrderedDict\n)R"


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    raw = pickle.encode_long(value)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def tensor_pickle(tensors: dict, storage_type: str = "FloatStorage") -> bytes:
    """A protocol-2 state_dict pickle as torch.save writes it: name -> (key, offset,
    size, stride, numel) of a tensor over storage ``key``."""
    out = [b"\x80\x02}"]
    for name, (key, offset, size, stride, numel) in tensors.items():
        pid = (b"(" + _binunicode("storage") + b"ctorch\n" + storage_type.encode() + b"\n" + _binunicode(key)
               + _binunicode("cpu") + _int(numel) + b"tQ")
        tup = lambda values: b"(" + b"".join(_int(v) for v in values) + b"t"  # noqa: E731
        out.append(_binunicode(name) + REBUILD + b"(" + pid + _int(offset) + tup(size) + tup(stride)
                   + b"\x89" + ORDERED_DICT + b"tR" + b"s")
    return b"".join(out) + b"."


def torch_zip(pkl: bytes, storages: dict = (), *, compression=zipfile.ZIP_STORED) -> bytes:
    """A torch.save-like zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in dict(storages).items():
            z.writestr(zipfile.ZipInfo(f"archive/data/{key}"), data, compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def legacy_file(object_pickle: bytes) -> bytes:
    """The legacy format's three header pickles, then ``object_pickle`` (no storages follow)."""
    sys_info = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(v, protocol=2) for v in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, sys_info)) + object_pickle


def float32_checkpoint(values=(1.5, -2.0, 0.25)) -> bytes:
    """A valid zip checkpoint {"w": float32 values}."""
    raw = struct.pack(f"<{len(values)}f", *values)
    return torch_zip(tensor_pickle({"w": ("0", 0, (len(values),), (1,), len(values))}), {"0": raw})


def poisoning_zip() -> bytes:
    """BUILD on the shared torch.FloatStorage stand-in: name = 'BFloat16Storage'.
    Before the fix every later float32 load in the process decoded as bfloat16."""
    pkl = b"\x80\x02ctorch\nFloatStorage\n}" + _binunicode("name") + _binunicode("BFloat16Storage") + b"sb."
    return torch_zip(pkl)


def build_on_function_zip() -> bytes:
    """BUILD with a slot state on the _rebuild_tensor_v2 stand-in (setattr __defaults__)."""
    pkl = REBUILD + b"N}" + _binunicode("__defaults__") + b"N\x85s\x86b."
    return torch_zip(b"\x80\x02" + pkl)


def _central_records(data: bytes):
    """(offset, length, name) of each central-directory record of a zip."""
    pos = data.index(b"PK\x01\x02")
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        yield pos, 46 + n + m + k, data[pos + 46:pos + 46 + n].decode()
        pos += 46 + n + m + k


def aliased_storages_zip(count: int = 1000, storage_bytes: int = 1 << 16) -> bytes:
    """One stored storage, ``count`` central-directory entries pointing at it,
    and a pickle with ``count`` tensors, one per entry: without the check, a
    file of storage_bytes loads count * storage_bytes."""
    numel = storage_bytes // 4
    pkl = tensor_pickle({f"t{i}": (str(i), 0, (numel,), (1,), numel) for i in range(count)})
    data = torch_zip(pkl, {"0": bytes(storage_bytes)})
    records = list(_central_records(data))
    start = records[0][0]
    (record,) = [data[p:p + n] for p, n, name in records if name == "archive/data/0"]
    extra = []
    for i in range(1, count):
        name = f"archive/data/{i}".encode()
        copy = bytearray(record[:46])  # same local header offset, sizes and CRC as archive/data/0
        struct.pack_into("<HHH", copy, 28, len(name), 0, 0)
        extra.append(bytes(copy) + name)
    body = b"".join(data[p:p + n] for p, n, _ in records) + b"".join(extra)
    entries = len(records) + len(extra)
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, entries, entries, len(body), start, 0)
    return data[:start] + body + eocd


def _patch_entry(data: bytes, name: str, central_offset: int, fmt: str, value, local_offset=None) -> bytes:
    """Set one field of a member's central-directory record (and of its local header)."""
    buf = bytearray(data)
    for pos, _, entry in _central_records(data):
        if entry == name:
            struct.pack_into(fmt, buf, pos + central_offset, value)
            if local_offset is not None:
                (header,) = struct.unpack_from("<I", buf, pos + 42)
                struct.pack_into(fmt, buf, header + local_offset, value)
    return bytes(buf)


def zip_with_pkl_field(field: str) -> bytes:
    """A valid checkpoint whose data.pkl entry claims something zipfile raises an odd error for."""
    good = float32_checkpoint()
    if field == "compression 99":  # NotImplementedError: compression type 99
        return _patch_entry(good, "archive/data.pkl", 10, "<H", 99, local_offset=8)
    if field == "version 7.5":  # NotImplementedError: zip file version 7.5
        return _patch_entry(good, "archive/data.pkl", 6, "<H", 75, local_offset=4)
    if field == "encrypted":  # RuntimeError: File is encrypted, password required
        return _patch_entry(good, "archive/data.pkl", 8, "<H", 1, local_offset=6)
    if field == "crc":  # BadZipFile: Bad CRC-32
        return _patch_entry(good, "archive/data.pkl", 16, "<I", 0xDEADBEEF, local_offset=14)
    if field == "negative seek":  # every local header offset moved before the file's start
        buf = bytearray(good)
        eocd = good.rindex(b"PK\x05\x06")
        (offset,) = struct.unpack_from("<I", buf, eocd + 16)
        struct.pack_into("<I", buf, eocd + 16, offset + 1_000_000)
        return bytes(buf)
    raise ValueError(field)


def zip_with_corrupt_compressed_pkl(method: int) -> bytes:
    """data.pkl deflated (zlib.error) or LZMA-compressed (LZMAError), its stream garbled."""
    pkl = tensor_pickle({"w": ("0", 0, (3,), (1,), 3)})
    data = bytearray(torch_zip(pkl, {"0": bytes(12)}, compression=method))
    (pos, _, _), *_ = [r for r in _central_records(bytes(data)) if r[2] == "archive/data.pkl"]
    (csize,) = struct.unpack_from("<I", data, pos + 20)
    (header,) = struct.unpack_from("<I", data, pos + 42)
    n, m = struct.unpack_from("<HH", data, header + 26)
    start = header + 30 + n + m
    for i in range(start + (csize // 3 if method == zipfile.ZIP_LZMA else 0), start + csize):
        data[i] ^= 0x5A
    return bytes(data)


def long_length_pickles() -> dict:
    """name -> a pickle stating a length far beyond its bytes (or a memo index far beyond its entries)."""
    return {
        "BINBYTES8 2**62": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",
        "BINUNICODE8 2**62": b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc.",
        "BYTEARRAY8 2**62": b"\x80\x05\x96" + struct.pack("<Q", 2**62) + b"abc.",
        "FRAME 2**63-1": b"\x80\x04\x95" + struct.pack("<Q", 2**63 - 1) + b"}.",
        "BINUNICODE 2**31": b"\x80\x02X" + struct.pack("<I", 2**31) + b"abc.",
        "LONG_BINPUT 2**30": b"\x80\x02}r" + struct.pack("<I", 2**30) + b".",
        "LONG4 2**31": b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01.",
    }


def many_opcodes_pickle(n: int = (1 << 20) + 10) -> bytes:
    """n one-byte EMPTY_DICT opcodes: 1 byte each in the file, 64 bytes each in memory."""
    return b"\x80\x02" + b"}" * n + b"."


def deflated_pkl_bomb_zip(n: int = 1 << 21) -> bytes:
    """A data.pkl of n bytes deflated to a few kilobytes (far more than 16 times the file)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"}" * n + b".")
    return buffer.getvalue()


def huge_list_pid_pickle(n: int = 100_000) -> bytes:
    """A persistent id that is a list of n integers: its error message must stay short."""
    return b"\x80\x02](" + b"K\x01" * n + b"eQ."


def huge_size_pickle(size, stride) -> bytes:
    """One tensor with the given size and stride over a 12-element storage."""
    return tensor_pickle({"w": ("0", 0, size, stride, 12)})


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------

def safetensors_file(header, data: bytes = b"") -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def safetensors_cases() -> dict:
    """name -> (bytes, text expected in the error)."""
    huge = "[" + ",".join(["18446744073709551616"] * 160_000) + "]"
    return {
        "160,000 dims of 2**64": (safetensors_file(('{"w":{"dtype":"F32","shape":' + huge + ',"data_offsets":[0,4]}}').encode(), bytes(4)), "invalid"),
        "shape product overflows": (safetensors_file({"w": {"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 4]}}, bytes(4)), "overflow"),
        "100,000 [": (safetensors_file(b"[" * 100_000), "safetensors"),
        "dtype given as a list": (safetensors_file({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "invalid"),
        "header length 2**64-1": (struct.pack("<Q", 2**64 - 1) + b"{}", "header"),
        "__metadata__ a list": (safetensors_file({"__metadata__": ["a"]}), "expected a map"),
        "__metadata__ of ints": (safetensors_file({"__metadata__": {"a": 1}}), "expected a string"),
        "__metadata__ nested": (safetensors_file({"__metadata__": {"a": {"b": "c"}}}), "expected a string"),
    }


# --------------------------------------------------------------------------
# ONNX (protobuf written by hand)
# --------------------------------------------------------------------------

def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload) -> bytes:
    """A length-delimited field (wire type 2), or a varint (wire type 0) for an int payload."""
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def onnx_cases() -> dict:
    """name -> (bytes, text expected in the error)."""
    nested = field(2, b"innermost")  # GraphProto.name
    for _ in range(400):  # graph -> node -> attribute g -> graph ...
        attribute = field(1, b"then_branch") + field(20, 5) + field(6, nested)
        nested = field(1, field(4, b"If") + field(5, attribute))
    return {
        "12 bytes, a string of 2**31": (b"\x08\x07\x12" + varint(2**31) + b"abcd", "length of 2147483648"),
        "graph nested 400 deep": (field(1, 7) + field(7, nested), "nested more than"),
        "producer_name as a varint": (field(1, 7) + field(2, 5) + field(7, b""), "wire type 0"),
        "raw_data shorter than dims": (field(1, 7) + field(7, field(5, field(1, 1000) + field(2, 1) + field(9, b"abcd"))),
                                       "raw_data holds 4"),
        "dims of 2**63": (field(1, 7) + field(7, field(5, varint(1 << 3) + varint(2**63) + field(2, 1))), "negative dims"),
        "dims of 2**62 x 8": (field(1, 7) + field(7, field(5, field(1, varint(2**62) + varint(8)) + field(2, 1))), "the file holds 0"),
        "string not UTF-8": (field(1, 7) + field(2, b"\xff\xfe") + field(7, b""), "not UTF-8"),
        "270,000 empty nodes": (field(1, 7) + field(7, b"\x0a\x00" * 270_000), "more than 262144 nodes"),
    }
