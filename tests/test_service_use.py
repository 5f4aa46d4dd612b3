"""The library inside a long-running service (found by the service-use hunt of session 13): forked workers, failed
calls whose exceptions are kept, a CLI ended by SIGTERM."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

import onnxlip
from onnxlip.errors import OnnxlipError
from onnxlip.prune import prune_sweep
from tests.helpers import gemm_chain


def _wide_chain() -> onnx.ModelProto:
    """Two 512x512 layers: enough entries (2**19) for blockwise.in_threads to use its thread pool."""
    rng = np.random.default_rng(0)
    return gemm_chain([rng.uniform(-1, 1, size=(512, 512)) for _ in range(2)], [np.zeros(512)] * 2)


def _child_path_norm(model_bytes: bytes) -> float:
    return onnxlip.path_norm(onnx.load_from_string(model_bytes), device="cpu").log10_path_norm


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_worker_after_a_large_call_does_not_hang():
    """The child inherited the thread pool without its threads, and the jobs it queued there never ran."""
    model = _wide_chain()
    want = onnxlip.path_norm(model, device="cpu").log10_path_norm  # (the parent's pool now exists)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_child_path_norm, (model.SerializeToString(),)).get(timeout=60)
    assert got == want


def _mapped(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc")
def test_kept_exceptions_do_not_keep_the_model_files_mapped(tmp_path):
    """The traceback's frames held the memory-mapped files: 80 failed futures kept 160 descriptors."""
    model = _wide_chain()
    onnx.save(model, tmp_path / "a.onnx")
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    w = onnx.numpy_helper.to_array(bad.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    bad.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, bad.graph.initializer[0].name))
    onnx.save(bad, tmp_path / "b.onnx")
    kept = []
    for _ in range(10):
        try:
            onnxlip.bound(tmp_path / "a.onnx", tmp_path / "b.onnx", samples=0, device="cpu")
        except OnnxlipError as exc:
            kept.append(exc)
    assert len(kept) == 10
    assert _mapped(tmp_path / "a.onnx") == 0 and _mapped(tmp_path / "b.onnx") == 0


def _catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_sigterm_ends_the_cli_as_ctrl_c_does():
    """SIGTERM (timeout, docker stop, a cancelled CI job) killed the process where it stood, leaving temporary
    output files; it now unwinds through the same cleanup, with exit code 128 + 15."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxlip.cli", "lipschitz", "models/digits_cnn.onnx", "--lower-seconds", "60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:  # (its handler is set once imported)
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143


def test_numpy_arrays_serve_as_lists_of_sparsities_and_factors():
    """A notebook's np.linspace was refused as 'must be a list of numbers'."""
    model = "models/digits_cnn.onnx"
    got = prune_sweep(model, np.linspace(0.2, 0.8, 2), criteria=["magnitude"])
    want = prune_sweep(model, [0.2, 0.8], criteria=["magnitude"])
    assert [r.bound for r in got] == [r.bound for r in want]
    _, a = onnxlip.rescale(model, seed=1, factors=np.array([0.5, 4.0]))
    _, b = onnxlip.rescale(model, seed=1, factors=[0.5, 4.0])
    assert a.rescaled_neurons == b.rescaled_neurons > 0


def test_preloading_cuda_prints_nothing_and_leaves_sys_stdout_alone(monkeypatch, capsys):
    """contextlib.redirect_stdout swapped the process-wide sys.stdout while onnxruntime preloaded the CUDA
    libraries: a line another thread printed in that window was lost."""
    import onnxlip.runtime as runtime

    seen = []

    def preload_dlls():  # stands for onnxruntime's, which print()s a line per library it cannot load
        seen.append(sys.stdout)
        print("Failed to load libcudnn.so")

    monkeypatch.setattr(runtime.ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(runtime, "_preloaded", False)
    before = sys.stdout
    runtime._preload_cuda_libraries()
    assert seen == [before] and capsys.readouterr().out == ""
    assert "print" not in preload_dlls.__globals__  # (this module's own print is back)
