"""What the importer says beyond its refusals: notes on a model's fixed batch and 16-bit arithmetic, why an op is
unsupported, and the --output cut that would analyse the supported part of a model."""

from __future__ import annotations

import onnx

from .ops import LIPSCHITZ_IMPORTERS, REJECTED

_HALF = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def batch_notes(graph: onnx.GraphProto, inputs, user_shapes) -> list[str]:
    """A note for each input exported with a fixed batch above 1: the network then maps that many samples at once,
    and its path-norms and bounds count all of them (the l1 norm of the outputs over the batch). A 1-D input's only
    axis is no batch axis."""
    notes = []
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        if i.name not in inputs or i.name in user_shapes or len(dims) < 2 or dims[0].dim_value <= 1:
            continue
        one = "x".join(["1"] + [str(d) for d in inputs[i.name][1:]])
        notes.append(
            f"input {i.name!r} has a fixed batch of {dims[0].dim_value}: path-norms and bounds are those of the "
            f"network on {dims[0].dim_value} samples at once; --input-shape {i.name}={one} analyses one sample"
        )
    return notes


def precision_notes(graph: onnx.GraphProto, nodes, inputs) -> list[str]:
    """A note when onnxruntime runs (part of) the model in 16-bit floats: a data input of that type, or a Cast to
    it. Path-norms and bounds are those of the network in exact arithmetic; the rounding of 16-bit activations
    (about 2**-11 relative per op for float16) is not part of them, but it is part of observed differences."""
    half_inputs = [i for i in graph.input if i.name in inputs and i.type.tensor_type.elem_type in _HALF]
    where = [f"input {i.name!r}" for i in half_inputs]
    kinds = {_HALF[i.type.tensor_type.elem_type] for i in half_inputs}
    for n in nodes:
        to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to in _HALF:
            where.append(f"Cast {n.name or n.output[0]!r}")
            kinds.add(_HALF[to])
    if not where:
        return []
    return [
        f"the model computes in {'/'.join(sorted(kinds))} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''}): "
        "path-norms and bounds are those of the network in exact arithmetic; the rounding of its 16-bit "
        "activations is not covered by the bound (observed differences include it)"
    ]


def unsupported_reason(node: onnx.NodeProto) -> str:
    if node.op_type in REJECTED:
        return REJECTED[node.op_type]
    if node.domain not in ("", "ai.onnx"):
        return f"op from domain {node.domain!r} is not a ReLU-network op"
    return f"{node.op_type} is not supported by onnxlip (not a known piecewise-linear op)"


_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def output_hint(nodes, issues, shapes, inputs, consts) -> str | None:
    """Suggest --output TENSOR: run-time inputs of the unsupported nodes that do not themselves depend on an
    unsupported node and are computed (a model input leaves nothing to analyse)."""
    bad = {i.node for i in issues}
    name_of = {id(n): n.name or (n.output[0] if n.output else "?") for n in nodes}
    tainted: set[str] = set()
    inside = False  # a layer with weights follows an unsupported node: it is not a tail
    for n in nodes:  # topological order: taint everything downstream of an unsupported node
        downstream = any(t in tainted for t in n.input)
        if downstream and n.op_type in _WEIGHTED and any(t in consts for t in n.input[1:]):
            inside = True
        if name_of[id(n)] in bad or downstream:
            tainted.update(o for o in n.output if o)
    if inside:
        ops = sorted({i.op if isinstance(i.op, str) else repr(i.op) for i in issues})  # (a damaged file: bytes)
        lipschitz = [op for op in ops if op in LIPSCHITZ_IMPORTERS]
        text = (
            f"hint: the unsupported {', '.join(ops)} node(s) lie inside the network (layers with weights follow "
            "them), so cutting it with --output would analyse only its first part"
        )
        if lipschitz:
            text += f"; `onnxlip lipschitz` accepts {', '.join(lipschitz)} (l2 bounds)"
        return text
    candidates = []
    for n in nodes:
        if name_of[id(n)] not in bad:
            continue
        for t in n.input:
            if t and t not in tainted and t not in consts and t in shapes and t not in inputs and t not in candidates:
                candidates.append(t)
    if not candidates:
        return None
    flags = " ".join(f"--output {c}" for c in candidates[:4])
    return f"hint: to analyse the network up to the unsupported tail (e.g. the logits before a Softmax), use {flags}"
