"""The wire-format reader (onnxlip/wire.py) and the in-place weight loading built on it: the stripped protobuf
must equal onnx's own parse minus the float raw data, the arrays must equal numpy_helper's, imports through it
must give the same IR, and every file it cannot read must take onnx's parser (with its errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip import wire
from onnxlip.errors import ModelLoadError, OnnxlipError
from onnxlip.importer import ImportOptions, import_model
from onnxlip.loading import load_with_arrays
from tests import dag_factory as F

MODELS = Path(__file__).resolve().parent.parent / "models"


def _files(tmp_path: Path) -> list[Path]:
    out = sorted(MODELS.glob("*.onnx"))
    for family in ("batchnorm", "layout", "mixed", "convtranspose"):
        path = tmp_path / f"{family}.onnx"
        onnx.save(F.build(family, 0).model, str(path))
        out.append(path)
    return out


def _without_float_raw(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.raw_data and init.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
            init.ClearField("raw_data")
    return out


def test_strip_equals_the_parse_without_float_raw_data(tmp_path):
    for path in _files(tmp_path):
        data = path.read_bytes()
        stripped, tensors = wire.strip(memoryview(data))
        model = onnx.load(str(path))
        assert onnx.ModelProto.FromString(stripped) == _without_float_raw(model)
        raw = {i.name: i for i in model.graph.initializer if i.raw_data and i.data_type == TensorProto.FLOAT}
        assert tensors.keys() == raw.keys()
        for name, t in tensors.items():
            np.testing.assert_array_equal(wire.array(data, t), numpy_helper.to_array(raw[name]))


def test_imports_through_the_arrays_equal_the_full_import(tmp_path):
    for path in _files(tmp_path):
        output = ["add_result2"] if "mlp" in path.name else None
        proto, arrays, _ = load_with_arrays(path)
        fast = import_model(proto, ImportOptions(outputs=output), arrays)
        full = import_model(onnx.load(str(path)), ImportOptions(outputs=output))
        assert [p.name for p in fast.params()] == [p.name for p in full.params()]
        for a, b in zip(fast.params(), full.params()):
            assert a.value.dtype == b.value.dtype and np.array_equal(a.value, b.value)
        assert (
            onnxlip.path_norm(path, output=output).log10_path_norm
            == onnxlip.path_norm(onnx.load(str(path)), output=output).log10_path_norm
        )


def test_files_the_reader_does_not_take_load_as_before(tmp_path):
    model = F.build("batchnorm", 1).model
    # float_data instead of raw_data: no arrays, the proto holds the values
    as_floats = onnx.ModelProto.FromString(model.SerializeToString())
    for init in as_floats.graph.initializer:
        values = numpy_helper.to_array(init)
        init.CopyFrom(helper.make_tensor(init.name, init.data_type, values.shape, values.ravel().tolist()))
    path = tmp_path / "floats.onnx"
    onnx.save(as_floats, str(path))
    proto, arrays, _ = load_with_arrays(path)
    assert arrays == {} and proto == as_floats
    # external data: read (safely) by the onnx path
    folder = tmp_path / "ext"
    folder.mkdir()
    ext = folder / "m.onnx"
    onnx.save(
        onnx.ModelProto.FromString(model.SerializeToString()),
        str(ext),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        size_threshold=0,
    )
    proto, arrays, _ = load_with_arrays(ext)
    assert arrays == {}
    assert onnxlip.path_norm(ext).log10_path_norm == onnxlip.path_norm(model).log10_path_norm


@pytest.mark.parametrize("damage", ["truncate", "length", "garbage", "dims"])
def test_damaged_files_are_errors_not_tracebacks(tmp_path, damage):
    model = F.build("conv2d", 2).model
    data = bytearray(model.SerializeToString())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbage":
        data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    elif damage == "length":  # a raw_data payload longer than its dims say
        init = model.graph.initializer[0]
        init.raw_data = init.raw_data + b"\x00\x00\x00\x00"
        data = bytearray(model.SerializeToString())
    elif damage == "dims":  # dims that disagree with the data
        model.graph.initializer[0].dims[0] += 1
        data = bytearray(model.SerializeToString())
    path = tmp_path / "bad.onnx"
    path.write_bytes(bytes(data))
    with pytest.raises(OnnxlipError):
        onnxlip.path_norm(path)
    with pytest.raises(OnnxlipError):
        onnxlip.check(path) if damage in ("truncate", "garbage") else onnxlip.scores(path)


def test_wire_errors_on_what_it_does_not_read():
    for data in (b"", b"\x3a\x05abc", b"\x3b", bytes([0x3A, 0x80])):  # empty, short graph, group, bad varint
        with pytest.raises(wire.WireError):
            wire.scan(memoryview(data))
    graph = helper.make_graph([], "g", [], [])
    doubled = helper.make_model(graph).SerializeToString()
    doubled += doubled  # two graph fields: protobuf would merge them; the scanner refuses
    with pytest.raises(wire.WireError):
        wire.scan(memoryview(doubled))


def test_a_missing_file_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_with_arrays(tmp_path / "missing.onnx")


def test_mutated_files_give_onnxlip_errors_only(tmp_path):
    """Truncated, overwritten, inserted and deleted bytes anywhere in a model: every outcome is a result or an
    OnnxlipError (exit 2 in the CLI), never another exception from the wire reader or the import."""
    data = F.build("batchnorm", 0).model.SerializeToString()
    rng = np.random.default_rng(11)
    for i in range(120):
        b = bytearray(data)
        pos = int(rng.integers(len(b)))
        if i % 4 == 0:
            b = b[:pos]
        elif i % 4 == 1:
            for p in rng.integers(len(b), size=3):
                b[int(p)] = int(rng.integers(256))
        elif i % 4 == 2:
            b[pos:pos] = rng.integers(256, size=5, dtype=np.uint8).tobytes()
        else:
            del b[pos : pos + 5]
        path = tmp_path / f"m{i}.onnx"
        path.write_bytes(bytes(b))
        for fn in (onnxlip.path_norm, onnxlip.check):
            try:
                fn(path)
            except OnnxlipError:
                pass
