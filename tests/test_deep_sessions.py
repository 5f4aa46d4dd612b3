"""Deep graphs build as few onnxruntime sessions as their results need, laid out so that they build fast, with the
same certified results: the thorough guard chosen before the first build (compiled.thorough_first), measuring
nodes placed next to what they measure (runtime.near_producers), many-input runs (runtime.run)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
import onnxlip.compiled as compiled
import onnxlip.runtime as runtime
from onnxlip.api import analyse
from onnxlip.companion import CompanionEmitter, emit_pathnorm
from onnxlip.errors import RuntimeFailure
from onnxlip.graph_builder import GraphBuilder
from tests.helpers import chain_log10_pathnorm, gemm_chain, make_model
from tests.test_range_guard import _conv_chain, _conv_chain_log10


def _dead_channel_chain():
    """30 convolutions whose output channel 1 is dead in every layer: its sums hold exact zeros layer after
    layer, which only the thorough guard certifies (test_range_guard)."""
    rng = np.random.default_rng(6)
    ws = [rng.uniform(-1.0, 1.0, size=(4, 4, 3, 3)) * 1e-3 ** rng.random((4, 4, 3, 3)) for _ in range(30)]
    bs = [rng.uniform(0.1, 1.0, size=4) for _ in range(30)]
    for w, b in zip(ws, bs):
        w[1], b[1] = 0.0, 0.0
    return ws, bs


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """The node counts of the sessions CompiledCompanion builds."""
    seen: list[int] = []
    make = compiled.make_session

    def counting(model, *args, **kwargs):
        seen.append(len(model.graph.node))
        return make(model, *args, **kwargs)

    monkeypatch.setattr(compiled, "make_session", counting)
    return seen


def test_deep_graphs_with_zeros_build_the_thorough_session_only(builds, monkeypatch):
    """Counted deep (NO_REUSE_ABOVE lowered), the dead-channel chain's path-norm and metrics build each guarded
    session once instead of twice (a refused session, then its thorough rebuild), with the same results."""
    ws, bs = _dead_channel_chain()
    base = _conv_chain(ws, bs)
    pruned = [w.copy() for w in ws]
    pruned[10][0, 2, 1, 1], pruned[20][3] = 0.0, 0.0  # a little pruned: the difference stream
    heavy = [w * (np.random.default_rng(1).random(w.shape) < 0.2) for w in ws]  # most pruned: subtraction
    variants = [_conv_chain(pruned, bs), _conv_chain(heavy, bs)]

    def results():
        out, counts = [onnxlip.path_norm(base).log10_path_norm], [len(builds)]
        for v in variants:
            m = onnxlip.path_metric(base, v)
            out.append((m.log10_path_metric, m.route, m.rounding_margin, m.exact, m.notes))
            counts.append(len(builds) - sum(counts))
        return out, counts

    shallow, shallow_builds = results()
    builds.clear()
    monkeypatch.setattr(runtime, "NO_REUSE_ABOVE", 100)
    deep, deep_builds = results()
    assert deep == shallow
    assert deep[0] == pytest.approx(_conv_chain_log10(ws, bs), abs=1e-6)
    assert [r[1] for r in deep[1:]] == ["difference stream", "subtraction"]
    # each session once, not refused first and rebuilt: the path-norm's; the values and difference sessions; the
    # values session
    assert shallow_builds == [2, 4, 2] and deep_builds == [1, 2, 1]


def test_thorough_first_only_for_deep_graphs_fed_zeros():
    rng = np.random.default_rng(0)
    ws = [rng.uniform(0.5, 1.0, size=(6, 6)) for _ in range(300)]
    graph = analyse(gemm_chain(ws, [np.full(6, 0.1)] * 300)).graph
    em = CompanionEmitter(1.0, {}, "value", fed=("value",), guarded=True)
    emit_pathnorm(graph, em)
    assert len(em.nodes) > runtime.NO_REUSE_ABOVE
    dense = [np.ones((6, 6), np.float32)]
    assert not compiled.thorough_first(graph, em, dense)
    assert compiled.thorough_first(graph, em, dense + [np.eye(6, dtype=np.float32)])
    small = analyse(gemm_chain(ws[:3], [np.full(6, 0.1)] * 3)).graph
    em = CompanionEmitter(1.0, {}, "value", fed=("value",), guarded=True)
    emit_pathnorm(small, em)
    assert not compiled.thorough_first(small, em, [np.eye(6, dtype=np.float32)])


def test_deep_mlp_path_norm_is_exact_with_its_guard_next_to_the_sums(monkeypatch):
    """A 300-layer chain: one session, whose range_guard nodes (each sum's measurements and their gathering)
    sit right after what they read, not after the whole graph (which built several times slower)."""
    rng = np.random.default_rng(1)
    ws = [rng.uniform(0.5, 1.0, size=(6, 6)) for _ in range(300)]
    bs = [rng.uniform(0.1, 1.0, size=6) for _ in range(300)]
    ws[150][0, 0] = 0.0  # fed zeros: the thorough guard from the start
    seen: list[onnx.ModelProto] = []
    make = compiled.make_session

    def keep(model, *args, **kwargs):
        seen.append(model)
        return make(model, *args, **kwargs)

    monkeypatch.setattr(compiled, "make_session", keep)
    r = onnxlip.path_norm(gemm_chain(ws, bs))
    assert r.log10_path_norm == pytest.approx(chain_log10_pathnorm(ws, bs), abs=1e-6)
    assert len(seen) == 1
    nodes = list(seen[0].graph.node)
    at = {t: i for i, n in enumerate(nodes) for t in n.output}
    guard = [(i, n) for i, n in enumerate(nodes) if n.output[0].startswith(("guard__", "gfetch__"))]
    assert len(guard) > 1000
    for i, node in guard:
        if node.op_type == "Concat":
            continue
        producers = [at[t] for t in node.input if t in at]
        assert producers and i - max(producers) <= 3, node


def test_near_producers_keeps_the_order_and_moves_appended_nodes_up():
    g = GraphBuilder()
    a = g.op("Relu", ["x"], "a")
    b = g.op("Relu", [a], "b")
    c = g.op("Relu", [b], "c")
    start = len(g.nodes)
    late_a = g.op("ReduceMin", [a], "m", keepdims=0)
    late_b = g.op("Add", [late_a, b], "m")
    const = g.op("Identity", ["w"], "m")
    both = g.op("Concat", [late_a, c], "m", axis=0)
    order = [n.output[0] for n in runtime.near_producers(g.nodes, start)]
    assert order == [const, a, late_a, b, late_b, c, both]
    assert runtime.near_producers(g.nodes, len(g.nodes)) == g.nodes


def test_runs_with_many_inputs_match_and_report_missing_ones():
    n = runtime.DIRECT_RUN_ABOVE + 10
    names = [f"i{k}" for k in range(n)]
    nodes = [helper.make_node("Sum", names, ["s"])]
    inputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, [2]) for t in names]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], [])
    session, _ = runtime.make_session(model, "cpu")
    feeds = {t: np.full(2, k, np.float32) for k, t in enumerate(names)}
    assert np.array_equal(runtime.run(session, None, feeds)[0], session.run(None, feeds)[0])
    assert runtime.run(session, ["s"], feeds)[0][0] == sum(range(n))
    del feeds[names[7]]
    with pytest.raises(RuntimeFailure):
        runtime.run(session, None, feeds)


def _bias_free_chain(n: int, seed: int = 0):
    """n x (MatMul -> Relu) without biases, then one Gemm with a bias: the exponents of range_guard chain through
    thousands of scalar nodes (its replay recursed once per node: RecursionError, exit 3, from n = 190)."""
    rng = np.random.default_rng(seed)
    ws = [(rng.normal(size=(4, 4)) * 0.5).astype(np.float32) for _ in range(n)]
    w_out, b_out = rng.normal(size=(2, 4)).astype(np.float32), np.array([0.5, -0.5], np.float32)
    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"g{i}"]), helper.make_node("Relu", [f"g{i}"], [f"h{i}"])]
        cur = f"h{i}"
    inits += [numpy_helper.from_array(w_out, "Wout"), numpy_helper.from_array(b_out, "bout")]
    nodes.append(helper.make_node("Gemm", [cur, "Wout", "bout"], ["y"], transB=1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    return make_model(nodes, [x], [y], inits), ws, w_out, b_out


def test_deep_bias_free_chain_with_a_biased_head():
    model, ws, w_out, b_out = _bias_free_chain(1000)
    mass, log10_scale = np.ones(4), 0.0  # ones @ |W0| @ ... @ |W999|, kept as mass * 10**log10_scale
    for w in ws:
        mass = mass @ np.abs(w.astype(np.float64))
        top = mass.max()
        log10_scale += np.log10(top)
        mass /= top
    heads = np.abs(w_out.astype(np.float64)) @ mass
    want = log10_scale + np.log10(heads.sum() + np.abs(b_out).sum() * 10.0**-log10_scale)
    assert onnxlip.path_norm(model).log10_path_norm == pytest.approx(want, abs=1e-6)
    # one head entry zeroed: the metric is exactly the mass through it
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    cut = w_out.copy()
    cut[0, 1] = 0.0
    for init in pruned.graph.initializer:
        if init.name == "Wout":
            init.CopyFrom(numpy_helper.from_array(cut, "Wout"))
    m = onnxlip.path_metric(model, pruned)
    assert m.exact
    assert m.log10_path_metric == pytest.approx(log10_scale + np.log10(abs(float(w_out[0, 1])) * mass[1]), abs=1e-6)


@pytest.mark.parametrize("op, attrs, gain", [("Abs", {}, 2.0), ("LeakyRelu", {"alpha": -0.1}, 1.1)])
def test_long_chains_of_activations_with_a_gain(op, attrs, gain):
    """300 activations in a row, each multiplying every path's mass by its gain: the companion's mantissa was
    scaled by a factor in [0.5, 1) per activation with nothing renormalising between them, until float32 could
    not hold it and the model was refused (from 150 Abs). Scores relative to the path-norm are the ReLU chain's."""
    rng = np.random.default_rng(4)
    w1, w2 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)

    def chain(act, kw):
        inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
        nodes = [helper.make_node("Gemm", ["x", "W1"], ["h0"], transB=1)]
        nodes += [helper.make_node(act, [f"h{i}"], [f"h{i + 1}"], **kw) for i in range(300)]
        nodes.append(helper.make_node("Gemm", ["h300", "W2"], ["y"], transB=1))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
        return make_model(nodes, [x], [y], inits)

    relu, other = chain("Relu", {}), chain(op, attrs)
    want = onnxlip.path_norm(relu).log10_path_norm + 300 * np.log10(gain)
    assert onnxlip.path_norm(other).log10_path_norm == pytest.approx(want, abs=1e-5)
    a, b = onnxlip.scores(relu), onnxlip.scores(other)
    for name in ("W1", "W2"):
        np.testing.assert_allclose(b.tensors[name].relative, a.tensors[name].relative, rtol=1e-4)


def test_chains_of_reshapes_and_identities_are_one_copy_in_every_graph(builds):
    """Gemm -> 2000 Identity -> Reshape (3,4) -> Reshape (12,) -> Reshape (2,6) -> Relu -> Gemm, and a second reader
    of the middle reshape: the identities vanish, the reshapes read the chain's start, and the numbers are those
    of numpy's float64 reference. (60000 Identity nodes took 38 s, 16 of them to build onnxruntime's session.)"""
    rng = np.random.default_rng(15)
    w1, b1 = rng.standard_normal((5, 12)), rng.standard_normal(12)
    w2 = rng.standard_normal((6, 3))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["t0"])]
    nodes += [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(2000)]
    shapes = {"s1": [3, 4], "s2": [12], "s3": [2, 6]}
    nodes += [
        helper.make_node("Reshape", ["t2000", "s1"], ["r1"]),
        helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
        helper.make_node("Reshape", ["r2", "s3"], ["r3"]),
        helper.make_node("Relu", ["r3"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
        helper.make_node("Relu", ["r1"], ["z"]),  # a second reader of a reshape in the chain
    ]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in (("w1", w1), ("b1", b1), ("w2", w2))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in shapes.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])
    outs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("y", "z")]
    model = make_model(nodes, [x], outs, inits)
    graph = analyse(model).graph
    reshapes = [n for n in graph.nodes if n.op == "reshape"]
    assert [(n.inputs[0], tuple(n.attrs["shape"])) for n in reshapes] == [("t0", (3, 4)), ("t0", (2, 6))]
    a1, a2 = np.abs(w1.astype(np.float32).astype(np.float64)), np.abs(w2.astype(np.float32).astype(np.float64))
    h = np.ones(5) @ a1 + np.abs(b1.astype(np.float32))  # the companion's first layer, then both readers
    expected = float((h.reshape(2, 6) @ a2).sum() + h.sum())
    assert onnxlip.path_norm(model).path_norm == pytest.approx(expected, rel=1e-6)
    assert max(builds) < 200  # nodes in onnxruntime's graph, not ~2000
    scores = onnxlip.scores(model)
    assert set(scores.tensors) == {"w1", "b1", "w2"}
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    w2_pruned = w2.astype(np.float32).copy()
    w2_pruned[0, 0] = 0.0
    pruned.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2_pruned, "w2"))
    result = onnxlip.bound(model, pruned, samples=0)  # w2[0, 0] serves both rows of the (2, 6) matrix
    assert result.exact and result.path_metric == pytest.approx(float(h.reshape(2, 6)[:, 0].sum() * a2[0, 0]), rel=1e-6)
