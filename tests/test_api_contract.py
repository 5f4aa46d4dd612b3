"""The Python API's contract: outputs never replace an input file (external data included), wrong argument types
are OnnxlipErrors, calls from several threads leave the process's sys.stdout alone, results are strict JSON, and
damaged or unusual inputs get clear errors (real files on disk, real onnxruntime sessions)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxlip
from onnxlip.errors import OnnxlipError, ShapeError
from onnxlip.prune import prune_sweep
from tests.helpers import gemm_chain, make_model

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN, CNN_PRUNED, MLP = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn_pruned.onnx", MODELS / "digits_mlp.onnx"


def _mlp(seed=0, zero=False):
    rng = np.random.default_rng(seed)
    ws, bs = [rng.normal(size=(3, 4)), rng.normal(size=(4, 2))], [rng.normal(size=4), rng.normal(size=2)]
    if zero:
        ws, bs = [w * 0 for w in ws], [b * 0 for b in bs]
    return gemm_chain(ws, bs)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlip.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    return proc.returncode, proc.stdout, proc.stderr


# ---- 1. outputs never replace an input file, external data included --------------------------------------------
@pytest.fixture
def external(tmp_path):
    """A model whose weights live in ext/w.bin, with a symbolic link to that file."""
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(
        _mlp(), str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
        location="w.bin", size_threshold=0,
    )  # fmt: skip
    data = folder / "w.bin"
    os.symlink(data, tmp_path / "w_link.bin")
    return folder / "m.onnx", data


def test_prune_and_rescale_refuse_to_write_over_the_external_data_file(external, monkeypatch):
    model, data = external
    before = _digest(data)
    monkeypatch.chdir(model.parent.parent)
    targets = [data, str(data), "ext/w.bin", "./ext/../ext/w.bin", data.parent.parent / "w_link.bin", "w_hard.bin"]
    for target in targets:
        if target == "w_hard.bin":
            os.link(data, target)  # last: onnx refuses to read external data with several hard links
        for call in (
            lambda t=target: onnxlip.prune(str(model), 0.5, out_path=t),
            lambda t=target: onnxlip.prune(model, 0.5, out_path=t, criterion="magnitude"),
            lambda t=target: onnxlip.rescale(str(model), out_path=t),
        ):
            with pytest.raises(OnnxlipError, match="refusing to overwrite the input file"):
                call()
            assert _digest(data) == before, target
    os.unlink("w_hard.bin")
    assert onnxlip.path_norm(model).path_norm > 0  # the model still loads
    onnxlip.prune(model, 0.5, out_path="pruned.onnx")  # a new file is fine
    assert Path("pruned.onnx").stat().st_size > 0


def test_cli_refuses_to_write_over_the_external_data_file(external):
    model, data = external
    before = _digest(data)
    for args in (["scores", model], ["prune", model, "--sparsity", "0.5"], ["rescale", model]):
        for target in (data, data.parent.parent / "w_link.bin"):
            code, out, _ = cli(*args, "-o", target, "--json")
            assert code == 2 and "refusing to overwrite the input file" in json.loads(out)["error"], (args, out)
            assert _digest(data) == before


def test_hard_linked_external_data_is_a_load_error(external):
    """onnx refuses external data with several hard links (a ValidationError, which escaped as a raw exception)."""
    os.link(external[1], external[1].parent / "hard.bin")
    with pytest.raises(OnnxlipError, match="cannot read external data"):
        onnxlip.path_norm(external[0])


# ---- 2. threads ------------------------------------------------------------------------------------------------
def test_two_threads_leave_sys_stdout_alone():
    """Session builds used contextlib.redirect_stdout, which swaps the process-wide sys.stdout: two threads building
    at once left it replaced by a StringIO, and every later print() of the caller was lost."""
    real = sys.stdout
    sequential = [onnxlip.path_norm(m, 1.5).log10_path_norm for m in (CNN, CNN_PRUNED)]
    for _ in range(12):
        got, barrier = [None, None], threading.Barrier(2)

        def work(k, got, barrier):
            barrier.wait()
            got[k] = onnxlip.path_norm((CNN, CNN_PRUNED)[k], 1.5).log10_path_norm

        threads = [threading.Thread(target=work, args=(k, got, barrier)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        replaced = sys.stdout is not real
        sys.stdout = real
        assert not replaced, "sys.stdout was left replaced"
        assert got == sequential


# ---- 3. argument types -----------------------------------------------------------------------------------------
BAD_MODELS = [None, 5, b"\x08\x07", [str(CNN)], onnx.GraphProto()]


@pytest.mark.parametrize("bad", BAD_MODELS, ids=["None", "int", "bytes", "list", "GraphProto"])
def test_a_model_argument_of_the_wrong_kind_is_an_onnxlip_error(bad, tmp_path):
    calls = [
        lambda: onnxlip.path_norm(bad),
        lambda: onnxlip.check(bad),
        lambda: onnxlip.scores(bad),
        lambda: onnxlip.path_metric(CNN, bad),
        lambda: onnxlip.bound(bad, CNN, samples=2),
        lambda: onnxlip.bound(CNN, bad, samples=2),
        lambda: onnxlip.bound_many(CNN, [bad], samples=2),
        lambda: onnxlip.prune(bad, 0.5),
        lambda: onnxlip.prune(bad, 0.5, out_path=tmp_path / "p.onnx"),
        lambda: onnxlip.rescale(bad),
        lambda: onnxlip.lipschitz(bad, lower_seconds=0),
    ]
    for call in calls:
        with pytest.raises(OnnxlipError):
            call()
    assert not (tmp_path / "p.onnx").exists()


def test_serialized_bytes_get_a_hint():
    with pytest.raises(OnnxlipError, match="onnx.load_from_string"):
        onnxlip.path_norm(CNN.read_bytes())


@pytest.mark.parametrize(
    "shapes",
    [{"input": "1x1x8x8"}, {"input": None}, {"input": [1, 1, 8.5, 8]}, {"input": [True, 1, 8, 8]}, ["input"]],
    ids=["str", "None", "float", "bool", "list"],
)
def test_input_shapes_must_be_positive_ints(shapes):
    for call in (
        lambda: onnxlip.path_norm(CNN, input_shapes=shapes),
        lambda: onnxlip.check(CNN, input_shapes=shapes),
        lambda: onnxlip.scores(CNN, input_shapes=shapes),
    ):
        with pytest.raises(ShapeError, match="input_shapes"):
            call()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_bound": None},
        {"input_bound": "1"},
        {"input_bound": True},
        {"samples": 2.5},
        {"samples": "4"},
        {"samples": True},
        {"samples": None},
        {"sample_seconds": None},
        {"sample_seconds": "1"},
    ],
    ids=lambda k: repr(k),
)
def test_bound_options_of_the_wrong_type(kwargs):
    with pytest.raises(OnnxlipError):
        onnxlip.bound(CNN, CNN_PRUNED, **kwargs)


@pytest.mark.parametrize("variants", [None, str(CNN_PRUNED), CNN_PRUNED, 5], ids=["None", "str", "Path", "int"])
def test_bound_many_wants_a_list_of_variants(variants):
    with pytest.raises(OnnxlipError, match="list of models"):
        onnxlip.bound_many(CNN, variants, samples=2)


@pytest.mark.parametrize("sparsity", [None, "0.5", [0.5], True], ids=repr)
def test_prune_sparsity_must_be_a_number_from_0_to_1(sparsity):
    with pytest.raises(OnnxlipError, match="sparsity"):
        onnxlip.prune(CNN, sparsity)


@pytest.mark.parametrize("input_bound", [None, "1"], ids=repr)
def test_prune_input_bound(input_bound):
    with pytest.raises(OnnxlipError, match="input bound"):
        onnxlip.prune(CNN, 0.5, input_bound=input_bound)


@pytest.mark.parametrize("factors", [None, "abc", 5, ["2"]], ids=repr)
def test_rescale_factors(factors):
    with pytest.raises(OnnxlipError, match="factor"):
        onnxlip.rescale(CNN, factors=factors)


def test_unusable_output_paths(tmp_path):
    """The CLI reported "cannot write ..." (exit 2); the API raised IsADirectoryError, FileNotFoundError,
    TypeError or PermissionError."""
    for target, why in [
        (tmp_path, "folder"),
        (tmp_path / "no" / "such" / "p.onnx", "does not exist"),
        ("", "file name"),
        (5, "str or os.PathLike"),
        ("/proc/onnxlip-no-such.onnx", "cannot write"),
    ]:
        for call in (
            lambda t=target: onnxlip.prune(CNN, 0.5, out_path=t),
            lambda t=target: onnxlip.rescale(CNN, out_path=t),
        ):
            with pytest.raises(OnnxlipError, match=why):
                call()


def test_one_output_name_as_a_plain_string():
    """output="add_result2" means ["add_result2"], not one output per character."""
    want = onnxlip.path_norm(MLP, output=["add_result2"])
    got = onnxlip.path_norm(MLP, output="add_result2")
    assert got.log10_path_norm == want.log10_path_norm and got.outputs == ["add_result2"]
    assert onnxlip.check(MLP, output="add_result2").supported
    assert onnxlip.scores(MLP, output="add_result2").outputs == ["add_result2"]


def test_an_output_named_twice_is_one_output():
    """--output add_result2 --output add_result2 doubled the path-norm and the bound (and sqrt(2) the Lipschitz)."""
    want = onnxlip.path_norm(MLP, output=["add_result2"])
    got = onnxlip.path_norm(MLP, output=["add_result2", "add_result2"])
    assert got.log10_path_norm == want.log10_path_norm and got.outputs == ["add_result2"]
    code, out, err = cli("pathnorm", MLP, "--output", "add_result2", "--output", "add_result2", "--json")
    assert code == 0 and json.loads(out)["log10_path_norm"] == want.log10_path_norm


def test_q_must_not_be_a_bool():
    with pytest.raises(OnnxlipError, match="q must be a number"):
        onnxlip.path_norm(CNN, True)


# ---- 4. strict JSON --------------------------------------------------------------------------------------------
def test_scores_to_json_is_strict_json_like_every_result(tmp_path):
    model = tmp_path / "zero.onnx"
    onnx.save(_mlp(zero=True), str(model))
    for result in (onnxlip.path_norm(model), onnxlip.scores(model)):
        obj = result.to_json()
        json.dumps(obj, allow_nan=False)
        assert obj["log10_path_norm"] == "-inf"
    tensors = onnxlip.scores(model).to_json()["tensors"]  # a zero score sum is "-inf" there too (it was null)
    assert {t["log10_sum"] for t in tensors.values()} == {"-inf"} and {t["log10_max"] for t in tensors.values()} == {
        "-inf"
    }
    code, out, _ = cli("scores", model, "--json")
    assert code == 0 and json.loads(out)["log10_path_norm"] == onnxlip.scores(model).to_json()["log10_path_norm"]


# ---- 5. negative dims ------------------------------------------------------------------------------------------
def test_an_initializer_with_negative_dims_is_refused(tmp_path):
    """numpy reshapes with any negative dim as "infer this one": (-3, 4) read a (3, 4) weight as if nothing were
    wrong, in every command but lipschitz."""
    good = _mlp()
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    bad.graph.initializer[0].dims[0] = -3  # W0: (3, 4) -> (-3, 4)
    path = tmp_path / "bad.onnx"
    onnx.save(bad, str(path))
    onnx.save(good, str(tmp_path / "good.onnx"))
    for src in (bad, path):
        for call in (
            lambda src=src: onnxlip.path_norm(src),
            lambda src=src: onnxlip.check(src),
            lambda src=src: onnxlip.scores(src),
            lambda src=src: onnxlip.bound(good, src, samples=4),
            lambda src=src: onnxlip.bound(tmp_path / "good.onnx", src, samples=4),
            lambda src=src: onnxlip.prune(src, 0.5),
            lambda src=src: onnxlip.rescale(src),
            lambda src=src: onnxlip.lipschitz(src, lower_seconds=0),
        ):
            with pytest.raises(OnnxlipError, match="'W0' has negative dimensions"):
                call()
    code, out, _ = cli("pathnorm", path, "--json")
    assert code == 2 and "'W0' has negative dimensions" in json.loads(out)["error"]


# ---- 6. rescale of protos with no network ----------------------------------------------------------------------
def test_rescale_refuses_protos_with_no_network(tmp_path):
    no_inputs = _mlp()
    del no_inputs.graph.input[:]
    no_outputs = _mlp()
    del no_outputs.graph.output[:]
    for proto in (onnx.ModelProto(), no_inputs, no_outputs):
        out = tmp_path / "out.onnx"
        with pytest.raises(OnnxlipError):
            onnxlip.rescale(proto, out_path=out)
        with pytest.raises(OnnxlipError):
            onnxlip.path_norm(proto)
        assert not out.exists()


# ---- 7. a batch above 1 ----------------------------------------------------------------------------------------
def test_a_batch_above_one_is_said_and_scores_name_the_batch():
    """input_shapes with a batch of 2 analyse the network on 2 samples at once (each path counted twice, as for a
    model exported with a fixed batch): path_norm says so instead of silently doubling; scores and prune, whose
    adjoint graph cannot run the digits CNN's Reshape at batch 2, say which batch to give instead of blaming the
    model ("is the model consistent?")."""
    shapes = {"input": [2, 1, 8, 8]}
    one, two = onnxlip.path_norm(CNN), onnxlip.path_norm(CNN, input_shapes=shapes)
    assert two.path_norm == pytest.approx(2 * one.path_norm, rel=1e-6)
    assert any("batch of 2" in n and "input=1x1x8x8" in n for n in two.notes)
    assert not onnxlip.path_norm(CNN, input_shapes={"input": [1, 1, 8, 8]}).notes
    assert any("batch of 2" in w for w in onnxlip.check(CNN, input_shapes=shapes).warnings)
    for call in (
        lambda: onnxlip.scores(CNN, input_shapes=shapes),
        lambda: onnxlip.prune(CNN, 0.5, input_shapes=shapes),
    ):
        with pytest.raises(ShapeError, match=r"batch of 2 .*\{'input': \[1, 1, 8, 8\]\}") as info:
            call()
        assert "consistent" not in str(info.value)
    code, out, _ = cli("scores", CNN, "--input-shape", "input=2x1x8x8", "--json")
    assert code == 2 and "--input-shape input=1x1x8x8" in json.loads(out)["error"]


# ---- 8. the --input-shape hint ---------------------------------------------------------------------------------
def test_the_input_shape_hint_names_the_input_with_the_unknown_dimension(tmp_path):
    w = onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("MatMul", ["z", "W"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "F"]),
    ]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w], opset=13)
    with pytest.raises(ShapeError) as info:
        onnxlip.path_norm(model)
    message = str(info.value)
    assert "--input-shape z=1xF" in message and "--input-shape z=1x224" in message and "x=" not in message
    assert onnxlip.path_norm(model, input_shapes={"z": [1, 3]}).path_norm > 0  # the example, followed
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    code, _, err = cli("pathnorm", path)
    assert code == 2 and "--input-shape z=1xF" in err
    assert cli("pathnorm", path, "--input-shape", "z=1x3")[0] == 0


def test_prune_sweep_checks_its_lists():
    with pytest.raises(OnnxlipError, match="criteria"):
        prune_sweep(CNN, [0.5], criteria=[])
    with pytest.raises(OnnxlipError, match="sparsities"):
        prune_sweep(CNN, 0.5)


def test_cli_output_into_a_missing_folder(tmp_path):
    shutil.copy(CNN, tmp_path / "m.onnx")
    code, out, _ = cli("rescale", tmp_path / "m.onnx", "-o", tmp_path / "no" / "r.onnx", "--json")
    assert code == 2 and "does not exist" in json.loads(out)["error"]


@pytest.mark.parametrize(
    "option", [{"lower_seconds": None}, {"lower_seconds": "1"}, {"estimate_iters": None}, {"estimate_iters": 2.5}]
)
def test_lipschitz_options_of_the_wrong_type(option):
    with pytest.raises(onnxlip.OnnxlipError):
        onnxlip.lipschitz(MODELS / "digits_mlp.onnx", **option)


def test_odd_numbers_for_the_input_bound():
    """-0.0 is 0 (numpy's uniform(0.0, -0.0) raised ValueError: exit 3); an int too large for a float is an
    OnnxlipError naming the option, not an OverflowError."""
    zero = onnxlip.bound(MLP, MLP, -0.0, output=["add_result2"], samples=4)
    assert zero.input_bound == 0.0
    for kwargs in ({"input_bound": 10**400}, {"sample_seconds": 10**400}):
        with pytest.raises(onnxlip.OnnxlipError, match="too large"):
            onnxlip.bound(MLP, MLP, output=["add_result2"], **kwargs)
