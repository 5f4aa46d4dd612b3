"""The CLI contract: --json prints exactly one JSON object with the documented keys; exit codes 0/1/2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxlip
from tests.helpers import gemm_chain
from tests.test_bad_input import cli


@pytest.fixture()
def pair(tmp_path):
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(4, 8)), rng.normal(size=(8, 3))]
    bs = [rng.normal(size=8), rng.normal(size=3)]
    pruned = [w.copy() for w in ws]
    pruned[0][np.abs(pruned[0]) < 0.5] = 0.0
    noisy = [w + 0.01 * rng.normal(size=w.shape) for w in ws]
    paths = []
    for name, weights in (("base", ws), ("pruned", pruned), ("noisy", noisy)):
        path = tmp_path / f"{name}.onnx"
        onnx.save(gemm_chain(weights, bs), str(path))
        paths.append(path)
    return paths


def _json(args):
    code, out, err = cli(*args, "--json")
    obj = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert out.strip().count("\n") == 0
    return code, obj


def test_check_json(pair):
    code, obj = _json(["check", pair[0]])
    assert code == 0
    assert {"supported", "errors", "warnings", "inputs", "outputs", "num_parameters", "ops"} <= set(obj)
    assert obj["supported"] is True and obj["errors"] == []
    assert obj["num_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert obj["ops"] == {"Gemm": 2, "Relu": 1}
    assert obj["inputs"] == {"x": [1, 4]}


def test_pathnorm_json_matches_api(pair):
    code, obj = _json(["pathnorm", pair[0], "--q", "2"])
    assert code == 0
    assert {"q", "path_norm", "log10_path_norm", "device"} <= set(obj)
    api = onnxlip.path_norm(pair[0], q=2)
    assert obj["q"] == 2 and obj["path_norm"] == pytest.approx(api.path_norm) and obj["device"] in ("cpu", "cuda")


def test_bound_json_single_variant(pair):
    code, obj = _json(["bound", pair[0], pair[1], "--input-bound", "2", "--samples", "32"])
    assert code == 0
    keys = {
        "path_metric",
        "log10_path_metric",
        "exact",
        "sign_flips",
        "input_bound",
        "bound",
        "log10_bound",
        "observed_max_l1_diff",
        "samples",
        "device",
    }
    assert keys <= set(obj)
    assert obj["exact"] is True and obj["input_bound"] == 2.0
    assert 0 < obj["rounding_margin"] < 1e-5  # float32 rounding of a 2-layer net with fan-in <= 8
    # (plus api.HOST_LOG10_ALLOWANCE: the float64 host work, a few 1e-12 here)
    assert obj["bound"] == pytest.approx(2 * obj["path_metric"] / (1 - obj["rounding_margin"]), rel=1e-11)
    assert obj["bound"] >= 2 * obj["path_metric"] / (1 - obj["rounding_margin"])
    assert 0 < obj["samples"] <= 32 and obj["observed_max_l1_diff"] <= obj["bound"]


def test_bound_json_many_variants(pair):
    code, obj = _json(["bound", *pair, "--samples", "0"])
    assert code == 0 and obj["base"] == str(pair[0])
    assert [r["variant"] for r in obj["results"]] == [str(pair[1]), str(pair[2])]
    assert obj["results"][0]["exact"] is True and obj["results"][1]["exact"] is False
    assert obj["results"][0]["samples"] == 0 and obj["results"][0]["observed_max_l1_diff"] is None


def test_max_bound_gate(pair):
    bound = onnxlip.bound(pair[0], pair[1], samples=0).bound
    code, obj = _json(["bound", pair[0], pair[1], "--samples", "0", "--max-bound", str(bound * 1.01)])
    assert code == 0 and obj["exceeded"] is False
    code, obj = _json(["bound", pair[0], pair[1], "--samples", "0", "--max-bound", str(bound * 0.99)])
    assert code == 1 and obj["exceeded"] is True
    code, out, err = cli("bound", pair[0], pair[1], "--samples", "0", "--max-bound", str(bound * 0.99))
    assert code == 1 and "GATE FAILED" in out  # said in words: CI logs keep no colour
    code, out, err = cli("bound", pair[0], pair[1], "--samples", "0", "--max-bound", str(bound * 1.01))
    assert code == 0 and "gate passed" in out
    code, obj = _json(["bound", pair[0], pair[1], pair[2], "--samples", "0", "--max-bound", str(bound * 1.01)])
    flags = [r["exceeded"] for r in obj["results"]]  # one per variant
    assert flags == [r["bound"] > bound * 1.01 for r in obj["results"]] and flags[0] is False
    assert obj["exceeded"] is any(flags)


def test_human_output(pair):
    code, out, err = cli("bound", pair[0], pair[1], pair[2], "--samples", "8")
    assert code == 0 and "exact" in out and "upper" in out and "pruned.onnx" in out
    code, out, err = cli("check", pair[0])
    assert code == 0 and "supported" in out and "Gemm" in out


def test_log10_shown_when_value_overflows(tmp_path):
    rng = np.random.default_rng(0)
    ws = [rng.uniform(2, 4, size=(4, 4)) for _ in range(400)]
    bs = [np.zeros(4) for _ in range(400)]
    path = tmp_path / "deep.onnx"
    onnx.save(gemm_chain(ws, bs), str(path))
    code, obj = _json(["pathnorm", path])
    assert code == 0 and obj["path_norm"] is None and obj["log10_path_norm"] > 308
    code, out, err = cli("pathnorm", path)
    assert code == 0 and "10^" in out


def test_bound_needs_two_models(pair):
    code, out, err = cli("bound", pair[0])
    assert code == 2 and "at least one variant" in err


def test_help_teaches():
    code, out, err = cli("bound", "--help")
    assert code == 0 and "--input-bound" in out and "--max-bound" in out and "exact" in out


@pytest.mark.parametrize("command", ["", "check", "pathnorm", "bound", "scores", "prune", "rescale", "lipschitz"])
def test_help_shows_no_value_for_flags(command):
    """On/off options (--help, --json, ...) take no value: typer's rich help would show "<bool>" beside them."""
    code, out, err = cli(*[c for c in [command] if c], "--help")
    assert code == 0 and "--help" in out and "<bool>" not in out


def test_cli_turns_numpys_hugepage_advice_off(monkeypatch):
    from onnxlip.cli import no_hugepage_advice

    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _set_madvise_hugepage
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = _set_madvise_hugepage(True)
    try:
        assert no_hugepage_advice()
        assert _set_madvise_hugepage(True) is False  # it was off
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")  # the user's choice stands
        assert not no_hugepage_advice()
        assert _set_madvise_hugepage(True) is True
    finally:
        _set_madvise_hugepage(before)


def test_version_names_the_libraries_behind_the_numbers():
    import onnxruntime

    code, out, _ = cli("--version")
    assert code == 0
    assert out.startswith(f"onnxlip {onnxlip.__version__} (") and f" {onnxruntime.__version__}," in out
    from importlib import metadata

    try:  # the wheel that provides the module: the GPU build or the plain one
        metadata.version("onnxruntime-gpu")
        assert f"(onnxruntime-gpu {onnxruntime.__version__}," in out
    except metadata.PackageNotFoundError:
        assert f"(onnxruntime {onnxruntime.__version__}," in out
    code, out, _ = cli("pathnorm", "models/digits_cnn.onnx", "--json")
    assert code == 0 and json.loads(out)["onnxlip_version"] == onnxlip.__version__


def test_names_that_look_like_markup_are_printed_as_they_are(tmp_path):
    """Paths, node and tensor names are user data: rich must not read "[red]" or "[/x]" in them as style tags
    (it dropped them, and a closing tag with no opening one crashed the error printer with exit 1)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "W[/b]")
    nodes = [
        helper.make_node("MatMul", ["x", "W[/b]"], ["h[red]"], name="mm[/red]"),
        helper.make_node("Sigmoid", ["h[red]"], ["y"], name="sig[/bold]"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    folder = tmp_path / "run[bold]"
    folder.mkdir()
    path = folder / "m[red].onnx"
    onnx.save(model, str(path))
    code, out, err = cli("check", path)
    assert code == 2 and "Traceback" not in err
    assert str(path) in out and "sig[/bold]" in out and "--output h[red]" in out
    code, out, err = cli("pathnorm", path)
    assert code == 2 and "Traceback" not in err and "sig[/bold]" in err and "h[red]" in err
    code, out, err = cli("pathnorm", path, "--output", "h[red]")
    assert code == 0 and "m[red].onnx" in out and "h[red]" in out
    code, out, err = cli("pathnorm", tmp_path / "missing[/x].onnx")
    assert code == 2 and "missing[/x].onnx" in err and "Traceback" not in err


def test_help_shows_bracketed_extras():
    code, out, err = cli("prune", "--help")
    assert code == 0 and "onnxlip[plot]" in out


def test_running_out_of_memory_is_an_input_error(capsys):
    """A model whose declared tensors do not fit in memory (found by fuzzing: 1x2x8000x8000 was an internal
    error): exit 2 with a hint, as JSON with --json."""
    import typer

    from onnxlip.cli_common import _guard

    with pytest.raises(typer.Exit) as info:
        with _guard(True):
            raise MemoryError("Unable to allocate 8.00 TiB")
    obj = json.loads(capsys.readouterr().out)
    assert info.value.exit_code == 2 and obj["exit_code"] == 2 and "--input-shape" in obj["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["pathnorm", "models/digits_cnn.onnx", "--q", "abc"], "--q"),
        (["prune", "models/digits_cnn.onnx", "--sparsity", "0.5", "--bogus"], "--bogus"),
        (["rescale", "models/digits_cnn.onnx"], "--out"),
    ],
)
def test_usage_errors_are_json_with_json(args, message):
    """The parser's errors (before any command runs) were a usage box on stderr and nothing on stdout."""
    code, obj = _json(args)
    assert code == 2 and obj["exit_code"] == 2 and message in obj["error"] and "onnxlip_version" in obj
    code, out, err = cli(*args)  # without --json: typer's usage message, as before
    assert code == 2 and out == "" and message in err


def test_bound_rows_are_told_apart_and_fit_80_columns(tmp_path):
    """Variants of one name in two folders: each row shows the shortest path part that differs; the table fits
    80 columns without folding a number."""
    import shutil

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy("models/digits_cnn_pruned.onnx", tmp_path / d / "model.onnx")
    code, out, err = cli(
        "bound", "models/digits_cnn.onnx", tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx",
        "--samples", "0", columns=80,
    )  # fmt: skip
    assert code == 0 and "a/model.onnx" in out and "b/model.onnx" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_every_json_names_its_model(pair, tmp_path):
    """Audit logs need the analysed file in each JSON object (bound names base and variants)."""
    for args in (
        ["check", pair[0]],
        ["pathnorm", pair[0]],
        ["scores", pair[0]],
        ["prune", pair[0], "--sweep", "0.5"],
        ["prune", pair[0], "--sparsity", "0.5", "-o", tmp_path / "p.onnx"],
        ["rescale", pair[0], "-o", tmp_path / "r.onnx"],
        ["lipschitz", pair[0], "--lower-seconds", "0.1"],
    ):
        code, obj = _json(args)
        assert code == 0 and obj["model"] == str(pair[0]), args


def test_check_of_an_unsupported_model_says_what_it_does_not_know(tmp_path):
    """Not analysed: its declared inputs (a symbolic dimension by name) and no parameter count (0 was false); the
    hint's value does not repeat its key."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])]
    model = make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    path = tmp_path / "softmax.onnx"
    onnx.save(model, str(path))
    code, obj = _json(["check", path])
    assert code == 2 and obj["inputs"] == {"x": ["N", 3]} and obj["num_parameters"] is None
    assert obj["hint"].startswith("to analyse") and "--output h" in obj["hint"]


def test_prune_options_that_do_not_apply_are_not_ignored(pair, tmp_path):
    code, obj = _json(["prune", pair[0], "--sweep", "0.3,0.6", "--criterion", "magnitude"])
    assert code == 0 and {r["criterion"] for r in obj["results"]} == {"magnitude"}  # (both were run before)
    code, obj = _json(["prune", pair[0], "--sparsity", "0.5", "-o", tmp_path / "p.onnx", "--plot", tmp_path / "x.png"])
    assert code == 2 and "--plot draws a --sweep" in obj["error"]


def test_rescale_that_changes_nothing_says_so(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])]
    path = tmp_path / "tanh.onnx"
    onnx.save(make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w]), str(path))
    code, obj = _json(["rescale", path, "-o", tmp_path / "r.onnx"])
    assert code == 0 and obj["rescaled_neurons"] == 0 and "no neuron was rescaled" in obj["notes"][0]


def test_output_and_out_are_told_apart(tmp_path):
    """--output names a tensor, -o a file: the mix-up, and an unknown tensor, get errors that say what to do."""
    code, obj = _json(["prune", "models/digits_cnn.onnx", "--sparsity", "0.5", "--output", "pruned.onnx"])
    assert code == 2 and "not the file to write" in obj["error"]
    code, obj = _json(["pathnorm", "models/digits_mlp.onnx", "--output", "add_result3"])
    assert code == 2 and "'add_result2'" in obj["error"]  # the close names it computes


def test_bound_sweep_reports_an_unusable_variant_and_compares_the_rest(pair, tmp_path):
    """One corrupt and one other-architecture variant among good ones: rows for all, exit 2, and the good rows equal
    a sweep without the bad files (the engine's state survives a variant that failed half way)."""
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(pair[1].read_bytes()[:200])
    other = tmp_path / "other.onnx"
    rng = np.random.default_rng(1)
    onnx.save(gemm_chain([rng.normal(size=(4, 5)), rng.normal(size=(5, 3))], [np.zeros(5), np.zeros(3)]), str(other))
    nan = tmp_path / "nan.onnx"
    model = onnx.load(str(pair[2]))
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.flat[3] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, str(nan))
    args = ["bound", pair[0], pair[1], truncated, other, nan, pair[2], "--samples", "0", "--max-bound", "1e9"]
    code, obj = _json(args)
    assert code == 2 and obj["exit_code"] == 2
    assert obj["unusable_variants"] == [str(truncated), str(other), str(nan)]
    rows = obj["results"]
    assert [set(r) >= {"variant", "error", "exit_code"} for r in rows] == [False, True, True, True, False]
    assert "truncated" in rows[1]["error"] and "nan" in rows[3]["error"].lower()
    clean = _json(["bound", pair[0], pair[1], pair[2], "--samples", "0", "--max-bound", "1e9"])[1]["results"]
    for got, want in zip((rows[0], rows[4]), clean):
        assert got == want
    code, out, err = cli(*args)  # the table: rows for all, the errors on stderr
    assert code == 2
    assert out.count("error") == 3 and "gate passed: every bound computed" in out
    assert err.count("error:") == 3 and "truncated.onnx" in err


def test_bound_single_unusable_variant_still_fails_at_once(pair, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(pair[1].read_bytes()[:200])
    code, obj = _json(["bound", pair[0], truncated, "--samples", "0"])
    assert code == 2 and "truncated" in obj["error"] and "results" not in obj


def test_bound_many_errors_argument(pair, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(pair[1].read_bytes()[:200])
    with pytest.raises(onnxlip.OnnxlipError, match="truncated"):
        onnxlip.bound_many(pair[0], [pair[1], truncated], samples=0)
    got = onnxlip.bound_many(pair[0], [truncated, pair[1]], samples=0, errors="report")
    assert isinstance(got[0], onnxlip.VariantError) and got[0].exit_code == 2
    assert got[1] == onnxlip.bound_many(pair[0], [pair[1]], samples=0)[0]
    with pytest.raises(onnxlip.OnnxlipError, match="errors must be"):
        onnxlip.bound_many(pair[0], [pair[1]], samples=0, errors="ignore")


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_exits_3_also_with_its_traceback_shown(monkeypatch, capsys, debug):
    """ONNXLIP_DEBUG=1 re-raised the exception: Python exited 1, the code of a threshold exceeded."""
    import typer

    from onnxlip.cli_common import _guard

    if debug:
        monkeypatch.setenv("ONNXLIP_DEBUG", "1")
    else:
        monkeypatch.delenv("ONNXLIP_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as info:
        with _guard(as_json=False):
            raise ValueError("boom")
    assert info.value.exit_code == 3
    err = capsys.readouterr().err
    assert "internal error: ValueError: boom" in err and ("Traceback" in err) == debug


def _shell(command: str, **env):
    import os
    import subprocess
    import sys

    run_env = dict(os.environ, **env)
    cmd = f"{sys.executable} -m onnxlip.cli {command}"
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=run_env)


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["pathnorm models/digits_mlp.onnx --output add_result2 --json", "--version"])
def test_a_full_stdout_is_exit_2_with_a_message_not_a_traceback(command):
    proc = _shell(f"{command} > /dev/full")
    assert proc.returncode == 2 and "cannot write to standard output" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_closed_standard_streams():
    """Started with stdout or stderr closed, the CLI crashed at import (sys.stdout is None): exit 1, a traceback."""
    proc = _shell("pathnorm models/digits_cnn.onnx --json >&-")
    assert proc.returncode == 0 and proc.stderr == ""
    proc = _shell("pathnorm nope.onnx --json >&-")
    assert proc.returncode == 2 and "no such file" in proc.stderr  # no stdout for the JSON: stderr says it
    proc = _shell("pathnorm nope.onnx --json 2>&-")
    assert proc.returncode == 2 and json.loads(proc.stdout)["exit_code"] == 2


def test_a_narrow_terminal_crops_no_number():
    """At COLUMNS=40 rich cropped the observed column to '4' for '41.18 (16)' and dropped the variant names."""
    proc = _shell("bound models/digits_cnn.onnx models/digits_cnn_pruned.onnx --samples 0", COLUMNS="40")
    assert proc.returncode == 0
    assert "digits_cnn_pruned" in proc.stdout and "23366.4" in proc.stdout and "<= 1" in proc.stdout


def test_no_onnxruntime_telemetry_files_in_home(tmp_path):
    """onnxruntime writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} on import unless
    ORT_DISABLE_TELEMETRY is set; onnxlip sets it (an audit tool leaves no trace in the user's home)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"} | {"HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "onnxlip.cli", "pathnorm", "models/digits_cnn.onnx", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and list(tmp_path.iterdir()) == []
