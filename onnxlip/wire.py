"""The protobuf wire format of ONNX files (https://protobuf.dev/programming-guides/encoding/), read just deep
enough to find where each float initializer's raw_data lies, so that big weights are used in place instead of
being copied by the protobuf parser and again by numpy_helper.to_array (fresh memory is slow on our machines).

`scan` gives the file's skeleton (every byte outside those payloads: two files with equal skeletons parse to equal
protos up to raw_data) and the payloads' places; `strip` gives a valid serialized ModelProto without those
payloads, small and quick to parse. Anything unusual (external data, duplicate graphs, groups, a raw_data length
that does not match the dims) raises WireError, and callers fall back to onnx's own parser."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

# field numbers of onnx.proto3
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 8, 9
_TENSOR_PLAIN_FIELDS = {_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW, 12}  # 12: doc_string
_TENSOR_EXTERNAL = {3, 13, 14}  # segment, external_data, data_location
_RAW_DTYPES = {onnx.TensorProto.FLOAT: np.dtype("<f4"), onnx.TensorProto.DOUBLE: np.dtype("<f8")}


class WireError(Exception):
    """Not a file this scanner reads: the caller takes the full path (onnx's parser, with its errors)."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, payload start, payload end, value) for each field in buf[start:end]."""
    for field in _fields_with_keys(buf, start, end):
        yield field[1:]


def _fields_with_keys(buf: memoryview, start: int, end: int):
    """(key start, field number, wire type, payload start, payload end, value) for each field."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, after = _varint(buf, pos, end)
            yield key_start, number, wire, pos, after, value
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
            if after > end:
                raise WireError
            yield key_start, number, wire, pos, after, None
        elif wire in (1, 5):
            after = pos + (8 if wire == 1 else 4)
            if after > end:
                raise WireError
            yield key_start, number, wire, pos, after, None
        else:  # groups: not in ONNX files
            raise WireError
        pos = after


@dataclass(frozen=True)
class RawTensor:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # of the raw_data payload in the file
    end: int


def scan(buf: memoryview) -> tuple[bytes, dict[str, RawTensor]]:
    """(skeleton, {initializer name: where its raw data lies}) of a serialized ModelProto, for the float32 and
    float64 initializers stored as raw_data; WireError for what this fast path does not read (no single graph,
    external data, a raw_data length that does not match the dims)."""
    holes: list[tuple[int, int]] = []
    tensors: dict[str, RawTensor] = {}
    graphs = [f for f in _fields(buf, 0, len(buf)) if f[0] == _MODEL_GRAPH]
    if len(graphs) != 1 or graphs[0][1] != 2:
        raise WireError
    _, _, gstart, gend, _ = graphs[0]
    for number, wire, start, end, _ in _fields(buf, gstart, gend):
        if number != _GRAPH_INITIALIZER:
            continue
        if wire != 2:
            raise WireError
        found = _tensor(buf, start, end)
        if found is None:
            continue
        name, tensor = found
        if name in tensors:
            raise WireError
        tensors[name] = tensor
        holes.append((tensor.start, tensor.end))
    pieces, pos = [], 0
    for start, end in sorted(holes):
        pieces.append(buf[pos:start])
        pos = end
    pieces.append(buf[pos:])
    return b"".join(pieces), tensors


def _tensor(buf: memoryview, start: int, end: int) -> tuple[str, RawTensor] | None:
    """(name, where its raw data lies) of a float32/float64 initializer stored as raw_data; None for others,
    whose every byte then stays in the skeleton (any change sends the variant to the full import)."""
    dims: list[int] = []
    data_type = name = raw = None
    plain = True
    for number, wire, s, e, value in _fields(buf, start, end):
        if number in _TENSOR_EXTERNAL:  # the values live elsewhere: equal bytes here prove nothing
            raise WireError
        if number not in _TENSOR_PLAIN_FIELDS:  # float_data, int64_data, ...: compared as skeleton bytes
            plain = False
        elif number == _TENSOR_DIMS:
            if wire == 0:
                dims.append(value)
            else:  # packed
                pos = s
                while pos < e:
                    d, pos = _varint(buf, pos, e)
                    dims.append(d)
        elif number == _TENSOR_DATA_TYPE and wire == 0:
            data_type = value
        elif number == _TENSOR_NAME and wire == 2:
            name = bytes(buf[s:e]).decode("utf-8", errors="strict")
        elif number == _TENSOR_RAW and wire == 2:
            if raw is not None:
                raise WireError
            raw = (s, e)
    dtype = _RAW_DTYPES.get(data_type)
    if not plain or name is None or raw is None or dtype is None:
        return None
    if any(d >= 2**40 for d in dims):
        raise WireError
    count = math.prod(dims)  # Python ints: an int64 product of dims near 2**40 each wraps
    if raw[1] - raw[0] != count * dtype.itemsize:
        raise WireError
    return name, RawTensor(dtype, tuple(dims), raw[0], raw[1])


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def strip(buf: memoryview) -> tuple[bytes, dict[str, RawTensor]]:
    """A serialized ModelProto equal to buf's except that the float initializers found by `scan` have no
    raw_data (their dims, type and name stay), and where their payloads lie in buf."""
    _, tensors = scan(buf)
    holes = {(t.start, t.end) for t in tensors.values()}
    out = []
    for key_start, number, _, start, end, _ in _fields_with_keys(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            out.append(bytes(buf[key_start:end]))
            continue
        graph = []
        for g_key, g_number, _, g_start, g_end, _ in _fields_with_keys(buf, start, end):
            fields = list(_fields_with_keys(buf, g_start, g_end)) if g_number == _GRAPH_INITIALIZER else []
            if not any((s, e) in holes for _, n, _, s, e, _ in fields if n == _TENSOR_RAW):
                graph.append(bytes(buf[g_key:g_end]))
                continue
            kept = b"".join(bytes(buf[k:e]) for k, n, _, _, e, _ in fields if n != _TENSOR_RAW)
            graph.append(_message(_GRAPH_INITIALIZER, kept))
        out.append(_message(_MODEL_GRAPH, b"".join(graph)))
    return b"".join(out), tensors


def array(buf, t: RawTensor) -> np.ndarray:
    """The tensor's values in place (a view of buf)."""
    return np.frombuffer(buf, t.dtype, math.prod(t.shape), t.start).reshape(t.shape)
