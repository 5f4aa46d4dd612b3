"""Op forms that real exports and onnx's version converter write (found by the opset and exporter-format hunt):
each is read as the network onnxruntime computes, checked against the brute-force oracle (tests/oracle.py) or
onnxruntime itself, or refused with the node named."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

import onnxlip
from tests import oracle
from tests.helpers import make_model

W = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)


def _mlp(middle: list, opset: int, ir: int = 8, extra_inits=()) -> onnx.ModelProto:
    """x -> MatMul(W) -> [middle nodes reading 'h', writing 'c'] -> MatMul(W) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), *middle, helper.make_node("MatMul", ["c", "W"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])]
    if ir < 4:  # IR 3: initializers are listed among the inputs
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 2]))
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(W, "W"), *extra_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def test_clip_bounds_at_float32s_largest_mean_no_bound():
    """Clip-6 to 10 default to -FLT_MAX / FLT_MAX; onnx's version converter writes them out as inputs. Taken
    literally they added a bias path of 3.4e38 (path-norm 4.4e39 against 50.5); they never clip a float32."""
    m7 = _mlp([helper.make_node("Clip", ["h"], ["c"], max=1.0)], 7, ir=3)
    m11 = version_converter.convert_version(m7, 11)
    m11.ir_version = 6
    lowest = float(np.finfo(np.float32).min)
    explicit = _mlp([helper.make_node("Clip", ["h"], ["c"], max=1.0, min=lowest)], 7, ir=3)
    expected = onnxlip.path_norm(m7).path_norm  # (x - ReLU(x - 1): the parameterisation of README "Clip")
    for model in (m11, explicit):
        assert onnxlip.path_norm(model).path_norm == pytest.approx(expected, rel=1e-9)
    pair = onnxlip.bound(m7, m11, samples=0)
    assert pair.path_metric == 0.0


@pytest.mark.parametrize("opset,ir", [(7, 3), (9, 4), (13, 7), (17, 8)])
def test_dropout_with_an_unused_mask_is_the_identity(opset, ir):
    """Older exports write Dropout -> (out, mask) with nothing reading the mask: onnxruntime runs it as the
    identity (it was refused, at opsets 7 to 9 with 'the shape of its output mask could not be inferred')."""
    relu = helper.make_node("Relu", ["h"], ["r"])
    dropout = helper.make_node("Dropout", ["r"], ["c", "mask"], **({"ratio": 0.5} if opset < 12 else {}))
    model = _mlp([relu, dropout], opset, ir)
    plain = _mlp([helper.make_node("Relu", ["h"], ["c"])], opset, ir)
    assert onnxlip.path_norm(model).path_norm == pytest.approx(oracle.path_norm(plain), rel=1e-9)


def test_dropout_whose_mask_is_read_is_refused():
    relu = helper.make_node("Relu", ["h"], ["r"])
    dropout = helper.make_node("Dropout", ["r"], ["d", "mask"])
    cast = helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT)
    mul = helper.make_node("Mul", ["d", "m"], ["c"])
    result = onnxlip.check(_mlp([relu, dropout, cast, mul], 13))
    assert not result.supported
    assert any(e.op == "Dropout" and "mask" in e.reason for e in result.errors)


def test_castlike_to_an_integer_type_is_refused():
    """Like Cast to an integer type (it truncates); CastLike to a float type stays a no-op."""
    to_int = _mlp(
        [helper.make_node("CastLike", ["h", "like"], ["c"])],
        17,
        extra_inits=[numpy_helper.from_array(np.zeros(1, np.int64), "like")],
    )
    result = onnxlip.check(to_int)
    assert not result.supported and result.errors[0].op == "CastLike" and "truncates" in result.errors[0].reason
    to_float = _mlp(
        [helper.make_node("CastLike", ["h", "like"], ["c"])],
        17,
        extra_inits=[numpy_helper.from_array(np.zeros(1, np.float32), "like")],
    )
    plain = _mlp([helper.make_node("Identity", ["h"], ["c"])], 17)
    assert onnxlip.path_norm(to_float).path_norm == pytest.approx(oracle.path_norm(plain), rel=1e-9)


def _resize_model(node, shape, inits, opset) -> onnx.ModelProto:
    return make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
        opset=opset,
    )


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize10_reads_its_scales_from_its_second_input(mode):
    """Resize-10 is (X, scales), with source coordinates x / scale: its linear form was refused ('could not read
    its scales'). Same map as onnxruntime, and as the Resize-11 asymmetric equivalent."""
    from tests.test_exactness import _assert_map_is_onnxruntimes

    scales = numpy_helper.from_array(np.array([1, 1, 2, 3], np.float32), "s")
    resize10 = helper.make_node("Resize", ["x", "s"], ["y"], mode=mode)
    _assert_map_is_onnxruntimes(resize10, [1, 2, 3, 4], [scales], 10, 0, rtol=1e-6, atol=1e-6)
    extra = {"nearest_mode": "floor"} if mode == "nearest" else {}
    resize11 = helper.make_node(
        "Resize", ["x", "", "s"], ["y"], mode=mode, coordinate_transformation_mode="asymmetric", **extra
    )
    a, b = (_resize_model(n, [1, 2, 3, 4], [scales], o) for n, o in ((resize10, 10), (resize11, 11)))
    assert onnxlip.path_norm(a).path_norm == pytest.approx(onnxlip.path_norm(b).path_norm, rel=1e-12)


def test_nearest_resize_that_fills_in_a_constant_is_refused():
    """tf_crop_and_resize writes extrapolation_value outside the region of interest: those outputs copy nothing.
    The nearest index map read the constant as an input index (extrapolation_value=0: a path-norm of 4 where 2
    entries are copies; 5: an index out of range, a failure naming no node). Linear mode refused it already."""
    for value in (0.0, 5.0):
        node = helper.make_node(
            "Resize",
            ["x", "roi", "s"],
            ["y"],
            mode="nearest",
            coordinate_transformation_mode="tf_crop_and_resize",
            extrapolation_value=value,
        )
        inits = [
            numpy_helper.from_array(np.array([0, 0, 0, -0.5, 1, 1, 1, 1.5], np.float32), "roi"),
            numpy_helper.from_array(np.array([1, 1, 1, 2], np.float32), "s"),
        ]
        result = onnxlip.check(_resize_model(node, [1, 1, 1, 2], inits, 13))
        assert not result.supported
        assert result.errors[0].node and "not copies of input entries" in result.errors[0].reason


def test_nodes_after_an_unsupported_one_are_not_reported_for_their_unknown_shapes():
    """An op onnx cannot infer shapes for (here a custom domain's) leaves every later shape unknown: only the
    op itself is reported, not one 'shape could not be inferred' per downstream node."""
    nodes = [
        helper.make_node("Custom", ["h"], ["k"], domain="com.example"),
        helper.make_node("Relu", ["k"], ["c"]),
    ]
    model = _mlp(nodes, 17)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    result = onnxlip.check(model)
    assert not result.supported
    assert [e.op for e in result.errors] == ["Custom"]


@pytest.mark.parametrize("opset", [22, 23, 24, 25, 26])
@pytest.mark.parametrize("family", ["layout", "avgpool", "mixed"])
def test_newer_opsets_read_as_before(opset, family):
    """Opsets 22 to 26 changed the ops onnxlip reads only in the element types they accept: a model converted up
    to them (onnx's version converter) has the same path-norm; 27 and above are refused with a message."""
    from tests import dag_factory

    model = dag_factory.build(family, 3).model
    newer = version_converter.convert_version(model, opset)
    newer.ir_version = 10
    assert onnxlip.path_norm(newer).log10_path_norm == pytest.approx(
        onnxlip.path_norm(model).log10_path_norm, abs=1e-12
    )


def test_versions_outside_the_range_are_refused():
    for opset, ir, words in ((27, 10, "newer"), (6, 3, "too old"), (21, 0, "not set"), (21, 2, "too old")):
        model = _mlp([helper.make_node("Relu", ["h"], ["c"])], opset, ir=max(ir, 3))
        model.ir_version = ir
        with pytest.raises(onnxlip.errors.ModelLoadError, match=words):
            onnxlip.check(model)


@pytest.mark.parametrize("scaler", ["standard", "minmax"])
def test_sklearn_pipeline_with_a_scaler(scaler, tmp_path):
    """StandardScaler / MinMaxScaler + MLPRegressor, exported by skl2onnx: the Scaler (domain ai.onnx.ml) is a
    diagonal affine op, y = (x - offset) * scale. It was refused (and every later node with it). The path-norm
    equals the float64 companion of the fitted pipeline; the bound against a pruned variant holds on samples."""
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    first = StandardScaler() if scaler == "standard" else MinMaxScaler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_pipeline(first, MLPRegressor(hidden_layer_sizes=(16,), max_iter=50, random_state=0)).fit(x, y)
    model = to_onnx(pipe, x[:1], target_opset={"": 17, "ai.onnx.ml": 1})
    model.ir_version = min(model.ir_version, 10)
    assert any(n.op_type == "Scaler" for n in model.graph.node) == (scaler == "standard")  # minmax: Mul, Add

    def f32(a):
        return np.asarray(a, np.float32).astype(np.float64)

    if scaler == "standard":  # (x - mean) * (1 / scale)
        a = f32(1.0 / first.scale_)
        v = np.abs(a) + np.abs(f32(first.mean_) * a)
    else:  # x * scale + min
        v = np.abs(f32(first.scale_)) + np.abs(f32(first.min_))
    mlp = pipe[-1]
    for w, b in zip(mlp.coefs_, mlp.intercepts_):
        v = v @ np.abs(w.astype(np.float32).astype(np.float64)) + np.abs(b.astype(np.float32).astype(np.float64))
    assert onnxlip.path_norm(model).path_norm == pytest.approx(float(v.sum()), rel=1e-6)
    path = tmp_path / "pipe.onnx"
    onnx.save(model, str(path))
    pruned = onnxlip.prune(str(path), 0.5, out_path=tmp_path / "pruned.onnx")
    r = onnxlip.bound(str(path), str(tmp_path / "pruned.onnx"), samples=64)
    assert r.exact and r.bound == pytest.approx(pruned.bound, rel=1e-9)
    assert r.observed_max_l1_diff is not None and 0 < r.observed_max_l1_diff <= r.bound
    # rescale sees through the Scaler (onnx infers no shape for it: every later rank was unknown, nothing rescaled)
    from onnxlip.rescale import rescale

    assert rescale(str(path), seed=0)[1].rescaled_neurons > 0
    if scaler == "standard":  # the Scaler's bias -offset * scale is derived from both attributes: said so
        tensors = onnxlip.scores(str(path)).tensors
        offset = next(t for n, t in tensors.items() if n.endswith("::offset"))
        assert offset.folded and any(s.endswith("::scale") for s in offset.sources)


def test_an_activation_inside_the_network_gets_no_cut_hint(tmp_path):
    """A Tanh between two weighted layers is no tail: '--output <its input>' would analyse the first layer only,
    and an audit would read 'supported'. The hint says so and points to lipschitz; the bound error names the file."""
    inside = _mlp([helper.make_node("Tanh", ["h"], ["c"])], 17)
    result = onnxlip.check(inside)
    assert not result.supported and "use --output" not in result.hint
    assert "inside the network" in result.hint and "lipschitz" in result.hint
    tail = _mlp([helper.make_node("Relu", ["h"], ["c"])], 17)
    tail.graph.node.append(helper.make_node("Softmax", ["y"], ["p"]))
    tail.graph.output[0].name = "p"
    assert "--output y" in onnxlip.check(tail).hint
    base, bad = tmp_path / "base.onnx", tmp_path / "tanh.onnx"
    onnx.save(_mlp([helper.make_node("Relu", ["h"], ["c"])], 17), str(base))
    onnx.save(inside, str(bad))
    with pytest.raises(onnxlip.UnsupportedModelError, match="tanh.onnx: the model has 1 unsupported"):
        onnxlip.bound_many(str(base), [str(base), str(bad)], samples=0)


def _left_dense(rank: int, gemm: bool, after: str) -> onnx.ModelProto:
    """W @ x (a constant on the left: channels are rows) followed by an (M, 1) Add or Mul, a Relu and a right-side
    MatMul. The output's last axis has M entries too when rank is 2, where a bias folded along the columns still
    runs and gives wrong numbers silently."""
    rng = np.random.default_rng(rank)
    m, k = 3, 2
    lead = (2,) * (rank - 2)
    x_shape = (*lead, k, m)
    w = rng.normal(size=(m, k)).astype(np.float32)
    c = rng.normal(size=(m, 1)).astype(np.float32)
    out_w = rng.normal(size=(m, 3)).astype(np.float32)
    if gemm:
        linear = helper.make_node("Gemm", ["W", "x", "C0"], ["h0"])
        inits = [numpy_helper.from_array(rng.normal(size=(m, 1)).astype(np.float32), "C0")]
    else:
        linear = helper.make_node("MatMul", ["W", "x"], ["h0"])
        inits = []
    nodes = [
        linear,
        helper.make_node(after, ["h0", "C"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "V"], ["y"]),
    ]
    inits += [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (c, "C"), (out_w, "V"))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model([*nodes], [x], [y], inits)


def _merged(model: onnx.ModelProto) -> onnx.ModelProto:
    """The oracle's view of onnxlip's convention: a Gemm bias and the Add right after it are one bias (C0 + C; an
    affine chain without a ReLU between is one layer), where the oracle would count two bias neurons."""
    inits = {t.name: t for t in model.graph.initializer}
    if "C0" not in inits or model.graph.node[1].op_type != "Add":
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    c0, c = (numpy_helper.to_array(inits[n]) for n in ("C0", "C"))
    inits["C0"].CopyFrom(numpy_helper.from_array(c0 + c, "C0"))
    inits["C"].CopyFrom(numpy_helper.from_array(np.zeros_like(c), "C"))
    return out


@pytest.mark.parametrize(
    "rank,gemm,after",
    [(2, False, "Add"), (2, True, "Add"), (2, False, "Mul"), (3, False, "Add"), (4, False, "Mul"), (2, True, "Mul")],
)
def test_bias_folded_into_a_left_side_dense_layer_stays_on_its_rows(rank, gemm, after):
    """A bias or scale after W @ x is per row: it was folded as a vector along the last axis (path-norm 49.09
    instead of 48.41, a certified bound of 0.18 where the outputs differ by 60, or onnxruntime refusing the graph)."""
    if gemm and rank != 2:
        pytest.skip("Gemm is 2-D")
    model = _left_dense(rank, gemm, after)
    assert onnxlip.path_norm(model).path_norm == pytest.approx(oracle.path_norm(_merged(model)), rel=1e-6)
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    c = next(t for t in changed.graph.initializer if t.name == "C")
    value = numpy_helper.to_array(c).copy()
    value[2] = 0.0  # one row's bias (or scale) zeroed: the variant is dominated, the metric exact
    c.CopyFrom(numpy_helper.from_array(value, "C"))
    got = onnxlip.path_metric(model, changed)
    want = oracle.path_metric(_merged(model), _merged(changed))
    assert got.exact and got.path_metric == pytest.approx(want, rel=1e-6)
    if after == "Add" and not gemm:  # C is a bias of its own (else it is folded into W's or C0's scores)
        scores = onnxlip.scores(model)
        assert scores.absolute("C")[2, 0] == pytest.approx(got.path_metric, rel=1e-6)
