"""One ONNX node run on a probe tensor, by onnxruntime's CPU kernels or by the ONNX reference evaluator: how the
layout ops' index maps (onnxlip/ops/layout.py) and the interpolation ops' matrices (onnxlip/ops/interpolate.py)
are read off the real op."""

from __future__ import annotations

import numpy as np


def _one_node_model(node, opset: int, x: np.ndarray, consts: dict[str, np.ndarray], ir_version: int):
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    inits = [numpy_helper.from_array(np.asarray(consts[n]), n) for n in node.input[1:] if n]
    xi = helper.make_tensor_value_info(node.input[0], elem, list(x.shape))
    yi = helper.make_tensor_value_info(node.output[0], elem, None)
    model = helper.make_model(helper.make_graph([node], "probe", [xi], [yi], inits))
    model.opset_import[0].version = opset
    model.ir_version = ir_version
    return model


def run_reference(node, opset: int, x: np.ndarray, consts: dict[str, np.ndarray]) -> np.ndarray:
    """The op on x (its other inputs the constants `consts`), by the ONNX reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    probe = _probe_node(node)
    inits = []
    probe, opset = upsample9(probe, opset, inits)
    consts = {**consts, **{t.name: _array(t) for t in inits}}
    evaluator = ReferenceEvaluator(_one_node_model(probe, opset, x, consts, 8))
    for op in evaluator.rt_nodes_:
        # float attributes reach the evaluator as float32 scalars, and NumPy keeps float32 in arithmetic with
        # Python floats: Resize's cubic coefficients came out 1.4e-6 off the exact ones (cubic_coeff_a), enough to
        # put a certified l_inf bound below the true constant. The same values as float64:
        for name, value in list(vars(op).items()):
            if isinstance(value, np.float32):
                setattr(op, name, float(value))
    (out,) = evaluator.run(None, {probe.input[0]: x})
    return np.asarray(out)


def run_onnxruntime(node, opset: int, x: np.ndarray, consts: dict[str, np.ndarray]) -> np.ndarray | None:
    """The op on x by onnxruntime's CPU kernels, or None where onnxruntime has no kernel for it (or for x's type)."""
    from ..errors import OnnxlipError
    from ..runtime import run_model

    model = _one_node_model(_probe_node(node), opset, x, consts, 8 if opset >= 9 else 3)
    try:
        return np.asarray(run_model(model, {model.graph.input[0].name: x})[0])
    except OnnxlipError:  # no kernel (runtime.RuntimeFailure): the caller falls back to the reference evaluator
        return None


def _probe_node(node):
    """A copy of node reading its data from "onnxlip::x" and writing "onnxlip::y" (the constants keep their
    names)."""
    import onnx

    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    probe.input[0], probe.output[0] = "onnxlip::x", "onnxlip::y"
    del probe.output[1:]
    return probe


def _array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def upsample9(node, opset: int, consts: list):
    """An Upsample as a node the ONNX reference evaluator runs: with its scales in an attribute (opsets 7-8), the
    same op of opset 9, which takes them as an input (appended to `consts`); in linear mode, which the evaluator's
    Upsample lacks, the equal Resize (asymmetric coordinates, opset 11). Other nodes pass unchanged."""
    from onnx import helper, numpy_helper

    if node.op_type != "Upsample":
        return node, opset
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scales = attrs.pop("scales", None)
    inputs = list(node.input)
    if scales is not None:
        inputs = [node.input[0], f"{node.output[0]}::scales"]
        consts.append(numpy_helper.from_array(np.asarray(scales, dtype=np.float32), inputs[1]))
        opset = max(opset, 9)
    mode = attrs.get("mode", b"nearest")
    if (mode.decode() if isinstance(mode, bytes) else mode) in ("linear", "bilinear"):
        resize = helper.make_node(
            "Resize", [inputs[0], "", inputs[1]], list(node.output), mode="linear",
            coordinate_transformation_mode="asymmetric",
        )  # fmt: skip
        return resize, max(opset, 11)
    return helper.make_node("Upsample", inputs, list(node.output), **attrs), opset
