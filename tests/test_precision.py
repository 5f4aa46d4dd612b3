"""A model against its float16 export: the exports differ in Casts (no-ops of the exact network), the float16
model takes float16 inputs, and the bound says that 16-bit rounding of activations is not part of it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import MismatchError
from tests import oracle
from tests.helpers import make_model
from tests.test_bad_input import cli

RNG = np.random.default_rng(3)
W1, B1 = RNG.normal(size=(8, 4)).astype(np.float32), RNG.normal(size=8).astype(np.float32)
W2 = RNG.normal(size=(3, 8)).astype(np.float32)


def _mlp(dtype, io: str = "float32", identity: bool = False, w1=W1) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm with weights stored as `dtype`; io "float32" with float32 inputs and outputs,
    "cast" with Casts to float16 and back around it (a keep_io_types conversion), "float16" with float16 inputs
    and outputs; `identity` adds an Identity, as some exporters write."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, x = [], "x"
    if io == "cast":
        nodes.append(helper.make_node("Cast", ["x"], ["xh"], to=elem, name="to_half"))
        x = "xh"
    if identity:
        nodes.append(helper.make_node("Identity", [x], ["xi"]))
        x = "xi"
    last = "yh" if io == "cast" else "y"
    nodes += [
        helper.make_node("Gemm", [x, "W1", "B1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], [last], transB=1),
    ]
    if io == "cast":
        nodes.append(helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT))
    io_type = TensorProto.FLOAT16 if io == "float16" else TensorProto.FLOAT
    inits = [numpy_helper.from_array(a.astype(dtype), n) for a, n in ((w1, "W1"), (B1, "B1"), (W2, "W2"))]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", io_type, [1, 4])],
        [helper.make_tensor_value_info("y", io_type, [1, 3])],
        inits,
    )


@pytest.mark.parametrize("io", ["cast", "float16"])
def test_bound_against_a_float16_export(tmp_path, io):
    onnx.save(_mlp(np.float32), str(tmp_path / "f32.onnx"))
    onnx.save(_mlp(np.float16, io), str(tmp_path / "f16.onnx"))
    # the same network with the float16-rounded weights kept in float32: what the bound is about
    rounded = _mlp(np.float32)
    for init in rounded.graph.initializer:
        value = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    onnx.save(rounded, str(tmp_path / "rounded.onnx"))

    got = onnxlip.bound(tmp_path / "f32.onnx", tmp_path / "f16.onnx", samples=64, device="cpu")
    ref = onnxlip.bound(tmp_path / "f32.onnx", tmp_path / "rounded.onnx", samples=0, device="cpu")
    assert got.log10_bound == ref.log10_bound and got.changed_parameters == ref.changed_parameters > 0
    assert got.path_metric >= oracle.path_metric(str(tmp_path / "f32.onnx"), str(tmp_path / "rounded.onnx"))
    assert got.samples == 64 and got.observed_max_l1_diff is not None  # float16 inputs were fed as float16
    assert len(got.notes) == 1 and "float16" in got.notes[0] and "not covered" in got.notes[0]
    assert not ref.notes

    code, out, err = cli("bound", tmp_path / "f32.onnx", tmp_path / "f16.onnx", "--json", "--samples", "8")
    assert code == 0 and "float16" in json.loads(out)["notes"][0]
    code, out, _ = cli("check", tmp_path / "f16.onnx", "--json")
    assert code == 0 and any("float16" in w for w in json.loads(out)["warnings"])


def test_no_op_nodes_do_not_break_the_pairing(tmp_path):
    """An Identity (or a Cast between float types) in one export and not in the other is no structural
    difference; a real one still is, and is named."""
    w1 = W1 * np.float32(1.01)
    onnx.save(_mlp(np.float32), str(tmp_path / "a.onnx"))
    onnx.save(_mlp(np.float32, identity=True, w1=w1), str(tmp_path / "b.onnx"))
    onnx.save(_mlp(np.float32, w1=w1), str(tmp_path / "b_plain.onnx"))
    got = onnxlip.bound(tmp_path / "a.onnx", tmp_path / "b.onnx", samples=32, device="cpu")
    # (the oracle's paths run through the Identity's neurons: it is given b without it)
    want = oracle.path_metric(str(tmp_path / "a.onnx"), str(tmp_path / "b_plain.onnx"))
    assert got.exact and got.path_metric == pytest.approx(want, rel=1e-6)  # |w1| >= |W1|: b dominates, exact
    assert got.observed_max_l1_diff <= got.bound

    other = _mlp(np.float32)
    other.graph.node[1].op_type = "LeakyRelu"  # not a no-op: a different network
    onnx.save(other, str(tmp_path / "c.onnx"))
    with pytest.raises(MismatchError, match="relu"):
        onnxlip.bound(tmp_path / "a.onnx", tmp_path / "c.onnx", samples=0, device="cpu")
