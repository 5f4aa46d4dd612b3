"""Forms imported by lowering them into the IR's ops: Pad with negative pads (a crop: slice, then pad), MatMul with
a constant of rank 1 or 3+ and Einsum with one constant operand (onnxlip/ops/einsum.py: transpose / reshape +
dense, or a grouped 1x1 conv for a batched constant). Each is checked against the brute-force oracle (path-norms,
path-metrics, the score of an entry), the bound on random inputs, scores and pruning by the initializer's name;
the sub-forms that stay refused name the node, the op and the reason."""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import UnsupportedModelError
from tests import oracle as O
from tests.helpers import make_model

ort.set_default_logger_severity(3)
REL = 1e-6


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(np.float32)})[0]


def _net(nodes, x_shape, inits: dict, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x -> nodes (ending in tensor "h") -> Add c (one bias per entry) -> Relu -> ReduceSum over the last axis."""
    rng = np.random.default_rng([seed, 7])
    arrays = [numpy_helper.from_array(_typed(v), k) for k, v in inits.items()]
    probe = make_model(nodes, [_vi("x", x_shape)], [_vi("h", None)], arrays, opset=opset)
    h_shape = list(_run(probe, np.zeros(x_shape)).shape)
    c = numpy_helper.from_array((0.5 * rng.normal(size=h_shape)).astype(np.float32), "c")
    tail = [
        helper.make_node("Add", ["h", "c"], ["hc"], name="bias"),
        helper.make_node("Relu", ["hc"], ["r"], name="relu"),
        helper.make_node("ReduceSum", ["r", "sum_axes"], ["y"], name="sum", keepdims=0),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "sum_axes")
    return make_model(nodes + tail, [_vi("x", x_shape)], [_vi("y", None)], [*arrays, c, axes], opset=opset)


def _typed(v) -> np.ndarray:
    v = np.asarray(v)
    return v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int64)


def _weight(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _pad(pads, mode="constant"):
    """x (1, 1, 5, 5) -> Conv W (2, 1, 2, 2) -> Pad(pads, mode) -> h."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv"),
        helper.make_node("Pad", ["a", "pads"], ["h"], name="pad", mode=mode),
    ]
    return _net(nodes, [1, 1, 5, 5], {"W": _weight((2, 1, 2, 2)), "pads": np.array(pads)}, seed=1)


def _matmul(x_shape, w_shape, w_first=False):
    inputs = ["W", "x"] if w_first else ["x", "W"]
    return _net([helper.make_node("MatMul", inputs, ["h"], name="mm")], x_shape, {"W": _weight(w_shape, 2)}, seed=2)


def _einsum(eq, x_shape, w_shape, w_first=False):
    inputs = ["W", "x"] if w_first else ["x", "W"]
    node = helper.make_node("Einsum", inputs, ["h"], name="ein", equation=eq)
    return _net([node], x_shape, {"W": _weight(w_shape, 3)}, opset=17, seed=3)


FORMS = {
    "pad_crop": lambda: _pad([0, 0, -1, 0, 0, 0, 0, -2]),
    "pad_mixed": lambda: _pad([0, 0, -1, 2, 0, 1, 1, -1]),
    "pad_mixed_reflect": lambda: _pad([0, 0, -1, 2, 0, 0, 1, -1], "reflect"),
    "pad_mixed_edge": lambda: _pad([0, 0, 2, -1, 0, 0, -2, 1], "edge"),
    "matmul_vector_right": lambda: _matmul([1, 3, 4], [4]),
    "matmul_vector_left": lambda: _matmul([1, 4, 3], [4], w_first=True),
    "matmul_batched_right": lambda: _matmul([1, 2, 3, 4], [2, 4, 5]),
    "matmul_batched_left": lambda: _matmul([1, 2, 4, 3], [2, 5, 4], w_first=True),
    "matmul_1kn": lambda: _matmul([1, 2, 3, 4], [1, 4, 5]),
    "matmul_x_broadcast": lambda: _matmul([1, 3, 4], [2, 4, 5]),
    "einsum_bij_jk": lambda: _einsum("bij,jk->bik", [1, 3, 4], [4, 5]),
    "einsum_bi_ij": lambda: _einsum("bi,ij->bj", [1, 4], [4, 3]),
    "einsum_ij_bj": lambda: _einsum("ij,bj->bi", [1, 4], [3, 4], w_first=True),
    "einsum_bchw_oc": lambda: _einsum("bchw,oc->bohw", [1, 3, 2, 2], [4, 3]),
    "einsum_batched": lambda: _einsum("bij,bjk->bik", [2, 3, 4], [2, 4, 5]),
    "einsum_batched_transposed": lambda: _einsum("nij,nkj->nik", [2, 3, 4], [2, 5, 4]),
    "einsum_ellipsis": lambda: _einsum("...ij,jk->...ik", [1, 2, 3, 4], [4, 2]),
    "einsum_implicit": lambda: _einsum("bij,jk", [1, 3, 4], [4, 2]),
    "einsum_sums_x": lambda: _einsum("bij,jk->bk", [1, 3, 4], [4, 2]),
    "einsum_two_contracted": lambda: _einsum("bijk,jkl->bil", [1, 2, 3, 2], [3, 2, 4]),
}
NAMES = list(FORMS)


@functools.cache
def form(name: str):
    model = FORMS[name]()
    dag = O.expand(model)
    return model, dag


def _w(model) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W")


def _with_w(model, w: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(np.asarray(w, np.float32), "W"))
    return out


def _rel(got, want):
    return abs(got - want) / max(abs(want), 1e-300)


# ---- path-norms and the IR ----------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [1.0, 2.0])
@pytest.mark.parametrize("name", NAMES)
def test_path_norm_equals_the_oracle(name, q):
    model, dag = form(name)
    if q == 1.0:
        O.check_forward(model, dag, scale=2.0)  # the oracle's expansion is the model
    want = O.path_norm(dag, q)
    got = onnxlip.path_norm(model, q=q)
    assert _rel(got.path_norm, want) <= REL, (got.path_norm, want)


@pytest.mark.parametrize("name", NAMES)
def test_the_weight_is_one_parameter_under_its_name(name):
    """Lowered into IR ops onnxlip has (no new op): the initializer is one parameter, its entries in file order."""
    model, _ = form(name)
    graph = onnxlip.import_model(model)
    assert {n.op for n in graph.nodes} <= {
        "reshape", "transpose", "slice", "pad", "select", "reduce", "dense", "conv", "conv_transpose", "affine",
        "relu_combo",
    }  # fmt: skip
    (w,) = [p for p in graph.params() if p.name == "W"]
    assert w.sources == ("W",)
    value = w.value.T if w.transposed else w.value
    np.testing.assert_array_equal(value.reshape(-1), _w(model).reshape(-1))


# ---- path-metric and the bound --------------------------------------------------------------------------------
def _variant(model, kind: str):
    w = _w(model).astype(np.float64)
    rng = np.random.default_rng(len(kind))
    if kind == "prune":
        return _with_w(model, np.where(np.abs(w) < np.median(np.abs(w)), 0.0, w))
    return _with_w(model, w + 0.3 * rng.normal(size=w.shape))  # some signs flip


@pytest.mark.parametrize("kind", ["prune", "noise"])
@pytest.mark.parametrize("name", NAMES)
def test_bound_holds_on_random_inputs(name, kind):
    model, dag = form(name)
    other = _variant(model, kind)
    want = O.path_metric(dag, O.expand(other))
    rng = np.random.default_rng(5)
    shape = dag.inputs["x"].shape
    for r in (0.5, 2.0):
        res = onnxlip.bound(model, other, input_bound=r, samples=0)
        assert res.path_metric >= want * (1 - REL)
        if kind == "prune":  # dominated: exact
            assert res.exact and _rel(res.path_metric, want) <= REL, (res.path_metric, want)
        xs = [rng.uniform(-r, r, size=shape) for _ in range(24)] + [r * rng.choice([-1.0, 1.0], size=shape)]
        for x in xs:
            x = x.astype(np.float32)
            ya, yb = _run(model, x).astype(np.float64), _run(other, x).astype(np.float64)
            diff = float(np.abs(ya - yb).sum())
            assert diff <= res.bound * (1 + 1e-5) + 1e-6 * float(np.abs(ya).sum() + np.abs(yb).sum())


# ---- scores and pruning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_scores_use_the_initializer_name(name):
    """score_i = ||Phi(theta) - Phi(theta with entry i zeroed)||_1 (theory.md section 4), read by the oracle, for
    the largest-scoring entry of W and one more, at their places in the file's layout."""
    model, dag = form(name)
    res = onnxlip.scores(model)
    assert "W" in res.tensors and res.tensors["W"].sources == ("W",)
    w = _w(model)
    score = res.absolute("W")
    assert score.shape == w.shape and res.tensors["W"].shape == w.shape  # reported in the initializer's shape
    assert _rel(res.log10_path_norm, np.log10(O.path_norm(dag))) <= 1e-6
    for i in (int(np.argmax(score)), w.size // 3):
        zeroed = w.copy().reshape(-1)
        zeroed[i] = 0.0
        want = O.path_metric(dag, O.expand(_with_w(model, zeroed.reshape(w.shape))))
        assert _rel(score.reshape(-1)[i], want) <= 1e-5, (i, score.reshape(-1)[i], want)


@pytest.mark.parametrize("name", NAMES)
def test_prune_writes_a_file_that_loads(name, tmp_path):
    model, dag = form(name)
    out = tmp_path / "pruned.onnx"
    result = onnxlip.prune(model, 0.5, out_path=out)
    pruned = onnx.load(str(out))
    w, pw = _w(model), _w(pruned)
    assert pw.shape == w.shape
    zeroed = (pw == 0) & (w != 0)
    assert result.pruned_entries == int(np.count_nonzero(pw == 0)) == w.size // 2
    np.testing.assert_array_equal(pw[~zeroed], w[~zeroed])  # the others are untouched
    score = onnxlip.scores(model).absolute("W")
    assert score.shape == w.shape
    assert score[zeroed].max() <= score[~zeroed].min()  # the smallest path-magnitude scores went
    x = np.random.default_rng(0).uniform(-1, 1, size=dag.inputs["x"].shape)
    assert np.all(np.isfinite(_run(pruned, x)))  # it runs, and onnxlip reads it
    assert _rel(onnxlip.path_norm(str(out)).path_norm, O.path_norm(O.expand(pruned))) <= REL
    want = O.path_metric(dag, O.expand(pruned))
    assert result.exact and _rel(result.path_metric, want) <= REL, (result.path_metric, want)


# ---- Lipschitz -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,tight",
    [
        (lambda: _einsum("bij,bjk->bik", [2, 3, 4], [2, 4, 5]), True),  # conv_transpose, one group per batch
        (lambda: _einsum("nij,nkj->nik", [2, 3, 4], [2, 5, 4]), True),  # conv
        (lambda: _matmul([1, 3, 4], [4]), True),
        (lambda: _einsum("bchw,oc->bohw", [1, 3, 2, 2], [4, 3]), True),
        (lambda: _matmul([1, 3, 4], [2, 4, 5]), False),  # copies of x: AutoLip counts sqrt(2) more
    ],
)
def test_lipschitz_of_a_lowered_linear_layer(make, tight):
    """Just the contraction (a linear map): the certified l2 bound is at least its largest singular value, and
    equal to it where AutoLip is exact for one layer."""
    model = make()
    trimmed = onnx.ModelProto()
    trimmed.CopyFrom(model)
    nodes = [n for n in trimmed.graph.node if n.output[0] == "h"]
    del trimmed.graph.node[:]
    trimmed.graph.node.extend(nodes)
    del trimmed.graph.output[:]
    trimmed.graph.output.append(_vi("h", None))
    x_shape = O.expand(trimmed).inputs["x"].shape
    n = int(np.prod(x_shape))
    cols = [_run(trimmed, np.eye(n)[i].reshape(x_shape)).reshape(-1) for i in range(n)]
    exact = float(np.linalg.svd(np.array(cols, dtype=np.float64), compute_uv=False)[0])
    upper = onnxlip.lipschitz(trimmed, "2", lower_seconds=0.1).upper.value
    assert upper >= exact * (1 - 1e-6)
    if tight:
        assert upper <= exact * (1 + 1e-5)


# ---- more Pad forms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pads", [[0, 0, -1, 2, 0, 0, 1, -1], [0, 1, -2, 0, 0, 0, 0, -3]])
def test_wrap_pad_with_crops_is_onnxruntimes(pads):
    """Wrap mode (opset 19) with negative pads: a select whose index map is onnxruntime's (it crops first)."""
    shape = [1, 2, 4, 5]
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap")
    pad_init = numpy_helper.from_array(np.array(pads, np.int64), "pads")
    model = make_model([node], [_vi("x", shape)], [_vi("y", None)], [pad_init], opset=19)
    iota = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    (select,) = onnxlip.import_model(model).nodes
    assert select.op == "select"
    np.testing.assert_array_equal(select.attrs["index"], _run(model, iota).astype(np.int64))


def test_pad_with_axes_and_crops():
    """Opset 18's axes input: the crop and pad land on the named axes (the same path-norm as full pads)."""
    full = _pad([0, 0, -1, 2, 0, 0, 1, -1])
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv"),
        helper.make_node("Pad", ["a", "pads", "", "axes"], ["h"], name="pad"),
    ]
    inits = {"W": _weight((2, 1, 2, 2)), "pads": np.array([2, -1, -1, 1]), "axes": np.array([-1, 2])}
    model = _net(nodes, [1, 1, 5, 5], inits, opset=18, seed=1)
    x = np.random.default_rng(1).uniform(-1, 1, size=(1, 1, 5, 5))
    np.testing.assert_allclose(_run(model, x), _run(full, x), rtol=1e-6)
    assert _rel(onnxlip.path_norm(model).path_norm, O.path_norm(full)) <= REL


# ---- refusals ---------------------------------------------------------------------------------------------------
REFUSED = [
    ("bii,ij->bj", [1, 3, 3], [3, 2], "repeats the index 'i' in its run-time operand"),
    ("bi,jj->bi", [1, 3], [3, 3], "repeats the index 'j' in its constant operand"),
    ("bi,ijk->bj", [1, 3], [3, 2, 2], "sums its constant operand 'W' over the index 'k' alone"),
    ("bijl,jkl->bik", [1, 2, 3, 2], [3, 4, 2], "interleave the contracted indices"),
    ("bI,Ij", [1, 3], [3, 2], "an implicit output and upper-case indices"),
    ("bmk,bkn->bmn", [1, 3, 4], [3, 4, 2], "but ONNX shape inference gives [1, 3, 2]"),  # b broadcast from 1
]


@pytest.mark.parametrize("eq,x_shape,w_shape,reason", REFUSED)
def test_unsupported_einsum_names_node_op_and_reason(eq, x_shape, w_shape, reason):
    model = _einsum_bare(eq, x_shape, w_shape)
    with pytest.raises(UnsupportedModelError) as info:
        onnxlip.path_norm(model)
    (issue,) = info.value.issues
    assert (issue.node, issue.op) == ("ein", "Einsum")
    assert f"its equation {eq!r}" in issue.reason and reason in issue.reason, issue.reason


def _einsum_bare(eq, x_shape, w_shape, inputs=("x", "W")):
    node = helper.make_node("Einsum", list(inputs), ["y"], name="ein", equation=eq)
    inits = [numpy_helper.from_array(_weight(w_shape), "W")] if w_shape else []
    return make_model([node], [_vi(i, x_shape) for i in dict.fromkeys(inputs) if i != "W"], [_vi("y", None)], inits)


def test_einsum_of_two_run_time_tensors_or_three_operands_is_refused():
    two = make_model(
        [helper.make_node("Einsum", ["x", "z"], ["y"], name="ein", equation="bi,bj->bij")],
        [_vi("x", [1, 3]), _vi("z", [1, 2])],
        [_vi("y", None)],
        [],
    )
    three = make_model(
        [helper.make_node("Einsum", ["x", "W", "V"], ["y"], name="ein", equation="bi,ij,jk->bk")],
        [_vi("x", [1, 3])],
        [_vi("y", None)],
        [numpy_helper.from_array(_weight((3, 2)), "W"), numpy_helper.from_array(_weight((2, 2)), "V")],
    )
    for model, reason in ((two, "multiplies two run-time tensors"), (three, "has 3 operand(s)")):
        with pytest.raises(UnsupportedModelError) as info:
            onnxlip.path_norm(model)
        (issue,) = info.value.issues
        assert (issue.node, issue.op) == ("ein", "Einsum") and reason in issue.reason, issue.reason


def test_check_json_names_the_refused_einsum(tmp_path):
    from tests.test_bad_input import cli

    path = tmp_path / "m.onnx"
    onnx.save(_einsum_bare("bii,ij->bj", [1, 3, 3], [3, 2]), str(path))
    code, out, _ = cli("check", path, "--json")
    obj = json.loads(out)
    assert code == 2 and obj["supported"] is False  # (2: an unsupported model)
    (error,) = obj["errors"]
    assert error["node"] == "ein" and error["op"] == "Einsum" and "a diagonal or a trace" in error["reason"]


def test_cli_prune_of_a_batched_einsum(tmp_path):
    """`onnxlip prune` writes a file whose initializer W (a batched constant, a grouped conv in the IR) has half
    its entries zeroed, in the file's layout, and which onnxlip and onnxruntime read."""
    from tests.test_bad_input import cli

    model, dag = form("einsum_batched")
    src, dst = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, str(src))
    code, out, _ = cli("prune", src, "--sparsity", "0.5", "-o", dst, "--json")
    obj = json.loads(out)
    assert code == 0 and obj["exact"] and obj["pruned_entries"] == _w(model).size // 2
    pruned = onnx.load(str(dst))
    w, pw = _w(model), _w(pruned)
    assert pw.shape == w.shape and int(np.count_nonzero(pw == 0)) == w.size // 2
    score = onnxlip.scores(model).absolute("W")
    assert score.shape == w.shape
    assert score[pw == 0].max() <= score[pw != 0].min()
    assert _rel(obj["path_metric"], O.path_metric(dag, O.expand(pruned))) <= REL


def test_pad_crop_refusals_name_the_node():
    """A non-zero constant stays refused with crops too (it adds fixed neurons)."""
    nodes = [helper.make_node("Pad", ["x", "pads", "v"], ["y"], name="pad")]
    inits = [
        numpy_helper.from_array(np.array([0, -1, 0, 2], np.int64), "pads"),
        numpy_helper.from_array(np.array(1.5, np.float32), "v"),
    ]
    model = make_model(nodes, [_vi("x", [1, 4])], [_vi("y", None)], inits)
    with pytest.raises(UnsupportedModelError) as info:
        onnxlip.path_norm(model)
    (issue,) = info.value.issues
    assert (issue.node, issue.op) == ("pad", "Pad") and "non-zero constant" in issue.reason


# ---- an exported torch module --------------------------------------------------------------------------------------
def test_torch_einsum_and_batched_matmul_export(tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(4, 5, generator=g))
            self.v = torch.nn.Parameter(torch.randn(2, 5, 3, generator=g))

        def forward(self, x):  # x: (2, 3, 4)
            h = torch.relu(torch.einsum("bij,jk->bik", x, self.w))
            return torch.matmul(h, self.v)  # a batched constant: one (5, 3) matrix per batch entry

    path = tmp_path / "t.onnx"
    with warnings.catch_warnings():  # (the TorchScript exporter's deprecation notice)
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.zeros(2, 3, 4),), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"Einsum", "MatMul"} <= ops, ops
    dag = O.expand(model)
    O.check_forward(model, dag)
    for q in (1.0, 2.0):
        assert _rel(onnxlip.path_norm(model, q=q).path_norm, O.path_norm(dag, q)) <= REL
    names = {t.name for t in model.graph.initializer}
    scored = set(onnxlip.scores(model).tensors)
    assert scored <= names and len(scored) == 2, (scored, names)


@pytest.mark.parametrize("eq,w_shape", [("bkl,kln->bn", (2, 3, 2)), ("bkl,nkl->bn", (2, 2, 3))])
def test_scores_keep_the_initializers_shape_when_a_bias_is_folded_in(eq, w_shape):
    """A per-channel bias Add after the lowered contraction is folded into it: the folded parameter lost the
    initializer's shape, and the scores came as (6, 2) for a (2, 3, 2) weight ((2, 6) for the transposed form)."""
    x_shape = [1, 2, 3]
    n = w_shape[-1] if eq.startswith("bkl,kln") else w_shape[0]
    nodes = [
        helper.make_node("Einsum", ["x", "W"], ["h"], equation=eq),
        helper.make_node("Add", ["h", "c"], ["hc"]),
        helper.make_node("Relu", ["hc"], ["y"]),
    ]
    inits = [numpy_helper.from_array(_weight(w_shape, 1), "W"), numpy_helper.from_array(_weight((n,), 2), "c")]
    model = make_model(nodes, [_vi("x", x_shape)], [_vi("y", None)], inits)
    result = onnxlip.scores(model)
    assert result.tensors["W"].shape == w_shape and result.initializer_scores()["W"].shape == w_shape
    dropped = _w(model).copy()
    dropped[1, 0, 1] = 0.0
    want = O.path_metric(model, _with_w(model, dropped)) / O.path_norm(model)
    assert _rel(result.tensors["W"].relative[1, 0, 1], want) <= 1e-5
