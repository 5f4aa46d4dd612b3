"""The demo models shipped in models/ (built by models/make_models.py): present, runnable, variants with the
same graph as their base, and the certified bound holding on them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxlip

ort.set_default_logger_severity(3)

MODELS = Path(__file__).resolve().parent.parent / "models"

# family -> (analysed output or None, weight matrices that are pruned / quantized, input shape without batch)
FAMILIES = {
    "digits_mlp": ("add_result2", ("coefficient", "coefficient1", "coefficient2"), (64,)),
    "digits_cnn": (None, ("conv1.weight", "conv2.weight", "fc.weight"), (1, 8, 8)),
}
VARIANTS = ("pruned", "int8")
ALL_FILES = [f"{stem}{suffix}.onnx" for stem in FAMILIES for suffix in ("", "_pruned", "_int8")]


def path(stem: str, variant: str | None = None) -> Path:
    return MODELS / (f"{stem}_{variant}.onnx" if variant else f"{stem}.onnx")


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def output_of(stem: str) -> list[str] | None:
    out = FAMILIES[stem][0]
    return [out] if out else None


def test_files_exist_and_are_small():
    for name in ALL_FILES + ["make_models.py", "README.md"]:
        assert (MODELS / name).is_file(), f"models/{name} is missing (run python models/make_models.py)"
    total = sum(f.stat().st_size for f in MODELS.iterdir() if f.is_file())
    assert total < 1_000_000


@pytest.mark.parametrize("stem", FAMILIES)
@pytest.mark.parametrize("variant", (None, *VARIANTS))
def test_loads_and_runs_in_onnxruntime(stem, variant):
    model = onnx.load(str(path(stem, variant)))
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(str(path(stem, variant)), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input"
    assert not isinstance(inp.shape[0], int), "the batch dimension should be symbolic"
    x = np.random.default_rng(0).uniform(0, 1, size=(5, *FAMILIES[stem][2])).astype(np.float32)
    outputs = {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {"input": x}))}
    scores = outputs["probabilities"] if stem == "digits_mlp" else outputs["logits"]
    assert scores.shape == (5, 10) and np.all(np.isfinite(scores))


def test_mlp_logits_feed_the_softmax():
    model = onnx.load(str(path("digits_mlp")))
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax.input[0] == "add_result2"


def test_cnn_has_inference_batchnorm_with_real_statistics():
    model = onnx.load(str(path("digits_cnn")))
    assert model.ir_version == 10
    assert [n.op_type for n in model.graph.node] == [
        "Conv",
        "BatchNormalization",
        "Relu",
        "MaxPool",
        "Conv",
        "Relu",
        "Flatten",
        "Gemm",
    ]
    values = initializers(model)
    assert not np.allclose(values["bn.running_mean"], 0)
    assert not np.allclose(values["bn.running_var"], 1)
    assert not np.allclose(values["bn.scale"], 1)


def test_accuracy_on_held_out_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split((x / 16).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)
    for stem, floor in (("digits_mlp", 0.94), ("digits_cnn", 0.95)):
        for variant in (None, *VARIANTS):
            sess = ort.InferenceSession(str(path(stem, variant)), providers=["CPUExecutionProvider"])
            feed = x_test if stem == "digits_mlp" else x_test.reshape(-1, 1, 8, 8)
            scores = sess.run(["probabilities" if stem == "digits_mlp" else "logits"], {"input": feed})[0]
            acc = float(np.mean(scores.argmax(axis=1) == y_test))
            assert acc >= floor, (stem, variant, acc)


def _structure(model: onnx.ModelProto):
    g = model.graph
    nodes = [
        (
            n.op_type,
            n.domain,
            n.name,
            list(n.input),
            list(n.output),
            [helper.printable_attribute(a) for a in n.attribute],
        )
        for n in g.node
    ]
    inits = [(i.name, i.data_type, list(i.dims)) for i in g.initializer]
    io = [str(v) for v in (*g.input, *g.output, *g.value_info)]
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    return nodes, inits, io, opsets, model.ir_version


@pytest.mark.parametrize("stem", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_has_the_same_graph(stem, variant):
    base, other = onnx.load(str(path(stem))), onnx.load(str(path(stem, variant)))
    assert _structure(base) == _structure(other)
    # only the weight matrices change; biases and BatchNorm parameters are kept
    weights = FAMILIES[stem][1]
    vb, vo = initializers(base), initializers(other)
    for name in vb:
        if name not in weights:
            np.testing.assert_array_equal(vb[name], vo[name], err_msg=name)
        else:
            assert not np.array_equal(vb[name], vo[name]), f"{name} did not change"


@pytest.mark.parametrize("stem", FAMILIES)
def test_pruned_has_half_of_its_weights_zeroed(stem):
    weights = FAMILIES[stem][1]
    vb, vp = initializers(onnx.load(str(path(stem)))), initializers(onnx.load(str(path(stem, "pruned"))))
    total = sum(vb[w].size for w in weights)
    assert sum(np.count_nonzero(vb[w] == 0) for w in weights) == 0
    zeros = sum(np.count_nonzero(vp[w] == 0) for w in weights)
    assert abs(zeros / total - 0.5) <= 0.01
    # magnitude pruning: the kept entries are unchanged and every dropped entry is no larger than any kept one
    kept = np.concatenate([np.abs(vb[w][vp[w] != 0]) for w in weights])
    dropped = np.concatenate([np.abs(vb[w][vp[w] == 0]) for w in weights])
    assert dropped.max() <= kept.min()
    for w in weights:
        np.testing.assert_array_equal(vp[w][vp[w] != 0], vb[w][vp[w] != 0])


@pytest.mark.parametrize("stem", FAMILIES)
def test_int8_weights_lie_on_a_symmetric_int8_grid(stem):
    vb, vq = initializers(onnx.load(str(path(stem)))), initializers(onnx.load(str(path(stem, "int8"))))
    for w in FAMILIES[stem][1]:
        scale = float(np.abs(vb[w]).max()) / 127
        steps = vq[w].astype(np.float64) / scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert np.abs(np.round(steps)).max() <= 127
        assert np.all(vq[w] * vb[w] >= 0), "rounding must not flip signs"


@pytest.mark.parametrize("stem", FAMILIES)
def test_bound_is_exact_for_pruning_and_holds(stem):
    out = output_of(stem)
    r = onnxlip.bound(path(stem), path(stem, "pruned"), samples=64, output=out)
    assert r.exact and r.sign_flips == 0
    assert r.samples == 64 and r.observed_max_l1_diff is not None
    assert 0 < r.observed_max_l1_diff <= r.bound
    # pruning is dominated: the exact metric is the difference of the two path-norms (theory.md section 3)
    na = onnxlip.path_norm(path(stem), output=out).path_norm
    nb = onnxlip.path_norm(path(stem, "pruned"), output=out).path_norm
    assert math.isclose(r.path_metric, na - nb, rel_tol=1e-4)


@pytest.mark.parametrize("stem", FAMILIES)
def test_bound_holds_for_int8(stem):
    r = onnxlip.bound(path(stem), path(stem, "int8"), samples=64, output=output_of(stem))
    assert not r.exact and r.sign_flips == 0
    assert 0 < r.observed_max_l1_diff <= r.bound
