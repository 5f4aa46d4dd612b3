"""The samplers behind `bound`'s observed differences and `lipschitz`'s lower bound: onnxruntime reads a model
file itself when it can run it as it is, and runs a cut, serialised model otherwise; both give the same
numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxlip
from onnxlip.api import analyse
from onnxlip.sampling import Sampler, observed_max_l1, runnable, sampler_for

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN, CNN_PRUNED, MLP = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn_pruned.onnx", MODELS / "digits_mlp.onnx"


@pytest.fixture
def built(monkeypatch):
    """What each sampler session was built from: 'file' (a path onnxruntime reads) or 'proto'."""
    sampling = sys.modules["onnxlip.sampling"]
    kinds = []
    real = sampling.make_session

    def recording(model, *args, **kwargs):
        kinds.append("file" if isinstance(model, str) else "proto")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(sampling, "make_session", recording)
    return kinds


def test_runnable_files_are_read_by_onnxruntime(built, tmp_path):
    sampler_for(analyse(CNN, keep_proto=False))
    sampler_for(analyse(MLP, output=["add_result2"], keep_proto=False))  # cut at an inner tensor
    ext = tmp_path / "ext.onnx"  # weights in an external file: onnxlip checks its paths, so it loads them
    onnx.save(onnx.load(str(CNN)), str(ext), save_as_external_data=True, size_threshold=0)
    sampler_for(analyse(ext, keep_proto=False))
    newer = onnx.load(str(CNN))
    newer.ir_version = 11  # onnxlip lowers it for onnxruntime
    onnx.save(newer, str(tmp_path / "ir11.onnx"))
    sampler_for(analyse(tmp_path / "ir11.onnx", keep_proto=False))
    sampler_for(analyse(CNN))  # imported with its proto
    assert built == ["file", "proto", "proto", "proto", "proto"]


def test_file_and_cut_samplers_give_the_same_differences():
    a, b = analyse(CNN, keep_proto=False), analyse(CNN_PRUNED, keep_proto=False)
    direct = observed_max_l1((sampler_for(a), sampler_for(b)), 64, 1.0, seed=3, time_budget=60)
    cut = (Sampler(runnable(onnx.load(str(p)), m.graph), m.graph, "cpu") for p, m in ((CNN, a), (CNN_PRUNED, b)))
    assert direct == observed_max_l1(tuple(cut), 64, 1.0, seed=3, time_budget=60)
    assert direct[1] == 64 and direct[0] > 0


def test_bound_samples_both_files_directly(built):
    r = onnxlip.bound(CNN, CNN_PRUNED, samples=32)  # the variant takes the fast path (same graph as the base)
    assert built == ["file", "file"]
    assert r.samples == 32 and 0 < r.observed_max_l1_diff <= r.bound
    exported = onnxlip.bound(MLP, MODELS / "digits_mlp_pruned.onnx", output=["add_result2"], samples=32)
    assert built[2:] == ["proto", "proto"] and 0 < exported.observed_max_l1_diff <= exported.bound
    assert np.isfinite(exported.bound)


def test_initializers_listed_as_inputs_do_not_stop_batching(tmp_path):
    """Old exporters (IR < 4) list every initializer among the graph inputs."""
    model = onnx.load(str(CNN))
    for init in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    path = tmp_path / "inits_as_inputs.onnx"
    onnx.save(model, str(path))
    assert sampler_for(analyse(path, keep_proto=False)).batched
    r = onnxlip.bound(path, CNN_PRUNED, samples=64)
    assert r.samples == 64 and 0 < r.observed_max_l1_diff <= r.bound
