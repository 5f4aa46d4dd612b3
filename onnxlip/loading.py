"""Reading ONNX files defensively: missing, corrupt or truncated files and hostile external-data paths
become `ModelLoadError`s, never tracebacks."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from . import wire
from .errors import ModelLoadError

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

SUPPORTED_IR_VERSIONS = range(3, 11)
SUPPORTED_OPSETS = range(7, 22)


def model_label(model: ModelLike) -> str:
    """A short human name for a model argument."""
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return str(model)


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Load a model from a path (with safe external data) or return a given ModelProto unchanged."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        proto = _load_file(Path(model))
    _check_versions(proto)
    return proto


def load_with_arrays(model: ModelLike) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray | None]:
    """(proto, arrays, the file's bytes) for an import that needs no weights in the proto: the float initializers
    stored as raw data come as arrays that view the file's bytes in place (onnxlip/wire.py), and the proto omits
    their data (a few KB to parse). Files the scanner does not read (external data, ...) load as load_model does
    (no arrays, no bytes)."""
    if isinstance(model, onnx.ModelProto):
        return load_model(model), {}, None
    path = Path(model)
    data = map_file(path)
    try:
        skeleton, tensors = wire.strip(memoryview(data))
    except (wire.WireError, UnicodeDecodeError):
        proto = _parsed(data, path)
        _check_versions(proto)
        return proto, {}, None
    proto = _parsed(skeleton, path)
    _check_versions(proto)
    return proto, {name: wire.array(data, t) for name, t in tensors.items()}, data


def map_file(path: Path) -> np.ndarray:
    """The file's bytes as a read-only numpy view of a memory map (the IR's weights view these bytes, and nothing
    may change them in place). Mapping the page cache avoids reading a copy into fresh memory (10-25 ms for a
    45 MB file on the benchmark machine: benchmarks/README.md). Falls back to reading where mapping fails.
    A file must not shrink while its map is in use: reading past its new end kills the process (SIGBUS), as it
    does for every tool that maps model files (onnxruntime's external data, safetensors)."""
    _check_file(path)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: the pages are mapped in one call
        with open(path, "rb", buffering=0) as f:
            mapped = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    except (OSError, ValueError, AttributeError, TypeError):  # e.g. no mmap on this file system or platform
        data = _read(path)
        data.flags.writeable = False
        return data
    return np.frombuffer(mapped, np.uint8)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one existing file (through links of either kind): outputs never replace inputs."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty")


def _read(path: Path) -> np.ndarray:
    """The file's bytes, in a numpy buffer (arrays may view it)."""
    _check_file(path)
    size = path.stat().st_size
    try:
        data = np.empty(size, np.uint8)
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(memoryview(data))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror})") from None
    except MemoryError:
        raise ModelLoadError(f"{path}: the file ({size} bytes) does not fit in memory") from None
    if got != size:
        raise ModelLoadError(f"{path}: the file changed while it was read")
    return data


def _load_file(path: Path) -> onnx.ModelProto:
    return _parsed(_read(path), path)


def _parsed(data, path: Path) -> onnx.ModelProto:
    """ParseFromString with our errors, then the checks every loaded model gets (graph, external data)."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data if isinstance(data, bytes) else memoryview(data))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX protobuf (corrupt or truncated file?): {exc}") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelLoadError(f"{path}: the file parses but holds no graph (truncated, or not an ONNX model)")
    _load_external_data(proto, path.parent.resolve(), path)
    return proto


def _load_external_data(proto: onnx.ModelProto, base: Path, path: Path) -> None:
    """Resolve external tensors, refusing absolute paths, '..' escapes, links out of the model's folder
    and ranges past the end of the file."""
    tensors = [t for t in external_data_helper._get_all_tensors(proto) if external_data_helper.uses_external_data(t)]
    for tensor in tensors:
        try:
            info = external_data_helper.ExternalDataInfo(tensor)  # parses offset and length as integers
        except ValueError as exc:
            why = f"{path}: initializer {tensor.name!r} has unreadable external data fields: {exc}"
            raise ModelLoadError(why) from None
        location = info.location or ""
        where = f"{path}: initializer {tensor.name!r} has external data at {location!r}"
        if "\0" in location:
            raise ModelLoadError(f"{where}: the path holds a NUL byte")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise ModelLoadError(f"{where}: only relative paths inside the model's folder are allowed")
        target = (base / location).resolve()
        if base not in target.parents:
            raise ModelLoadError(f"{where}: the path leaves the model's folder; refusing to read it")
        if not target.is_file():
            raise ModelLoadError(f"{where}: no such file next to the model")
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else _tensor_bytes(tensor)
        size = target.stat().st_size
        if offset < 0 or offset + length > size:
            raise ModelLoadError(f"{where}: the byte range lies past the end of the file (truncated?)")
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(proto, str(base))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read external data: {exc}") from None


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's raw data needs, from its dims and element type."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    count = 1
    for d in tensor.dims:
        count *= int(d)
    return count * itemsize


def _check_versions(proto: onnx.ModelProto) -> None:
    if proto.ir_version and proto.ir_version not in SUPPORTED_IR_VERSIONS:
        if proto.ir_version > SUPPORTED_IR_VERSIONS[-1]:
            # Newer IR versions only add features; reading is safe, the companion graph is ours.
            return
        raise ModelLoadError(f"IR version {proto.ir_version} is not supported (3 to 10 are)")
    opset = default_opset(proto)
    if opset is not None and opset < SUPPORTED_OPSETS[0]:
        raise ModelLoadError(f"opset {opset} is too old (onnxlip reads opsets 7 to 21; upgrade the export)")


def default_opset(proto: onnx.ModelProto) -> int | None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None
