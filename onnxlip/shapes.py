"""Static shapes by onnx's shape inference, on a light copy of the graph, and the reason a node's shape cannot be
inferred (onnx's own message, from the node alone in strict mode)."""

from __future__ import annotations

import math
import re

import onnx
from onnx import helper, numpy_helper, shape_inference

from .errors import ModelIssue, ShapeError
from .graph_prep import MAX_RANK, node_inputs

_MAX_ENTRIES = 2**31  # a static tensor above this (8 GiB of float32 for one activation) is a damaged shape


# ---- shape inference ----------------------------------------------------------------------------------
_SHAPE_KEEPING = {("ai.onnx.ml", "Scaler")}


def _as_identity(node):
    return helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)


def shape_keeping_as_identity(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model, or a copy whose ops that onnx has no shape inference for but that keep their input's shape
    (skl2onnx's Scaler) are Identity nodes: for onnx's shape inference only."""
    if not any((n.domain, n.op_type) in _SHAPE_KEEPING for n in proto.graph.node):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    nodes = [_as_identity(n) if (n.domain, n.op_type) in _SHAPE_KEEPING else n for n in copy.graph.node]
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def type_issue(message: str) -> ModelIssue:
    """onnx's type-check message as an issue naming the node where it names one."""
    found = re.search(r"\(op_type:([\w.]+)(?:, node name: ([^)]*))?\)", message)
    op, node = (found.group(1), found.group(2) or "-") if found else ("-", "-")
    detail = message.split("): ", 1)[-1] if found else message
    reason = f"its inputs disagree in type ({detail}): not valid ONNX, onnxruntime refuses to load it"
    return ModelIssue(node, op, reason)


def infer_shapes(proto, nodes, inputs, consts, type_issues: list | None = None) -> dict[str, tuple[int, ...]]:
    """Static shapes of every tensor, by onnx shape inference on a light copy (big weights as typed inputs).
    `type_issues`: where a node's inputs disagree in type, an issue is added there and inference goes on."""
    used = {n for node in nodes for n in node_inputs(node)}
    graph_inputs, initializers = [], []
    declared = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    for name, shape in inputs.items():
        elem = declared.get(name) or onnx.TensorProto.FLOAT  # (an --output cut may make a tensor an input)
        graph_inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
    for name in sorted(used & set(consts)):
        arr = consts[name]
        if arr.size <= 4096 or arr.dtype.kind in "iub":
            initializers.append(numpy_helper.from_array(arr, name))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, list(arr.shape)))
    # ops onnx has no shape inference for, that keep their input's shape (and write float)
    nodes = [_as_identity(n) if (n.domain, n.op_type) in _SHAPE_KEEPING else n for n in nodes]
    g = helper.make_graph(nodes, "shapes", graph_inputs, [], initializers)
    for node in g.node:  # (onnx's messages name a node by its name: as the importer does, else by its output)
        if not node.name and node.output:
            node.name = node.output[0]
    light = helper.make_model(g, opset_imports=list(proto.opset_import))
    light.ir_version = 8  # our own copy: IR 3 rules (initializers must be inputs) would defeat inference
    shapes = _inferred(light, inputs, consts, type_issues)
    for _ in range(sum(n.op_type == "ConvTranspose" for n in nodes)):  # each round settles at least one more
        fixed = _conv_transpose_shapes(nodes, shapes, consts)
        if not fixed:
            break
        light.graph.value_info.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, d) for t, d in fixed)
        shapes = _inferred(light, inputs, consts, [])  # (a type issue is reported from the first round)
    for name, shape in shapes.items():
        if len(shape) > MAX_RANK:
            raise ShapeError(
                f"tensor {name!r} has rank {len(shape)}: onnxruntime runs tensors of rank {MAX_RANK} at most"
            )
        if any(d < 0 for d in shape) or math.prod(shape) > _MAX_ENTRIES:
            raise ShapeError(f"tensor {name!r} would have shape {shape}: not a plausible static shape (damaged file?)")
    return shapes


def _inferred(light, inputs, consts, type_issues: list | None) -> dict[str, tuple[int, ...]]:
    """onnx's static shapes for the light copy, with the inputs' and constants' own."""
    # no data_prop: onnx's data propagation turns a 1-D Add of n entries into a shape of n symbolic dims (~250 bytes
    # each: 2 GB for an 8 Mi-entry input); fold_constants evaluates the shape arithmetic itself, round by round
    # check_type: a node whose inputs disagree in type (a float64 weight in a float32 graph) makes the file invalid
    # ONNX, which onnxruntime refuses to load; its arithmetic is not what the model means
    try:
        try:
            inferred = shape_inference.infer_shapes(light, check_type=True, strict_mode=False, data_prop=False)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types
            if type_issues is None or not ("inconsistent type" in str(exc) or "TypeInferenceError" in str(exc)):
                raise
            type_issues.append(type_issue(str(exc)))
            inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
    except Exception as exc:  # noqa: BLE001 - all mean the same to the user
        raise ShapeError(f"shape inference failed: {exc}") from None
    shapes: dict[str, tuple[int, ...]] = {name: tuple(shape) for name, shape in inputs.items()}
    for name, arr in consts.items():
        shapes[name] = tuple(arr.shape)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if all(d is not None for d in dims):
            shapes[vi.name] = tuple(int(d) for d in dims)
    return shapes


def _conv_transpose_shapes(nodes, shapes, consts) -> list[tuple[str, list[int]]]:
    """(output, shape) of each ConvTranspose with an output_shape that onnx inferred wrongly: for an output_shape
    smaller than the input's spatial size it drops the spatial axes ([N, C]); onnxruntime crops (pads computed from
    output_shape, as the ONNX spec says). A declared shape makes onnx keep it and carry it downstream."""
    fixed = []
    for node in nodes:
        if node.op_type != "ConvTranspose" or len(node.input) < 2 or not node.output:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if "output_shape" not in attrs or x is None or w is None or len(x) != len(w) or len(x) < 3:
            continue
        spatial = [int(d) for d in attrs["output_shape"]]  # (N and C listed too: onnxruntime refuses, so does the rule)
        want = [x[0], int(w[1]) * int(attrs.get("group", 1)), *spatial]
        if len(spatial) == len(x) - 2 and tuple(want) != shapes.get(node.output[0]) and min(spatial) > 0:
            fixed.append((node.output[0], want))
    return fixed


def why_not_inferred(proto, node, shapes, consts) -> str | None:
    """onnx's reason why `node`'s output shape cannot be inferred (a stride of 0, a repeated perm entry), from the
    node alone in strict mode, with its inputs' known shapes and small constants; None when onnx gives none."""
    graph_inputs, initializers = [], []
    for name in dict.fromkeys(t for t in node.input if t):
        arr = consts.get(name)
        if arr is not None and (arr.size <= 4096 or arr.dtype.kind in "iub"):
            initializers.append(numpy_helper.from_array(arr, name))
        elif arr is not None:
            dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, list(arr.shape)))
        elif name in shapes:  # an activation: float (integer tensors are shape arithmetic, folded to constants)
            graph_inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shapes[name])))
        else:
            return None
    alone = onnx.NodeProto()
    alone.CopyFrom(node)
    alone.name = node.name or (node.output[0] if node.output else "")
    g = helper.make_graph([alone], "why", graph_inputs, [], initializers)
    model = helper.make_model(g, opset_imports=list(proto.opset_import))
    model.ir_version = 8
    try:
        shape_inference.infer_shapes(model, strict_mode=True, data_prop=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; only the message counts
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = reason.rsplit("] ", 1)[-1].strip()  # "...(op_type:Conv): [ShapeInferenceError] Attribute ..."
        return reason or None
    return None
