"""Reading ONNX files defensively: missing, corrupt or truncated files and hostile external-data paths
become `ModelLoadError`s, never tracebacks."""

from __future__ import annotations

import mmap
import os
import stat
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
# opsets 22 to 26 changed the ops onnxlip reads only in the element types they accept (tests/test_import_forms.py
# converts models up to them); 26 is the newest onnxruntime 1.31 runs
SUPPORTED_OPSETS = range(7, 27)


def model_label(model: ModelLike) -> str:
    """A short human name for a model argument."""
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "<in-memory model>"
    return str(model)


def check_model_arg(model, what: str = "model") -> None:
    """OnnxlipError unless `model` is a path (str or os.PathLike) or an onnx.ModelProto: every public function
    takes its models through this layer, so a wrong kind of argument is one clear error, not pathlib's TypeError."""
    if isinstance(model, onnx.ModelProto):
        return
    if isinstance(model, (str, os.PathLike)) and not isinstance(model, bytes):
        try:
            path = os.fspath(model)
        except TypeError:
            path = None
        if isinstance(path, str) and path and "\0" not in path:
            return
        raise ModelLoadError(f"the {what} path {model!r} is not a usable file name")
    hint = " (serialized bytes: pass onnx.load_from_string(data))" if isinstance(model, (bytes, bytearray)) else ""
    raise ModelLoadError(
        f"the {what} must be a path (str or os.PathLike) or an onnx.ModelProto, got {type(model).__name__}{hint}"
    )


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Load a model from a path (with safe external data) or return a given ModelProto unchanged."""
    check_model_arg(model)
    if isinstance(model, onnx.ModelProto):
        proto = model
        if not proto.HasField("graph"):
            raise ModelLoadError(f"{model_label(model)}: the ModelProto holds no graph; nothing to analyse")
        if not proto.graph.node:
            raise ModelLoadError(f"{model_label(model)}: {_no_nodes(proto.graph)}")
        marked = [t.name for t in external_data_helper._get_all_tensors(proto) if _marked_external(t)]
        if marked:  # onnx reads them relative to the current folder (even where the proto holds the bytes too)
            raise ModelLoadError(
                f"{model_label(model)}: "
                + (f"initializer {marked[0]!r} is" if len(marked) == 1 else f"{len(marked)} initializers are")
                + f" marked as external data ({marked[0]!r}, ...), which onnx would read from files relative to "
                "the current folder; "
                "pass the model's path, or load it with onnx.load(path) (which reads the external data in)"
            )
    else:
        proto = _load_file(Path(model))
    _check_versions(proto)
    return proto


def _marked_external(tensor: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(tensor)


def load_with_arrays(model: ModelLike) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray | None]:
    """(proto, arrays, the file's bytes) for an import that needs no weights in the proto: the float initializers
    stored as raw data come as arrays that view the file's bytes in place (onnxlip/wire.py), and the proto omits
    their data (a few KB to parse). Files the scanner does not read (external data, ...) load as load_model does
    (no arrays, no bytes)."""
    if isinstance(model, onnx.ModelProto):
        return load_model(model), {}, None
    check_model_arg(model)
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
    fd, size = _open_regular(path)
    try:
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: the pages are mapped in one call
            mapped = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
        except (OSError, ValueError, AttributeError, TypeError):  # e.g. no mmap on this file system or platform
            data = _read_open(fd, size, path)
            data.flags.writeable = False
            return data
    finally:
        os.close(fd)  # (the map holds its own reference to the file)
    return np.frombuffer(mapped, np.uint8)


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages ("a pipe (FIFO)", "a character device", ...)."""
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _not_regular(path, mode: int) -> str:
    return f"{path}: not a regular file ({file_kind(mode)}); onnxlip reads models from regular files"


def _check_file(path: Path) -> None:
    """ModelLoadError unless `path` (followed through links) is a non-empty regular file. Only stat is used: a
    pipe or a device is never opened (opening a named pipe waits for a writer; /dev/zero never ends)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(_not_regular(path, st.st_mode))
    if st.st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")


def _open_regular(path: Path) -> tuple[int, int]:
    """(descriptor, size) of the regular file at `path`, opened for reading without blocking: a file swapped for a
    named pipe after the check is found by fstat, not waited on."""
    _check_file(path)
    try:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        os.close(fd)
        raise ModelLoadError(_not_regular(path, st.st_mode) if st.st_size else f"{path}: the file is empty")
    return fd, st.st_size


def _read(path: Path) -> np.ndarray:
    """The file's bytes, in a numpy buffer (arrays may view it)."""
    fd, size = _open_regular(path)
    try:
        return _read_open(fd, size, path)
    finally:
        os.close(fd)


def _read_open(fd: int, size: int, path: Path) -> np.ndarray:
    """`size` bytes from the open file `fd`, in a numpy buffer."""
    try:
        data = np.empty(size, np.uint8)
        view, got = memoryview(data), 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while got < size:  # one read returns at most about 2 GB on Linux
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
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
    # an ONNX writer sets the IR version before the graph: without it, the bytes that parsed are no model file
    if not proto.HasField("graph") or (proto.ir_version == 0 and not proto.graph.node):
        raise ModelLoadError(f"{path}: the file parses but holds no graph (truncated, or not an ONNX model)")
    if not proto.graph.node:
        raise ModelLoadError(f"{path}: {_no_nodes(proto.graph)}")
    _load_external_data(proto, path.parent.resolve(), path)
    return proto


def _no_nodes(graph: onnx.GraphProto) -> str:
    """Why a graph that is present but has no nodes cannot be analysed."""
    if not graph.input and not graph.output:
        return "the model's graph is empty: no nodes, inputs or outputs; nothing to analyse"
    return "the model's graph has no nodes (its outputs are inputs or initializers); nothing to analyse"


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
        try:
            st = os.stat(target)  # stat only: a pipe or a device is never opened (see _check_file)
        except OSError:
            raise ModelLoadError(f"{where}: no such file next to the model") from None
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{where}: not a regular file ({file_kind(st.st_mode)}); refusing to read it")
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else _tensor_bytes(tensor)
        size = st.st_size
        if offset < 0 or offset + length > size:
            raise ModelLoadError(f"{where}: the byte range lies past the end of the file (truncated?)")
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(proto, str(base))
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, onnx's ValidationError (a hard-linked file)
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
    _check_names(proto)
    if proto.ir_version == 0:
        raise ModelLoadError("the model's IR version is not set (0): not a complete ONNX model; re-export it")
    if proto.ir_version < SUPPORTED_IR_VERSIONS[0]:
        raise ModelLoadError(f"IR version {proto.ir_version} is too old (3 and above are read)")
    if proto.ir_version > onnx.IR_VERSION:  # a format newer than the onnx package knows: it may mean other things
        raise ModelLoadError(
            f"IR version {proto.ir_version} is newer than this onnx package reads ({onnx.IR_VERSION}); re-export "
            "with an older IR version"
        )
    # newer IR versions than 10 only add features: reading is safe, and the companion graph is ours (onnxruntime
    # 1.31 runs the models themselves up to IR 12; above, bound says that it has no observed samples)
    opset = default_opset(proto)
    if opset is not None and opset < SUPPORTED_OPSETS[0]:
        raise ModelLoadError(f"opset {opset} is too old (onnxlip reads opsets 7 to 26; upgrade the export)")
    if opset is not None and opset > SUPPORTED_OPSETS[-1]:
        raise ModelLoadError(
            f"opset {opset} is newer than onnxlip reads (7 to 26, the newest onnxruntime 1.31 runs); export with "
            "an older opset"
        )


def _check_names(proto: onnx.ModelProto) -> None:
    """An initializer or graph input defined twice has no single meaning: onnxruntime uses the last initializer of
    a name, onnx's helpers (and onnxlip's fast reader) the first, and onnxruntime refuses a repeated input."""
    g = proto.graph
    for what, names in (("initializer", [t.name for t in g.initializer]), ("graph input", [i.name for i in g.input])):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ModelLoadError(
                    f"{what} {name!r} is defined twice in the model: the two may hold different values, and tools "
                    "disagree on which one counts; re-export the model"
                )
            seen.add(name)


def default_opset(proto: onnx.ModelProto) -> int | None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def replaced_tensor(init: onnx.TensorProto, array: np.ndarray) -> onnx.TensorProto:
    """`init` with new values: its name, doc_string and metadata kept (numpy_helper.from_array writes only the
    name, dims, type and data; prune and rescale dropped the rest)."""
    out = onnx.numpy_helper.from_array(array, init.name)
    out.doc_string = init.doc_string
    if hasattr(init, "metadata_props"):
        out.metadata_props.extend(init.metadata_props)
    return out
