"""The CUDA provider path. Skipped where onnxruntime's CUDA provider does not load (CI, this project's CPU
machines); run on a GPU machine with onnxruntime-gpu (benchmarks/README.md, "GPU"). The rest of the suite also
runs on CUDA there, since every API defaults to device="auto".

Each result computed on CUDA must equal the CPU result to within both computations' a-priori rounding margins
(onnxlip/rounding.py): the margin is what makes the certified bound valid, so it must hold for cuDNN's and
cuBLAS's summation orders too."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import onnxlip
from onnxlip import runtime
from onnxlip.api import analyse
from onnxlip.cli import app
from onnxlip.rounding import relative_error_bound
from tests import oracle
from tests.dag_factory import FAMILIES, build
from tests.helpers import chain_log10_pathnorm, gemm_chain

MODELS = Path(__file__).resolve().parents[1] / "models"
OUTPUT = {"digits_mlp": ["add_result2"], "digits_cnn": None}  # the logits (models/README.md)


def _cuda_loads() -> bool:
    try:
        _, dev = runtime.make_session(gemm_chain([np.ones((2, 2))], [np.zeros(2)]), "cuda")
    except onnxlip.OnnxlipError:
        return False
    return dev == "cuda"


CUDA = _cuda_loads()
needs_cuda = pytest.mark.skipif(not CUDA, reason="onnxruntime's CUDA provider does not load here")


@pytest.mark.skipif(CUDA, reason="CUDA loads here")
def test_device_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(onnxlip.OnnxlipError, match="CUDA provider does not load"):
        onnxlip.path_norm(MODELS / "digits_cnn.onnx", device="cuda")
    res = CliRunner().invoke(app, ["pathnorm", str(MODELS / "digits_cnn.onnx"), "--device", "cuda", "--json"])
    assert res.exit_code == 2 and "CUDA provider does not load" in res.output


def test_only_results_that_certify_nothing_may_use_the_fast_cuda_engines(monkeypatch):
    """Certified results must run under CUDA_PROVIDER (the rounding margin's assumptions); only the scores and the
    sampled differences may ask for CUDA_PROVIDER_FAST. Runs anywhere: it records what each session asks for."""
    calls = []

    def recording(*args, certified=True, **kwargs):
        calls.append((sys._getframe(1).f_globals["__name__"], certified))
        return runtime.make_session(*args, certified=certified, **kwargs)

    for name in ("compiled", "lipschitz", "sampling", "scores"):  # onnxlip.scores etc. are also functions' names
        monkeypatch.setattr(sys.modules[f"onnxlip.{name}"], "make_session", recording)
    cnn = MODELS / "digits_cnn.onnx"
    onnxlip.path_norm(cnn)
    onnxlip.bound(cnn, MODELS / "digits_cnn_int8.onnx", samples=8)
    onnxlip.prune(cnn, 0.5)
    onnxlip.lipschitz(cnn)
    fast = {"onnxlip.scores", "onnxlip.sampling"}
    assert {m for m, _ in calls} >= {"onnxlip.compiled", "onnxlip.lipschitz"} | fast
    assert all(certified == (module not in fast) for module, certified in calls), calls


def _close(log10_a: float, log10_b: float, rel: float) -> bool:
    return abs(10.0 ** (log10_a - log10_b) - 1.0) <= rel


@needs_cuda
def test_sessions_use_the_certifiable_cuda_options():
    sess, dev = runtime.make_session(gemm_chain([np.ones((2, 2))], [np.zeros(2)]), "cuda")
    assert dev == "cuda" and sess.get_providers()[0] == "CUDAExecutionProvider"
    options = sess.get_provider_options()["CUDAExecutionProvider"]
    assert options["use_tf32"] == "0" and options["cudnn_conv_algo_search"] == "DEFAULT"
    # results that certify nothing (scores, samples) may use cuDNN's heuristic engines, still without TF32
    fast, _ = runtime.make_session(gemm_chain([np.ones((2, 2))], [np.zeros(2)]), "cuda", certified=False)
    options = fast.get_provider_options()["CUDAExecutionProvider"]
    assert options["use_tf32"] == "0" and options["cudnn_conv_algo_search"] == "HEURISTIC"


@needs_cuda
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("q", [1.0, 2.0])
def test_pathnorm_on_cuda_matches_cpu(name, q):
    path, out = MODELS / f"{name}.onnx", OUTPUT[name]
    cpu = onnxlip.path_norm(path, q=q, output=out, device="cpu")
    gpu = onnxlip.path_norm(path, q=q, output=out, device="cuda")
    assert gpu.device == "cuda" and cpu.device == "cpu"
    margin = relative_error_bound(analyse(path, output=out).graph)
    assert _close(gpu.log10_path_norm, cpu.log10_path_norm, 2 * margin)
    if out is None:
        assert _close(gpu.log10_path_norm, math.log10(oracle.companion_dp(path, q)), margin)


@needs_cuda
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_factory_families_on_cuda_match_the_oracle(family):
    """Every supported op kind (strided/grouped/dilated convs, pools, transposed convs, BatchNorm, layout ops)
    through cuDNN and cuBLAS."""
    spec = build(family, seed=3)
    model = oracle.fold_batchnorm(spec.model) if spec.fold else spec.model
    r = onnxlip.path_norm(spec.model, device="cuda")
    assert r.device == "cuda"
    expected = oracle.companion_dp(model)
    margin = relative_error_bound(analyse(spec.model).graph)
    assert _close(r.log10_path_norm, math.log10(expected), margin + 1e-12)


@needs_cuda
def test_thousand_layers_on_cuda():
    rng = np.random.default_rng(1)
    ws = [rng.uniform(0.5, 3.0, (4, 4)) * rng.choice([-1.0, 1.0], (4, 4)) for _ in range(1000)]
    bs = [rng.uniform(0.1, 1.0, 4) for _ in range(1000)]
    r = onnxlip.path_norm(gemm_chain(ws, bs), device="cuda")
    assert r.device == "cuda" and r.path_norm is None
    assert r.log10_path_norm == pytest.approx(chain_log10_pathnorm(ws, bs), rel=1e-9, abs=1e-6)


@needs_cuda
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("kind", ["pruned", "int8"])
def test_bound_on_cuda_matches_cpu_and_holds(name, kind):
    base, variant = MODELS / f"{name}.onnx", MODELS / f"{name}_{kind}.onnx"
    cpu = onnxlip.bound(base, variant, input_bound=1.0, samples=0, output=OUTPUT[name], device="cpu")
    gpu = onnxlip.bound(base, variant, input_bound=1.0, samples=512, output=OUTPUT[name], device="cuda")
    assert gpu.device == "cuda"
    assert (gpu.exact, gpu.route, gpu.sign_flips) == (cpu.exact, cpu.route, cpu.sign_flips)
    assert _close(gpu.log10_path_metric, cpu.log10_path_metric, cpu.rounding_margin + gpu.rounding_margin)
    assert 0 < gpu.observed_max_l1_diff <= gpu.bound


@needs_cuda
def test_scores_on_cuda_match_cpu():
    path = MODELS / "digits_cnn.onnx"
    cpu, gpu = onnxlip.scores(path, device="cpu"), onnxlip.scores(path, device="cuda")
    assert gpu.device == "cuda" and set(gpu.tensors) == set(cpu.tensors)
    assert gpu.log10_path_norm == pytest.approx(cpu.log10_path_norm, abs=1e-6)
    for name, t in cpu.tensors.items():
        np.testing.assert_allclose(gpu.tensors[name].relative, t.relative, rtol=1e-5, atol=1e-12, err_msg=name)


@needs_cuda
def test_prune_on_cuda_gives_the_cpu_selection(tmp_path):
    path = MODELS / "digits_cnn.onnx"
    cpu = onnxlip.prune(path, 0.6, out_path=tmp_path / "cpu.onnx", device="cpu")
    gpu = onnxlip.prune(path, 0.6, out_path=tmp_path / "gpu.onnx", device="cuda")
    assert gpu.pruned_entries == cpu.pruned_entries and gpu.exact
    assert _close(gpu.log10_path_metric, cpu.log10_path_metric, 1e-5)


@needs_cuda
def test_cli_device_cuda_json():
    res = CliRunner().invoke(app, ["pathnorm", str(MODELS / "digits_cnn.onnx"), "--device", "cuda", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["device"] == "cuda"
