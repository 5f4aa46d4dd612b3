"""Bad input gets a clear error (OnnxlipError in the API, exit code 2 in the CLI), never a traceback or a
silently wrong number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import MismatchError, ModelLoadError, OnnxlipError, ShapeError, UnsupportedModelError
from tests.helpers import gemm_chain, make_model

MODELS = Path(__file__).resolve().parents[1] / "models"


def _mlp(width=4, seed=0):
    rng = np.random.default_rng(seed)
    return gemm_chain(
        [rng.normal(size=(3, width)), rng.normal(size=(width, 2))], [rng.normal(size=width), rng.normal(size=2)]
    )


def _save(model, path):
    onnx.save(model, str(path))
    return path


def cli(*args, columns: int = 200):
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlip.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage\xff" * 10, b"not an onnx file at all"])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        onnxlip.path_norm(path)
    code, out, err = cli("pathnorm", path)
    assert code == 2 and "Traceback" not in err and "error" in err


def test_truncated_files(tmp_path):
    data = _mlp().SerializeToString()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(OnnxlipError):
            onnxlip.path_norm(path)
        code, out, err = cli("pathnorm", path, "--json")
        assert code == 2 and "Traceback" not in err
        assert "error" in json.loads(out)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        onnxlip.path_norm(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        onnxlip.path_norm(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(bad):
    m = _mlp()
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[1, 1] = bad
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    with pytest.raises(OnnxlipError, match="NaN or Inf"):
        onnxlip.path_norm(m)


def _conv_bn_model(weight_entry: float, var: float, eps: float, gamma: float = 1.0) -> onnx.ModelProto:
    """Conv -> BatchNormalization: the importer keeps the folded weight as factors (conv weight x BN scale).
    `weight_entry` and `gamma` both sit on output channel 0."""
    w = np.ones((2, 3, 3, 3), np.float32)
    w[0, 0, 1, 1] = weight_entry
    bn = {"g": [gamma, 1.0], "b": [0.0, 0.0], "mu": [0.0, 0.0], "var": [var, 1.0]}
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(np.array(v), n) for n, v in bn.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["y"], epsilon=eps),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )


@pytest.mark.parametrize(
    "weight_entry, var, eps, gamma, message",
    [
        (np.nan, 1.0, 1e-5, 1.0, "NaN or Inf"),  # NaN in the conv weight under a folded BatchNorm
        (np.inf, 1.0, 1e-5, 1.0, "NaN or Inf"),
        (3e38, 1.0, 1e-5, 1e300, "NaN or Inf"),  # finite factors whose product overflows float64
        (1.0, 0.0, 0.0, 1.0, "variance \\+ epsilon is not positive"),  # an infinite scale, refused earlier
    ],
)
def test_non_finite_folded_weights_exit_2(tmp_path, weight_entry, var, eps, gamma, message):
    path = tmp_path / "bad.onnx"
    onnx.save(_conv_bn_model(weight_entry, var, eps, gamma), str(path))
    with pytest.raises(OnnxlipError, match=message):
        onnxlip.path_norm(path)
    code, out, err = cli("pathnorm", path, "--json")
    assert code == 2 and "Traceback" not in err and "Warning" not in err
    assert "error" in json.loads(out)


def _reference_log10_conv_bn(weight_entry: float, gamma: float) -> float:
    """log10 path-norm of the Conv -> BN model: the folded |weights| applied to the all-ones 5x5 input (pads 1)."""
    w = np.ones((2, 3, 3, 3))
    w[0, 0, 1, 1] = weight_entry
    scale = np.array([gamma, 1.0]) / np.sqrt(1.0 + 1e-5)
    folded = np.abs(w * scale[:, None, None, None])
    x = np.pad(np.ones((3, 5, 5)), ((0, 0), (1, 1), (1, 1)))
    total = sum(
        float((folded[o] * x[:, i : i + 3, j : j + 3]).sum()) for o in range(2) for i in range(5) for j in range(5)
    )
    return float(np.log10(total))


@pytest.mark.parametrize("weight_entry, gamma", [(3e38, 1e-30), (1.0, 1e300), (3e38, 1e200)])
def test_large_but_finite_folded_weights_are_exact(tmp_path, weight_entry, gamma):
    """Folded weights beyond float32's range (exponents >= 120) take the general path, without warnings."""
    path = tmp_path / "ok.onnx"
    onnx.save(_conv_bn_model(weight_entry, 1.0, 1e-5, gamma), str(path))
    got = onnxlip.path_norm(path).log10_path_norm
    assert got == pytest.approx(_reference_log10_conv_bn(weight_entry, gamma), abs=1e-6)
    code, out, err = cli("pathnorm", path, "--json")
    assert code == 0 and "Warning" not in err


def _conv_model(dims):
    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )


def test_unknown_dynamic_dimensions_need_input_shape(tmp_path):
    m = _conv_model(["N", 3, "H", "W"])
    with pytest.raises(ShapeError, match="--input-shape x=1x3x224x224"):
        onnxlip.path_norm(m)
    r = onnxlip.path_norm(m, input_shapes={"x": [1, 3, 5, 5]})
    # ones kernel, 2 out x 3 in channels, 3x3 taps on a zero-padded 5x5 map: 2*3*(2+3+3+3+2)^2 paths of weight 1
    assert r.path_norm == pytest.approx(2 * 3 * 13**2, rel=1e-7)
    path = _save(m, tmp_path / "dyn.onnx")
    code, out, err = cli("pathnorm", path)
    assert code == 2 and "--input-shape" in err
    code, out, err = cli("pathnorm", path, "--input-shape", "x=1x3x5x5", "--json")
    assert code == 0 and json.loads(out)["path_norm"] == pytest.approx(r.path_norm)
    with pytest.raises(ShapeError, match="model's inputs"):
        onnxlip.path_norm(m, input_shapes={"nope": [1, 3, 5, 5]})
    code, out, err = cli("pathnorm", path, "--input-shape", "x=1x3xfive")
    assert code == 2 and "NAME=D1xD2" in err


def test_input_shape_may_not_contradict_a_fixed_dimension(tmp_path):
    """--input-shape fills in unknown dimensions: giving a 9x9 map to a model declared 8x8 certified a bound (and a
    path-norm) of a model onnxruntime cannot run, exit 0. A fixed batch may still be set to 1 (one sample)."""
    m = _conv_model(["N", 3, 5, 5])
    with pytest.raises(ShapeError, match=r"contradicts the model's fixed shape \?x3x5x5 \(axis 2, 3\)"):
        onnxlip.path_norm(m, input_shapes={"x": [1, 3, 6, 6]})
    path = _save(m, tmp_path / "fixed.onnx")
    code, out, err = cli("bound", path, path, "--input-shape", "x=1x3x6x5")
    assert code == 2 and "contradicts" in err and "axis 2" in err
    vector = make_model(  # a 1-D input: its only axis is no batch ([9] for [4] gave path-norm 18 instead of 8)
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [],
    )
    with pytest.raises(ShapeError, match="contradicts"):
        onnxlip.path_norm(vector, input_shapes={"x": [9]})
    batch3 = _conv_model([3, 3, 5, 5])
    assert onnxlip.path_norm(batch3, input_shapes={"x": [1, 3, 5, 5]}).path_norm == onnxlip.path_norm(m).path_norm


def test_batch_dimension_defaults_to_one():
    r_dyn = onnxlip.path_norm(_conv_model(["N", 3, 5, 5]))
    r_fix = onnxlip.path_norm(_conv_model([1, 3, 5, 5]))
    assert r_dyn.path_norm == r_fix.path_norm


def test_mismatched_pairs():
    with pytest.raises(MismatchError, match="differ"):
        onnxlip.path_metric(_mlp(4), _mlp(5))
    rng = np.random.default_rng(0)
    deeper = gemm_chain(
        [rng.normal(size=(3, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 2))],
        [rng.normal(size=4), rng.normal(size=4), rng.normal(size=2)],
    )
    with pytest.raises(MismatchError):
        onnxlip.bound(_mlp(4), deeper, samples=0)


def test_mismatched_pair_cli(tmp_path):
    a, b = _save(_mlp(4), tmp_path / "a.onnx"), _save(_mlp(5), tmp_path / "b.onnx")
    code, out, err = cli("bound", a, b, "--json")
    assert code == 2 and "differ" in json.loads(out)["error"]


def test_pairs_with_other_tensor_names(tmp_path):
    """Two exports of one network with other input and output names pair by position, sampling included."""
    a = _mlp(4)
    b = onnx.ModelProto()
    b.CopyFrom(a)
    renames = {b.graph.input[0].name: "input.1", b.graph.output[0].name: "logits"}
    for vi in list(b.graph.input) + list(b.graph.output):
        vi.name = renames.get(vi.name, vi.name)
    for node in b.graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
        node.output[:] = [renames.get(t, t) for t in node.output]
    for init in b.graph.initializer:  # and a changed weight
        if init.name == b.graph.node[0].input[1]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(0.5), init.name))
    r = onnxlip.bound(_save(a, tmp_path / "a.onnx"), _save(b, tmp_path / "b.onnx"), samples=32)
    assert r.samples == 32 and 0 < r.observed_max_l1_diff <= r.bound


def _external_model(tmp_path, location):
    m = _mlp()
    tensor = m.graph.initializer[0]
    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return _save(m, tmp_path / "ext.onnx")


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin", "missing.bin"])
def test_hostile_external_data_paths(tmp_path, location):
    (tmp_path.parent / "outside.bin").write_bytes(b"\x00" * 64)
    path = _external_model(tmp_path, location)
    with pytest.raises(ModelLoadError):
        onnxlip.path_norm(path)
    code, out, err = cli("check", path)
    assert code == 2 and "Traceback" not in err


def test_external_data_symlink_escape_and_short_file(tmp_path):
    outside = tmp_path.parent / "secret.bin"
    outside.write_bytes(b"\x00" * 64)
    (tmp_path / "link.bin").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="leaves the model's folder"):
        onnxlip.path_norm(_external_model(tmp_path, "link.bin"))
    (tmp_path / "short.bin").write_bytes(b"\x00" * 4)
    with pytest.raises(ModelLoadError, match="past the end"):
        onnxlip.path_norm(_external_model(tmp_path, "short.bin"))


def test_valid_external_data_loads(tmp_path):
    m = _mlp()
    expected = onnxlip.path_norm(m).path_norm
    onnx.save(
        m,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.bin",
        size_threshold=0,
    )
    assert onnxlip.path_norm(tmp_path / "m.onnx").path_norm == expected
    assert onnxlip.path_norm(onnx.load(str(tmp_path / "m.onnx"))).path_norm == expected  # data read by onnx


def test_a_modelproto_without_its_external_data_is_refused(tmp_path, monkeypatch):
    """onnx.load(path, load_external_data=False) gives a ModelProto whose weights onnx would read relative to the
    current folder: another folder's m.bin (weights doubled) gave another path-norm, silently."""
    m = _mlp()
    expected = onnxlip.path_norm(m).path_norm
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    other = tmp_path / "other"
    other.mkdir()
    raw = np.fromfile(tmp_path / "m.bin", dtype=np.float32) * 2
    raw.tofile(other / "m.bin")
    monkeypatch.chdir(other)
    marked = onnx.ModelProto()  # marked external but still holding its bytes: onnx reads the file all the same
    marked.CopyFrom(m)
    onnx.external_data_helper.convert_model_to_external_data(marked, location="fresh.bin", size_threshold=0)
    for p in (proto, marked):
        with pytest.raises(ModelLoadError, match="marked as external data"):
            onnxlip.path_norm(p)
        with pytest.raises(ModelLoadError, match="marked as external data"):
            onnxlip.bound(p, tmp_path / "m.onnx", samples=0)
    assert onnxlip.path_norm(tmp_path / "m.onnx").path_norm == expected


def test_unsupported_ops_are_all_reported():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 3)).astype(np.float32), "w")]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
        helper.make_node("MatMul", ["s", "w"], ["h2"], name="mm2"),
        helper.make_node("Tanh", ["h2"], ["y"], name="tanh"),
    ]
    m = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    with pytest.raises(UnsupportedModelError) as info:
        onnxlip.path_norm(m)
    assert {(i.node, i.op) for i in info.value.issues} == {("sig", "Sigmoid"), ("tanh", "Tanh")}
    assert "not piecewise linear" in str(info.value)
    result = onnxlip.check(m)
    assert not result.supported and len(result.errors) == 2
    # a weighted layer follows the Sigmoid: no tail to cut off, and the hint says so (tests/test_import_forms.py)
    assert "inside the network" in (result.hint or "") and "use --output" not in result.hint
    # analysing up to the tensor before the first unsupported node still works when asked for
    assert onnxlip.path_norm(m, output=["h"]).path_norm == pytest.approx(
        np.abs(numpy_helper.to_array(inits[0])).sum(), rel=1e-6
    )


def test_unknown_output_tensor():
    with pytest.raises(OnnxlipError, match="not produced"):
        onnxlip.path_norm(_mlp(), output=["nope"])


@pytest.mark.parametrize("q", [0, -1, float("nan"), float("inf")])
def test_bad_q(q):
    with pytest.raises(OnnxlipError, match="q must be"):
        onnxlip.path_norm(_mlp(), q=q)


def test_bad_device():
    with pytest.raises(OnnxlipError, match="unknown device"):
        onnxlip.path_norm(_mlp(), device="tpu")


def test_inputs_are_never_written(tmp_path):
    a, b = _save(_mlp(4, 0), tmp_path / "a.onnx"), _save(_mlp(4, 1), tmp_path / "b.onnx")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (a, b)}
    for args in (("check", a), ("pathnorm", a), ("bound", a, b)):
        assert cli(*args)[0] == 0
    assert before == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (a, b)}
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx"]


def test_inner_output_without_value_info_can_be_sampled():
    """skl2onnx writes no value_info: cutting the model at an inner --output must still run (regression)."""
    m = onnx.load("models/digits_mlp.onnx")
    del m.graph.value_info[:]
    r = onnxlip.bound(m, "models/digits_mlp_pruned.onnx", output=["add_result2"], samples=16)
    assert r.samples == 16 and 0 < r.observed_max_l1_diff <= r.bound


def test_output_hint_is_followable():
    """The hint names only run-time tensors that do not depend on an unsupported node, and following it works."""
    result = onnxlip.check("models/digits_mlp.onnx")
    assert not result.supported and result.hint is not None
    suggested = [w for w in result.hint.split() if w not in ("--output",)][-1]
    assert result.hint.count("--output") == 1 and suggested == "add_result2"
    assert onnxlip.check("models/digits_mlp.onnx", output=[suggested]).supported


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.3"], ["rescale"], ["scores"]])
def test_unwritable_output_is_a_clear_error(tmp_path, command):
    target = tmp_path / "missing-folder" / "out.onnx"
    code, out, err = cli(command[0], "models/digits_cnn.onnx", *command[1:], "-o", target)
    assert code == 2 and "cannot write" in err and "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.3"], ["rescale"], ["scores"]])
def test_an_output_path_ending_in_a_slash_names_a_folder(tmp_path, command):
    """`-o newdir/` wrote a file named newdir (the CLI read the path as a pathlib.Path, which drops the slash)."""
    target = f"{tmp_path}/newdir/"
    code, _, err = cli(command[0], "models/digits_cnn.onnx", *command[1:], "-o", target)
    assert code == 2 and "names a folder" in err and not os.path.exists(tmp_path / "newdir")
    code, _, err = cli("prune", "models/digits_cnn.onnx", "--sweep", "0.2,0.4", "--plot", f"{tmp_path}/plots/")
    assert code == 2 and "names a folder" in err and not os.path.exists(tmp_path / "plots")
    with pytest.raises(OnnxlipError, match="names a folder"):
        onnxlip.rescale("models/digits_cnn.onnx", out_path=target)


# ---- damaged but parsable models: the node is named, the exit code is 2 ------------------------------------------
def _small_conv(**conv_attrs):
    w = np.ones((4, 2, 3, 3), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1], **conv_attrs),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )


@pytest.mark.parametrize(
    "attrs, reason",
    [
        ({"group": 2}, "channels"),  # weight (4, 2, 3, 3) with group 2 expects 4 input channels, the input has 2
        ({"group": 0}, "group"),
        ({"strides": [0, 1]}, ""),  # shape inference fails on the node first
        ({"dilations": [1.5, 1.0]}, ""),  # floats where ints belong: shape inference fails on the node
    ],
)
def test_inconsistent_conv_attributes_name_the_node(tmp_path, attrs, reason):
    model = _small_conv(**attrs)
    with pytest.raises(UnsupportedModelError) as info:
        onnxlip.path_norm(model)
    first = info.value.issues[0]  # the nodes after it cannot have shapes either
    assert first.node == "conv" and reason in first.reason
    code, out, err = cli("pathnorm", _save(model, tmp_path / "bad.onnx"))
    assert code == 2 and "Traceback" not in err and "conv" in err


def test_an_attribute_of_the_wrong_kind_names_the_node():
    model = _small_conv()
    eps = helper.make_attribute("epsilon", [1e-5, 2e-5])
    bn = helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn")
    bn.attribute.append(eps)
    model.graph.node[1].input[0] = "n"
    model.graph.node.insert(1, bn)
    for name, value in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
        model.graph.initializer.append(numpy_helper.from_array(np.full(4, value, np.float32), name))
    with pytest.raises(UnsupportedModelError, match="epsilon") as info:
        onnxlip.path_norm(model)
    assert [i.node for i in info.value.issues] == ["bn"]


def test_gather_indices_out_of_range_name_the_node():
    nodes = [
        helper.make_node("Gather", ["x", "idx"], ["g"], name="gather", axis=1),
        helper.make_node("MatMul", ["g", "W"], ["y"], name="mm"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([0, 7], np.int64), "idx"),
            numpy_helper.from_array(np.ones((2, 2), np.float32), "W"),
        ],
    )
    with pytest.raises(UnsupportedModelError) as info:
        onnxlip.scores(model)
    assert [i.node for i in info.value.issues] == ["gather"]
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([0, -1], np.int64), "idx"))  # valid: -1
    assert onnxlip.path_norm(model).path_norm > 0


def test_implausible_static_shapes_are_refused():
    model = _small_conv()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**40
    with pytest.raises(ShapeError, match="plausible"):
        onnxlip.path_norm(model)


@pytest.mark.parametrize(
    "command",
    [
        ["prune", "--sparsity", "0.3", "-o"],
        ["rescale", "--seed", "1", "-o"],
        ["scores", "-o"],
        ["prune", "--sweep", "0.3", "--plot"],
    ],
)
def test_outputs_never_replace_an_input_through_a_hard_link(tmp_path, command):
    src = tmp_path / "model.onnx"
    src.write_bytes(open("models/digits_cnn.onnx", "rb").read())
    os.link(src, tmp_path / "alias.onnx")  # another name for the same file: resolve() cannot tell them apart
    before = src.read_bytes()
    name, *options = command
    code, _, err = cli(name, src, *options, tmp_path / "alias.onnx")
    assert code == 2 and "overwrite" in err
    assert src.read_bytes() == before
    with pytest.raises(OnnxlipError, match="overwrite"):
        if name == "prune" and "--sparsity" in options:
            onnxlip.prune(src, 0.3, out_path=tmp_path / "alias.onnx")
        elif name == "rescale":
            onnxlip.rescale(src, seed=1, out_path=tmp_path / "alias.onnx")
        else:
            raise OnnxlipError("overwrite: no Python API writes for this command")
    assert src.read_bytes() == before


def test_mapped_file_reads_like_a_plain_read(tmp_path, monkeypatch):
    """Model bytes are memory-mapped read-only; where mapping fails they are read, with the same results."""
    import mmap

    from onnxlip import loading

    path = "models/digits_cnn.onnx"
    proto, arrays, data = loading.load_with_arrays(path)
    assert isinstance(data.base.obj, mmap.mmap) and not data.flags.writeable
    assert arrays and all(not a.flags.writeable for a in arrays.values())
    with pytest.raises(ValueError):
        next(iter(arrays.values()))[...] = 0  # nothing can write through to the file
    mapped = onnxlip.path_norm(path, device="cpu").log10_path_norm

    def refuse(*args, **kwargs):
        raise OSError("mapping refused")

    monkeypatch.setattr(mmap, "mmap", refuse)
    _, arrays_read, data_read = loading.load_with_arrays(path)
    assert data_read.base is None and not data_read.flags.writeable
    assert arrays_read.keys() == arrays.keys()
    assert all(np.array_equal(arrays[n], arrays_read[n]) for n in arrays)
    assert onnxlip.path_norm(path, device="cpu").log10_path_norm == mapped


def test_many_unsupported_nodes_are_all_reported_readably(tmp_path):
    """A transformer-like count of unsupported nodes: JSON lists every one, people get one line per op and reason;
    no --output hint names the model's input (there would be nothing left to analyse)."""
    nodes, x = [], "x"
    for i in range(120):
        op = "Sigmoid" if i % 3 else "Tanh"
        nodes.append(helper.make_node(op, [x], [f"s{i}"], name=f"act{i}"))
        x = f"s{i}"
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])],
        [],
    )
    path = _save(model, tmp_path / "m.onnx")
    code, out, _ = cli("check", path, "--json")
    result = json.loads(out)
    assert code == 2 and len(result["errors"]) == 120 and result["hint"] is None
    code, out, _ = cli("check", path)
    lines = [ln for ln in out.splitlines() if ln.startswith("x ")]
    assert code == 2 and len(lines) == 2
    assert lines[0].startswith("x 40 Tanh nodes ('act0', 'act3', 'act6', ... 'act117')")
    code, _, err = cli("pathnorm", path)
    assert code == 2 and "80 Sigmoid nodes" in err and "--output" not in err and len(err.splitlines()) < 6


def test_prelu_pairs_need_equal_slopes(tmp_path):
    """PRelu slopes are read as fixed edge weights: models whose slopes differ are refused with the reason, equal
    slopes pair, slopes outside [0, 1] are read (with a ReLU(-x) edge: the oracle's path-norm), NaN ones refused."""

    def model(slope):
        rng = np.random.default_rng(0)
        nodes = [
            helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
            helper.make_node("PRelu", ["h", "slope"], ["p"]),
            helper.make_node("Gemm", ["p", "W2"], ["y"], transB=1),
        ]
        inits = [
            numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "W1"),
            numpy_helper.from_array(np.asarray(slope, np.float32), "slope"),
            numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "W2"),
        ]
        return make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
            inits,
        )

    a = _save(model([0.1, 0.2, 0.3]), tmp_path / "a.onnx")
    assert onnxlip.bound(a, a, samples=8).bound == 0
    with pytest.raises(MismatchError, match="slope"):
        onnxlip.bound(a, _save(model([0.1, 0.25, 0.3]), tmp_path / "b.onnx"), samples=0)
    from tests import oracle

    wide = model([-0.7, 1.5, 0.3])
    assert json.loads(cli("check", _save(wide, tmp_path / "c.onnx"), "--json")[1])["supported"]
    for q in (1.0, 2.0):
        assert onnxlip.path_norm(wide, q=q).path_norm == pytest.approx(oracle.path_norm(wide, q), rel=1e-6)
    code, out, _ = cli("check", _save(model([0.1, float("nan"), 0.3]), tmp_path / "d.onnx"), "--json")
    assert code == 2 and "not all finite" in json.loads(out)["errors"][0]["reason"]


def test_a_fixed_batch_above_one_is_noted(tmp_path):
    """A model exported with a fixed batch of 3 maps 3 samples at once: its path-norm counts all of them, which the
    results say, with the --input-shape that analyses one sample."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 4)).astype(np.float32)

    def model(batch):
        nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])]
        return make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
            [numpy_helper.from_array(w, "W")],
        )

    one, three = _save(model(1), tmp_path / "one.onnx"), _save(model(3), tmp_path / "three.onnx")
    r = onnxlip.path_norm(three)
    assert r.path_norm == pytest.approx(3 * onnxlip.path_norm(one).path_norm, rel=1e-6)
    assert len(r.notes) == 1 and "fixed batch of 3" in r.notes[0] and "--input-shape x=1x4" in r.notes[0]
    assert not onnxlip.path_norm(one).notes
    single = onnxlip.path_norm(three, input_shapes={"x": [1, 4]})
    assert single.path_norm == pytest.approx(onnxlip.path_norm(one).path_norm, rel=1e-12) and not single.notes
    code, out, _ = cli("pathnorm", three, "--json")
    assert code == 0 and "fixed batch" in json.loads(out)["notes"][0]
    code, out, _ = cli("scores", three, "--json")
    assert code == 0 and "fixed batch" in json.loads(out)["notes"][0]


@pytest.mark.parametrize("attr", ["transA", "transB"])
@pytest.mark.parametrize("value", ["yes", 1.5])
def test_rescale_names_an_attribute_of_the_wrong_kind(tmp_path, attr, value):
    """rescale reads the file's own graph (not the IR): a damaged attribute it reads is an input error naming the
    node (exit 2), not an internal error."""
    model = gemm_chain([np.ones((3, 4)), np.ones((4, 2))], [np.zeros(4), np.zeros(2)])
    node = model.graph.node[0]
    node.attribute.append(helper.make_attribute(attr, value))
    with pytest.raises(OnnxlipError, match=f"{node.name or node.op_type}.*{attr}"):
        onnxlip.rescale(model)
    code, out, err = cli("rescale", _save(model, tmp_path / "bad.onnx"), "-o", tmp_path / "r.onnx")
    assert code == 2 and "Traceback" not in err and attr in err


def _damaged_raw(model: onnx.ModelProto, name: str, cut: int) -> onnx.ModelProto:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.raw_data = init.raw_data[:cut]
    return model


@pytest.mark.parametrize("command", ["rescale", "prune", "pathnorm"])
def test_an_initializer_of_the_wrong_size_is_an_input_error_everywhere(tmp_path, command):
    """Found by fuzzing: rescale decoded initializers itself, and a short raw_data was an internal error."""
    model = _damaged_raw(_mlp(), "W0", 7 * 4)
    path = _save(model, tmp_path / "bad.onnx")
    extra = {"rescale": ["-o", tmp_path / "r.onnx"], "prune": ["--sparsity", "0.5", "-o", tmp_path / "p.onnx"]}
    code, out, err = cli(command, path, *extra.get(command, []))
    assert code == 2 and "Traceback" not in err and "W0" in err


def test_a_tensor_defined_twice_names_the_node():
    """An initializer that is also a node's output (not valid ONNX): the node is named, not a KeyError."""
    model = _mlp()
    produced = model.graph.node[0].output[0]
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), produced))
    with pytest.raises(UnsupportedModelError, match="defined twice") as info:
        onnxlip.path_norm(model)
    assert info.value.issues[0].node == (model.graph.node[0].name or produced)


def test_a_stride_beyond_the_input_is_one_window():
    """strides of 2**40 on a 5-wide input (one window, as a stride of the extent): the Lipschitz rule's frequency
    grid was sized by the stride (8 TiB, an internal error); path-norms and bounds are those of stride 5."""
    models = [_small_conv(strides=[s, 1]) for s in (2**40, 7)]
    assert onnxlip.path_norm(models[0]).path_norm == onnxlip.path_norm(models[1]).path_norm
    assert onnxlip.lipschitz(models[0], lower_seconds=0.1).upper.value > 0


def test_an_all_zero_model_prunes_and_scores_as_strict_json(tmp_path):
    """A zero path-norm: scores are all 0 (their shifts are not finite), prune must not fail on them, and every
    --json object is strict JSON (no -Infinity)."""
    rng = np.random.default_rng(0)
    model = gemm_chain([np.zeros((3, 4)), rng.normal(size=(4, 2))], [np.zeros(4), np.zeros(2)])
    path = _save(model, tmp_path / "zero.onnx")
    for args in (
        ["scores", path, "-o", tmp_path / "s.npz"],
        ["prune", path, "--sparsity", "0.5", "-o", tmp_path / "p.onnx"],
    ):
        code, out, err = cli(*args, "--json")
        assert code == 0, err
        obj = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        assert obj.get("log10_path_norm", obj.get("log10_bound")) == "-inf"


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_time_budgets_must_be_finite(value):
    """--sample-seconds inf with a huge --samples never ended (found by fuzzing)."""
    code, out, err = cli(
        "bound", MODELS / "digits_cnn.onnx", MODELS / "digits_cnn_pruned.onnx", "--sample-seconds", value
    )
    assert code == 2 and "--sample-seconds" in err
    code, out, err = cli("lipschitz", MODELS / "digits_cnn.onnx", "--lower-seconds", value)
    assert code == 2 and "--lower-seconds" in err


@pytest.mark.parametrize("key, value", [("offset", "-8"), ("offset", "abc"), ("length", "x"), ("location", "w.bin\0x")])
def test_unreadable_external_data_fields(tmp_path, key, value):
    """Found by fuzzing: a negative or non-numeric offset, or a NUL in the location, was an internal error."""
    (tmp_path / "w.bin").write_bytes(b"\x00" * 64)
    path = _external_model(tmp_path, "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    entries = model.graph.initializer[0].external_data
    entry = next((e for e in entries if e.key == key), None) or entries.add()
    entry.key, entry.value = key, value
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError):
        onnxlip.path_norm(path)
    code, out, err = cli("check", path, "--json")
    assert code == 2 and json.loads(out)["exit_code"] == 2 and "onnxlip_version" in json.loads(out)


def test_a_model_without_outputs_is_refused():
    model = _mlp()
    del model.graph.output[:]
    with pytest.raises(OnnxlipError, match="no outputs"):
        onnxlip.path_norm(model)
    assert onnxlip.path_norm(model, output=[model.graph.node[-1].output[0]]).path_norm > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["pathnorm", "{m}", "--q", "1e308"], "q must be"),
        (["pathnorm", "{m}", "--q", "1e-308"], "q must be"),
        (["bound", "{m}", "{p}", "--seed", "-1"], "seed"),
        (["bound", "{m}", "{p}", "--max-bound", "nan"], "--max-bound"),
        (["bound", "{m}", "{p}", "--max-bound", "-1"], "--max-bound must be >= 0"),  # (tripped on every model)
        (["bound", "{m}", "{p}", "--max-bound", "-inf"], "--max-bound must be >= 0"),
        (["lipschitz", "{m}", "--max-lipschitz", "-0.5", "--lower-seconds", "0.1"], "--max-lipschitz must be >= 0"),
        (["lipschitz", "{m}", "--max-lipschitz", "nan", "--lower-seconds", "0.1"], "--max-lipschitz"),
        (["prune", "{m}", "--sparsity", "0.5", "-R", "nan", "-o", "{o}"], "input bound"),
        (["prune", "{m}", "--sweep="], "at least one sparsity"),
        (["rescale", "{m}", "-o", "{o}", "--seed", "-5"], "seed"),
        (["rescale", "{m}", "-o", "{o}", "--factors", "1e300"], "overflow"),
        (["rescale", "{m}", "-o", "{o}", "--factors", "1e-45"], "underflow"),
    ],
)
def test_option_values_without_meaning_are_refused(tmp_path, args, message):
    """Found by fuzzing: these were internal errors, silently meaningless results (a NaN gate never trips), or a
    model written with Inf weights."""
    names = {"m": MODELS / "digits_cnn.onnx", "p": MODELS / "digits_cnn_pruned.onnx", "o": tmp_path / "out.onnx"}
    code, out, err = cli(*[a.format(**names) for a in args], "--json")
    assert code == 2 and message in json.loads(out)["error"]
    assert not (tmp_path / "out.onnx").exists()


def test_scores_writes_exactly_the_named_file(tmp_path):
    """np.savez(path) appends ".npz": `scores m.npz -o m` wrote m.npz over the input (found by fuzzing)."""
    model = tmp_path / "m.npz"
    model.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    code, out, err = cli("scores", model, "-o", tmp_path / "m", "--json")
    assert code == 0 and json.loads(out)["file"] == str(tmp_path / "m")
    assert model.read_bytes() == (MODELS / "digits_cnn.onnx").read_bytes()
    assert set(np.load(tmp_path / "m")) >= {"__log10_path_norm__"}
    code, out, err = cli("scores", model, "-o", model)
    assert code == 2 and "overwrite" in err


@pytest.mark.parametrize(
    "failure", [OSError(28, "No space left on device"), KeyboardInterrupt(), SystemExit(143)]
)  # (SystemExit: how the CLI ends on SIGTERM)
def test_a_failed_write_leaves_the_previous_output_as_it_was(tmp_path, failure):
    """Outputs were written in place: a full disk left a truncated model where a good one had been."""
    from onnxlip.writing import write_output

    target = tmp_path / "keep.onnx"
    target.write_bytes(b"the previous good file")

    def write(path):
        with open(path, "wb") as f:
            f.write(b"half of a")
        raise failure

    with pytest.raises(OnnxlipError if isinstance(failure, OSError) else type(failure)):
        write_output(target, write)
    assert target.read_bytes() == b"the previous good file" and sorted(tmp_path.iterdir()) == [target]
    write_output(target, lambda path: open(path, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_prune_output_on_a_full_disk_keeps_the_previous_file(tmp_path):
    keep = tmp_path / "keep.onnx"
    code, _, err = cli("prune", "models/digits_cnn.onnx", "--sparsity", "0.3", "-o", keep)
    assert code == 0
    before = keep.read_bytes()
    cmd = f"ulimit -f 8; {sys.executable} -m onnxlip.cli prune models/digits_cnn.onnx --sparsity 0.6 -o {keep}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and str(keep) in proc.stderr
    assert keep.read_bytes() == before and sorted(tmp_path.iterdir()) == [keep]


def test_outputs_through_links_pipes_long_names_and_closed_folders(tmp_path):
    """The atomic write replaced a symbolic link by a regular file (its target kept the old contents) and a named
    pipe by a file (the reader got nothing), refused a 250-character name (the temporary name was longer) and a
    writable file in a folder that takes no new files, and dropped the replaced file's permissions."""
    import stat
    import threading

    from onnxlip.writing import write_output

    def writer(data):
        return lambda path: open(path, "wb").write(data)

    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    write_output(link, writer(b"new"))
    assert link.is_symlink() and real.read_bytes() == b"new"

    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    write_output(fifo, writer(b"through the pipe"))
    reader.join(10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)

    long = tmp_path / ("x" * 250)
    write_output(long, writer(b"long"))
    assert long.read_bytes() == b"long"

    kept = tmp_path / "mode.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    write_output(kept, writer(b"new"))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() == b"new"

    closed = tmp_path / "closed"
    closed.mkdir()
    inside = closed / "out.bin"
    inside.write_bytes(b"old")
    closed.chmod(0o555)
    try:
        if os.access(closed, os.W_OK):  # root ignores the folder's mode: nothing to test
            return
        write_output(inside, writer(b"new"))
        assert inside.read_bytes() == b"new"
    finally:
        closed.chmod(0o755)


def test_a_reshape_that_fixes_the_batch_is_named_when_the_batch_is_changed():
    """Following the fixed-batch note (--input-shape x=1x...) for a model whose exporter wrote its batch of 2 into a
    Reshape ended in onnxruntime's run-time error naming node ''; the import now names the Reshape and says why."""
    w = np.ones((3, 4), np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["y"], name="flatten_batch2"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2, 4], np.int64), "shape")],
    )
    assert onnxlip.path_norm(model).path_norm > 0  # as exported: batch 2, with its note
    with pytest.raises(ShapeError, match=r"'flatten_batch2' \(Reshape\) turns \[1, 4\] \(4 entries\) into \[2, 4\]"):
        onnxlip.path_norm(model, input_shapes={"x": [1, 3]})
