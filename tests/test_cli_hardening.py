"""CLI hardening (hunt 13b): .npz keys named like np.savez's parameters or the metadata key, absurd time budgets,
terminal escape sequences from a model's names, --input-shape and number parsing, and -o naming standard output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import OnnxlipError
from tests.helpers import gemm_chain, make_model
from tests.test_bad_input import cli

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN = MODELS / "digits_cnn.onnx"  # input "input" of shape N x 1 x 8 x 8


def _mlp(tmp_path, names=None) -> Path:
    """A 3 -> 4 -> 2 Gemm/ReLU/Gemm model; `names` renames its initializers W0, b0, W1, b1."""
    rng = np.random.default_rng(0)
    model = gemm_chain([rng.normal(size=(3, 4)), rng.normal(size=(4, 2))], [rng.normal(size=4), rng.normal(size=2)])
    for old, new in (names or {}).items():
        for init in model.graph.initializer:
            if init.name == old:
                init.name = new
        for node in model.graph.node:
            node.input[:] = [new if t == old else t for t in node.input]
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def _cli_bytes(*args, stdout=subprocess.PIPE):
    """The CLI as tests.test_bad_input.cli runs it, its output as bytes (a model or a .npz written to stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlip.cli", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")


# ---- 1. scores -o: every initializer name is its own .npz key ---------------------------------------------------
def test_scores_npz_keeps_names_like_savez_parameters(tmp_path):
    """np.savez(f, **arrays) dropped an initializer named allow_pickle (exit 0) and one named file was exit 3."""
    names = {"W0": "file", "b0": "allow_pickle", "W1": "../a/b", "b1": "arr_0"}
    model = _mlp(tmp_path, names)
    target = tmp_path / "s.npz"
    code, out, err = cli("scores", model, "-o", target, "--json")
    assert code == 0, out
    expected = onnxlip.scores(model).initializer_scores()
    with np.load(target) as npz:
        assert set(npz.files) == set(names.values()) | {"__log10_path_norm__"}
        for name in names.values():
            np.testing.assert_array_equal(npz[name], expected[name])
        assert float(npz["__log10_path_norm__"]) == pytest.approx(json.loads(out)["log10_path_norm"])


def test_scores_refuses_an_initializer_named_like_the_metadata_key(tmp_path):
    """It was exit 3 (TypeError: savez() got multiple values); now a clear exit 2 and no file."""
    model = _mlp(tmp_path, {"b1": "__log10_path_norm__"})
    target = tmp_path / "s.npz"
    code, out, err = cli("scores", model, "-o", target, "--json")
    obj = json.loads(out)
    assert code == 2 and obj["exit_code"] == 2 and "__log10_path_norm__" in obj["error"]
    assert "internal error" not in obj["error"] and not target.exists()
    code, out, err = cli("scores", model)  # without -o there is no file and no conflict
    assert code == 0


@pytest.mark.parametrize(
    "names, message",
    [
        ({"W0": "w", "b0": "w.npy"}, "'w.npy'"),  # np.load(...)["w.npy"] gave w's array
        ({"b1": "__log10_path_norm__.npy"}, "__log10_path_norm__.npy"),  # ... and the metadata for this one
        ({"W0": "w\0x"}, "NUL"),  # zip member names end at a NUL: the key read back was "w"
    ],
)
def test_scores_refuses_names_np_load_would_not_give_back(tmp_path, names, message):
    model = _mlp(tmp_path, names)
    target = tmp_path / "s.npz"
    code, out, err = cli("scores", model, "-o", target, "--json")
    assert code == 2 and message in json.loads(out)["error"] and not target.exists()


# ---- 2. time budgets have a maximum ----------------------------------------------------------------------------
def test_time_budgets_have_a_maximum_of_one_day():
    """--lower-seconds 1e300 and --sample-seconds 1e300 with a huge --samples ran forever (inf was refused)."""
    code, out, err = cli("lipschitz", CNN, "--lower-seconds", "1e300", "--json")
    obj = json.loads(out)
    assert code == 2 and "--lower-seconds" in obj["error"] and "86400" in obj["error"]
    code, out, err = cli(
        "bound", CNN, MODELS / "digits_cnn_pruned.onnx", "--sample-seconds", "1e300", "--samples", str(10**18)
    )
    assert code == 2 and "--sample-seconds" in err and "86400" in err and "Traceback" not in err


def test_seconds_arg():
    from onnxlip.args import MAX_SECONDS, seconds_arg

    assert seconds_arg("t", 0) == 0.0 and seconds_arg("t", MAX_SECONDS) == MAX_SECONDS == 86400
    for bad in (MAX_SECONDS * (1 + 1e-15), 1e300, float("inf"), float("nan"), -1, "1", None, True):
        with pytest.raises(OnnxlipError, match="^t "):
            seconds_arg("t", bad)


def test_api_time_budgets_have_a_maximum():
    with pytest.raises(OnnxlipError, match="86400"):
        onnxlip.lipschitz(CNN, lower_seconds=1e300)
    with pytest.raises(OnnxlipError, match="86400"):
        onnxlip.bound(CNN, MODELS / "digits_cnn_pruned.onnx", samples=10**18, sample_seconds=1e300)


# ---- 3. a model's names cannot send escape sequences to the terminal --------------------------------------------
TENSOR = "h\x1b]0;PWNED\x07\x1b[2J"  # an OSC (set the window title) and a CSI (clear the screen)
OP = "Evil\x1b[5mBLINK\x9b2J\u202e"  # blinking text, a C1 CSI, a right-to-left override


def _evil_model(tmp_path) -> Path:
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "W"], [TENSOR], name="mm"), helper.make_node(OP, [TENSOR], ["y"])]
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "evil.onnx"
    onnx.save(model, str(path))
    return path


RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def test_model_strings_are_printed_with_visible_escapes(tmp_path):
    path = _evil_model(tmp_path)
    for command in ("check", "pathnorm"):  # a table and hints on stdout; the error and its hint on stderr
        code, out, err = cli(command, path)
        assert code == 2
        assert not any(c in out + err for c in RAW), (out, err)
        text = out + err
        assert "Evil\\x1b[5mBLINK\\x9b2J\\u202e" in text and "h\\x1b]0;PWNED\\x07\\x1b[2J" in text


def test_json_output_escapes_control_characters(tmp_path):
    code, out, err = cli("check", _evil_model(tmp_path), "--json")
    assert code == 2 and not any(c in out for c in RAW)
    obj = json.loads(out)
    assert OP in obj["ops"] and TENSOR in obj["hint"]  # the exact names, escaped by JSON


def test_visible():
    from onnxlip.cli_console import visible

    assert visible("a\nb\tc\r\x00\x1b[0m\x7f\x85\x9f\u2066ü€") == "a\nb\\tc\\r\\x00\\x1b[0m\\x7f\\x85\\x9f\\u2066ü€"
    from rich.text import Text

    from onnxlip.cli_console import _visible_text

    shown = _visible_text(Text.assemble(("a\x1b", "red"), "b"))  # a Text keeps its styles
    assert shown.plain == "a\\x1bb"
    assert [(s.start, s.end, s.style) for s in shown.spans] == [(0, 1, "red"), (1, 5, "red")]


# ---- 4. --input-shape and numbers ------------------------------------------------------------------------------
def test_input_shape_errors_speak_of_the_option():
    code, out, err = cli("pathnorm", CNN, "--input-shape", "input=1x1x-3x8", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and "--input-shape" in error and "input_shapes[" not in error


def test_an_input_shape_given_twice_is_refused():
    """The last of the two was silently the one used."""
    code, out, err = cli("pathnorm", CNN, "--input-shape", "input=1x1x8x8", "--input-shape", "input=4x1x8x8", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and "twice" in error and "'input'" in error


@pytest.mark.parametrize(
    "args",
    [
        ["pathnorm", CNN, "--q", "1_0"],  # float("1_0") is 10
        ["pathnorm", CNN, "--input-shape", "input=1x1x\uff18x8"],  # a full-width 8: int() takes it
        ["pathnorm", CNN, "--input-shape", "input=1_0x1x8x8"],  # (a batch of 10)
        ["bound", CNN, CNN, "--samples", "1_6"],
        ["bound", CNN, CNN, "--samples", "0", "-R", "1_0"],
        ["prune", CNN, "--sweep", "0.5,0.9_0", "--criterion", "magnitude"],
        ["rescale", CNN, "-o", "{tmp}/r.onnx", "--factors", "1,\uff12"],
    ],
)
def test_numbers_must_be_plain_ascii(tmp_path, args):
    code, out, err = cli(*[str(a).format(tmp=tmp_path) for a in args], "--json")
    obj = json.loads(out)
    assert code == 2 and obj["exit_code"] == 2 and "internal error" not in obj["error"]
    assert not (tmp_path / "r.onnx").exists()


def test_number_parsers():
    from onnxlip.cli_common import int_option, real_option

    for text, value in (("2", 2.0), ("-1.5e3", -1500.0), (".5", 0.5), ("1.", 1.0), (" 3 ", 3.0), ("+1E-2", 0.01)):
        assert real_option(text) == value
    assert real_option("inf") == float("inf") and real_option("-Infinity") == -float("inf")
    assert np.isnan(real_option("nan")) and real_option(1.0) == 1.0  # (the default is passed as it is)
    for text in ("1_0", "\uff18", "0x10", "", "1e", "e3", "1..2", "٣", "1 0"):
        with pytest.raises(typer.BadParameter):
            real_option(text)
    assert int_option("256") == 256 and int_option("-1") == -1 and int_option(0) == 0
    for text in ("1_0", "\uff18", "1e2", "1.0", "", "٣"):
        with pytest.raises(typer.BadParameter):
            int_option(text)


# ---- 5. -o naming standard output -------------------------------------------------------------------------------
def test_json_and_an_output_to_stdout_are_refused(tmp_path):
    """With stdout a pipe: "cannot write /dev/stdout: No such file or directory"; now a clear refusal."""
    model = _mlp(tmp_path)
    for args in (["prune", model, "--sparsity", "0.5"], ["scores", model], ["rescale", model]):
        code, out, err = cli(*args, "-o", "/dev/stdout", "--json")
        obj = json.loads(out)
        assert code == 2 and "standard output" in obj["error"] and "--json" in obj["error"]


def test_json_with_stdout_redirected_to_the_output_file_is_refused(tmp_path):
    """`prune -o /dev/stdout --json > f`: f was replaced by the model and the JSON lost (exit 0)."""
    model = _mlp(tmp_path)
    target = tmp_path / "so.out"
    for output in ("/dev/stdout", target):  # the file stdout is redirected to, by either name
        with open(target, "wb") as f:
            code, _, err = _cli_bytes("prune", model, "--sparsity", "0.5", "-o", output, "--json", stdout=f)
        obj = json.loads(target.read_text())
        assert code == 2 and obj["exit_code"] == 2 and "standard output" in obj["error"]


def test_output_to_stdout_without_json(tmp_path):
    """The file's bytes alone go to stdout (a pipe or a redirected file), the report to stderr."""
    model = _mlp(tmp_path)
    code, data, err = _cli_bytes("prune", model, "--sparsity", "0.5", "-o", "/dev/stdout")
    assert code == 0, err
    pruned = onnx.load_from_string(data)
    assert [i.name for i in pruned.graph.initializer] == ["W0", "b0", "W1", "b1"] and "wrote /dev/stdout" in err
    target = tmp_path / "so.out"
    with open(target, "wb") as f:
        code, _, err = _cli_bytes("prune", model, "--sparsity", "0.5", "-o", "/dev/stdout", stdout=f)
    assert code == 0 and target.read_bytes() == data
    code, data, err = _cli_bytes("scores", model, "-o", "/dev/stdout")
    assert code == 0 and "__log10_path_norm__" in np.load(io.BytesIO(data)).files and "W0" in err


def test_output_to_another_stream(tmp_path):
    """-o /dev/stderr with stderr a pipe failed as /dev/stdout did; --json stays on stdout."""
    model = _mlp(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlip.cli", "rescale", str(model), "-o", "/dev/stderr", "--json"],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["rescaled_neurons"] >= 0
    assert len(onnx.load_from_string(proc.stderr).graph.node) == 3


def test_the_api_writes_to_dev_stdout_on_a_pipe():
    """writing.write_output resolved /dev/stdout to /proc/<pid>/fd/pipe:[N], which does not exist."""
    import subprocess
    import sys

    code = f"import onnxlip; onnxlip.rescale({str(CNN)!r}, out_path='/dev/stdout', seed=0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert onnx.load_from_string(proc.stdout).graph.node
