"""Multiple inputs and outputs, old IR versions: the path-norm sums over every output, the bound takes the
l1 norm over all outputs and the sup norm over all inputs (theory.md section 3)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from tests.helpers import make_model


def _two_in_two_out(w1, w2, w3, ir_version=10, opset=17):
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    nodes = [
        helper.make_node("MatMul", ["a", "w1"], ["ha"]),
        helper.make_node("MatMul", ["b", "w2"], ["hb"]),
        helper.make_node("Add", ["ha", "hb"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w3"], ["y1"]),
        helper.make_node("Relu", ["ha"], ["y2"]),
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2]),
    ]
    outputs = [
        helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 2]),
        helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 4]),
    ]
    if ir_version < 4:  # IR 3 lists every initializer as a graph input too
        inputs += [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits]
    return make_model(nodes, inputs, outputs, inits, opset=opset, ir_version=ir_version)


def _weights(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3, 4)), rng.normal(size=(2, 4)), rng.normal(size=(4, 2))


def test_several_inputs_and_outputs():
    w1, w2, w3 = (np.abs(w.astype(np.float32)).astype(np.float64) for w in _weights(0))
    # paths a -> y1, b -> y1 (through the Relu neurons), and a -> y2
    expected = np.ones(3) @ w1 @ w3 + np.ones(2) @ w2 @ w3
    expected = expected.sum() + (np.ones(3) @ w1).sum()
    assert onnxlip.path_norm(_two_in_two_out(*_weights(0))).path_norm == pytest.approx(expected, rel=1e-6)
    # one output only
    only_y2 = onnxlip.path_norm(_two_in_two_out(*_weights(0)), output=["y2"]).path_norm
    assert only_y2 == pytest.approx((np.ones(3) @ w1).sum(), rel=1e-6)


def test_bound_holds_over_all_inputs_and_outputs():
    w = _weights(1)
    pruned = [np.where(np.abs(x) < 0.6, 0.0, x) for x in w]
    a, b = _two_in_two_out(*w), _two_in_two_out(*pruned)
    r = onnxlip.bound(a, b, input_bound=2.0, samples=64)
    assert r.exact and r.samples == 64
    sa = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(300):
        feeds = {
            "a": rng.choice([-2.0, 2.0], size=(1, 3)).astype(np.float32),
            "b": rng.uniform(-2, 2, size=(1, 2)).astype(np.float32),
        }
        diff = sum(np.abs(x - y).sum() for x, y in zip(sa.run(None, feeds), sb.run(None, feeds)))
        worst = max(worst, float(diff))
    assert 0 < worst <= r.bound and r.observed_max_l1_diff <= r.bound


@pytest.mark.parametrize("ir_version,opset", [(3, 8), (4, 9), (7, 13), (10, 21)])
def test_ir_versions_and_opsets(ir_version, opset):
    expected = onnxlip.path_norm(_two_in_two_out(*_weights(2))).path_norm
    m = _two_in_two_out(*_weights(2), ir_version=ir_version, opset=opset)
    onnx.checker.check_model(m)
    assert onnxlip.path_norm(m).path_norm == pytest.approx(expected, rel=1e-12)


def test_ir_as_networkx_dag():
    import networkx as nx

    from onnxlip.importer import import_model

    graph = import_model(_two_in_two_out(*_weights(0)))
    dag = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(dag)
    assert dag.number_of_nodes() == len(graph.nodes)
    ops = nx.get_node_attributes(dag, "op")
    assert sorted(ops.values()) == sorted(n.op for n in graph.nodes)
    # the residual-style Add joins both dense branches; both outputs are reachable from it or from the first branch
    add = next(n.name for n in graph.nodes if n.op == "add")
    assert dag.in_degree(add) == 2
