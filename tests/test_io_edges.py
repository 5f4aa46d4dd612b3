"""Files that are not regular files (named pipes, folders, devices), empty graphs, -o /dev/null while stdout is
/dev/null, and SIGTERM during a sweep: each ends with a clear message and its exit code, never a hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.errors import ModelLoadError
from onnxlip.writing import refuse_overwrite
from tests.helpers import gemm_chain, make_model

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn.onnx"
posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")


def cli(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout: float = 60):
    """(exit code, stdout, stderr) of `onnxlip ARGS`; a hang fails the test after `timeout` seconds."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnxlip.cli", *map(str, args)],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _external_conv(folder: Path) -> Path:
    """A Conv + Relu model whose weight lives in folder/w.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.random.default_rng(0).uniform(-1, 1, (2, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    path = folder / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    assert (folder / "w.bin").is_file()
    return path


# ---- 1. pipes, folders and devices -------------------------------------------------------------------------------
@posix_only
def test_a_named_pipe_as_external_data_is_not_a_regular_file(tmp_path):
    """It was reported as 'no such file next to the model'."""
    model = _external_conv(tmp_path / "m")
    (tmp_path / "m" / "w.bin").unlink()
    os.mkfifo(tmp_path / "m" / "w.bin")
    with pytest.raises(ModelLoadError, match=r"'w\.bin': not a regular file \(a pipe"):
        onnxlip.path_norm(model, device="cpu")
    code, out, err = cli("pathnorm", model, "--json", timeout=30)
    message = json.loads(out)["error"]
    assert code == 2 and "not a regular file (a pipe" in message and "no such file" not in message
    assert "Traceback" not in err


@posix_only
def test_links_next_to_the_model_to_a_pipe_or_a_device(tmp_path):
    model = _external_conv(tmp_path / "m")
    (tmp_path / "m" / "w.bin").unlink()
    os.mkfifo(tmp_path / "m" / "pipe")
    (tmp_path / "m" / "w.bin").symlink_to("pipe")
    code, _, err = cli("check", model, timeout=30)
    assert code == 2 and "not a regular file (a pipe" in err and "Traceback" not in err
    if os.path.exists("/dev/zero"):  # outside the folder: refused before its kind matters
        (tmp_path / "m" / "w.bin").unlink()
        (tmp_path / "m" / "w.bin").symlink_to("/dev/zero")
        with pytest.raises(ModelLoadError, match="leaves the model's folder"):
            onnxlip.path_norm(model, device="cpu")


def test_a_character_device_as_external_data_is_not_a_regular_file(tmp_path):
    model = _external_conv(tmp_path / "m")
    (tmp_path / "m" / "w.bin").unlink()
    try:
        os.mknod(tmp_path / "m" / "w.bin", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers
    except (OSError, AttributeError):
        pytest.skip("cannot create a device node here")
    code, _, err = cli("check", model, timeout=30)
    assert code == 2 and "not a regular file (a character device)" in err


@posix_only
@pytest.mark.parametrize("kind", ["a pipe (FIFO)", "a folder", "a character device"])
def test_pipes_folders_and_devices_as_the_model_say_what_they_are(tmp_path, kind):
    """They were all 'not a regular file', without saying what they were."""
    model = {"a pipe (FIFO)": tmp_path / "pipe.onnx", "a folder": tmp_path, "a character device": "/dev/zero"}[kind]
    if kind == "a pipe (FIFO)":
        os.mkfifo(model)
    code, out, _ = cli("check", model, "--json", timeout=30)
    assert code == 2
    assert json.loads(out)["error"] == f"{model}: not a regular file ({kind}); onnxlip reads models from regular files"


@posix_only
@pytest.mark.parametrize("kind", ["a character device", "a pipe (FIFO)"])
def test_dev_stdin_as_the_model_is_never_read_from_a_device_or_a_pipe(kind):
    with open(os.devnull if kind == "a character device" else __file__, "rb") as f:
        stdin = f if kind == "a character device" else subprocess.PIPE  # (a pipe that no one writes to)
        code, _, err = cli("check", "/dev/stdin", stdin=stdin, timeout=30)
    assert code == 2 and f"/dev/stdin: not a regular file ({kind})" in err


@posix_only
def test_an_output_path_that_exists_does_not_open_a_pipe_given_as_the_model(tmp_path):
    """Checking that the output would not replace an input parsed the model with onnx.load, which waited forever
    for a writer to the named pipe (and read /dev/zero until memory ran out)."""
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    existing = tmp_path / "out.onnx"
    existing.write_bytes(b"previous")
    code, _, err = cli("prune", fifo, "--sparsity", "0.5", "-o", existing, timeout=30)
    assert code == 2 and "not a regular file (a pipe (FIFO))" in err
    assert existing.read_bytes() == b"previous"
    refuse_overwrite(existing, [fifo])  # (in-process: returns at once)


# ---- 2. empty graphs ----------------------------------------------------------------------------------------------
def _empty() -> onnx.ModelProto:
    return make_model([], [], [], [])


def test_an_empty_graph_says_so_and_a_truncated_file_keeps_its_wording(tmp_path):
    """A valid model whose graph is empty was reported as 'truncated, or not an ONNX model'."""
    path = tmp_path / "empty.onnx"
    onnx.save(_empty(), path)
    want = "the model's graph is empty: no nodes, inputs or outputs"
    with pytest.raises(ModelLoadError, match=want):
        onnxlip.path_norm(path, device="cpu")
    with pytest.raises(ModelLoadError, match=want):
        onnxlip.path_norm(_empty(), device="cpu")
    code, out, _ = cli("check", path, "--json")
    message = json.loads(out)["error"]
    assert code == 2 and want in message and "truncated" not in message
    # a file cut before its graph; bytes that parse as an IR version only; bytes that parse as an empty graph only
    model = gemm_chain([np.ones((3, 2))], [np.zeros(2)])
    model.producer_name = "test"
    header = onnx.ModelProto(ir_version=model.ir_version, producer_name="test").SerializeToString()
    assert model.SerializeToString().startswith(header)  # fields in number order: the graph (7) after these (1, 2)
    for i, content in enumerate((header, b"\x08\x0a", b"\x3a\x00")):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(content)
        with pytest.raises(ModelLoadError, match=r"the file parses but holds no graph \(truncated, or not an ONNX"):
            onnxlip.path_norm(path, device="cpu")


def test_a_graph_of_inputs_and_outputs_only_has_no_nodes(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    path = tmp_path / "passthrough.onnx"
    onnx.save(make_model([], [x], [x], []), path)
    with pytest.raises(ModelLoadError, match="the model's graph has no nodes"):
        onnxlip.path_norm(path, device="cpu")


# ---- 3. -o /dev/null while stdout is /dev/null ----------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="/dev/null")
def test_output_to_dev_null_while_stdout_is_dev_null(tmp_path):
    """-o /dev/null was refused as 'standard output' when stdout was /dev/null too (the JSON error went there:
    exit 2 and not a word), and without --json the report was sent to stderr."""
    with open(os.devnull, "w") as null:
        code, _, err = cli("prune", CNN, "--sparsity", "0.5", "-o", "/dev/null", "--json", stdout=null)
        assert (code, err) == (0, "")
        code, _, err = cli("prune", CNN, "--sparsity", "0.5", "-o", "/dev/null", stdout=null)
        assert (code, err) == (0, "")  # the report went to stdout, as asked
        # naming stdout itself is still refused with --json (its one JSON object goes there)
        code, _, _ = cli("prune", CNN, "--sparsity", "0.5", "-o", "/dev/stdout", "--json", stdout=null)
        assert code == 2
    # so is the file stdout is redirected to, and an input file (through a link)
    report = tmp_path / "report.json"
    with open(report, "w") as f:
        code, _, _ = cli("prune", CNN, "--sparsity", "0.5", "-o", report, "--json", stdout=f)
    assert code == 2 and "is standard output" in json.loads(report.read_text())["error"]
    model = tmp_path / "cnn.onnx"
    shutil.copy(CNN, model)
    (tmp_path / "link.onnx").symlink_to(model)
    code, out, _ = cli("rescale", model, "-o", tmp_path / "link.onnx", "--json")
    assert code == 2 and "refusing to overwrite" in json.loads(out)["error"]
    assert model.read_bytes() == CNN.read_bytes()


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="/dev/null")
@pytest.mark.parametrize("command", [("prune", "--sparsity", "0.5"), ("rescale",)])
def test_the_json_names_the_output_as_given_not_the_temporary_file_a_stream_is_written_through(command):
    """-o /dev/null (a stream: written through a temporary file) reported "output": "/tmp/onnxlip-.../output"."""
    code, out, _ = cli(command[0], CNN, *command[1:], "-o", "/dev/null", "--json")
    assert code == 0 and json.loads(out)["output"] == "/dev/null"


# ---- 4. SIGTERM during a sweep ---------------------------------------------------------------------------------
def _mapped(pid: int, path: Path) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(str(path) in line for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc")
@pytest.mark.parametrize("as_json", [False, True])
def test_sigterm_during_a_sweep_ends_it_promptly_with_a_message(tmp_path, as_json):
    """The process waited for the comparison threads (blockwise's pool) before it exited, and said nothing."""
    rng = np.random.default_rng(0)
    weights = [rng.uniform(-1, 1, (1024, 1024)) for _ in range(4)]  # 4 x 2**20 entries: the pool's jobs
    onnx.save(gemm_chain(weights, [np.zeros(1024)] * 4), tmp_path / "base.onnx")
    onnx.save(gemm_chain([w * 1.01 for w in weights], [np.zeros(1024)] * 4), tmp_path / "v.onnx")
    variants = []
    for i in range(200):  # tens of seconds of work: far more than the test waits
        (tmp_path / f"v{i}.onnx").symlink_to("v.onnx")
        variants.append(tmp_path / f"v{i}.onnx")
    args = ["bound", tmp_path / "base.onnx", *variants, "--samples", "0", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxlip.cli", *map(str, args), *(["--json"] if as_json else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120  # (a slow, shared machine: importing and the base model take a while)
        while not _mapped(proc.pid, tmp_path / "v.onnx") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the variants are being compared once their file is mapped
        time.sleep(0.3)
        assert proc.poll() is None, "the sweep ended before the signal: make the workload longer"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM and took < 2.0
    if as_json:
        assert json.loads(out) | {"onnxlip_version": None} == {
            "error": "terminated by SIGTERM",
            "exit_code": 143,
            "onnxlip_version": None,
        }
    else:
        assert err.strip() == "error: terminated by SIGTERM"
