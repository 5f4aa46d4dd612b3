"""The samplers behind `bound`'s observed differences and `lipschitz`'s lower bound: onnxruntime reads a model
file itself when it can run it as it is, and runs a cut, serialised model otherwise; both give the same
numbers."""

from __future__ import annotations

import math
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


def test_a_model_onnxruntime_cannot_run_still_gets_its_bound(tmp_path):
    """onnxruntime has no kernel for a dilated Conv with auto_pad SAME_UPPER (torch's padding='same' with a
    dilation, as TorchScript exports it): the certified bound comes from onnxlip's own graphs, so it is given, with
    no samples and a note saying why (before: exit 2 for the whole call)."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 2, 3, 3)).astype(np.float32)
    g = rng.normal(size=(2 * 5 * 5, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], auto_pad="SAME_UPPER", dilations=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["y"]),
    ]
    paths = []
    for name, weight in (("a", w), ("b", np.where(np.abs(w) < 0.5, 0, w).astype(np.float32))):
        model = make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(g, "G")],
        )
        paths.append(tmp_path / f"{name}.onnx")
        onnx.save(model, str(paths[-1]))
    r = onnxlip.bound(paths[0], paths[1], samples=16)
    assert r.exact and r.bound > 0 and r.observed_max_l1_diff is None and r.samples == 0
    assert any("no sampled differences" in n and "Dilation" in n for n in r.notes)
    # lipschitz likewise: its certified bounds, no lower figure (it refused the model, exit 2)
    lip = onnxlip.lipschitz(paths[0], "1", lower_seconds=0.2)
    assert lip.upper.certified and lip.lower["value"] is None and lip.lower["pairs"] == 0
    assert any("no lower bound was measured" in n and "Dilation" in n for n in lip.notes)
    assert r.path_metric == onnxlip.bound(paths[0], paths[1], samples=0).path_metric


def test_an_observed_difference_above_the_bound_is_explained(tmp_path):
    """A one-ulp change of one weight: the bound (exact arithmetic) is tiny, and onnxruntime's float32 rounding
    in the two forward passes can exceed it. Then a note says so, with an a priori estimate of that rounding,
    which must cover the excess (else the note asks for a report)."""
    from onnx import numpy_helper

    model = onnx.load(str(CNN))
    init = next(i for i in model.graph.initializer if len(i.dims) >= 2)
    a = numpy_helper.to_array(init).copy()
    a.flat[0] = np.nextafter(a.flat[0], np.float32(np.inf))
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(model, str(tmp_path / "ulp.onnx"))
    r = onnxlip.bound(CNN, tmp_path / "ulp.onnx", samples=256)
    explained = [n for n in r.notes if "exceeds the certified bound" in n]
    assert r.changed_parameters == 1 and r.exact
    assert bool(explained) == (r.observed_max_l1_diff > r.bound)
    assert not any("please report" in n for n in explained)


def test_outputs_that_overflow_float32_give_no_observed_figure():
    """A valid model whose float32 outputs overflow (Gemm alpha 3e38): the observed difference was reported as
    "inf" beside a finite certified bound; now there is none, and a note says why."""
    from onnx import helper

    from tests.helpers import gemm_chain

    rng = np.random.default_rng(0)
    ws, bs = [rng.normal(size=(4, 5)), rng.normal(size=(5, 3))], [rng.normal(size=5), rng.normal(size=3)]
    models = []
    for scale in (1.0, 0.5):
        m = gemm_chain([ws[0] * scale, ws[1]], bs)
        m.graph.node[-1].attribute.append(helper.make_attribute("alpha", 3e38))
        models.append(m)
    r = onnxlip.bound(models[0], models[1], samples=8)
    assert math.isfinite(r.log10_bound) and r.observed_max_l1_diff is None
    assert any("overflow" in n and "failed" not in n for n in r.notes)
    assert r.samples == 0  # (inputs compared: none; it said 2 beside no figure)


def _deep_chain(layers: int = 250, scale: float = 3.0, pruned: int | None = None) -> onnx.ModelProto:
    """x -> (MatMul, Relu) * layers with N(0, scale) weights: the float32 forward overflows to Inf, then NaN."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    rng = np.random.default_rng(1)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((8, 8)) * scale).astype(np.float32)
        if i == pruned:
            w[0, 0] = 0.0
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [
            helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
        ]
        prev = f"r{i}"
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])]
    return make_model(nodes, io, [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 8])], inits)


def test_nan_outputs_give_no_observed_figure_and_no_lower_bound():
    """Outputs of Inf - Inf = NaN: max(0.0, nan) kept 0.0, so bound reported 'observed 0' and lipschitz a lower
    bound of 0 labelled observed. Now neither gives a figure, and a note says why."""
    base, pruned = _deep_chain(), _deep_chain(pruned=100)
    r = onnxlip.bound(base, pruned, samples=16)
    assert r.observed_max_l1_diff is None and any("Inf or NaN" in n for n in r.notes)
    result = onnxlip.lipschitz(base, "inf", lower_seconds=0.2)
    assert result.lower["value"] is None and result.lower["certified"] is False
    assert any("not finite" in n for n in result.notes)


def test_samples_stay_inside_the_box_in_the_models_input_type(tmp_path):
    """A float16 input: rounding the corners +-R to nearest gave +-float16(R) > R (R = 1 + 0.6 * 2**-10), outside
    the box, and the observed difference exceeded the certified bound. Samples are rounded toward zero there."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    def model(w2: float) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["xf", "W1"], ["m"]),
            helper.make_node("Relu", ["m"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(np.full((4, 4), 0.25, np.float32), "W1"),
            numpy_helper.from_array(np.full((4, 1), w2, np.float32), "W2"),
        ]
        io = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])]
        return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])], inits)

    radius = 1 + 0.6 * 2**-10
    assert float(np.float16(radius)) > radius
    r = onnxlip.bound(model(1.0), model(2.0), radius, samples=256)
    assert r.observed_max_l1_diff is not None and r.observed_max_l1_diff <= r.bound


@pytest.mark.parametrize("shape_in,shape_out", [([3, 4], [3, 2]), ([4], [2]), ([2, 4], ["M", 2])])
def test_inputs_whose_sample_is_the_whole_tensor_are_sampled(shape_in, shape_out):
    """A fixed batch above 1 is analysed as one sample of that many rows, and a 1-D input has no batch axis: the
    samplers fed them a batch of one row (onnxruntime refused it), so `bound` gave no observed figure and
    `lipschitz` no lower bound. Both now sample the whole tensor, and a 1-D input gets no fixed-batch note."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    w = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)

    def model(scale):
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
        return make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
            [numpy_helper.from_array(w * np.float32(scale), "W")],
        )

    r = onnxlip.bound(model(1.0), model(1.25), samples=64)
    assert r.samples == 64 and 0 < r.observed_max_l1_diff <= r.bound
    assert not any("no sampled" in n for n in r.notes)
    assert any("fixed batch" in n for n in r.notes) == (len(shape_in) == 2)
    lip = onnxlip.lipschitz(model(1.0), "2", lower_seconds=0.3)
    assert lip.lower["pairs"] > 0 and 0 < lip.lower["value"] <= lip.upper.value * (1 + 1e-4)


@pytest.mark.parametrize(("fixed", "analysed"), [(4, 1), (1, 2)])
def test_a_fixed_batch_overridden_by_input_shape_is_sampled_at_the_analysed_batch(tmp_path, fixed, analysed):
    """--input-shape may override a fixed batch (one sample of a model exported with batch 4); the sampler ran the
    file as declared, onnxruntime refused the analysed shape, and the bound came with no sampled differences."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.helpers import make_model

    rng = np.random.default_rng(fixed)
    paths = []
    for scale in (1.0, 0.9):
        w = numpy_helper.from_array((rng.standard_normal((4, 3)) * scale).astype(np.float32), "w")
        b = numpy_helper.from_array(np.ones(4, np.float32), "b")
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["t"], transB=1), helper.make_node("Relu", ["t"], ["y"])]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [fixed, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [fixed, 4])
        paths.append(tmp_path / f"m{scale}.onnx")
        onnx.save(make_model(nodes, [x], [y], [w, b]), paths[-1])
    result = onnxlip.bound(*paths, samples=64, input_shapes={"x": [analysed, 3]})
    assert result.samples == 64 and 0 < result.observed_max_l1_diff <= result.bound, result.notes
    assert not any("could not run" in n for n in result.notes)


def test_a_sampling_budget_of_zero_seconds_skips_the_sampling():
    """--sample-seconds 0 still drew a first batch of inputs; it now means what --samples 0 does."""
    models = Path(__file__).resolve().parents[1] / "models"
    result = onnxlip.bound(models / "digits_cnn.onnx", models / "digits_cnn_pruned.onnx", sample_seconds=0)
    assert result.samples == 0 and result.observed_max_l1_diff is None
    result = onnxlip.bound(models / "digits_cnn.onnx", models / "digits_cnn_pruned.onnx", sample_seconds=0.5)
    assert result.samples > 0 and result.observed_max_l1_diff is not None
