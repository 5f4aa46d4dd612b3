"""Models whose attributes onnxruntime refuses (found by the hostile-input hunt of session 14): each was analysed
as if valid (a number, exit 0), an internal error (exit 3), or gigabytes of memory. Each is now refused with the
node named; every refusal is checked against onnxruntime refusing the same model, and the repaired neighbour of
each model is still analysed. (A dilated Conv with auto_pad SAME stays analysed: ONNX defines it and torch exports
it, onnxruntime only lacks a kernel for it; tests/test_sampling.py.)"""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.api import analyse
from onnxlip.errors import OnnxlipError
from tests.helpers import make_model
from tests.test_bad_input import cli

ort.set_default_logger_severity(4)
RNG = np.random.default_rng(14)
W3 = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")


def _one(node, x_shape=(1, 3, 8, 8), inits=(), opset=17, ir_version=10) -> onnx.ModelProto:
    """x -> node (output y) -> Relu -> z."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    nodes = [node, helper.make_node("Relu", ["y"], ["z"])]
    return make_model(nodes, [x], [z], list(inits), opset=opset, ir_version=ir_version)


def _ort_refuses(model: onnx.ModelProto) -> bool:
    """onnxruntime refuses to load the model or to run it on ones."""
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {
            i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in sess.get_inputs()
        }
        sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - any refusal
        return True
    return False


def _ort_abs_sum(model: onnx.ModelProto, shape) -> float:
    """sum |A| of the linear map x -> y (no Relu needed: the node is linear) by onnxruntime on unit vectors."""
    g = model.graph
    lin = make_model([g.node[0]], [g.input[0]], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [])
    lin.graph.initializer.extend(g.initializer)
    lin.opset_import[0].version = model.opset_import[0].version
    sess = ort.InferenceSession(lin.SerializeToString(), providers=["CPUExecutionProvider"])
    n = int(np.prod(shape))
    eye = np.eye(n, dtype=np.float32).reshape(n, *shape[1:]) if shape[0] == 1 else None
    total = 0.0
    for i in range(n):
        total += float(np.abs(sess.run(None, {"x": eye[i : i + 1]})[0]).sum())
    return total


REFUSED = {
    "conv auto_pad unknown": (
        lambda: _one(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="FOO"), inits=[W3]),
        "auto_pad 'FOO'",
    ),
    "conv_transpose auto_pad unknown": (
        lambda: _one(
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], auto_pad="FOO"),
            inits=[numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")],
        ),
        "auto_pad 'FOO'",
    ),
    "conv kernel_shape disagrees with the weight": (
        lambda: _one(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5], pads=[2] * 4), inits=[W3]),
        "kernel_shape [5, 5] does not match",
    ),
    "conv_transpose output_padding >= stride": (
        lambda: _one(
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_padding=[5, 5]),
            inits=[numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")],
        ),
        "below max(stride, dilation)",
    ),
    "maxpool pads >= kernel": (
        lambda: _one(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[5] * 4)),
        "not all smaller than its kernel",
    ),
    "pad reflect beyond the axis": (
        lambda: _one(
            helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect"),
            inits=[numpy_helper.from_array(np.array([0, 0, 20, 20, 0, 0, 20, 20], np.int64), "p")],
        ),
        "reflect pads",
    ),
    "depth_to_space unknown mode": (
        lambda: _one(helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="FOO"), x_shape=(1, 4, 8, 8)),
        "neither DCR nor CRD",
    ),
    "depth_to_space channels not divisible": (
        lambda: _one(helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2)),
        "not divisible by blocksize**2",
    ),
    "space_to_depth size not divisible": (
        lambda: _one(helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=3)),
        "not divisible by its blocksize",
    ),
    "slice-1 axis out of range": (
        lambda: _one(helper.make_node("Slice", ["x"], ["y"], starts=[0], ends=[3], axes=[7]), opset=9),
        "out of range",
    ),
    "squeeze-11 axis out of range": (
        lambda: _one(helper.make_node("Squeeze", ["x"], ["y"], axes=[7]), x_shape=(1, 3, 1, 8), opset=11),
        "out of range",
    ),
    "kernel larger than the input": (
        lambda: _one(
            helper.make_node("Conv", ["x", "w"], ["y"]),
            inits=[numpy_helper.from_array(np.ones((4, 3, 9, 9), np.float32), "w")],
        ),
        "no entries",
    ),
    "resize to nothing": (
        lambda: _one(
            helper.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest"),
            inits=[numpy_helper.from_array(np.array([1, 1, 0, 0], np.float32), "s")],
        ),
        "no entries",
    ),
    # session 15: refused before, but as "the shape of its output could not be inferred" with no reason (onnx's
    # strict inference of the node alone now gives it), or analysed as if valid (a short Transpose perm)
    "conv stride 0": (
        lambda: _one(helper.make_node("Conv", ["x", "w"], ["y"], strides=[0, 1]), inits=[W3]),
        "strides must only contain positive values",
    ),
    "conv negative pads": (
        lambda: _one(helper.make_node("Conv", ["x", "w"], ["y"], pads=[-1, 0, 0, 0]), inits=[W3]),
        "pads must not contain negative values",
    ),
    "conv dilation 0": (
        lambda: _one(helper.make_node("Conv", ["x", "w"], ["y"], dilations=[0, 1]), inits=[W3]),
        "dilations must only contain positive values",
    ),
    "maxpool stride 0": (
        lambda: _one(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[0, 1])),
        "strides must only contain positive values",
    ),
    "averagepool kernel 0": (
        lambda: _one(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[0, 2])),
        "kernel_shape must only contain positive values",
    ),
    "transpose perm repeats an axis": (
        lambda: _one(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 1, 2])),
        "repeated value",
    ),
    "transpose perm too short": (
        lambda: _one(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 2])),
        "is not a permutation of the 4 axes",
    ),
    "conv_transpose output_shape larger than its full output": (
        lambda: _one(
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], output_shape=[12, 12]),
            inits=[numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")],
        ),
        "larger than its full output",
    ),
    "conv_transpose output_shape listing N and C": (
        lambda: _one(
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], output_shape=[1, 2, 6, 6]),
            inits=[numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")],
        ),
        "output_shape has incorrect size",
    ),
    "prelu slope does not broadcast": (
        lambda: _one(
            helper.make_node("PRelu", ["x", "s"], ["y"]),
            inits=[numpy_helper.from_array(np.full((4,), 0.1, np.float32), "s")],
        ),
        "slope of shape [4] does not broadcast to its input's shape [1, 3, 8, 8]",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_model_onnxruntime_refuses_is_refused_with_the_node_named(case):
    build, reason = REFUSED[case]
    model = build()
    assert _ort_refuses(model), "the oracle: onnxruntime must refuse this model"
    report = onnxlip.check(model)
    assert not report.supported and report.errors[0].node == "y", report.errors
    assert reason in report.errors[0].reason, report.errors
    assert len(report.errors) == 1, report.errors  # the Relu after it is not reported again
    with pytest.raises(OnnxlipError, match="unsupported"):
        onnxlip.path_norm(model)


def test_the_repaired_neighbours_are_analysed():
    """The same ops with valid attributes: analysed, and equal to onnxruntime's sum |A| where the op is linear."""
    good = [
        _one(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER"), inits=[W3]),
        _one(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4), inits=[W3]),
        _one(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1] * 4)),
        _one(
            helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect"),
            inits=[numpy_helper.from_array(np.array([0, 0, 7, 7, 0, 0, 7, 7], np.int64), "p")],
        ),
        _one(helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2, mode="CRD"), x_shape=(1, 4, 8, 8)),
        _one(  # onnxruntime squeezes an axis named twice once
            helper.make_node("Squeeze", ["x", "a"], ["y"]),
            x_shape=(1, 3, 1, 8),
            inits=[numpy_helper.from_array(np.array([2, 2], np.int64), "a")],
        ),
    ]
    for model in good:
        assert not _ort_refuses(model)
        result = onnxlip.path_norm(model)
        if model.graph.node[0].op_type != "MaxPool":
            shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            assert result.path_norm == pytest.approx(_ort_abs_sum(model, shape), rel=1e-5)


def test_a_reduce_axis_named_twice_is_reduced_once_as_onnxruntime_does():
    """ReduceMean over axes [2, 2] divided by 8 * 8: path-norm 3, where onnxruntime's map has sum |A| = 24."""
    twice = _one(helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 2]))
    once = _one(helper.make_node("ReduceMean", ["x"], ["y"], axes=[2]))
    expected = _ort_abs_sum(twice, (1, 3, 8, 8))
    assert expected == pytest.approx(24.0, rel=1e-6)
    assert onnxlip.path_norm(twice).path_norm == pytest.approx(expected, rel=1e-6)
    assert onnxlip.path_norm(once).path_norm == pytest.approx(expected, rel=1e-6)
    scores = onnxlip.scores(twice)  # the adjoint reads the same axes (a weight-free model: no tensors)
    assert scores.log10_path_norm == pytest.approx(np.log10(expected), abs=1e-6)


@pytest.mark.parametrize("where", ["input", "inside"])
def test_a_tensor_of_rank_above_64_is_refused_not_an_internal_error(tmp_path, where):
    if where == "input":
        model = _one(helper.make_node("Identity", ["x"], ["y"]), x_shape=(1,) * 100)
    else:
        axes = numpy_helper.from_array(np.arange(1, 62, dtype=np.int64), "a")
        model = _one(helper.make_node("Unsqueeze", ["x", "a"], ["y"]), inits=[axes])
    path = tmp_path / "rank.onnx"
    onnx.save(model, path)
    for command in ("check", "pathnorm"):
        code, out, err = cli(command, path, "--json")
        assert code == 2 and "rank" in json.loads(out)["error"] and "Traceback" not in err, (out, err)


def test_a_conv_with_huge_pads_is_refused_before_any_memory_is_taken():
    """A 1 KB Conv with pads of 3000 on an 8x8 input: 144 M output entries; path_norm took 8 GB and 25 s."""
    model = _one(helper.make_node("Conv", ["x", "w"], ["y"], pads=[3000] * 4), inits=[W3])
    start = time.perf_counter()
    assert _peak_bytes_of_refusal(model, "activations hold") < 100 * 2**20 and time.perf_counter() - start < 10


def _peak_bytes_of_refusal(model: onnx.ModelProto, match: str) -> int:
    """The peak of numpy's and Python's allocations while path_norm refuses the model with a message matching."""
    tracemalloc.start()
    try:
        with pytest.raises(OnnxlipError, match=match):
            onnxlip.path_norm(model)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_activation_size_is_checked_before_any_import_rule_runs():
    """A nearest Resize of an 8x8 input by 1024 (64 Mi entries, each op within its own limits) and two Relus after
    it: 192 Mi activation entries, refused, but only after the Resize's index map (probed in onnxruntime) had taken
    1.6 GB and 4.5 s (session 15)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    scales = numpy_helper.from_array(np.array([1, 1, 1024, 1024], np.float32), "s")
    nodes = [
        helper.make_node("Resize", ["x", "", "s"], ["y"], mode="nearest"),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Relu", ["r"], ["z"]),
    ]
    model = make_model(nodes, [x], [z], [scales], opset=17)
    assert _peak_bytes_of_refusal(model, "activations hold 201,326,592 entries") < 100 * 2**20


def test_a_constant_with_two_values_and_an_unknown_ir_version_are_refused():
    const = helper.make_node("Constant", [], ["c"], value_float=2.0, value_int=3)
    nodes = [const, helper.make_node("Mul", ["x", "c"], ["y"]), helper.make_node("Relu", ["y"], ["z"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    with pytest.raises(OnnxlipError, match="2 value attributes"):
        onnxlip.path_norm(make_model(nodes, [x], [z], []))
    with pytest.raises(OnnxlipError, match="IR version 99 is newer"):
        onnxlip.path_norm(_one(helper.make_node("Identity", ["x"], ["y"]), ir_version=99))


@pytest.mark.parametrize(
    ("output_shape", "strides", "auto_pad"),
    [([2, 2], [1, 1], None), ([5, 5], [2, 2], None), ([5, 5], [2, 2], "SAME_UPPER"), ([4, 7], [2, 2], "SAME_LOWER")],
)
def test_a_conv_transpose_output_shape_smaller_than_its_input_crops_as_onnxruntime_does(
    output_shape, strides, auto_pad
):
    """onnx's shape inference gives such an output the shape [N, C] (spatial axes dropped), so onnxlip refused it
    (and before session 14 failed with an IndexError); onnxruntime crops, with pads computed from output_shape.
    Oracle: onnxruntime's own map, sum |A| from unit vectors; the node after it gets the right shape too."""
    attrs = {"output_shape": output_shape, "strides": strides} | ({"auto_pad": auto_pad} if auto_pad else {})
    w = numpy_helper.from_array(RNG.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    model = _one(helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs), inits=[w])
    assert not _ort_refuses(model)
    expected = _ort_abs_sum(model, (1, 3, 8, 8))
    assert onnxlip.path_norm(model).path_norm == pytest.approx(expected, rel=1e-5)
    assert analyse(model).graph.shapes["z"] == (1, 2, *output_shape)


def test_a_chain_of_cropping_conv_transposes_gets_every_shape():
    """Two cropping ConvTransposes in a row: the second's input shape is known only once the first is settled.
    onnxruntime cannot load this model (its own copy of onnx's inference fails on the second node), so the oracle
    composes the two nodes' maps, each run alone in onnxruntime."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w1"], ["y"], output_shape=[6, 6]),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "w2"], ["s"], output_shape=[3, 5]),
        helper.make_node("Relu", ["s"], ["z"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    model = make_model(nodes, [x], [z], [w1, w2], opset=17)
    assert analyse(model).graph.shapes["z"] == (1, 4, 3, 5)
    # path-norm of the ReLU net: the product of |W1| and |W2| as linear maps, summed (all paths)
    a1 = _ort_abs_map(nodes[0], [w1], (1, 3, 8, 8))
    a2 = _ort_abs_map(nodes[2], [w2], (1, 2, 6, 6))
    assert a2.shape == (4 * 3 * 5, 2 * 6 * 6)
    expected = float((np.abs(a2) @ np.abs(a1)).sum())
    assert onnxlip.path_norm(model).path_norm == pytest.approx(expected, rel=1e-5)


def _ort_abs_map(node, inits, shape) -> np.ndarray:
    """The matrix A (outputs x inputs) of a linear node, by onnxruntime on unit vectors."""
    x = helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
    sess = ort.InferenceSession(
        make_model([node], [x], [y], list(inits), opset=17).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    n = int(np.prod(shape))
    eye = np.eye(n, dtype=np.float32).reshape(n, *shape[1:])
    return np.stack([sess.run(None, {node.input[0]: eye[i : i + 1]})[0].ravel() for i in range(n)], axis=1)


def test_a_type_issue_beside_a_cropping_conv_transpose_is_named_not_a_failed_inference():
    """The second round of shape inference (the cropped shape declared) met the type issue again and failed
    as a bare 'shape inference failed'."""
    w = numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")
    k = numpy_helper.from_array(np.full((1,), 2.0, np.float64), "k")
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], output_shape=[5, 5]),
        helper.make_node("Mul", ["y", "k"], ["z"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    report = onnxlip.check(make_model(nodes, [x], [z], [w, k], opset=17))
    assert not report.supported and [e.op for e in report.errors] == ["Mul"], report.errors
    assert "disagree in type" in report.errors[0].reason
