"""Checking that two IRs share one architecture, and lining up their parameters."""

from __future__ import annotations

import numpy as np

from .errors import MismatchError
from .ir import Graph


def _attrs_equal(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):  # e.g. interpolate's {axis: coefficient matrix}
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_attrs_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (np.ndarray, list, tuple)) or isinstance(b, (np.ndarray, list, tuple)):
        try:
            return np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)) or np.array_equal(
                np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            )
        except (TypeError, ValueError):
            return False
    return a == b


def _without_no_ops(graph: Graph) -> tuple[list, dict[str, str]]:
    """The graph's nodes without those that change neither values nor shape (Identity, Dropout, a Cast between
    float types, a Reshape to the same shape, a Concat of one tensor: one export writes them where another does
    not), and the map from their outputs to the tensors they pass on."""
    alias: dict[str, str] = {}
    kept = []
    for n in graph.nodes:
        same_shape = graph.shapes[n.inputs[0]] == graph.shapes[n.outputs[0]]
        if n.op in ("reshape", "concat") and len(n.inputs) == 1 and not n.params and same_shape:
            alias[n.outputs[0]] = alias.get(n.inputs[0], n.inputs[0])
        else:
            kept.append(n)
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
    nodes_a, alias_a = _without_no_ops(base)
    nodes_b, alias_b = _without_no_ops(other)
    if len(nodes_a) != len(nodes_b):
        raise MismatchError(f"the models have different numbers of ops after import: {len(nodes_a)} vs {len(nodes_b)}")
    tensor_map = dict(zip(base.inputs, other.inputs))
    values: dict[str, np.ndarray] = {}
    for i, (na, nb) in enumerate(zip(nodes_a, nodes_b)):
        where = f"op #{i} ({la}: {na.name!r} {na.onnx_op}, {lb}: {nb.name!r} {nb.onnx_op})"
        if na.op != nb.op:
            raise MismatchError(f"the models differ at {where}: {na.op} vs {nb.op}")
        if [tensor_map.get(alias_a.get(t, t)) for t in na.inputs] != [alias_b.get(t, t) for t in nb.inputs]:
            raise MismatchError(f"the models differ at {where}: its inputs come from different ops")
        for key in sorted(set(na.attrs) | set(nb.attrs)):
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
