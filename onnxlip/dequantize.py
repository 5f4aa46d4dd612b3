"""DequantizeLinear of constant weights, folded into float weights (weight-only quantized models).

Quantized exports store weights as integers with a DequantizeLinear in front; the network stays a ReLU network
in float, so onnxlip folds the dequantization into the weights and analyses the float network that
onnxruntime runs. The fold reproduces onnxruntime's arithmetic bit for bit: y = float(x - zero_point) * scale,
one float32 rounding of the integer and one of the product (the float64 product of two float32 values is exact,
so rounding it once equals the float32 multiply), then the scale's type. Per-tensor (opset 10), per-axis
(opset 13) and blocked (opset 21, `block_size`) quantization; int8, uint8, int16, uint16 and int32 weights.
Anything else is left to the ONNX reference evaluator (graph_prep._fold_one). A DequantizeLinear of a run-time
tensor (a quantized activation) is not folded and is rejected by its import rule."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

_INTEGERS = (np.int8, np.uint8, np.int16, np.uint16, np.int32)
_FLOATS = (np.float32, np.float16)


def fold_dequantize(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The dequantized constant, or None where this rule does not apply (another type, output_dtype, ...)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if set(attrs) - {"axis", "block_size"}:
        return None
    names = list(node.input) + [""] * (3 - len(node.input))
    x, scale = consts[names[0]], consts[names[1]]
    zero = consts[names[2]] if names[2] else np.zeros(scale.shape, x.dtype)
    if x.dtype.type not in _INTEGERS or scale.dtype.type not in _FLOATS or zero.dtype != x.dtype:
        return None
    if zero.shape != scale.shape or x.ndim == 0 and scale.size != 1:
        return None
    axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
    if scale.size == 1 and block == 0:  # per tensor
        scale, zero = scale.reshape(()), zero.reshape(())
    else:
        if not -x.ndim <= axis < x.ndim:
            return None
        axis %= x.ndim
        if block > 0:  # blocked: one scale per `block` entries along the axis
            expected = list(x.shape)
            expected[axis] = -(-x.shape[axis] // block)
            if list(scale.shape) != expected:
                return None
            scale, zero = (np.repeat(a, block, axis=axis).take(range(x.shape[axis]), axis=axis) for a in (scale, zero))
        else:  # per axis: a 1-D scale along `axis`
            if scale.shape != (x.shape[axis],):
                return None
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            scale, zero = scale.reshape(shape), zero.reshape(shape)
    shifted = (x.astype(np.int64) - zero.astype(np.int64)).astype(np.float32)
    product = shifted.astype(np.float64) * scale.astype(np.float32).astype(np.float64)
    return [product.astype(np.float32).astype(scale.dtype)]
