"""A small reader for ONNX ModelProto files, NumPy and the standard library only.

Mirror of the parts of onnx/onnx.proto (proto3) that a model export uses:
ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto. It exists so
that npsam can read the weights out of an exported SAM without the `onnx`
package (see npsam/io/onnx_import.py); it never runs a graph.

The protobuf wire format in brief: a message is a sequence of fields, each a
varint key `(field_number << 3) | wire_type` followed by its value:
wire type 0 a varint, 1 eight little-endian bytes, 2 a varint length and that
many bytes (strings, sub-messages, packed repeated numbers), 5 four bytes.

Dimension letters: none; tensors keep the shape stored in the file (`dims`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .checkpoint import CheckpointError

# TensorProto.DataType -> NumPy dtype (little-endian, as raw_data stores them).
DATA_TYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # FLOAT
    2: np.dtype("u1"),  # UINT8
    3: np.dtype("i1"),  # INT8
    4: np.dtype("<u2"),  # UINT16
    5: np.dtype("<i2"),  # INT16
    6: np.dtype("<i4"),  # INT32
    7: np.dtype("<i8"),  # INT64
    9: np.dtype("?"),  # BOOL
    10: np.dtype("<f2"),  # FLOAT16
    11: np.dtype("<f8"),  # DOUBLE
    12: np.dtype("<u4"),  # UINT32
    13: np.dtype("<u8"),  # UINT64
}

# AttributeProto.AttributeType
ATTR_FLOAT, ATTR_INT, ATTR_STRING, ATTR_TENSOR, ATTR_GRAPH = 1, 2, 3, 4, 5
ATTR_FLOATS, ATTR_INTS, ATTR_STRINGS, ATTR_TENSORS, ATTR_GRAPHS = 6, 7, 8, 9, 10


@dataclass(frozen=True)
class Tensor:
    """TensorProto: `array` has shape `dims` and the dtype of `data_type`."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    array: np.ndarray


@dataclass(frozen=True)
class Attribute:
    """AttributeProto: `value` is a float, int, str, Tensor, Graph or a list of them."""

    name: str
    type: int
    value: Any


@dataclass(frozen=True)
class Node:
    """NodeProto; `attributes` maps each attribute's name to its Attribute."""

    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Attribute]


@dataclass(frozen=True)
class Graph:
    """GraphProto: nodes in file order; inputs/outputs/value_info as names."""

    name: str
    nodes: list[Node]
    initializers: list[Tensor]
    inputs: list[str]
    outputs: list[str]
    value_info: list[str]


@dataclass(frozen=True)
class Model:
    """ModelProto: `opset_import` maps each domain ("" is the default) to its version."""

    ir_version: int
    producer_name: str
    producer_version: str
    opset_import: dict[str, int]
    graph: Graph
    metadata: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- wire format

# Bounds on what a file may state (checked before anything is allocated).
MAX_DEPTH = 16  # graphs inside attributes inside nodes inside graphs (If, Loop, Scan)
MAX_NDIM = 32  # a tensor's dims; SAM's weights have at most 4

# Python objects built from one file: nodes, attributes, tensors, names and
# list items. A node can be 2 bytes in the file and a kilobyte in memory, so
# their number, not the file's size, bounds what parsing costs (and its time:
# about 5 us each). MobileSAM's TinyViT export builds about 10,000.
MAX_OBJECTS = 1 << 18

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


class _Objects:
    """What one parse may still build (see MAX_OBJECTS)."""

    def __init__(self, left: int = MAX_OBJECTS) -> None:
        self.left = left

    def take(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise _error(f"more than {MAX_OBJECTS} nodes, attributes, tensors, names and values in one model")


def _error(message: str) -> CheckpointError:
    return CheckpointError(f"onnx file: {message}")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Read one varint at `pos`; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _error(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _error(f"varint longer than 10 bytes at byte {pos}")


def _signed(value: int) -> int:
    """int64/int32 fields store negatives as 64-bit two's complement."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _fields(buf: memoryview, wires: dict[int, tuple[int, ...]], message: str) -> Iterator[tuple[int, int, Any]]:
    """Yield (field_number, wire_type, value) for each field of one message.

    value is an int for wire types 0, 1 and 5 (the raw bits for 1 and 5) and a
    memoryview for wire type 2. Every length is checked against the bytes left
    in the message before it is used; a known field (a key of ``wires``) must
    come with one of its wire types (a protobuf parser would refuse it too).
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value, pos = _varint(buf, pos)
        elif wire == WIRE_I64 or wire == WIRE_I32:
            size = 8 if wire == WIRE_I64 else 4
            if size > end - pos:
                raise _error(f"{message} field {number}: {size} bytes stated, {end - pos} left")
            value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
        elif wire == WIRE_LEN:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise _error(f"{message} field {number}: a length of {length} bytes, only {end - pos} left")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise _error(f"{message} field {number}: unsupported protobuf wire type {wire}")
        if number in wires and wire not in wires[number]:
            raise _error(f"{message} field {number}: wire type {wire}, expected {' or '.join(map(str, wires[number]))}")
        yield number, wire, value


def _packed_varints(wire: int, value, objects: "_Objects") -> list[int]:
    """A repeated int field: either one unpacked varint or a packed run."""
    if wire == WIRE_VARINT:
        objects.take()
        return [_signed(value)]
    objects.take(sum(1 for b in value if b < 0x80))  # one value ends at each byte below 0x80
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    return out


def _packed_int64s(wire: int, value) -> np.ndarray:
    """A repeated int field of a tensor as an int64 array, decoded in NumPy: a
    packed run of millions of values costs 8 bytes each, not a Python int each."""
    if wire == WIRE_VARINT:
        return np.array([value], dtype=np.uint64).view(np.int64)
    b = np.frombuffer(value, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    if b[-1] >= 0x80:
        raise _error("a packed run of varints ends inside a varint")
    ends = np.flatnonzero(b < 0x80)  # the last byte of each varint
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise _error("a varint longer than 10 bytes in a packed run")
    shift = (np.arange(b.size) - np.repeat(starts, lengths)) * 7  # bit position of each byte's 7 bits
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)  # bits beyond 64 drop, as in protobuf
    return np.bitwise_or.reduceat(parts, starts).view(np.int64)  # two's complement, as _signed


def _packed_fixed(wire: int, value, dtype: str) -> np.ndarray:
    """A repeated float/double field: one unpacked value (wire 5/1) or a packed run (wire 2)."""
    size = np.dtype(dtype).itemsize
    if wire == WIRE_LEN:
        if len(value) % size:
            raise _error(f"a packed run of {len(value)} bytes is not a whole number of {dtype} values")
        return np.frombuffer(value, dtype=dtype)
    return np.frombuffer(int(value).to_bytes(size, "little"), dtype=dtype)


def _text(value) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _error(f"a string that is not UTF-8 ({e.reason} at byte {e.start})") from None


def _show(text: str) -> str:
    from .checkpoint import _show

    return _show(text)


# ---------------------------------------------------------------- messages

_PACKED_INT = (WIRE_VARINT, WIRE_LEN)
_TENSOR_WIRES = {1: _PACKED_INT, 2: (WIRE_VARINT,), 4: (WIRE_I32, WIRE_LEN), 5: _PACKED_INT, 6: (WIRE_LEN,),
                 7: _PACKED_INT, 8: (WIRE_LEN,), 9: (WIRE_LEN,), 10: (WIRE_I64, WIRE_LEN), 11: _PACKED_INT,
                 13: (WIRE_LEN,), 14: (WIRE_VARINT,)}


def parse_tensor(buf: memoryview, objects: Optional[_Objects] = None) -> Tensor:
    """TensorProto -> Tensor. External data raises CheckpointError."""
    objects = objects or _Objects()
    objects.take()
    name, data_type, dims = "", 0, []
    raw = None
    typed: dict[int, list] = {}  # field number -> list of arrays (float_data, int32_data, ...)
    for number, wire, value in _fields(buf, _TENSOR_WIRES, "TensorProto"):
        if number == 1:  # dims
            if wire == WIRE_LEN and sum(1 for b in value if b < 0x80) > MAX_NDIM:
                raise _error(f"tensor {_show(name)}: more than {MAX_NDIM} dims")
            dims += _packed_varints(wire, value, objects)
            if len(dims) > MAX_NDIM:
                raise _error(f"tensor {_show(name)}: more than {MAX_NDIM} dims")
        elif number == 2:  # data_type
            data_type = _signed(value)
        elif number == 8:  # name
            name = _text(value)
        elif number == 9:  # raw_data
            raw = value
        elif number == 4:  # float_data
            typed.setdefault(4, []).append(_packed_fixed(wire, value, "<f4"))
        elif number == 10:  # double_data
            typed.setdefault(10, []).append(_packed_fixed(wire, value, "<f8"))
        elif number in (5, 7, 11):  # int32_data, int64_data, uint64_data
            typed.setdefault(number, []).append(_packed_int64s(wire, value))
        elif number == 13:  # external_data
            raise _error(f"tensor {_show(name)}: external data is not supported (expected the weights inside the file)")
        elif number == 14 and value == 1:  # data_location = EXTERNAL
            raise _error(f"tensor {_show(name)}: external data is not supported (expected the weights inside the file)")
        elif number == 6:  # string_data
            raise _error(f"tensor {_show(name)}: string tensors are not supported")
    if data_type not in DATA_TYPES:
        raise _error(f"tensor {_show(name)}: data_type {data_type} is not supported (expected one of {sorted(DATA_TYPES)})")
    if any(d < 0 for d in dims):
        raise _error(f"tensor {_show(name)}: negative dims {dims}")
    dtype = DATA_TYPES[data_type]
    shape = tuple(dims)
    count = math.prod(shape)  # Python ints: no overflow, whatever the file claims
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise _error(f"tensor {_show(name)}: dims {shape} need {count * dtype.itemsize} bytes of "
                         f"{dtype}, raw_data holds {len(raw)}")
        array = np.frombuffer(raw, dtype=dtype).copy()
    elif typed:
        if len(typed) != 1:
            raise _error(f"tensor {_show(name)}: values in {len(typed)} different typed fields")
        (number, parts), = typed.items()
        values = np.concatenate(parts)
        if values.size != count:
            raise _error(f"tensor {_show(name)}: dims {shape} need {count} values, the file holds {values.size}")
        if number == 5 and data_type == 10:
            # NOTE(reference): float16 values travel in int32_data as their uint16 bit patterns.
            array = values.astype(np.uint16).view(np.float16)
        elif number == 11:
            array = values.view(np.uint64).astype(dtype)
        else:
            array = values.astype(dtype)
    else:
        array = np.zeros(0, dtype=dtype)
    if array.size != count:
        raise _error(f"tensor {_show(name)}: dims {shape} need {count} values, the file holds {array.size}")
    return Tensor(name=name, data_type=data_type, dims=shape, array=array.reshape(shape))


_ATTRIBUTE_WIRES = {1: (WIRE_LEN,), 20: (WIRE_VARINT,), 2: (WIRE_I32,), 3: (WIRE_VARINT,), 4: (WIRE_LEN,),
                    5: (WIRE_LEN,), 6: (WIRE_LEN,), 7: (WIRE_I32, WIRE_LEN), 8: _PACKED_INT, 9: (WIRE_LEN,),
                    10: (WIRE_LEN,), 11: (WIRE_LEN,)}


def parse_attribute(buf: memoryview, depth: int = 0, objects: Optional[_Objects] = None) -> Attribute:
    """AttributeProto -> Attribute (single values, lists, tensors and graphs)."""
    objects = objects or _Objects()
    objects.take()
    name, attr_type = "", 0
    scalar: Any = None
    floats: list[float] = []
    ints: list[int] = []
    strings: list[str] = []
    tensors: list[Tensor] = []
    graphs: list[Graph] = []
    for number, wire, value in _fields(buf, _ATTRIBUTE_WIRES, "AttributeProto"):
        if number == 1:
            name = _text(value)
        elif number == 20:
            attr_type = value
        elif number == 2:  # f
            scalar = float(np.frombuffer(value.to_bytes(4, "little"), dtype="<f4")[0])
        elif number == 3:  # i
            scalar = _signed(value)
        elif number == 4:  # s
            scalar = _text(value)
        elif number == 5:  # t
            scalar = parse_tensor(value, objects)
        elif number == 6:  # g
            scalar = parse_graph(value, depth + 1, objects)
        elif number == 7:  # floats
            run = _packed_fixed(wire, value, "<f4")
            objects.take(run.size)
            floats += run.tolist()
        elif number == 8:  # ints
            ints += _packed_varints(wire, value, objects)
        elif number == 9:  # strings
            objects.take()
            strings.append(_text(value))
        elif number == 10:  # tensors
            tensors.append(parse_tensor(value, objects))
        elif number == 11:  # graphs
            graphs.append(parse_graph(value, depth + 1, objects))
    lists = {ATTR_FLOATS: floats, ATTR_INTS: ints, ATTR_STRINGS: strings,
             ATTR_TENSORS: tensors, ATTR_GRAPHS: graphs}
    value = lists[attr_type] if attr_type in lists else scalar
    return Attribute(name=name, type=attr_type, value=value)


_NODE_WIRES = {1: (WIRE_LEN,), 2: (WIRE_LEN,), 3: (WIRE_LEN,), 4: (WIRE_LEN,), 5: (WIRE_LEN,), 7: (WIRE_LEN,)}


def parse_node(buf: memoryview, depth: int = 0, objects: Optional[_Objects] = None) -> Node:
    """NodeProto -> Node."""
    objects = objects or _Objects()
    objects.take()
    name = op_type = domain = ""
    inputs: list[str] = []
    outputs: list[str] = []
    attributes: dict[str, Attribute] = {}
    for number, _, value in _fields(buf, _NODE_WIRES, "NodeProto"):
        if number == 1:
            objects.take()
            inputs.append(_text(value))
        elif number == 2:
            objects.take()
            outputs.append(_text(value))
        elif number == 3:
            name = _text(value)
        elif number == 4:
            op_type = _text(value)
        elif number == 7:
            domain = _text(value)
        elif number == 5:
            attr = parse_attribute(value, depth, objects)
            attributes[attr.name] = attr
    return Node(name=name, op_type=op_type, domain=domain, inputs=tuple(inputs),
                outputs=tuple(outputs), attributes=attributes)


def _value_info_name(buf: memoryview) -> str:
    for number, _, value in _fields(buf, {1: (WIRE_LEN,)}, "ValueInfoProto"):
        if number == 1:
            return _text(value)
    return ""


_GRAPH_WIRES = {1: (WIRE_LEN,), 2: (WIRE_LEN,), 5: (WIRE_LEN,), 11: (WIRE_LEN,), 12: (WIRE_LEN,), 13: (WIRE_LEN,)}


def parse_graph(buf: memoryview, depth: int = 0, objects: Optional[_Objects] = None) -> Graph:
    """GraphProto -> Graph (a subgraph of an attribute is one level deeper)."""
    if depth > MAX_DEPTH:
        raise _error(f"graphs nested more than {MAX_DEPTH} deep")
    objects = objects or _Objects()
    objects.take()
    name = ""
    nodes: list[Node] = []
    initializers: list[Tensor] = []
    inputs: list[str] = []
    outputs: list[str] = []
    value_info: list[str] = []
    for number, _, value in _fields(buf, _GRAPH_WIRES, "GraphProto"):
        if number == 1:
            nodes.append(parse_node(value, depth, objects))
        elif number == 2:
            name = _text(value)
        elif number == 5:
            initializers.append(parse_tensor(value, objects))
        elif number in (11, 12, 13):
            objects.take()
            {11: inputs, 12: outputs, 13: value_info}[number].append(_value_info_name(value))
        elif number == 15:
            raise _error(f"graph {_show(name)}: sparse initializers are not supported")
    return Graph(name=name, nodes=nodes, initializers=initializers, inputs=inputs,
                 outputs=outputs, value_info=value_info)


_MODEL_WIRES = {1: (WIRE_VARINT,), 2: (WIRE_LEN,), 3: (WIRE_LEN,), 7: (WIRE_LEN,), 8: (WIRE_LEN,), 14: (WIRE_LEN,)}


def parse_model(data: bytes) -> Model:
    """ModelProto bytes -> Model."""
    buf = memoryview(data)
    objects = _Objects()
    ir_version, producer_name, producer_version = 0, "", ""
    opset_import: dict[str, int] = {}
    metadata: dict[str, str] = {}
    graph = None
    for number, _, value in _fields(buf, _MODEL_WIRES, "ModelProto"):
        if number == 1:
            ir_version = value
        elif number == 2:
            producer_name = _text(value)
        elif number == 3:
            producer_version = _text(value)
        elif number == 7:
            graph = parse_graph(value, 0, objects)
        elif number == 8:  # OperatorSetIdProto: domain = 1, version = 2
            objects.take()
            domain, version = "", 0
            for n, _, v in _fields(value, {1: (WIRE_LEN,), 2: (WIRE_VARINT,)}, "OperatorSetIdProto"):
                if n == 1:
                    domain = _text(v)
                elif n == 2:
                    version = _signed(v)
            opset_import[domain] = version
        elif number == 14:  # StringStringEntryProto: key = 1, value = 2
            objects.take()
            entry = {n: _text(v) for n, _, v in _fields(value, {1: (WIRE_LEN,), 2: (WIRE_LEN,)}, "StringStringEntryProto")
                     if n in (1, 2)}
            metadata[entry.get(1, "")] = entry.get(2, "")
    if graph is None:
        raise _error("expected a ModelProto with a graph, found no graph field")
    return Model(ir_version=ir_version, producer_name=producer_name, producer_version=producer_version,
                 opset_import=opset_import, graph=graph, metadata=metadata)


def load_model(path: str | os.PathLike) -> Model:
    """Read an .onnx file (weights inside the file) into a Model.

    Any failure is a CheckpointError (a ValueError) naming the file: the reader
    checks every length against the bytes left, every known field's wire
    type, the nesting depth and tensor sizes, so that a hostile or corrupt file
    costs at most about its own size.
    """
    from .checkpoint import _reading

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected an existing .onnx file, got {str(path)!r}")
    data = path.read_bytes()
    return _reading("onnx file", str(path), lambda: parse_model(data))
