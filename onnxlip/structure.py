"""Checking that two IRs share one architecture, and lining up their parameters."""

from __future__ import annotations

import numpy as np

from .errors import MismatchError
from .ir import Graph, Node
from .ops.layout import sliced


def _attrs_equal(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):  # e.g. interpolate's {axis: coefficient matrix}
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_attrs_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype.kind in "iuf" and b.dtype.kind in "iuf":
        return a.shape == b.shape and bool(np.array_equal(a, b))  # (index maps of millions of entries: no objects)
    if isinstance(a, (np.ndarray, list, tuple)) or isinstance(b, (np.ndarray, list, tuple)):
        try:
            return np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)) or np.array_equal(
                np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            )
        except (TypeError, ValueError):
            return False
    return a == b


# ops whose every output entry is a copy of one input entry (or a zero): for pairing, a chain of them is one copy
# map from the tensor it starts at (theory.md section 1: identity neurons with fixed weights 1)
_COPY_OPS = ("slice", "select", "gather", "transpose", "reshape", "split", "concat", "pad")
_MAX_COPY_MAP = 1 << 22  # entries; larger copies are compared op by op


def _copy_outputs(n: Node, maps: list[np.ndarray]) -> list[np.ndarray] | None:
    """The copy maps of n's outputs given those of its inputs (flat source indices, -1 for a zero), or None when
    n is not a pure copy."""
    a = n.attrs
    if n.op == "concat":
        return [np.concatenate(maps, axis=a["axis"])]
    if len(maps) != 1:
        return None
    m = maps[0]
    if n.op == "reshape":
        return [m.reshape(a["shape"])]
    if n.op == "transpose":
        return [m.transpose(a["perm"])]
    if n.op == "split":
        return np.split(m, np.cumsum(a["sizes"])[:-1], axis=a["axis"])
    if n.op == "gather":
        return [np.take(m, a["indices"], axis=a["axis"])]
    if n.op == "select":
        return [m.reshape(-1)[a["index"]]]
    if n.op == "slice":
        return [sliced(m, a)]
    if n.op == "pad" and a.get("mode", "constant") == "constant" and min(a["pads"]) >= 0:
        half = len(a["pads"]) // 2
        return [np.pad(m, list(zip(a["pads"][:half], a["pads"][half:])), constant_values=-1)]
    return None


def _as_global_reduce(n: Node, graph: Graph) -> Node:
    """A max pool whose one window covers the whole unpadded input (torch's AdaptiveMaxPool2d(1), exported as
    MaxPool by one exporter and as ReduceMax by the other) as the reduce it equals; other nodes unchanged."""
    a, shape = n.attrs, graph.shapes[n.inputs[0]]
    if n.op != "pool" or a.get("weights") is not None or list(a["kernel"]) != list(shape[2:]):
        return n
    if any(a["pads"]) or any(d != 1 for d in a["dilations"]) or any(d != 1 for d in graph.shapes[n.outputs[0]][2:]):
        return n
    attrs = {"axes": list(range(2, len(shape))), "keepdims": 1, "weight": 1.0, "kind": "max"}
    return Node(n.name, "reduce", list(n.inputs), list(n.outputs), attrs, dict(n.params), n.onnx_op)


def _canonical_nodes(graph: Graph) -> tuple[list, dict[str, str]]:
    """The graph's nodes as pairing compares them, and the map from tensors to the tensors they equal. Chains of
    copying ops (slices, splits, concats of slices of one tensor, selects, pads, transposes, reshapes) become one
    `select` from the tensor they start at, placed where a computing op first reads it; an identity copy (a
    Reshape or Concat that changes nothing, a Slice that keeps everything) disappears. One exporter writes
    torch.chunk as Slices and the other as a Split, a circular pad as Slices and Concats or as a wrapping Pad, a
    slice's end as the extent or as INT64_MAX: the copy maps are equal exactly when the functions are."""
    copies: dict[str, tuple[str, np.ndarray]] = {}  # tensor -> (source tensor, flat index map shaped like it)
    alias: dict[str, str] = {}
    placed: set[str] = set()
    kept: list = []

    def source(t: str) -> tuple[str, np.ndarray]:
        return copies.get(t) or (t, np.arange(int(np.prod(graph.shapes[t]))).reshape(graph.shapes[t]))

    def materialize(t: str) -> None:
        if t not in copies or t in placed or t in alias:
            return
        src, m = copies[t]
        if m.shape == tuple(graph.shapes[src]) and np.array_equal(m.reshape(-1), np.arange(m.size)):
            alias[t] = src
            return
        placed.add(t)
        kept.append(Node(f"copy of {src}", "select", [src], [t], {"index": m}, {}, "copy"))

    for n in graph.nodes:
        n = _as_global_reduce(n, graph)
        small = all(int(np.prod(graph.shapes[t])) <= _MAX_COPY_MAP for t in [*n.inputs, *n.outputs])
        # (one source for all inputs, checked before any index map is formed: a Concat of two computed tensors
        # is no copy)
        if n.op in _COPY_OPS and not n.params and small and len({copies.get(t, (t,))[0] for t in n.inputs}) == 1:
            sources = [source(t) for t in n.inputs]
            outs = _copy_outputs(n, [m for _, m in sources])
            if outs is not None:
                for t, m in zip(n.outputs, outs):
                    copies[t] = (sources[0][0], m)
                continue
        for t in n.inputs:
            materialize(t)
        kept.append(n)
    for t in graph.outputs:
        materialize(t)
    return kept, alias


def align_params(base: Graph, other: Graph, labels: tuple[str, str] = ("a", "b")) -> dict[str, np.ndarray]:
    """other's parameter values keyed by base's parameter names; MismatchError naming the first difference."""
    la, lb = labels
    in_a, in_b = list(base.inputs.values()), list(other.inputs.values())
    if in_a != in_b:
        raise MismatchError(f"the models have different inputs: {la} {in_a} vs {lb} {in_b}")
    out_a = [base.shapes[t] for t in base.outputs]
    out_b = [other.shapes[t] for t in other.outputs]
    if out_a != out_b:
        raise MismatchError(f"the models have different output shapes: {la} {out_a} vs {lb} {out_b}")
    nodes_a, alias_a = _canonical_nodes(base)
    nodes_b, alias_b = _canonical_nodes(other)
    if len(nodes_a) != len(nodes_b):
        i = next(
            (i for i, (na, nb) in enumerate(zip(nodes_a, nodes_b)) if na.op != nb.op), min(len(nodes_a), len(nodes_b))
        )
        first = [
            f"{label}: {ns[i].name!r} ({ns[i].onnx_op})" if i < len(ns) else f"{label}: none"
            for label, ns in ((la, nodes_a), (lb, nodes_b))
        ]
        raise MismatchError(
            f"the models have different numbers of ops after import: {la} {len(nodes_a)}, {lb} {len(nodes_b)}; they "
            f"part at op #{i} ({', '.join(first)})"
        )
    tensor_map = dict(zip(base.inputs, other.inputs))
    values: dict[str, np.ndarray] = {}
    for i, (na, nb) in enumerate(zip(nodes_a, nodes_b)):
        where = f"op #{i} ({la}: {na.name!r} {na.onnx_op}, {lb}: {nb.name!r} {nb.onnx_op})"
        if na.op != nb.op:
            raise MismatchError(f"the models differ at {where}: {na.op} vs {nb.op}")
        if [tensor_map.get(alias_a.get(t, t)) for t in na.inputs] != [alias_b.get(t, t) for t in nb.inputs]:
            raise MismatchError(f"the models differ at {where}: its inputs come from different ops")
        for key in sorted(set(na.attrs) | set(nb.attrs)):
            if key == "kind" and na.op == "relu_combo":  # a label: the other attributes define the function
                continue  # (Abs is LeakyRelu(alpha=-1), PRelu([a]) is LeakyRelu(a))
            if not _attrs_equal(na.attrs.get(key), nb.attrs.get(key)):
                raise MismatchError(
                    f"the models differ at {where}: attribute {key} {na.attrs.get(key)} vs {nb.attrs.get(key)}"
                )
        if sorted(na.params) != sorted(nb.params):
            raise MismatchError(f"the models differ at {where}: parameters {sorted(na.params)} vs {sorted(nb.params)}")
        for role, pa in na.params.items():
            pb = nb.params[role]
            if pa.value.shape != pb.value.shape:
                raise MismatchError(f"the models differ at {where}: {role} shape {pa.value.shape} vs {pb.value.shape}")
            values[pa.name] = pb.value
        for ta, tb in zip(na.outputs, nb.outputs):
            if base.shapes[ta] != other.shapes[tb]:
                raise MismatchError(
                    f"the models differ at {where}: output shape {base.shapes[ta]} vs {other.shapes[tb]}"
                )
            tensor_map[ta] = tb
    if [tensor_map.get(alias_a.get(t, t)) for t in base.outputs] != [alias_b.get(t, t) for t in other.outputs]:
        raise MismatchError("the models' outputs come from different ops")
    return values
