"""Exactness of onnxlip against an independent brute-force oracle (theory.md sections 1-3 and 6).

The oracle (tests/oracle.py) expands each tiny model into an explicit neuron-level DAG by probing onnxruntime one
ONNX node at a time, validates the expansion by a float64 forward pass against onnxruntime, and enumerates every
path. BatchNormalization: models whose BN follows a Conv/Gemm WITH a bias (family "batchnorm_bias") are compared
with the oracle built on `oracle.fold_batchnorm(model)` (the fold onnxlip applies, redone independently in
numpy); every other BN follows a bias-free op or a Relu, where folding changes no path value.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxlip
from tests import dag_factory as F
from tests import oracle as O

ort.set_default_logger_severity(3)

FAMILIES = list(F.FAMILIES)
SEEDS = [0, 1, 2]
CASES = [(f, s) for f in FAMILIES for s in SEEDS]
IDS = [f"{f}-{s}" for f, s in CASES]
REL = 1e-6


# ---- cached oracle work -----------------------------------------------------------------------------------------
def _oracle_model(spec: F.Spec, model: onnx.ModelProto) -> onnx.ModelProto:
    return O.fold_batchnorm(model) if spec.fold else model


@functools.cache
def case(family: str, seed: int):
    spec = F.build(family, seed)
    dag = O.expand(_oracle_model(spec, spec.model))
    return spec, dag


@functools.cache
def pair(family: str, seed: int, kind: str):
    spec, dag = case(family, seed)
    other = F.perturb(spec, kind, np.random.default_rng([seed, 17, len(kind)]))
    odag = O.expand(_oracle_model(spec, other))
    flips, dominated = O.compare_params(dag, odag)
    return other, odag, O.path_metric(dag, odag), flips, dominated


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


# ---- the oracle itself ----------------------------------------------------------------------------------------------
def _tiny(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(nodes, "t", inputs, outputs, inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _vi(name, *shape):
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", *shape])


def _init(name, arr):
    return onnx.numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def test_oracle_hand_computed_clip_and_maxpool():
    """x -> Gemm(w, b) -> Clip(0, 6) -> Gemm(v, c): paths x.w.(+1).v, x.w.(-1).v, b.(+1).v, b.(-1).v, the bias
    -6 of ReLU(x - 6) times (-1) v, and c: ||Phi||_1 = 2|w v| + 2|b v| + 6|v| + |c|."""
    w, b, v, c = 1.5, -0.5, -2.0, 0.25
    nodes = [
        onnx.helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
        onnx.helper.make_node("Clip", ["h", "lo", "hi"], ["r"]),
        onnx.helper.make_node("Gemm", ["r", "v", "c"], ["y"]),
    ]
    inits = [_init("w", [[w]]), _init("b", [b]), _init("lo", 0.0), _init("hi", 6.0), _init("v", [[v]]), _init("c", [c])]
    model = _tiny(nodes, [_vi("x", 1)], [_vi("y", 1)], inits)
    want = 2 * abs(w * v) + 2 * abs(b * v) + 6 * abs(v) + abs(c)
    dag = O.expand(model)
    O.check_forward(model, dag, scale=8.0)
    assert O.path_norm(dag) == pytest.approx(want, rel=1e-12)
    assert onnxlip.path_norm(model).path_norm == pytest.approx(want, rel=REL)
    # MaxPool k=2 s=1 on 3 inputs, then AveragePool k=2 (1/2 each): 2 max neurons, 4 input paths of 1/2
    nodes = [
        onnx.helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[2]),
        onnx.helper.make_node("AveragePool", ["m"], ["y"], kernel_shape=[2]),
    ]
    model = _tiny(nodes, [_vi("x", 1, 3)], [_vi("y", 1, 1)], [])
    dag = O.expand(model)
    O.check_forward(model, dag)
    assert len(dag.paths()) == 4
    assert O.path_norm(dag) == pytest.approx(2.0)
    assert O.path_norm(dag, q=2.0) == pytest.approx(1.0)
    assert onnxlip.path_norm(model).path_norm == pytest.approx(2.0, rel=REL)


def test_oracle_probe_recovers_conv_weights_exactly():
    """Conv has no float64 kernel in onnxruntime: the oracle probes it in float32 with a 2^64-scaled basis vector;
    every edge weight and bias must still be the float32 initializer value exactly."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 1, 3)).astype(np.float32) * np.float32(1e-3)
    bias = rng.normal(size=2).astype(np.float32) * np.float32(1e3)
    node = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3])
    model = _tiny([node], [_vi("x", 1, 5)], [_vi("y", 2, 3)], [_init("w", w), _init("b", bias)])
    dag = O.expand(model)
    xs = dag.inputs["x"].reshape(-1)
    for (c, t), n in np.ndenumerate(dag.outputs["y"][0]):
        assert dag.biases[n] == float(bias[c])
        got = dict(zip(dag.srcs[n].tolist(), dag.weights[n].tolist()))
        assert got == {int(xs[t + k]): float(w[c, 0, k]) for k in range(3)}


def test_sign_condition_counterexample():
    """theory.md section 3: (w1, w2, v) = (1, 1, 1) vs (-1, -1, 1) have the same Phi, yet ReLU(x) vs 0."""

    def net(w1, w2, v):
        nodes = [
            onnx.helper.make_node("MatMul", ["x", "w1"], ["a"]),
            onnx.helper.make_node("Relu", ["a"], ["ra"]),
            onnx.helper.make_node("MatMul", ["ra", "w2"], ["b"]),
            onnx.helper.make_node("Relu", ["b"], ["rb"]),
            onnx.helper.make_node("MatMul", ["rb", "v"], ["y"]),
        ]
        inits = [_init("w1", [[w1]]), _init("w2", [[w2]]), _init("v", [[v]])]
        return _tiny(nodes, [_vi("x", 1)], [_vi("y", 1)], inits)

    a, b = net(1, 1, 1), net(-1, -1, 1)
    assert O.path_metric(a, b) == 0.0
    m = onnxlip.path_metric(a, b)
    assert m.sign_flips == 2 and not m.exact
    assert m.path_metric == pytest.approx(2.0, rel=REL)  # M(a, mid) + M(mid, b) with mid = (0, 0, 1)
    for r in (0.5, 1.0, 3.0):
        res = onnxlip.bound(a, b, input_bound=r, samples=0)
        assert res.bound >= r  # |ReLU(r) - 0| = r


@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_oracle_expansion_matches_onnxruntime(family, seed):
    spec, dag = case(family, seed)
    assert dag.num_paths() <= 100_000
    for scale in (1.0, 5.0):
        O.check_forward(spec.model, dag, samples=5, seed=seed, scale=scale)
    assert O.companion_dp(dag) == pytest.approx(O.path_norm(dag), rel=1e-12)
    assert O.companion_dp(dag, 2.0) == pytest.approx(O.path_norm(dag, 2.0), rel=1e-12)


def test_factory_covers_required_ops():
    ops = set()
    for family, seed in CASES:
        ops |= {n.op_type for n in case(family, seed)[0].model.graph.node}
    required = {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Div", "Mul", "BatchNormalization", "AveragePool",
        "GlobalAveragePool", "MaxPool", "GlobalMaxPool", "Concat", "Split", "Gather", "Pad", "Reshape", "Flatten",
        "Transpose", "Squeeze", "Unsqueeze", "Slice", "Resize", "Relu", "LeakyRelu", "Clip", "Max", "Min",
        "ReduceMean", "ReduceSum", "PRelu", "Neg", "Mean",
    }  # fmt: skip
    assert required <= ops, required - ops


# ---- path-norm -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [1.0, 2.0, 0.5, 3.0])
@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_path_norm_equals_brute_force(family, seed, q):
    spec, dag = case(family, seed)
    want = O.path_norm(dag, q)
    got = onnxlip.path_norm(spec.model, q=q)
    assert _rel(got.path_norm, want) <= REL, (got.path_norm, want)
    assert got.log10_path_norm == pytest.approx(math.log10(want), abs=1e-6)


def test_batchnorm_fold_never_increases_path_norm():
    """theory.md section 3: folding BN into a biased Gemm gives an equal or smaller path-norm (|a b + c| <=
    |a b| + |c|); onnxlip reports the folded one (test_path_norm_equals_brute_force[batchnorm_bias-*])."""
    strictly = 0
    for seed in SEEDS:
        spec, folded = case("batchnorm_bias", seed)
        unfolded = O.path_norm(spec.model)
        assert O.path_norm(folded) <= unfolded * (1 + 1e-12)
        strictly += O.path_norm(folded) < unfolded * (1 - 1e-6)
        O.check_forward(spec.model, folded, seed=seed)  # the fold keeps the function
    assert strictly > 0


def test_path_norm_accepts_a_path(tmp_path):
    spec, dag = case("mixed", 0)
    p = tmp_path / "m.onnx"
    onnx.save(spec.model, str(p))
    assert _rel(onnxlip.path_norm(str(p)).path_norm, O.path_norm(dag)) <= REL


def _with_outputs_and_batch(model: onnx.ModelProto, outputs=None, batch=None) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    if outputs is not None:
        del out.graph.output[:]
        out.graph.output.extend([onnx.helper.make_empty_tensor_value_info(o) for o in outputs])
    if batch is not None:
        for vi in out.graph.input:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_value = batch
    return out


@pytest.mark.parametrize("family", ["gemm", "conv2d", "maxpool", "residual", "activations", "layout"])
def test_path_norm_of_an_intermediate_output(family):
    spec, _ = case(family, 0)
    relus = [n.output[0] for n in spec.model.graph.node if n.op_type in ("Relu", "LeakyRelu", "Clip")]
    name = relus[-1]
    for q in (1.0, 2.0):
        want = O.path_norm(_with_outputs_and_batch(spec.model, outputs=[name]), q)
        got = onnxlip.path_norm(spec.model, q=q, output=[name])
        assert _rel(got.path_norm, want) <= REL, (name, got.path_norm, want)


@pytest.mark.parametrize("family", ["gemm", "matmul", "conv1d", "avgpool", "concat", "layout"])
def test_path_norm_with_input_shapes(family):
    """A batch of 2 through the symbolic batch dimension: twice the paths (the oracle expands batch 2 itself)."""
    spec, _ = case(family, 1)
    batched = _with_outputs_and_batch(spec.model, batch=2)
    shapes = {}
    for vi in spec.model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [2] + [d.dim_value for d in dims[1:]]
    for q in (1.0, 2.0):
        want = O.path_norm(batched, q)
        assert _rel(want, 2 ** (1 / q) * O.path_norm(case(family, 1)[1], q)) <= 1e-12
        got = onnxlip.path_norm(spec.model, q=q, input_shapes=shapes)
        assert _rel(got.path_norm, want) <= REL, (got.path_norm, want)


# ---- path-metric -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_metric_pruned_is_exact(family, seed):
    spec, _ = case(family, seed)
    other, _, want, flips, dominated = pair(family, seed, "prune")
    if not spec.fold:
        assert dominated and flips == 0  # a pruned copy is dominated, unless BN folding mixes bias signs
    m = onnxlip.path_metric(spec.model, other)
    assert (m.sign_flips > 0) == (flips > 0)
    if flips == 0:
        assert m.exact == dominated
    if dominated and flips == 0:
        assert _rel(m.path_metric, want) <= REL, (m.path_metric, want)
        back = onnxlip.path_metric(other, spec.model)  # the pruned copy first: b dominates a, still exact
        assert back.exact and _rel(back.path_metric, want) <= REL
    else:
        assert m.path_metric >= want * (1 - REL)


@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_metric_noised_is_an_upper_bound(family, seed):
    spec, _ = case(family, seed)
    other, _, want, flips, dominated = pair(family, seed, "noise")
    m = onnxlip.path_metric(spec.model, other)
    assert (m.sign_flips > 0) == (flips > 0)
    assert m.path_metric >= want * (1 - REL), (m.path_metric, want)
    if flips == 0:
        assert m.exact == dominated
    if m.exact:
        assert _rel(m.path_metric, want) <= REL
    # the noised copy, swapped: the metric is symmetric
    back = onnxlip.path_metric(other, spec.model)
    assert _rel(back.path_metric, m.path_metric) <= 1e-5


@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_metric_sign_flipped(family, seed):
    spec, _ = case(family, seed)
    other, _, want, flips, _ = pair(family, seed, "flip")
    m = onnxlip.path_metric(spec.model, other)
    assert m.sign_flips > 0 and flips > 0 and not m.exact
    assert m.path_metric >= want * (1 - REL), (m.path_metric, want)
    if not spec.fold:
        # theory.md section 3: M(a, mid) + M(mid, b), mid zero where the signs flip and the smaller magnitude
        # elsewhere (here a itself: b = a with entries negated); both pairs are dominated, so each term is exact
        va = F.params_of(spec.model, spec.params)
        vb = F.params_of(other, spec.params)
        mid = F._replace_inits(spec.model, {n: np.where(va[n] * vb[n] < 0, 0.0, va[n]) for n in va})
        split = O.path_metric(spec.model, mid) + O.path_metric(mid, other)
        assert _rel(m.path_metric, split) <= REL, (m.path_metric, split)


@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_metric_quantized(family, seed):
    spec, _ = case(family, seed)
    other, _, want, flips, dominated = pair(family, seed, "quantize")
    m = onnxlip.path_metric(spec.model, other)
    assert (m.sign_flips > 0) == (flips > 0)
    assert m.path_metric >= want * (1 - REL)
    if dominated and flips == 0:
        assert m.exact and _rel(m.path_metric, want) <= REL


# ---- the bound on ||R_a(x) - R_b(x)||_1 ------------------------------------------------------------------------------
def _samples(dag: O.Dag, r: float, rng, n: int = 48) -> dict[str, np.ndarray]:
    """Uniform points, random box corners, all corners when there are few, sparse points and zero, ||x||_inf <= r."""
    sizes = {k: v.size for k, v in dag.inputs.items()}
    total = sum(sizes.values())
    rows = [rng.uniform(-r, r, size=(n, total)), r * rng.choice([-1.0, 1.0], size=(n, total))]
    if total <= 8:
        rows.append(r * np.array(list(itertools.product([-1.0, 1.0], repeat=total))))
    sparse = np.zeros((total, total))
    sparse[np.arange(total), np.arange(total)] = r * rng.choice([-1.0, 1.0], size=total)
    rows += [sparse, np.zeros((1, total))]
    flat = np.concatenate(rows).astype(np.float32)
    out, k = {}, 0
    for name, ids in dag.inputs.items():
        out[name] = flat[:, k : k + ids.size].reshape((len(flat),) + ids.shape[1:])  # ids.shape[0]: batch 1
        k += ids.size
    return out


def _outputs(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Per-sample outputs of the original model, flattened and concatenated: shape (B, total outputs)."""
    outs = sess.run(None, feeds)  # the batch dimension is symbolic
    batch = next(iter(feeds.values())).shape[0]
    return np.concatenate([np.asarray(o, dtype=np.float64).reshape(batch, -1) for o in outs], axis=1)


def _check_batched(sess, feeds) -> None:
    one = {k: v[:1] for k, v in feeds.items()}
    assert np.allclose(_outputs(sess, one), _outputs(sess, feeds)[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["prune", "quantize", "noise", "flip"])
@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_bound_holds_on_samples(family, seed, kind):
    spec, dag = case(family, seed)
    other, _, want, _, _ = pair(family, seed, kind)
    sa, sb = O.session(spec.model), O.session(other)
    rng = np.random.default_rng([seed, 3])
    for r in (0.5, 1.0, 3.0):
        res = onnxlip.bound(spec.model, other, input_bound=r, samples=0)
        assert res.bound >= max(r, 1.0) * want * (1 - REL)
        # bound = max(R, 1) * metric, possibly inflated by a tiny certified rounding margin
        assert 0 <= res.log10_bound - res.log10_path_metric - math.log10(max(r, 1.0)) <= 1e-4
        feeds = _samples(dag, r, rng)
        _check_batched(sa, feeds)
        ya, yb = _outputs(sa, feeds), _outputs(sb, feeds)
        diff = np.abs(ya - yb).sum(axis=1)
        slack = res.bound * 1e-5 + 1e-6 * (np.abs(ya).sum(axis=1) + np.abs(yb).sum(axis=1))
        worst = int(np.argmax(diff - slack))
        assert np.all(diff <= res.bound + slack), (r, float(diff[worst]), res.bound)
        # and the oracle's exact metric bounds the observed differences too (when there are no sign flips)
        if pair(family, seed, kind)[3] == 0:
            assert np.all(diff <= max(r, 1.0) * want * (1 + 1e-5) + slack)


@pytest.mark.parametrize("family", ["conv2d", "mixed", "activations", "batchnorm_bias"])
def test_bound_with_sampling_reports_observed_below_bound(family):
    spec, _ = case(family, 2)
    for kind in ("noise", "flip"):
        other = pair(family, 2, kind)[0]
        res = onnxlip.bound(spec.model, other, input_bound=2.0, samples=64, sample_seconds=1.0)
        assert res.samples > 0 and res.observed_max_l1_diff is not None
        assert 0 < res.observed_max_l1_diff <= res.bound * (1 + 1e-5)


@pytest.mark.parametrize("family,seed", CASES, ids=IDS)
def test_output_l1_below_path_norm(family, seed):
    """theory.md section 6: ||R(x)||_1 <= max(||x||_inf, 1) ||Phi||_1 (the metric to theta' = 0)."""
    spec, dag = case(family, seed)
    pn = onnxlip.path_norm(spec.model).path_norm
    sess = O.session(spec.model)
    rng = np.random.default_rng([seed, 5])
    for r in (0.3, 1.0, 4.0):
        feeds = _samples(dag, r, rng, n=32)
        y = _outputs(sess, feeds)
        assert np.all(np.abs(y).sum(axis=1) <= max(r, 1.0) * pn * (1 + 1e-5))


# ---- rescaling invariance (theory.md section 6) ----------------------------------------------------------------------
def _lambdas(rng, n):
    return np.exp(rng.uniform(math.log(0.1), math.log(10.0), size=n))


def _rescale_gemm(ws, bs, rng):
    ws, bs = [w.copy() for w in ws], [b.copy() for b in bs]
    for i in range(len(ws) - 1):  # hidden ReLU neurons of layer i
        lam = _lambdas(rng, ws[i].shape[1])
        ws[i] *= lam[None, :]
        bs[i] *= lam
        ws[i + 1] /= lam[:, None]
    return ws, bs


def _rescale_conv(ws, bs, head, rng):
    ws, bs, head = [w.copy() for w in ws], [b.copy() for b in bs], head.copy()
    for i in range(len(ws)):  # every output channel (its neurons share the conv weights)
        lam = _lambdas(rng, ws[i].shape[0])
        ws[i] *= lam[:, None, None, None]
        bs[i] *= lam
        if i + 1 < len(ws):
            ws[i + 1] /= lam[None, :, None, None]
        else:  # Flatten (N, C, 3, 3) -> rows c * 9 + k of the head
            head /= np.repeat(lam, 9)[:, None]
    return ws, bs, head


def _prune_like(arrs, rng_seed):
    rng = np.random.default_rng(rng_seed)
    masks = [rng.random(a.shape) < 0.3 for a in arrs]
    return masks, lambda xs: [np.where(m, 0.0, x) for m, x in zip(masks, xs)]


@pytest.mark.parametrize("seed", range(4))
def test_rescaling_invariance_gemm_chain(seed):
    rng = np.random.default_rng([seed, 11])
    ws, bs = F.gemm_chain_weights(rng, dims=(3, 5, 4, 4, 2))
    ws2, bs2 = _rescale_gemm(ws, bs, rng)
    a, a2 = F.gemm_chain_model(ws, bs), F.gemm_chain_model(ws2, bs2)
    _, prune_w = _prune_like(ws, seed)
    _, prune_b = _prune_like(bs, seed + 100)
    p, p2 = F.gemm_chain_model(prune_w(ws), prune_b(bs)), F.gemm_chain_model(prune_w(ws2), prune_b(bs2))
    _check_invariance(a, a2, p, p2, rng)


@pytest.mark.parametrize("seed", range(3))
def test_rescaling_invariance_conv_chain(seed):
    rng = np.random.default_rng([seed, 12])
    ws, bs, head = F.conv_chain_weights(rng)
    ws2, bs2, head2 = _rescale_conv(ws, bs, head, rng)
    a, a2 = F.conv_chain_model(ws, bs, head), F.conv_chain_model(ws2, bs2, head2)
    _, prune_w = _prune_like(ws + [head], seed)
    _, prune_b = _prune_like(bs, seed + 100)
    pw, pw2 = prune_w(ws + [head]), prune_w(ws2 + [head2])
    p = F.conv_chain_model(pw[:-1], prune_b(bs), pw[-1])
    p2 = F.conv_chain_model(pw2[:-1], prune_b(bs2), pw2[-1])
    _check_invariance(a, a2, p, p2, rng)


def _check_invariance(a, a2, p, p2, rng):
    for q in (1.0, 2.0):
        n1, n2 = onnxlip.path_norm(a, q=q).path_norm, onnxlip.path_norm(a2, q=q).path_norm
        assert _rel(n2, n1) <= 2 * REL, (q, n1, n2)
        assert _rel(n1, O.path_norm(a, q)) <= REL
        assert _rel(O.path_norm(a2, q), O.path_norm(a, q)) <= REL  # the oracle agrees it is invariant
    m1, m2 = onnxlip.path_metric(a, p), onnxlip.path_metric(a2, p2)
    assert m1.exact and m2.exact
    assert _rel(m2.path_metric, m1.path_metric) <= 2 * REL, (m1.path_metric, m2.path_metric)
    assert _rel(m1.path_metric, O.path_metric(a, p)) <= REL
    dag = O.expand(a)
    feeds = _samples(dag, 2.0, rng, n=32)
    y1, y2 = _outputs(O.session(a), feeds), _outputs(O.session(a2), feeds)
    assert np.allclose(y1, y2, rtol=1e-4, atol=1e-5 * (np.abs(y1).max() + 1.0))


# ---- regressions: onnxlip bugs found by the oracle (fixed since; they were strict xfails) --------------------------
def _conv_bn(conv_op: str, with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    b = F.Builder(rng, "bug")
    x = b.input(2, 4)
    if conv_op == "Conv":
        h = b.conv(x, 2, (2,), bias=with_bias)
    else:
        h = b.conv_transpose(x, 2, (2,), bias=with_bias)
    return b.model(b.batchnorm(h, follows_bias=with_bias))


def test_conv_without_bias_then_batchnorm_ok():
    for op in ("Conv", "ConvTranspose"):
        m = _conv_bn(op, with_bias=False)
        assert _rel(onnxlip.path_norm(m).path_norm, O.path_norm(m)) <= REL


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_bug_conv_with_bias_then_batchnorm(op):
    """Was: Conv/ConvTranspose WITH a bias followed by BatchNormalization (or a per-channel Add/Mul) crashed in
    passes._merge (_channel_vector(conv bias of shape (C,), rank, axis=1) returned None -> TypeError)."""
    m = _conv_bn(op, with_bias=True)
    want = O.path_norm(O.fold_batchnorm(m))
    assert _rel(onnxlip.path_norm(m).path_norm, want) <= REL


def test_bug_avgpool_ceil_mode_window_in_padding():
    """Was: AveragePool with ceil_mode=1 whose extra last window would start in the right padding (ONNX shape
    inference gives one more output than onnxruntime computes) crashed the import with a raw numpy ValueError."""
    x = _vi("x", 1, 4)
    node = onnx.helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2], strides=[2], pads=[0, 1], ceil_mode=1)
    m = _tiny([node], [x], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [])
    want = O.path_norm(m)  # onnxruntime computes 2 outputs: (x0 + x1) / 2, (x2 + x3) / 2
    try:
        got = onnxlip.path_norm(m).path_norm
    except onnxlip.OnnxlipError:
        return  # a clear refusal is acceptable too
    assert _rel(got, want) <= REL


@pytest.mark.parametrize("op", ["Mul", "Div", "Add"])
def test_bug_metric_with_scalar_constant_after_relu(op):
    """Was: path_metric crashed (onnxruntime 'Unable to handle object of type numpy.float32') on an unfolded
    Add/Mul/Div by a 0-d (scalar) constant, e.g. after a Relu."""
    rng = np.random.default_rng(0)
    b = F.Builder(rng, "bug")
    h = b.relu(b.gemm(b.input(3), 2))
    spec = b.spec(b.op(op, [h, b.const(2.0, learned=False)]))
    other = F.perturb(spec, "prune", rng)
    m = onnxlip.path_metric(spec.model, other)
    assert _rel(m.path_metric, O.path_metric(spec.model, other)) <= REL


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, 0, 3, 0, 0, 1, 0], [0, 0, -1, 2, 0, 0, 1, -1]])
def test_copying_pads_are_onnxruntimes(mode, pads):
    """Pad in reflect, edge and wrap mode (opset 19) becomes a select whose index map is onnxruntime's Pad of an
    index tensor, crops (negative pads) included."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxlip.importer import import_model
    from tests.helpers import make_model

    shape = [1, 2, 4, 5]
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)
    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(pads, np.int64), "pads")],
        opset=19,
    )
    iota = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"x": iota})[0]
    (select,) = import_model(model).nodes
    assert select.op == "select"
    np.testing.assert_array_equal(select.attrs["index"], expected.astype(np.int64))


def _assert_map_is_onnxruntimes(node, shape, inits, opset: int, seed: int, rtol: float, atol: float) -> None:
    """The IR of a one-node Resize/Upsample model reproduces onnxruntime's output: a copy map (select) for nearest,
    separable coefficient matrices (interpolate) otherwise."""
    from onnx import TensorProto, helper

    from onnxlip.importer import import_model
    from onnxlip.ops.interpolate import apply_maps
    from tests.helpers import make_model

    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
        opset=opset,
    )
    x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (ir,) = import_model(model).nodes
    if ir.op == "select":
        np.testing.assert_array_equal(x.reshape(-1)[ir.attrs["index"]], want)
    else:
        assert ir.op == "interpolate"
        np.testing.assert_allclose(apply_maps(x.astype(np.float64), ir.attrs["mats"]), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("opset", [7, 8, 9, 13])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_and_resize_maps_are_onnxruntimes(opset, mode):
    """Upsample (scales as an attribute in opsets 7-8, an input in 9) and Resize (13), nearest or linear: the
    IR's copy map or coefficient matrices reproduce onnxruntime's output."""
    from onnx import helper, numpy_helper

    shape, scales = [1, 2, 4, 3], [1.0, 1.0, 2.0, 3.0]
    inits = [numpy_helper.from_array(np.asarray(scales, np.float32), "s")]
    if opset < 9:
        node, inits = helper.make_node("Upsample", ["x"], ["y"], mode=mode, scales=scales), []
    elif opset == 9:
        node = helper.make_node("Upsample", ["x", "s"], ["y"], mode=mode)
    else:
        node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode=mode)
    _assert_map_is_onnxruntimes(node, shape, inits, opset, opset, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("by", ["scales", "sizes"])
@pytest.mark.parametrize("axes", [[2, 3], [-1], [3, 2]])
def test_resize_with_axes_is_onnxruntimes(mode, by, axes):
    """Resize-18's `axes` attribute (scales or sizes for the named axes only, in their order): the IR's map
    reproduces onnxruntime's output."""
    from onnx import helper, numpy_helper

    shape = [1, 2, 4, 3]
    factor = {2: 2.0, 3: 3.0, -1: 3.0}
    if by == "scales":
        inputs, value = ["x", "", "s"], np.asarray([factor[a] for a in axes], np.float32)
    else:
        inputs, value = ["x", "", "", "s"], np.asarray([int(shape[a] * factor[a]) for a in axes], np.int64)
    node = helper.make_node("Resize", inputs, ["y"], mode=mode, axes=axes)
    inits = [numpy_helper.from_array(value, "s")]
    _assert_map_is_onnxruntimes(node, shape, inits, 18, len(axes), rtol=1e-6, atol=1e-6)


def test_resize_axes_that_do_not_fit_are_refused():
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    for axes, value in (([2, 2], [2.0, 2.0]), ([5], [2.0]), ([2, 3], [2.0])):
        node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear", axes=axes)
        model = make_model(
            [node],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.asarray(value, np.float32), "s")],
            opset=18,
        )
        with pytest.raises(onnxlip.errors.OnnxlipError):
            onnxlip.path_norm(model)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize(
    "transform", ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel", "half_pixel_symmetric"]
)
@pytest.mark.parametrize(
    "scales", [[1.0, 1.0, 1.5, 2.0], [1.0, 1.0, 1.7, 2.5], [1.0, 1.0, 0.6, 1.0], [1.0, 1.0, 0.5, 0.75]]
)
def test_resize_maps_are_onnxruntimes_in_every_coordinate_mode(mode, transform, scales):
    """Non-integer output lengths: the ONNX reference evaluator computes align_corners and pytorch_half_pixel
    with the unrounded length n * scale, onnxruntime (and torch) with floor(n * scale); the maps must be
    onnxruntime's (3 -> 4 with align_corners gave coefficients off by up to 0.47)."""
    from onnx import helper, numpy_helper

    shape = [1, 2, 3, 4]
    extra = {"nearest_mode": "floor"} if mode == "nearest" else {}
    node = helper.make_node(
        "Resize", ["x", "", "s"], ["y"], mode=mode, coordinate_transformation_mode=transform, **extra
    )
    inits = [numpy_helper.from_array(np.asarray(scales, np.float32), "s")]
    _assert_map_is_onnxruntimes(node, shape, inits, 19, 7, rtol=1e-5, atol=1e-6)


def _keys_cubic_map(n: int, scale: int, a, transform: str, exclude_outside: bool) -> np.ndarray:
    """The exact (out, in) matrix of a cubic Resize by an integer scale (ONNX spec: Keys kernel with coefficient
    a, edge taps clamped, or dropped and renormalised with exclude_outside), in rational arithmetic."""
    from fractions import Fraction

    def kernel(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else Fraction(0)

    rows = []
    for o in range(n * scale):
        x = Fraction(o, scale) if transform == "asymmetric" else Fraction(2 * o + 1, 2 * scale) - Fraction(1, 2)
        start = math.floor(x) - 1
        taps = [(j, kernel(x - j)) for j in range(start, start + 4)]
        if exclude_outside:
            taps = [(j, w) for j, w in taps if 0 <= j < n]
            total = sum(w for _, w in taps)
            taps = [(j, w / total) for j, w in taps]
        row = [Fraction(0)] * n
        for j, w in taps:
            row[min(max(j, 0), n - 1)] += w
        rows.append(row)
    return np.array([[float(v) for v in row] for row in rows])


@pytest.mark.parametrize("a", [-0.5, -0.75])
@pytest.mark.parametrize("exclude_outside", [0, 1])
@pytest.mark.parametrize("transform", ["asymmetric", "half_pixel"])
def test_cubic_resize_coefficients_are_exact(a, exclude_outside, transform):
    """The reference evaluator computed cubic coefficients in float32 (cubic_coeff_a reaches it as a float32
    scalar): 1.4e-6 off, and a certified l_inf bound of 1.249999 for a map whose constant is 5/4. The imported map
    now equals the exact rational one to float64 rounding."""
    from fractions import Fraction

    from onnx import TensorProto, helper, numpy_helper

    from onnxlip.importer import import_model
    from tests.helpers import make_model

    n, scale = 6, 3
    node = helper.make_node(
        "Resize",
        ["x", "", "s"],
        ["y"],
        mode="cubic",
        cubic_coeff_a=a,
        exclude_outside=exclude_outside,
        coordinate_transformation_mode=transform,
    )
    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, n, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, scale, 1], np.float32), "s")],
        opset=18,
    )
    (ir,) = import_model(model).nodes
    exact = _keys_cubic_map(n, scale, Fraction(a), transform, bool(exclude_outside))
    np.testing.assert_allclose(ir.attrs["mats"][2], exact, rtol=0, atol=1e-14)
    if transform == "asymmetric" and exclude_outside and a == -0.5:
        bounds = {b.norm: b.value for b in onnxlip.lipschitz(model, "inf", lower_seconds=0.1).bounds}
        assert bounds["inf->inf"] >= 1.25


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sign_split_is_symmetric_and_certified(seed):
    """A sign flip that appears only after BatchNorm folding (the folded bias changes sign): the split at a mid
    both models dominate gives the same metric for (a, b) and (b, a) (the split at a's zeroed entries differed by
    up to 2%, found by invariant fuzzing), and with its rounding margin it bounds the oracle's true metric."""
    spec = F.build("batchnorm_bias", seed)
    other = F.perturb(spec, "prune", np.random.default_rng([seed, 17, 5]))
    ab, ba = onnxlip.path_metric(spec.model, other), onnxlip.path_metric(other, spec.model)
    true = O.path_metric(O.expand(O.fold_batchnorm(spec.model)), O.expand(O.fold_batchnorm(other)))
    assert _rel(ab.path_metric, ba.path_metric) <= 1e-6
    for m in (ab, ba):
        assert m.path_metric / (1 - m.rounding_margin) >= true * (1 - 1e-12)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_dilated_pools_with_same_padding(op):
    """onnxruntime computes a pool's SAME pads without the dilation, the ONNX spec with it: where the two differ
    the model has no single meaning and is refused (it was analysed by the spec while onnxruntime, which measures
    the lower bounds, computed another function: lower 1.73 > upper 0). Where they agree it is analysed, and the
    expansion matches onnxruntime."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    def pool(shape, **attrs):
        node = helper.make_node(op, ["x"], ["y"], auto_pad="SAME_UPPER", **attrs)
        io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
        return make_model([node], io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [], opset=19)

    differs = pool([1, 2, 3, 1], kernel_shape=[3, 2], dilations=[1, 2], strides=[1, 2])
    result = onnxlip.check(differs)
    assert not result.supported and "SAME with dilations" in result.errors[0].reason
    agrees = pool([1, 2, 7, 7], kernel_shape=[1, 3], dilations=[2, 1], strides=[1, 1])  # dilation on a 1-wide axis
    assert onnxlip.check(agrees).supported
    if op == "MaxPool":  # (the oracle's probes stop at opset 17, before AveragePool had dilations)
        O.check_forward(agrees)
    result = onnxlip.lipschitz(agrees, "1", lower_seconds=0.2)
    assert 0 < result.lower["value"] <= result.upper.value
