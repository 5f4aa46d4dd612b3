"""Rescaling: same function, same path-norm, metrics and scores; visibly different magnitudes; magnitude pruning
of the rescaled model collapses while path-magnitude pruning is unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxlip
from onnxlip.prune import prune_sweep
from onnxlip.rescale import rescale
from tests import dag_factory as F
from tests.test_bad_input import cli

CASES = [("models/digits_cnn.onnx", None), ("models/digits_mlp.onnx", ["add_result2"])]


def _outputs(model, x, names=None):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(names, {sess.get_inputs()[0].name: x})


def _inputs(path, n=16):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else n for d in sess.get_inputs()[0].shape]
    return np.random.default_rng(0).random(shape).astype(np.float32)


@pytest.mark.parametrize("path,output", CASES)
@pytest.mark.parametrize("factors", [(1.0, 128.0, 4096.0), (0.013, 0.7, 3.3, 91.0)])
def test_rescaled_model_is_the_same_function_with_other_magnitudes(path, output, factors):
    model, result = rescale(path, seed=1, factors=factors)
    assert result.rescaled_neurons > 0 and result.rescaled_layers >= 2
    x = _inputs(path)
    for a, b in zip(_outputs(path, x), _outputs(model, x)):  # every graph output, tails included
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max() + 1e-7)
    before = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ratios = [
        np.abs(after[n]).max() / np.abs(before[n]).max()
        for n in before
        if before[n].dtype.kind == "f" and before[n].size > 1 and np.abs(before[n]).max() > 0
    ]
    assert max(ratios) > 5 or min(ratios) < 0.2  # visibly different magnitudes
    pa, pb = onnxlip.path_norm(path, output=output), onnxlip.path_norm(model, output=output)
    assert pb.log10_path_norm == pytest.approx(pa.log10_path_norm, abs=1e-6)
    sa, sb = onnxlip.scores(path, output=output), onnxlip.scores(model, output=output)
    for name, t in sa.tensors.items():
        assert np.allclose(sb.tensors[name].relative, t.relative, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", ["gemm", "conv2d", "maxpool", "matmul"])
def test_rescaling_keeps_metrics_on_random_dags(family):
    spec = F.build(family, 0)
    model, _ = rescale(spec.model, seed=3, factors=(0.25, 2.0, 64.0))
    pruned = prune_sweep(spec.model, [0.3], criteria=["path-magnitude"])[0]
    pruned_rescaled = prune_sweep(model, [0.3], criteria=["path-magnitude"])[0]
    assert pruned_rescaled.log10_path_metric == pytest.approx(pruned.log10_path_metric, abs=1e-5)


def test_magnitude_pruning_collapses_after_rescaling_path_magnitude_does_not():
    path = "models/digits_cnn.onnx"
    model, _ = rescale(path, seed=0)
    base = prune_sweep(path, [0.6], criteria=["path-magnitude", "magnitude"])
    attacked = prune_sweep(model, [0.6], criteria=["path-magnitude", "magnitude"])
    assert attacked[0].log10_bound == pytest.approx(base[0].log10_bound, abs=1e-6)  # path-magnitude: unchanged
    assert attacked[1].log10_bound > base[1].log10_bound + 0.15  # magnitude: > 1.4x the certified drift


def test_cli(tmp_path):
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", tmp_path / "r.onnx", "--seed", "2", "--json")
    assert (
        code == 0 and json.loads(out)["rescaled_neurons"] > 0 and json.loads(out)["output"] == str(tmp_path / "r.onnx")
    )
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", "models/digits_cnn.onnx")
    assert code == 2 and "overwrite" in err
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", tmp_path / "s.onnx", "--factors", "1,-2")
    assert code == 2 and "positive" in err
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", tmp_path / "s.onnx", "--factors", "1,,2")
    assert code == 2 and "comma-separated list of numbers" in err  # an empty item is a typo, not skipped
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", tmp_path / "s.onnx", "--factors", "1", "--json")
    (note,) = json.loads(out)["notes"]  # rescalable layers exist: every neuron drew 1 (it said there were none)
    assert code == 0 and "drew the factor 1" in note


@pytest.mark.parametrize("activation", ["LeakyRelu", "PRelu", "LeakyRelu-2.5", "PRelu-wide", "Abs"])
def test_leaky_and_parametric_relu_neurons_are_rescaled(tmp_path, activation):
    """LeakyRelu, PRelu (any slopes) and Abs are positively homogeneous too: their neurons are rescaled, the
    function and the path-norm stay."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    rng = np.random.default_rng(5)
    nodes, inits = [helper.make_node("Gemm", ["x", "W1", "b1"], ["z"], transB=1)], []
    if activation.startswith("PRelu"):
        low, high = (-1.0, 2.0) if activation.endswith("wide") else (0.0, 1.0)
        nodes.append(helper.make_node("PRelu", ["z", "slope"], ["h"]))
        inits.append(numpy_helper.from_array(rng.uniform(low, high, 6).astype(np.float32), "slope"))
    elif activation == "Abs":
        nodes.append(helper.make_node("Abs", ["z"], ["h"]))
    else:
        nodes.append(helper.make_node("LeakyRelu", ["z"], ["h"], alpha=2.5 if "-" in activation else 0.2))
    nodes.append(helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], transB=1))
    inits += [
        numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    rescaled, result = rescale(tmp_path / "m.onnx", seed=2, factors=(0.5, 8.0, 64.0))
    assert result.rescaled_layers == 1 and result.rescaled_neurons > 0
    x = np.random.default_rng(0).uniform(-2, 2, (16, 4)).astype(np.float32)
    a, b = _outputs(str(tmp_path / "m.onnx"), x)[0], _outputs(rescaled, x)[0]
    assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    pa, pb = onnxlip.path_norm(tmp_path / "m.onnx"), onnxlip.path_norm(rescaled)
    assert pb.log10_path_norm == pytest.approx(pa.log10_path_norm, abs=1e-6)


def _graph(nodes, inits, x_shape) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    rng = np.random.default_rng(1)
    arrays = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), k) for k, s in inits.items()]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], arrays)


def _axis_cases():
    from onnx import helper

    n = helper.make_node
    relu = n("Relu", ["z"], ["r"])
    return {  # name: (model, whether its ReLU can be rescaled)
        "conv then a MatMul over the width": (
            _graph([n("Conv", ["x", "K", "b"], ["z"]), relu, n("MatMul", ["r", "W2"], ["y"])],
                   {"K": (4, 3, 1, 1), "b": (4,), "W2": (4, 2)}, [1, 3, 5, 4]),
            False,
        ),
        "MatMul on a 4-D map then a conv": (
            _graph([n("MatMul", ["x", "W1"], ["z"]), relu, n("Conv", ["r", "K"], ["y"])],
                   {"W1": (4, 4), "K": (2, 4, 1, 1)}, [1, 4, 5, 4]),
            False,
        ),
        "MatMul on tokens, Flatten, Gemm": (
            _graph([n("MatMul", ["x", "W1"], ["z"]), relu, n("Flatten", ["r"], ["f"]), n("Gemm", ["f", "W2"], ["y"])],
                   {"W1": (3, 4), "W2": (12, 2)}, [1, 3, 3]),
            True,
        ),
        "BatchNorm over the tokens' axis 1, then MatMul": (
            _graph([n("MatMul", ["x", "W1"], ["z0"]), n("BatchNormalization", ["z0", "g", "be", "mu", "va"], ["z"]),
                    relu, n("MatMul", ["r", "W2"], ["y"])],
                   {"W1": (4, 4), "g": (4,), "be": (4,), "mu": (4,), "va": (4,), "W2": (4, 2)}, [1, 4, 4]),
            False,
        ),
        "MatMul on a 4-D map, MaxPool over its last axis": (
            _graph([n("MatMul", ["x", "W1"], ["z"]), relu,
                    n("MaxPool", ["r"], ["p"], kernel_shape=[1, 2], pads=[0, 0, 0, 1]),
                    n("MatMul", ["p", "W2"], ["y"])], {"W1": (4, 4), "W2": (4, 3)}, [1, 2, 3, 4]),
            False,
        ),
        "Gemm with a bias per row, (M, 1)": (
            _graph([n("Gemm", ["x", "W1", "b1"], ["z"]), relu, n("Gemm", ["r", "W2"], ["y"])],
                   {"W1": (3, 3), "b1": (3, 1), "W2": (3, 2)}, [3, 3]),
            False,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_axis_cases()))
def test_rescaling_divides_the_axis_it_multiplied(case):
    """A layer's channels (axis 1 for Conv, Gemm and BatchNorm; the last axis for MatMul at any rank) must be the
    axis the next layer reads: the counts matched, so rescale multiplied one axis and divided another (outputs off
    by 1e3 relative, and MixNet's path-norm 17392 -> 4558086). Channels on the last axis flatten interleaved.
    A Gemm bias of shape (M, 1) broadcasts along the batch, not the outputs: skipped, not a false underflow."""
    model, expected = _axis_cases()[case]
    if case.startswith("BatchNorm"):
        va = [i for i in model.graph.initializer if i.name == "va"][0]
        va.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(va)) + 1, "va"))
    out, result = rescale(model, seed=0)
    assert (result.rescaled_neurons > 0) == expected
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = (np.random.default_rng(2).standard_normal(shape) * 2).astype(np.float32)
    np.testing.assert_allclose(_outputs(out, x)[0], _outputs(model, x)[0], rtol=1e-5, atol=1e-6)


def test_rescaling_torch_mixnet_keeps_its_function(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.exporter_models import build

    path = tmp_path / "mix.onnx"
    module = build("mix").eval()
    x = torch.randn(1, *module.input_shape)
    torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    out, result = rescale(str(path), seed=0)
    assert result.rescaled_neurons > 0  # the token Linear's neurons, whose Flatten interleaves them
    data = x.numpy()
    np.testing.assert_allclose(_outputs(out, data)[0], _outputs(str(path), data)[0], rtol=1e-4, atol=1e-5)


def test_float16_weights_are_not_rescaled_into_subnormals():
    """Dividing float16 weights of 0.004-0.02 by 4096 makes float16 subnormals, which keep few bits: the written
    model was off by 7e-3 relative (2.4% per weight). Refused; factors that keep them normal still work."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    rng = np.random.default_rng(0)
    arrays = {
        "W1": (rng.standard_normal((8, 16)) * 0.3).astype(np.float16),
        "b1": (rng.standard_normal(16) * 0.1).astype(np.float16),
        "W2": (rng.choice([-1, 1], (16, 4)) * rng.uniform(0.004, 0.02, (16, 4))).astype(np.float16),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["z"]),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["y"]),
    ]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 8])]
    inits = [numpy_helper.from_array(v, n) for n, v in arrays.items()]
    model = make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 4])], inits)
    with pytest.raises(onnxlip.OnnxlipError, match="subnormal"):
        rescale(model, seed=0, factors=[4096.0])
    out, result = rescale(model, seed=0, factors=[0.5, 4.0])
    assert result.rescaled_neurons > 0
    x = rng.standard_normal((4, 8)).astype(np.float16)
    a, b = (np.asarray(_outputs(m, x)[0], np.float64) for m in (model, out))
    assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()  # float16 rounding of the rescaled weights


def test_an_infinite_constant_the_rescaling_does_not_touch_is_no_overflow():
    """A Clip(z, -inf, 6) after the last layer: every other command accepts the model, and rescale refused it
    ("rescaling makes entries of 'lo' overflow") because it checked every float initializer, not the rescaled."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    rng = np.random.default_rng(0)
    arrays = {
        "W1": rng.normal(size=(2, 3)).astype(np.float32),
        "B1": rng.normal(size=3).astype(np.float32),
        "W2": rng.normal(size=(3, 2)).astype(np.float32),
        "lo": np.array(-np.inf, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["z"]),
        helper.make_node("Clip", ["z", "lo", "hi"], ["y"]),
    ]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])]
    inits = [numpy_helper.from_array(v, n) for n, v in arrays.items()]
    model = make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])], inits)
    out, result = rescale(model, seed=0, factors=[0.25, 8.0])
    assert result.rescaled_neurons == 3
    x = rng.normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_allclose(_outputs(out, x)[0], _outputs(model, x)[0], rtol=1e-5, atol=1e-6)
    lo = next(t for t in out.graph.initializer if t.name == "lo")
    assert numpy_helper.to_array(lo) == -np.inf


# ---- the rescaled model is run before it is written (activations that leave float range) -----------------------
def _dense_relu_dense(first: onnx.NodeProto, inits: dict[str, np.ndarray], width: int) -> onnx.ModelProto:
    """x (N, 4) -> `first` (to z, `width` channels) -> Relu -> Gemm(W2) -> y (N, 3), float32."""
    from onnx import TensorProto, helper

    from tests.helpers import make_model

    rng = np.random.default_rng(7)
    w2 = rng.choice([-1.0, 1.0], (width, 3)) * rng.uniform(0.5, 1.0, (width, 3))  # no weight near 0
    nodes = [first, helper.make_node("Relu", ["z"], ["r"]), helper.make_node("Gemm", ["r", "W2"], ["y"])]
    arrays = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in {**inits, "W2": w2}.items()]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], arrays)


def _wide_gemm() -> onnx.ModelProto:
    from onnx import helper

    rng = np.random.default_rng(8)
    w1 = rng.choice([-1.0, 1.0], (4, 6)) * rng.uniform(0.5, 1.0, (4, 6))
    return _dense_relu_dense(helper.make_node("Gemm", ["x", "W1"], ["z"]), {"W1": w1}, 6)


def test_factors_that_keep_the_weights_but_overflow_the_activations_are_refused(tmp_path):
    """Factors of 1e36 keep every weight of this model a normal float32 (the outgoing ones, 0.5-1, become 5e-37 to
    1e-36), but its activations reach 4e36 on the box [-1, 1] and overflow on inputs of size 1024: refused
    (rescale wrote it, and the model computed Inf and NaN there). 1e30 leaves headroom and is accepted."""
    model = _wide_gemm()
    with pytest.raises(onnxlip.OnnxlipError, match=r"NaN or Inf in its output 'y'.*\[-1024, 1024\].*factors closer"):
        rescale(model, seed=0, factors=[1e36])
    out, result = rescale(model, seed=0, factors=[1e30])
    assert result.rescaled_neurons == 6 and result.checked_inputs == 5 and result.notes == []
    x = np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype(np.float32)
    np.testing.assert_allclose(_outputs(out, x)[0], _outputs(model, x)[0], rtol=1e-5, atol=1e-6)
    onnx.save(model, str(tmp_path / "m.onnx"))
    code, out_json, err = cli("rescale", tmp_path / "m.onnx", "-o", tmp_path / "r.onnx", "--factors", "1e36", "--json")
    assert code == 2 and "overflow" in json.loads(out_json)["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing written, no temporary file left


def test_factors_that_make_the_activations_subnormal_are_refused():
    """A BatchNorm whose running variance is 1e30 puts out values of 1e-15: rescaled by 1e-30 (gamma 1e-30 and
    the next weights of 1e30 are normal float32) they are subnormals of 1 or 2 units, and the outputs were off by
    tens of percent. Refused; factors that keep them normal are accepted."""
    from onnx import helper

    bn = {"g": np.ones(4), "be": np.zeros(4), "mu": np.zeros(4), "va": np.full(4, 1e30)}
    model = _dense_relu_dense(helper.make_node("BatchNormalization", ["x", "g", "be", "mu", "va"], ["z"]), bn, 4)
    with pytest.raises(onnxlip.OnnxlipError, match=r"output 'y' differs from the input model's by .* factors closer"):
        rescale(model, seed=0, factors=[1e-30])
    out, result = rescale(model, seed=0, factors=[1e-10, 0.3, 7.0])
    assert result.rescaled_neurons == 4 and result.checked_inputs == 5
    x = np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype(np.float32)
    a, b = _outputs(model, x)[0], _outputs(out, x)[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_factors_of_1e38_are_refused_by_the_cli_and_nothing_is_written(tmp_path):
    """Found by the output-file hunt: `--factors 1e38` exited 0 and wrote a digits CNN whose every output was NaN
    (its float32 activations overflow; its last weights, divided by 1e38, were subnormals of a few bits)."""
    target = tmp_path / "rs.onnx"
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", target, "--factors", "1e38", "--json")
    message = json.loads(out)["error"]
    assert code == 2 and "fc.weight" in message and "subnormal" in message and "factors closer to 1" in message
    assert list(tmp_path.iterdir()) == []
    code, out, err = cli("rescale", "models/digits_cnn.onnx", "-o", target, "--factors", "1e38")
    assert code == 2 and "factors closer to 1" in err and list(tmp_path.iterdir()) == []


def test_float32_entries_that_matter_are_not_made_subnormal():
    """Factors of 1e-38 made every BatchNorm bias (0.005-0.2) and conv2 bias of the digits CNN a float32 subnormal
    of 15-20 bits (outputs off by up to 1e-6 relative), with no word: refused, as float16 subnormals are. Entries
    negligible in their neuron may become subnormals (the digits MLP's weights of 1e-37 beside 0.1: see CASES)."""
    with pytest.raises(onnxlip.OnnxlipError, match=r"'bn\.bias' float32 subnormals.*factors closer to 1"):
        rescale("models/digits_cnn.onnx", seed=0, factors=[1e-38])
    model, result = rescale("models/digits_mlp.onnx", seed=0)
    tiny = np.finfo(np.float32).tiny
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("coefficient")]
    assert any(np.any((w != 0) & (np.abs(w) < tiny)) for w in weights) and result.checked_inputs == 5


@pytest.mark.parametrize("path", ["models/digits_cnn.onnx", "models/digits_mlp.onnx"])
def test_ordinary_factors_pass_the_run(path):
    """The defaults (powers of two: outputs bit for bit the input model's), odd factors (rounding) and wide ones
    are run on 5 inputs and accepted."""
    for factors in [(1.0, 128.0, 4096.0), (0.013, 0.7, 3.3, 91.0), (1e-3, 1e3)]:
        _, result = rescale(path, seed=4, factors=factors)
        assert result.rescaled_neurons > 0 and result.checked_inputs == 5 and result.notes == [], factors


def test_a_model_onnxruntime_cannot_run_is_rescaled_with_a_note(tmp_path):
    """An op onnxruntime has no kernel for after the last layer: the weights are checked, the run is not done,
    and the result says so (rescale never needed onnxruntime before)."""
    from onnx import helper

    model = _wide_gemm()
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.append(helper.make_node("Frobnicate", ["y0"], ["y"], domain="example.custom"))
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    out, result = rescale(model, seed=0, factors=[0.5, 8.0])
    assert result.rescaled_neurons > 0 and result.checked_inputs == 0
    (note,) = result.notes
    assert "not run" in note and "onnxruntime" in note
    # the CLI shows it, in its JSON and in words
    from tests.test_bad_input import cli

    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    code, stdout, _ = cli("rescale", path, "-o", tmp_path / "r.onnx", "--factors", "0.5,8", "--json")
    assert code == 0 and note in json.loads(stdout)["notes"]
    code, stdout, _ = cli("rescale", path, "-o", tmp_path / "r2.onnx", "--factors", "0.5,8")
    assert code == 0 and "not run" in stdout


def test_a_rescaling_that_is_not_exact_is_caught_by_the_run(monkeypatch):
    """The run's second net: with each factor replaced by its mantissa (within [1, 2), no range problem) the
    outputs must still be the input model's to rounding. A rescaling that forgets to divide the next layer (a
    simulated bug) is refused, not written."""
    import importlib

    module = importlib.import_module("onnxlip.rescale")
    real = module._outgoing

    def forgets_to_divide(*args):
        found = real(*args)
        return None if found is None else (lambda lam: None, found[1])

    monkeypatch.setattr(module, "_outgoing", forgets_to_divide)
    with pytest.raises(onnxlip.OnnxlipError, match="not exact.*please report it"):
        rescale("models/digits_cnn.onnx", seed=0, factors=[0.7, 3.3])
