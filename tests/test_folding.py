"""Folded weights kept as factors (onnxlip/blockwise.py, ir.Param): mantissas and NaN/Inf checks read from the
factors equal, bit for bit, those of the formed float64 value; path-norm and scores never form it."""

from __future__ import annotations

import numpy as np
import pytest

import onnxlip
from onnxlip import blockwise as folding
from onnxlip.api import analyse
from onnxlip.ir import Param
from onnxlip.mantissas import ZERO_EXPONENT, normalized_power
from tests import dag_factory as F


def _factors(kind: str, rng, dtype=np.float32):
    if kind == "conv":  # (Cout, Cin, k, k) by a per-output-channel scale, several blocks
        return rng.normal(size=(300, 64, 3, 3)).astype(dtype), rng.normal(size=(300, 1, 1, 1))
    if kind == "conv_transpose":  # (Cin, Cout/g, k, k) by a (Cin, Cout/g) matrix
        return rng.normal(size=(40, 8, 5, 5)).astype(dtype), rng.normal(size=(40, 8, 1, 1))
    if kind == "dense_right":  # (in, out) by a per-column scale: a leading axis of length 1
        return rng.normal(size=(700, 200)).astype(dtype), rng.normal(size=(1, 200))
    if kind == "dense_left":
        return rng.normal(size=(200, 700)).astype(dtype), rng.normal(size=(200, 1))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "dense_right", "dense_left"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_factored_mantissas_equal_those_of_the_formed_value(kind, dtype):
    base, factor = _factors(kind, np.random.default_rng(0), dtype)
    factor[0] = 0.0  # a zeroed channel or column
    p = Param("w", None, ("w", "bn.scale"), False, (base, factor))
    want = base.astype(np.float64) * factor
    m, e = p.mantissas(1.0)
    m_want, e_want = normalized_power(want, 1.0)
    assert e == e_want
    np.testing.assert_array_equal(m, m_want)
    assert p._value is None  # not formed
    np.testing.assert_array_equal(p.value, want)
    assert p.shape == want.shape and p.size == want.size


def test_extreme_exponents_take_the_general_path():
    base = np.full((3, 4), 1e30, np.float32)
    factor = np.full((3, 1), 1e10)  # 1e40: beyond the float32 fast path of normalized_power
    p = Param("w", None, (), False, (base, factor))
    assert folding.factored_mantissas(base, factor) is None
    m, e = p.mantissas(1.0)
    m_want, e_want = normalized_power(base.astype(np.float64) * factor, 1.0)
    assert e == e_want
    np.testing.assert_array_equal(m, m_want)


def test_all_zero_factors_give_zero_mantissas():
    p = Param("w", None, (), False, (np.ones((4, 3), np.float32), np.zeros((4, 1))))
    m, e = p.mantissas(1.0)
    assert e == ZERO_EXPONENT and not m.any()  # the exponent no alignment picks (mantissas.ZERO_EXPONENT)


@pytest.mark.parametrize(
    "base, factor, finite",
    [
        (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[2.0], [0.5]]), True),
        (np.array([[1.0, np.nan], [3.0, 4.0]]), np.array([[2.0], [0.5]]), False),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[np.inf], [0.5]]), False),
        (np.array([[1e200, 1.0], [1.0, 1.0]]), np.array([[1e200], [1.0]]), False),  # the product overflows
        (np.array([[1e200, 1.0], [1.0, 1.0]]), np.array([[1.0], [1e200]]), True),  # large maxima, finite products
    ],
)
def test_factored_finite_matches_the_formed_value(base, factor, finite):
    assert folding.factored_finite(base, factor) is finite
    with np.errstate(over="ignore", invalid="ignore"):
        assert folding.finite(base * factor) is finite


def test_batchnorm_folded_weights_stay_factored_through_path_norm_and_scores():
    spec = F.build("batchnorm", 0)
    m = analyse(spec.model)
    factored = [p for p in m.graph.params() if p.factors is not None]
    assert factored, "the BatchNorm after a Conv should fold into it as factors"
    onnxlip.path_norm(m)
    onnxlip.scores(m)
    assert all(p._value is None for p in factored)  # neither formed the float64 weights


def _fold_affine_by_rescans(graph):
    """The former fold_affine: one fold, then rebuild the maps and rescan from the start (quadratic)."""
    from dataclasses import replace

    from onnxlip.passes import _FOLD_INTO, _merge

    changed = True
    while changed:
        changed = False
        producer, consumers = graph.producer(), graph.consumers()
        for node in graph.nodes:
            if node.op != "affine":
                continue
            src, t = producer.get(node.inputs[0]), node.inputs[0]
            if src is None or src.op not in _FOLD_INTO or len(consumers.get(t, [])) != 1 or t in graph.outputs:
                continue
            if graph.shapes[node.output] != graph.shapes[t]:
                continue
            merged = _merge(src, node, graph.shapes[t])
            if merged is None:
                continue
            graph = replace(graph, nodes=[merged if n is src else n for n in graph.nodes if n is not node])
            changed = True
            break
    return graph


def _folded_models():
    yield from (F.build(family, seed).model for family in F.FAMILIES for seed in range(3))
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    rng = np.random.default_rng(0)  # a chain of affine ops after every layer, and affine after affine
    nodes, inits, x = [], [], "x"
    for i in range(6):
        names = [f"w{i}", f"s{i}", f"b{i}", f"c{i}"]
        arrays = [rng.normal(size=(4, 4)), rng.normal(size=4), rng.normal(size=4), rng.normal(size=(1, 4))]
        inits += [numpy_helper.from_array(a.astype(np.float32), n) for n, a in zip(names, arrays)]
        nodes += [
            helper.make_node("MatMul", [x, names[0]], [f"m{i}"]),
            helper.make_node("Mul", [f"m{i}", names[1]], [f"ms{i}"]),
            helper.make_node("Add", [f"ms{i}", names[2]], [f"a{i}"]),
            helper.make_node("Sub", [f"a{i}", names[3]], [f"z{i}"]),
            helper.make_node("Relu", [f"z{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    yield make_model(nodes, io, [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])], inits)


def test_one_sweep_fold_equals_the_rescanning_fold(monkeypatch):
    """fold_affine folds in one topological sweep (a 2000-layer chain: 43.6 s -> 1.7 s for `check`); it must give
    the graph the one-fold-per-rescan loop gave, node for node and value for value."""
    from onnxlip import passes

    seen = []
    original = passes.fold_affine
    monkeypatch.setattr(passes, "fold_affine", lambda g: (seen.append(g), original(g))[1])
    folds = 0
    for model in _folded_models():
        seen.clear()
        analyse(model)
        (before,) = seen
        got, want = original(before), _fold_affine_by_rescans(before)
        folds += len(before.nodes) - len(got.nodes)
        assert [(n.op, n.inputs, n.outputs, n.attrs.keys()) for n in got.nodes] == [
            (n.op, n.inputs, n.outputs, n.attrs.keys()) for n in want.nodes
        ]
        for a, b in zip(got.nodes, want.nodes):
            assert a.params.keys() == b.params.keys()
            for role in a.params:
                pa, pb = a.params[role], b.params[role]
                assert pa.name == pb.name and pa.sources == pb.sources
                np.testing.assert_array_equal(pa.value, pb.value)
    assert folds > 20  # the cases do fold
