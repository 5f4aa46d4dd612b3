"""Pruning: the file differs from the input only in zeroed entries, loads in onnxruntime, reaches the requested
sparsity, and its certified bound (exact metric) holds on random inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.api import analyse
from onnxlip.prune import (
    apply_masks,
    criterion_scores,
    ir_keep_masks,
    masks_for,
    masks_for_many,
    prunable_tensors,
    prune,
    prune_sweep,
)
from onnxlip.structure import align_params
from tests import dag_factory as F
from tests.helpers import make_model
from tests.test_bad_input import cli

MODELS = ["models/digits_cnn.onnx", "models/digits_mlp.onnx"]
OUTPUTS = {"models/digits_mlp.onnx": ["add_result2"], "models/digits_cnn.onnx": None}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("criterion", ["path-magnitude", "magnitude"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruned_file_differs_only_in_zeroed_entries(tmp_path, model, criterion, scope):
    out = tmp_path / "pruned.onnx"
    r = prune(model, 0.4, criterion=criterion, scope=scope, out_path=out, output=OUTPUTS[model])
    a, b = onnx.load(model), onnx.load(str(out))
    assert a.graph.node == b.graph.node and a.opset_import == b.opset_import and a.ir_version == b.ir_version
    assert [i.name for i in a.graph.initializer] == [i.name for i in b.graph.initializer]
    changed = 0
    for ia, ib in zip(a.graph.initializer, b.graph.initializer):
        x, y = numpy_helper.to_array(ia), numpy_helper.to_array(ib)
        assert x.dtype == y.dtype and x.shape == y.shape
        diff = x != y
        assert np.all(y[diff] == 0)
        changed += int(diff.sum())
    assert changed > 0 and r.exact and r.sparsity == pytest.approx(0.4, abs=0.01)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model", MODELS)
def test_bound_of_pruned_model_holds(tmp_path, model):
    out = tmp_path / "pruned.onnx"
    r = prune(model, 0.6, out_path=out, output=OUTPUTS[model], input_bound=1.0)
    check = onnxlip.bound(model, out, input_bound=1.0, samples=256, output=OUTPUTS[model])
    assert check.exact and check.bound == pytest.approx(r.bound, rel=1e-12)
    assert 0 < check.observed_max_l1_diff <= r.bound


def test_path_magnitude_prunes_the_smallest_scores_first():
    scores = onnxlip.scores("models/digits_cnn.onnx")
    r = prune_sweep("models/digits_cnn.onnx", [1 / 3784], criteria=["path-magnitude"])[0]
    smallest = min(float(t.relative.min()) for n, t in scores.tensors.items() if n.endswith("weight"))
    assert r.pruned_entries == 1
    assert r.path_metric == pytest.approx(smallest * 10**scores.log10_path_norm, rel=1e-5, abs=1e-9)


def test_plot_names_the_file_it_writes(tmp_path):
    """matplotlib appends .png to a name without an extension: '--plot weird' for an input 'weird.png' wrote over the
    input model; an unknown extension failed after the whole sweep, as an internal error (exit 3)."""
    pytest.importorskip("matplotlib")
    model = tmp_path / "weird.png"
    model.write_bytes(open("models/digits_cnn.onnx", "rb").read())
    before = model.read_bytes()
    for plot in (tmp_path / "weird", tmp_path / "x.xyz"):
        code, out, err = cli("prune", model, "--sweep", "0.5", "--plot", plot)
        assert code == 2 and "image format" in err
    assert model.read_bytes() == before and not (tmp_path / "x.xyz").exists()
    code, out, err = cli("prune", "models/digits_cnn.onnx", "--sweep", "0.5", "--plot", tmp_path / "s.SVG")
    assert code == 0 and (tmp_path / "s.SVG").read_bytes().lstrip().startswith(b"<?xml")


def test_sweep_cli_and_plot(tmp_path):
    pytest.importorskip("matplotlib")  # the optional 'plot' extra (installed by the 'test' extra)
    code, out, err = cli(
        "prune", "models/digits_cnn.onnx", "--sweep", "0.2,0.5", "--json", "--plot", tmp_path / "sweep.png"
    )
    assert code == 0, err
    assert json.loads(out)["plot"] == str(tmp_path / "sweep.png")
    rows = json.loads(out)["results"]
    assert [(r["criterion"], r["requested_sparsity"]) for r in rows] == [
        ("path-magnitude", 0.2),
        ("path-magnitude", 0.5),
        ("magnitude", 0.2),
        ("magnitude", 0.5),
    ]
    keys = {
        "criterion",
        "scope",
        "sparsity",
        "path_metric",
        "log10_path_metric",
        "exact",
        "bound",
        "log10_bound",
        "input_bound",
        "output",
    }
    assert all(keys <= set(r) for r in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_cli_single_and_refusals(tmp_path):
    code, out, err = cli("prune", "models/digits_cnn.onnx", "--sparsity", "0.3", "-o", tmp_path / "p.onnx", "--json")
    assert code == 0 and json.loads(out)["output"] == str(tmp_path / "p.onnx")
    code, out, err = cli("prune", "models/digits_cnn.onnx", "--sparsity", "0.3", "-o", "models/digits_cnn.onnx")
    assert code == 2 and "overwrite" in err
    code, out, err = cli("prune", "models/digits_cnn.onnx", "--sweep", "0.3", "-o", tmp_path / "q.onnx")
    assert code == 2 and "--sweep writes none" in err and not (tmp_path / "q.onnx").exists()
    code, out, err = cli("prune", "models/digits_cnn.onnx", "--sparsity", "1.5", "-o", tmp_path / "q.onnx")
    assert code == 2 and "between 0 and 1" in err
    code, out, err = cli(
        "prune", "models/digits_cnn.onnx", "--sparsity", "0.3", "-o", tmp_path / "q.onnx", "--criterion", "random"
    )
    assert code == 2 and "unknown criterion" in err


def test_scores_cli_npz(tmp_path):
    code, out, err = cli("scores", "models/digits_cnn.onnx", "-o", tmp_path / "s.npz", "--json")
    assert code == 0
    obj = json.loads(out)
    assert {"log10_path_norm", "output", "tensors"} <= set(obj)
    data = np.load(tmp_path / "s.npz")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load("models/digits_cnn.onnx").graph.initializer}
    for name, t in obj["tensors"].items():
        assert list(data[name].shape) == t["shape"] == list(inits[name].shape)
        assert {"shape", "log10_sum", "log10_max"} <= set(t)


# ---- pruning as masks on the IR (no re-import per sparsity) ----------------------------------------------------
@pytest.mark.parametrize("family", ["gemm", "matmul", "conv2d", "convtranspose", "batchnorm", "residual", "mixed"])
def test_masks_on_the_ir_equal_reimporting_the_pruned_file(family):
    spec = F.build(family, 0)
    m = analyse(spec.model)
    tensors = prunable_tensors(m, include_biases=True)
    masks = masks_for(criterion_scores(m, tensors, "magnitude"), 0.5, "global")
    keep = ir_keep_masks(m.graph, masks)
    assert keep is not None
    vb = align_params(m.graph, analyse(apply_masks(m.proto, masks)).graph)
    for p in m.graph.params():
        want = np.where(keep[p.name], p.value, 0) if p.name in keep else p.value
        np.testing.assert_array_equal(vb[p.name], want)


def test_shared_initializer_falls_back_to_the_file(tmp_path):
    """One weight used by two MatMuls: zeroing it changes both IR parameters, so the sweep re-imports."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 6)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W"], ["h"]),
        onnx.helper.make_node("Relu", ["h"], ["r"]),
        onnx.helper.make_node("MatMul", ["r", "W"], ["y"]),
    ]
    model = make_model(
        nodes,
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(w, "W")],
    )
    m = analyse(model)
    masks = masks_for(criterion_scores(m, prunable_tensors(m), "magnitude"), 0.5, "global")
    assert ir_keep_masks(m.graph, masks) is None
    out = tmp_path / "pruned.onnx"
    r = prune(model, 0.5, criterion="magnitude", out_path=out)
    want = onnxlip.path_metric(model, out)
    assert r.exact and r.path_metric == pytest.approx(want.path_metric, rel=1e-12)
    # from a file without an output file: the weights are imported in place, the protobuf loaded for the fallback
    path = tmp_path / "tied.onnx"
    onnx.save(model, str(path))
    again = prune(path, 0.5, criterion="magnitude")
    assert again.path_metric == r.path_metric and again.pruned_entries == r.pruned_entries


def test_one_selection_serves_every_sparsity():
    rng = np.random.default_rng(1)
    scores = {"a": rng.random((40, 7)), "b": np.round(rng.random(500), 2)}  # b has ties
    sparsities = [0.0, 0.1, 0.33, 0.5, 0.9, 1.0]
    for scope in ("global", "layer"):
        many = masks_for_many(scores, sparsities, scope)
        for s, masks in zip(sparsities, many):
            single = {n: _reference_keep(v.ravel(), s).reshape(v.shape) for n, v in scores.items()}
            if scope == "global":
                flat = np.concatenate([v.ravel() for v in scores.values()])
                ref = _reference_keep(flat, s)
                single = {"a": ref[:280].reshape(40, 7), "b": ref[280:]}
            for n in scores:
                np.testing.assert_array_equal(masks[n], single[n])


def _reference_keep(values, sparsity):
    """Sort-based reference: prune the k smallest, ties in position order."""
    k = int(round(sparsity * values.size))
    keep = np.ones(values.size, dtype=bool)
    keep[np.argsort(values, kind="stable")[:k]] = False
    return keep


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_counts_of_an_already_sparse_model_match_the_written_file(tmp_path, scope):
    """Zeros already in the file count as pruned, whether the criterion removes them or keeps them (ties at 0)."""
    model = onnx.load("models/digits_cnn_pruned.onnx")
    path = tmp_path / "sparse.onnx"
    onnx.save(model, str(path))
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for criterion in ("magnitude", "path-magnitude"):
        for sparsity in (0.1, 0.5, 0.9):
            out = tmp_path / f"{criterion}{sparsity}{scope}.onnx"
            r = prune(path, sparsity, criterion=criterion, scope=scope, out_path=out)
            written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
            names = [n for n in written if n.endswith("weight")]
            assert r.prunable_entries == sum(tensors[n].size for n in names)
            assert r.pruned_entries == sum(int(np.count_nonzero(written[n] == 0)) for n in names)
            assert r.sparsity == r.pruned_entries / r.prunable_entries


def test_sweep_reports_progress_once_per_result():
    ticks = []
    results = prune_sweep("models/digits_cnn.onnx", [0.2, 0.5, 0.8], progress=lambda: ticks.append(len(ticks)))
    assert len(ticks) == len(results) == 6


def _two_gemms_sharing(w_name: str = "W") -> onnx.ModelProto:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", w_name, "b1"], ["z"]),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("Gemm", ["r", w_name, "b2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in ((w_name, (4, 4)), ("b1", (4,)), ("b2", (4,)))
    ]
    for init in inits:
        init.doc_string = f"doc of {init.name}"
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)


def test_a_weight_used_twice_is_pruned_without_a_false_note(tmp_path):
    """One initializer read by two Gemms: pruning the file's tensor prunes both uses. The second use ('W#1' in the
    IR) was reported as 'not a float initializer of the file, not pruned'."""
    out = tmp_path / "pruned.onnx"
    r = onnxlip.prune(_two_gemms_sharing(), 0.5, out_path=out)
    assert r.notes == []
    (w,) = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer if i.name == "W"]
    assert int(np.count_nonzero(w == 0)) == 8 and r.pruned_entries == 8


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_written_files_keep_initializer_doc_strings(tmp_path, sparsity):
    """numpy_helper.from_array writes no doc_string: prune (even at sparsity 0) and rescale dropped them, and a
    written file must differ from its input only in the changed entries."""
    from onnxlip.rescale import rescale

    model = _two_gemms_sharing("Wa")
    model.graph.node[2].input[1] = "Wb"  # two weights, so that one ReLU layer can be rescaled
    wb = onnx.TensorProto()
    wb.CopyFrom(model.graph.initializer[0])
    wb.name, wb.doc_string = "Wb", "doc of Wb"
    model.graph.initializer.append(wb)
    onnxlip.prune(model, sparsity, out_path=tmp_path / "p.onnx")
    rescaled, result = rescale(model, seed=0)
    assert result.rescaled_neurons > 0
    for written in (onnx.load(str(tmp_path / "p.onnx")), rescaled):
        assert {i.name: i.doc_string for i in written.graph.initializer} == {
            i.name: i.doc_string for i in model.graph.initializer
        }


def _tied_model(w_in, w, w_out):
    """x -> Win -> ReLU -> W -> ReLU -> W -> ReLU -> Wout: one MatMul weight used twice (a module applied twice)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("MatMul", ["x", "Win"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "W"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "Wout"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (("Win", w_in), ("W", w), ("Wout", w_out))]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)


def test_a_tied_weight_is_ranked_by_the_scores_of_all_its_uses():
    """One MatMul weight used twice (a module applied twice): its path-magnitude criterion is the sum of both uses'
    scores (the derivative of ||Phi||_1 in a tied weight); the first use alone was used before."""
    rng = np.random.default_rng(0)
    model = _tied_model(rng.normal(size=(3, 6)) * 3, rng.normal(size=(6, 6)), rng.normal(size=(6, 2)))
    m = analyse(model, None, None, keep_proto=True)
    tensors = prunable_tensors(m)
    assert set(tensors) == {"Win", "W", "Wout"}
    got = criterion_scores(m, tensors, "path-magnitude")
    s = onnxlip.scores(model)
    both = s.tensors["W"].relative + s.tensors["W#1"].relative
    ratio = got["W"].astype(np.float64) / both  # one common power of two for every tensor
    assert np.allclose(ratio, ratio.flat[0], rtol=1e-6)
    np.testing.assert_allclose(got["Win"] / s.tensors["Win"].relative, ratio.flat[0], rtol=1e-6)
    assert not np.allclose(got["W"] / s.tensors["W"].relative, ratio.flat[0], rtol=1e-3)  # not the first use alone


@pytest.mark.parametrize("log10", [False, True])
def test_scores_file_of_a_tied_weight_has_the_initializer_names_and_the_derivative(tmp_path, log10):
    """`scores -o` wrote one array per use ("W" and "W#1", a key no initializer has). The file now holds one array
    per initializer: a shared one's score is |w| times the derivative of ||Phi||_1 in w, here checked by central
    differences of the brute-force path-norm in |w|: exact for any step, as ||Phi||_1 is a polynomial of degree
    at most 2 in one tied entry."""
    from tests import oracle

    rng = np.random.default_rng(3)
    w_in, w, w_out = rng.normal(size=(3, 6)), rng.normal(size=(6, 6)), rng.normal(size=(6, 2))
    path = tmp_path / "m.onnx"
    onnx.save(_tied_model(w_in, w, w_out), str(path))
    args = ["--log10"] if log10 else []
    code, out, err = cli("scores", path, "-o", tmp_path / "s.npz", "--json", *args)
    assert code == 0, err
    result = json.loads(out)
    assert result["tensors"]["W#1"]["initializer"] == "W" and "read by 2 ops" in result["notes"][0]
    saved = np.load(tmp_path / "s.npz")
    assert set(saved.files) == {"Win", "W", "Wout", "__log10_path_norm__"}
    norm = 10.0 ** float(saved["__log10_path_norm__"])
    w32 = np.abs(w.astype(np.float32).astype(np.float64))
    for i, j in [(0, 0), (2, 5), (4, 1)]:
        up, down = w32.copy(), w32.copy()
        up[i, j], down[i, j] = 2 * w32[i, j], 0.0  # steps of +-|w_ij|: exact in float32
        norms = [oracle.path_norm(_tied_model(np.abs(w_in), v, np.abs(w_out))) for v in (up, down)]
        want = (norms[0] - norms[1]) / 2
        got = (10.0 ** saved["W"][i, j] if log10 else saved["W"][i, j]) * norm
        assert got == pytest.approx(want, rel=1e-5)


def test_an_initializer_named_like_a_second_use_is_not_summed_into_another(tmp_path):
    """A file may name two different initializers 'W' and 'W#1' (the IR's name for a second use of W): the tied
    criterion summed them (different shapes: an internal error, exit 3; equal shapes: a wrong ranking)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    arrays = {"W": rng.normal(size=(4, 6)), "W#1": rng.normal(size=(6, 2))}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W#1"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    model = make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    m = analyse(model, None, None, keep_proto=True)
    got = criterion_scores(m, prunable_tensors(m), "path-magnitude")
    s = onnxlip.scores(model)
    for name in arrays:
        ratio = got[name].astype(np.float64) / s.tensors[name].relative
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-6)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    code, out, err = cli("prune", path, "--sparsity", "0.5", "-o", tmp_path / "p.onnx", "--json")
    assert code == 0, err


def test_a_tied_weight_with_a_scale_folded_into_each_use_is_still_one_initializer():
    """W read by two MatMuls, each followed by a per-channel Mul that is folded into it: the uses' sources are
    (W, s1) and (W, s2), and the grouping asked for (W,) alone, so `scores` kept a key W#1 and W counted one
    use (0.18-0.78 of its score). Checked against central differences of the brute-force path-norm in |W|."""
    from onnx import TensorProto, helper

    from tests import oracle

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4)).astype(np.float32)
    s1, s2 = (rng.uniform(0.5, 2, size=4).astype(np.float32) for _ in range(2))

    def model(w):
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["a"]),
            helper.make_node("Mul", ["a", "s1"], ["b"]),
            helper.make_node("Relu", ["b"], ["c"]),
            helper.make_node("MatMul", ["c", "W"], ["d"]),
            helper.make_node("Mul", ["d", "s2"], ["y"]),
        ]
        inits = [numpy_helper.from_array(a, n) for n, a in (("W", w), ("s1", s1), ("s2", s2))]
        io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
        return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)

    result = onnxlip.scores(model(w))
    assert result.uses() == {"W": ["W", "W#1"]} or result.uses() == {"W": ["W#1", "W"]}
    got = result.initializer_scores()["W"] * 10.0**result.log10_path_norm
    a = np.abs(w).astype(np.float64)
    for i, j in [(0, 1), (2, 2), (3, 0)]:
        up, down = a.copy(), a.copy()
        up[i, j], down[i, j] = 2 * a[i, j], 0.0  # ||Phi||_1 is of degree <= 2 in one tied entry: exact
        want = (oracle.path_norm(model(up.astype(np.float32))) - oracle.path_norm(model(down.astype(np.float32)))) / 2
        assert got[i, j] == pytest.approx(want, rel=1e-5)


def _weight_also_prelu_slope(tmp_path):
    """W1 is the first MatMul's weight and, read again, the slope of a later PRelu (one initializer, two roles)."""
    w1 = np.array([[-0.5, 2.0, 2.5, 1.5]], np.float32)
    w3 = np.full((4, 4), 1.0, np.float32)
    w3[1:, 0] = -5.0
    inits = [
        numpy_helper.from_array(np.array([10.0, 0, 0, 0], np.float32), "c1"),
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(w3, "W3"),
        numpy_helper.from_array(np.ones((4, 2), np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "c1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W3"], ["h2"]),
        helper.make_node("PRelu", ["h2", "W1"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W2"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    path = tmp_path / "slope.onnx"
    onnx.save(make_model(nodes, [x], [y], inits), path)
    return path


def test_a_weight_that_is_also_a_fixed_constant_is_not_pruned(tmp_path):
    """Zeroing an entry of W1 would also zero a PRelu slope, a fixed edge of the network that no path-metric
    covers: prune certified 7.5 where the written model moved by 17.5. Such tensors are left, with a note."""
    path = _weight_also_prelu_slope(tmp_path)
    out = tmp_path / "pruned.onnx"
    r = onnxlip.prune(path, 0.5, criterion="magnitude", out_path=out)
    assert any("fixed constants" in n and "W1" in n for n in r.notes)
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    assert np.array_equal(written["W1"], original["W1"])
    assert not np.array_equal(written["W3"], original["W3"])
    xs = np.linspace(-1.0, 1.0, 401, dtype=np.float32)[:, None, None]
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (path, out))
    observed = max(float(np.abs(a.run(None, {"x": x})[0] - b.run(None, {"x": x})[0]).sum()) for x in xs)
    assert 0 < observed <= r.bound
    assert r.bound == pytest.approx(onnxlip.bound(path, out, samples=0).bound, rel=1e-12)
    scores = onnxlip.scores(path)
    assert any("fixed constants" in n and "'W1'" in n for n in scores.notes)


def test_prunable_tensors_lists_the_fixed_constants_it_leaves(tmp_path):
    path = _weight_also_prelu_slope(tmp_path)
    m = analyse(path)
    fixed: list[str] = []
    tensors = prunable_tensors(m, fixed=fixed)
    assert fixed == ["W1"] and "W1" not in tensors
