"""A small reader for ONNX ModelProto files, NumPy and the standard library only.

Mirror of the parts of onnx/onnx.proto (proto3) that a model export uses:
ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto. It exists so
that npsam can read the weights out of an exported SAM without the `onnx`
package (see npsam/onnx_import.py); it never runs a graph.

The protobuf wire format in brief: a message is a sequence of fields, each a
varint key `(field_number << 3) | wire_type` followed by its value:
wire type 0 a varint, 1 eight little-endian bytes, 2 a varint length and that
many bytes (strings, sub-messages, packed repeated numbers), 5 four bytes.

Dimension letters: none; tensors keep the shape stored in the file (`dims`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

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


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Read one varint at `pos`; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError(f"onnx file: truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError(f"onnx file: varint longer than 10 bytes at byte {pos}")


def _signed(value: int) -> int:
    """int64/int32 fields store negatives as 64-bit two's complement."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield (field_number, wire_type, value) for each field of one message.

    value is an int for wire types 0, 1 and 5 (the raw bits for 1 and 5) and a
    memoryview for wire type 2.
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"onnx file: unsupported protobuf wire type {wire} (field {number})")
        if pos > end:
            raise ValueError(f"onnx file: field {number} runs past the end of its message")
        yield number, wire, value


def _packed_varints(wire: int, value) -> list[int]:
    """A repeated int field: either one unpacked varint or a packed run."""
    if wire == 0:
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    return out


def _packed_fixed(wire: int, value, dtype: str) -> np.ndarray:
    """A repeated float/double field: one unpacked value (wire 5/1) or a packed run (wire 2)."""
    if wire == 2:
        return np.frombuffer(value, dtype=dtype)
    size = np.dtype(dtype).itemsize
    return np.frombuffer(int(value).to_bytes(size, "little"), dtype=dtype)


def _text(value) -> str:
    return bytes(value).decode("utf-8")


# ---------------------------------------------------------------- messages


def parse_tensor(buf: memoryview) -> Tensor:
    """TensorProto -> Tensor. External data raises ValueError."""
    name, data_type, dims = "", 0, []
    raw = None
    typed: dict[int, list] = {}  # field number -> list of arrays (float_data, int32_data, ...)
    for number, wire, value in _fields(buf):
        if number == 1:  # dims
            dims += _packed_varints(wire, value)
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
            typed.setdefault(number, []).append(np.array(_packed_varints(wire, value), dtype=np.int64))
        elif number == 13:  # external_data
            raise ValueError(f"onnx tensor {name!r}: external data is not supported (expected the weights inside the file)")
        elif number == 14 and value == 1:  # data_location = EXTERNAL
            raise ValueError(f"onnx tensor {name!r}: external data is not supported (expected the weights inside the file)")
        elif number == 6:  # string_data
            raise ValueError(f"onnx tensor {name!r}: string tensors are not supported")
    if data_type not in DATA_TYPES:
        raise ValueError(f"onnx tensor {name!r}: data_type {data_type} is not supported (expected one of {sorted(DATA_TYPES)})")
    dtype = DATA_TYPES[data_type]
    shape = tuple(dims)
    count = int(np.prod(shape, dtype=np.int64))
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype).copy()
    elif typed:
        (number, parts), = typed.items()
        values = np.concatenate(parts) if parts else np.zeros(0)
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
        raise ValueError(f"onnx tensor {name!r}: dims {shape} need {count} values, the file holds {array.size}")
    return Tensor(name=name, data_type=data_type, dims=shape, array=array.reshape(shape))


def parse_attribute(buf: memoryview) -> Attribute:
    """AttributeProto -> Attribute (single values, lists, tensors and graphs)."""
    name, attr_type = "", 0
    scalar: Any = None
    floats: list[float] = []
    ints: list[int] = []
    strings: list[str] = []
    tensors: list[Tensor] = []
    graphs: list[Graph] = []
    for number, wire, value in _fields(buf):
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
            scalar = parse_tensor(value)
        elif number == 6:  # g
            scalar = parse_graph(value)
        elif number == 7:  # floats
            floats += [float(x) for x in _packed_fixed(wire, value, "<f4")]
        elif number == 8:  # ints
            ints += _packed_varints(wire, value)
        elif number == 9:  # strings
            strings.append(_text(value))
        elif number == 10:  # tensors
            tensors.append(parse_tensor(value))
        elif number == 11:  # graphs
            graphs.append(parse_graph(value))
    lists = {ATTR_FLOATS: floats, ATTR_INTS: ints, ATTR_STRINGS: strings,
             ATTR_TENSORS: tensors, ATTR_GRAPHS: graphs}
    value = lists[attr_type] if attr_type in lists else scalar
    return Attribute(name=name, type=attr_type, value=value)


def parse_node(buf: memoryview) -> Node:
    """NodeProto -> Node."""
    name = op_type = domain = ""
    inputs: list[str] = []
    outputs: list[str] = []
    attributes: dict[str, Attribute] = {}
    for number, _, value in _fields(buf):
        if number == 1:
            inputs.append(_text(value))
        elif number == 2:
            outputs.append(_text(value))
        elif number == 3:
            name = _text(value)
        elif number == 4:
            op_type = _text(value)
        elif number == 7:
            domain = _text(value)
        elif number == 5:
            attr = parse_attribute(value)
            attributes[attr.name] = attr
    return Node(name=name, op_type=op_type, domain=domain, inputs=tuple(inputs),
                outputs=tuple(outputs), attributes=attributes)


def _value_info_name(buf: memoryview) -> str:
    for number, _, value in _fields(buf):
        if number == 1:
            return _text(value)
    return ""


def parse_graph(buf: memoryview) -> Graph:
    """GraphProto -> Graph."""
    name = ""
    nodes: list[Node] = []
    initializers: list[Tensor] = []
    inputs: list[str] = []
    outputs: list[str] = []
    value_info: list[str] = []
    for number, _, value in _fields(buf):
        if number == 1:
            nodes.append(parse_node(value))
        elif number == 2:
            name = _text(value)
        elif number == 5:
            initializers.append(parse_tensor(value))
        elif number == 11:
            inputs.append(_value_info_name(value))
        elif number == 12:
            outputs.append(_value_info_name(value))
        elif number == 13:
            value_info.append(_value_info_name(value))
        elif number == 15:
            raise ValueError(f"onnx graph {name!r}: sparse initializers are not supported")
    return Graph(name=name, nodes=nodes, initializers=initializers, inputs=inputs,
                 outputs=outputs, value_info=value_info)


def parse_model(data: bytes) -> Model:
    """ModelProto bytes -> Model."""
    buf = memoryview(data)
    ir_version, producer_name, producer_version = 0, "", ""
    opset_import: dict[str, int] = {}
    metadata: dict[str, str] = {}
    graph = None
    for number, _, value in _fields(buf):
        if number == 1:
            ir_version = value
        elif number == 2:
            producer_name = _text(value)
        elif number == 3:
            producer_version = _text(value)
        elif number == 7:
            graph = parse_graph(value)
        elif number == 8:  # OperatorSetIdProto: domain = 1, version = 2
            domain, version = "", 0
            for n, _, v in _fields(value):
                if n == 1:
                    domain = _text(v)
                elif n == 2:
                    version = _signed(v)
            opset_import[domain] = version
        elif number == 14:  # StringStringEntryProto: key = 1, value = 2
            entry = {n: _text(v) for n, _, v in _fields(value)}
            metadata[entry.get(1, "")] = entry.get(2, "")
    if graph is None:
        raise ValueError("onnx file: expected a ModelProto with a graph, found no graph field")
    return Model(ir_version=ir_version, producer_name=producer_name, producer_version=producer_version,
                 opset_import=opset_import, graph=graph, metadata=metadata)


def load_model(path: str | os.PathLike) -> Model:
    """Read an .onnx file (weights inside the file) into a Model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected an existing .onnx file, got {str(path)!r}")
    return parse_model(path.read_bytes())
