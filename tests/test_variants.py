"""Variant files read against the base's import (onnxlip/variants.py): the fast path must give exactly the outcome
of a full import, take over only what it can prove equal, and leave every bad file to the full import's errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlip
from onnxlip.api import analyse
from onnxlip.engine import MetricEngine
from onnxlip.errors import MismatchError, ModelLoadError, OnnxlipError
from onnxlip.loading import map_file
from onnxlip.structure import align_params
from onnxlip.variants import VariantReader, _same_bytes
from onnxlip.wire import scan
from tests import dag_factory as F
from tests.test_bad_input import cli

MODELS = Path(__file__).resolve().parent.parent / "models"
KINDS = ["prune", "quantize", "noise", "flip", "shrink", "same", "weights-only"]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _variant(spec: F.Spec, kind: str, graph) -> onnx.ModelProto:
    rng = np.random.default_rng([7, KINDS.index(kind)])
    if kind in ("prune", "quantize", "noise", "flip"):
        return F.perturb(spec, kind, rng)
    vals = F.params_of(spec.model, spec.params)
    if kind == "same":
        return F._replace_inits(spec.model, {})
    if kind == "shrink":  # dominated, but not a pruning: halved entries
        return F._replace_inits(spec.model, {n: np.where(rng.random(v.shape) < 0.3, v / 2, v) for n, v in vals.items()})
    # weights-only: prune only what parameters read unchanged (BatchNorm and folded biases stay)
    origins = {p.origin for p in graph.params() if p.origin}
    return F._replace_inits(
        spec.model, {n: np.where(rng.random(v.shape) < 0.3, 0.0, v) for n, v in vals.items() if n in origins}
    )


def _changed_initializers(a: onnx.ModelProto, b: onnx.ModelProto) -> set[str]:
    va = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    return {i.name for i in b.graph.initializer if not np.array_equal(va[i.name], numpy_helper.to_array(i))}


def _expect_fast(graph, changed: set[str]) -> bool:
    """The contract: every changed initializer is read unchanged by each parameter that uses it."""
    params = graph.params()
    return all(
        any(p.origin == i for p in params) and all(p.origin == i for p in params if i in p.sources) for i in changed
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(F.FAMILIES))
def test_fast_path_gives_the_full_import_outcome(tmp_path, family, kind):
    spec = F.build(family, 0)
    base = _save(spec.model, tmp_path / "base.onnx")
    ref = analyse(base)
    variant_model = _variant(spec, kind, ref.graph)
    variant = _save(variant_model, tmp_path / "variant.onnx")
    changes = VariantReader(base, ref.graph).changes(variant)
    assert (changes is not None) == _expect_fast(ref.graph, _changed_initializers(spec.model, variant_model))
    full = MetricEngine(ref.graph).metric(align_params(ref.graph, analyse(variant).graph))
    if changes is not None:
        fast = MetricEngine(ref.graph).metric_changes(changes)
        assert fast == full  # every field, bit for bit


def test_the_fast_path_is_taken_where_sweeps_need_it(tmp_path):
    """Pruned and quantized weights of Conv+BatchNorm, Gemm (transB) and Conv-bias models: no full import."""
    for family in ("batchnorm", "residual", "concat", "layout", "mixed", "convtranspose"):
        spec = F.build(family, 1)
        base = _save(spec.model, tmp_path / f"{family}.onnx")
        ref = analyse(base)
        reader = VariantReader(base, ref.graph)
        for kind in ("weights-only", "quantize"):
            model = _variant(spec, kind, ref.graph)
            if _expect_fast(ref.graph, _changed_initializers(spec.model, model)):
                assert reader.changes(_save(model, tmp_path / f"{family}_{kind}.onnx")) is not None
        assert reader.changes(_save(_variant(spec, "weights-only", ref.graph), tmp_path / "w.onnx"))


def test_shipped_variants_take_the_fast_path_and_agree():
    for name, output in (("digits_cnn", None), ("digits_mlp", ["add_result2"])):
        base = MODELS / f"{name}.onnx"
        ref = analyse(base, output)
        reader = VariantReader(base, ref.graph)
        assert reader.usable
        for suffix in ("pruned", "int8"):
            path = MODELS / f"{name}_{suffix}.onnx"
            changes = reader.changes(path)
            full = MetricEngine(ref.graph).metric(align_params(ref.graph, analyse(path, output).graph))
            if changes is not None:
                assert MetricEngine(ref.graph).metric_changes(changes) == full
        # skl2onnx stores float_data, the pruned copy raw_data: other bytes, so only the torch export's is read fast
        assert (reader.changes(MODELS / f"{name}_pruned.onnx") is not None) == (name == "digits_cnn")


def _without(result):
    return {k: v for k, v in result.to_json().items() if k != "variant"}


def test_bound_many_reuses_one_buffer_for_many_variants(tmp_path):
    spec = F.build("batchnorm", 2)
    base = _save(spec.model, tmp_path / "base.onnx")
    graph = analyse(base).graph
    paths = [_save(_variant(spec, kind, graph), tmp_path / f"{kind}.onnx") for kind in KINDS]
    fast = onnxlip.bound_many(base, paths + paths[::-1], samples=0)
    full = onnxlip.bound_many(spec.model, paths + paths[::-1], samples=0)  # a ModelProto base: full imports
    assert [_without(r) for r in fast] == [_without(r) for r in full]
    sampled = onnxlip.bound_many(base, paths[:2], samples=16)  # sampling loads the variant for its session
    for r in sampled:
        assert r.samples == 16 and r.observed_max_l1_diff <= r.bound


def test_scan_finds_every_raw_initializer():
    for path in sorted(MODELS.glob("*.onnx")):
        view = memoryview(map_file(path))
        skeleton, tensors = scan(view)
        model = onnx.load(str(path))
        raw = {i.name: i for i in model.graph.initializer if i.raw_data and i.data_type == TensorProto.FLOAT}
        assert tensors.keys() == raw.keys()
        for name, t in tensors.items():
            got = np.frombuffer(view, t.dtype, int(np.prod(t.shape)), t.start).reshape(t.shape)
            np.testing.assert_array_equal(got, numpy_helper.to_array(raw[name]))
        assert len(skeleton) + sum(t.end - t.start for t in tensors.values()) == path.stat().st_size


def test_same_bytes():
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 9, 8 * 65536 + 3):
        a = rng.integers(0, 255, size, dtype=np.uint8)
        assert _same_bytes(memoryview(a), memoryview(a.copy()))
        for pos in {0, size // 2, size - 1} if size else ():
            b = a.copy()
            b[pos] ^= 1
            assert not _same_bytes(memoryview(a), memoryview(b))
    assert not _same_bytes(memoryview(b"abc"), memoryview(b"abcd"))


# ---- what the fast path must leave to the full import ------------------------------------------------------------
def _conv_bn(tmp_path):
    spec = F.build("batchnorm", 3)
    base = _save(spec.model, tmp_path / "base.onnx")
    ref = analyse(base)
    weight = next(p.origin for p in ref.graph.params() if p.origin and p.factor is not None)
    return spec, base, ref, weight


def _set(model: onnx.ModelProto, name: str, fn) -> onnx.ModelProto:
    inits = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    return F._replace_inits(model, {name: fn(inits[name])})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_variant_is_an_error(tmp_path, bad):
    spec, base, ref, weight = _conv_bn(tmp_path)

    def poison(v):
        v.reshape(-1)[1] = bad
        return v

    variant = _save(_set(spec.model, weight, poison), tmp_path / "bad.onnx")
    changes = VariantReader(base, ref.graph).changes(variant)
    assert changes is not None  # the fast path reads it, and must refuse it itself
    with pytest.raises(OnnxlipError, match="NaN or Inf"):
        MetricEngine(ref.graph).metric_changes(changes)
    with pytest.raises(OnnxlipError, match="NaN or Inf"):
        onnxlip.bound_many(base, [variant], samples=0)
    code, out, err = cli("bound", base, variant, "--samples", "0")
    assert code == 2 and "NaN or Inf" in err and "Traceback" not in err


def test_overflowing_folded_variant_weight_is_an_error(tmp_path):
    """A BatchNorm scale near float64's range: a variant weight times it overflows. Such factors are left to the
    full import (variants._factor_ok), which reports the overflow."""
    spec = F.build("batchnorm", 3)
    bn = next(n for n in spec.model.graph.node if n.op_type == "BatchNormalization")
    conv = next(n for n in spec.model.graph.node if n.output[0] == bn.input[0])
    model = _set(spec.model, conv.input[1], lambda v: v * 1e-30)
    for init in model.graph.initializer:  # gamma 1e300 is not a float32: float64 scale and bias (opset >= 15's T1)
        if init.name == bn.input[1]:
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, 1e300), init.name))
        elif init.name == bn.input[2]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    base = _save(model, tmp_path / "base.onnx")
    ref = analyse(base)
    variant = _save(_set(model, conv.input[1], lambda v: np.full_like(v, 3e38)), tmp_path / "big.onnx")
    assert VariantReader(base, ref.graph).changes(variant) is None
    with pytest.raises(OnnxlipError, match="NaN or Inf"):
        onnxlip.bound_many(base, [variant], samples=0)
    code, out, err = cli("bound", base, variant, "--samples", "0")
    assert code == 2 and "NaN or Inf" in err and "Traceback" not in err


def test_truncated_variant_takes_the_full_import_and_its_error(tmp_path):
    spec, base, ref, weight = _conv_bn(tmp_path)
    data = _variant(spec, "weights-only", ref.graph).SerializeToString()
    reader = VariantReader(base, ref.graph)
    for cut in (len(data) // 2, len(data) - 3):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        assert reader.changes(path) is None
        with pytest.raises(OnnxlipError):
            onnxlip.bound_many(base, [path], samples=0)
        code, out, err = cli("bound", base, path, "--samples", "0")
        assert code == 2 and "Traceback" not in err


def test_other_architectures_and_storages_take_the_full_import(tmp_path):
    spec, base, ref, weight = _conv_bn(tmp_path)
    reader = VariantReader(base, ref.graph)
    pruned = _variant(spec, "weights-only", ref.graph)
    # a doc string: the same network, other bytes -> full import, same result
    documented = onnx.ModelProto.FromString(pruned.SerializeToString())
    documented.doc_string = "fine-tuned"
    # the same values stored as float_data instead of raw_data
    as_floats = onnx.ModelProto.FromString(pruned.SerializeToString())
    for init in as_floats.graph.initializer:
        if init.name == weight:
            values = numpy_helper.to_array(init)
            init.CopyFrom(helper.make_tensor(init.name, TensorProto.FLOAT, values.shape, values.ravel().tolist()))
    want = _without(onnxlip.bound_many(base, [_save(pruned, tmp_path / "p.onnx")], samples=0)[0])
    for i, model in enumerate((documented, as_floats)):
        path = _save(model, tmp_path / f"other{i}.onnx")
        assert reader.changes(path) is None
        assert _without(onnxlip.bound_many(base, [path], samples=0)[0]) == want
    # another architecture: the full import names the difference
    other = _save(F.build("residual", 0).model, tmp_path / "residual.onnx")
    assert reader.changes(other) is None
    with pytest.raises(MismatchError):
        onnxlip.bound_many(base, [other], samples=0)
    # a changed BatchNorm: not a parameter read unchanged
    bn = next(i.name for i in spec.model.graph.initializer if i.name not in {p.origin for p in ref.graph.params()})
    path = _save(_set(spec.model, bn, lambda v: v * 1.5), tmp_path / "bn.onnx")
    assert reader.changes(path) is None


def test_external_data_variants_are_read_safely(tmp_path):
    spec, base, ref, weight = _conv_bn(tmp_path)
    pruned = _variant(spec, "weights-only", ref.graph)
    want = _without(onnxlip.bound_many(base, [_save(pruned, tmp_path / "p.onnx")], samples=0)[0])
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "v.onnx"
    onnx.save(pruned, str(path), save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=0)
    reader = VariantReader(base, ref.graph)
    assert reader.changes(path) is None  # values outside the file: the full import reads them
    assert _without(onnxlip.bound_many(base, [path], samples=0)[0]) == want
    hostile = onnx.load(str(path), load_external_data=False)
    for init in hostile.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    bad = _save(hostile, folder / "hostile.onnx")
    with pytest.raises(ModelLoadError):
        onnxlip.bound_many(base, [bad], samples=0)


def test_a_missing_base_or_variant_file(tmp_path):
    spec, base, ref, weight = _conv_bn(tmp_path)
    assert not VariantReader(tmp_path / "missing.onnx", ref.graph).usable
    reader = VariantReader(base, ref.graph)
    assert reader.changes(tmp_path / "missing.onnx") is None
    with pytest.raises(ModelLoadError):
        onnxlip.bound_many(base, [tmp_path / "missing.onnx"], samples=0)


def test_change_value_matches_the_import(tmp_path):
    spec, base, ref, weight = _conv_bn(tmp_path)
    model = _variant(spec, "quantize", ref.graph)
    variant = _save(model, tmp_path / "q.onnx")
    changes = VariantReader(base, ref.graph).changes(variant)
    if changes is None:
        pytest.skip("quantize changes BatchNorm here")
    imported = {p.name: p.value for p in analyse(variant).graph.params()}
    for name, change in changes.items():
        got = change.value(name)
        assert got.dtype == imported[name].dtype and np.array_equal(got, imported[name])
        assert dataclasses.is_dataclass(change)


def test_a_shared_weight_changes_every_parameter_that_reads_it(tmp_path):
    """One initializer used by two MatMuls (weight tying): both IR parameters take the variant's values."""
    rng = np.random.default_rng(5)
    w, v = rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "V"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    base = _save(model, tmp_path / "tied.onnx")
    ref = analyse(base)
    assert sum(p.origin == "W" for p in ref.graph.params()) == 2
    pruned = _save(_set(model, "W", lambda a: np.where(np.abs(a) < 0.5, 0, a)), tmp_path / "tied_pruned.onnx")
    changes = VariantReader(base, ref.graph).changes(pruned)
    assert changes is not None and len(changes) == 2
    full = MetricEngine(ref.graph).metric(align_params(ref.graph, analyse(pruned).graph))
    assert MetricEngine(ref.graph).metric_changes(changes) == full and full.changed > 0


def test_a_base_file_that_changed_since_its_import_is_not_trusted(tmp_path):
    spec, base, ref, weight = _conv_bn(tmp_path)
    variant = _save(_variant(spec, "weights-only", ref.graph), tmp_path / "v.onnx")
    assert VariantReader(base, ref.graph).changes(variant) is not None
    _save(_set(spec.model, weight, lambda v: v * 2), base)  # the file on disk no longer matches the IR
    assert VariantReader(base, ref.graph).changes(variant) is None


def _shared_constant_model(op: str) -> onnx.ModelProto:
    """B is a Gemm bias (a parameter, read unchanged) and also a fixed constant: Max(z, B)'s threshold, or
    PRelu(z, B)'s slopes."""
    from tests.helpers import make_model

    rng = np.random.default_rng(1)
    arrays = {
        "W": 1e-3 * rng.normal(size=(4, 4)),
        "B": np.full(4, 0.5),
        "C": 1e-3 * rng.normal(size=(4, 2)),
        "A": rng.normal(size=(4, 4)),
        "D": 10 * rng.normal(size=(4, 2)),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "C"], ["y1"]),
        helper.make_node("Gemm", ["x", "A"], ["z"]),
        helper.make_node(op, ["z", "B"], ["p"]),
        helper.make_node("Gemm", ["p", "D"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    io = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    return make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)


@pytest.mark.parametrize("op", ["Max", "PRelu"])
def test_an_initializer_also_read_as_a_fixed_constant_takes_the_full_import(tmp_path, op):
    """Changing B changes the Max threshold (or the PRelu slopes) too: the fast path reused the base's IR with its
    thresholds and certified 0.002 where the models differ by 17 (258 for PRelu) on samples. The full import
    refuses the pair, as it must."""
    model = _shared_constant_model(op)
    base = _save(model, tmp_path / "base.onnx")
    ref = analyse(base)
    assert "B" in ref.graph.fixed_sources
    variant = _save(_set(model, "B", lambda v: np.full_like(v, 0.3)), tmp_path / "variant.onnx")
    assert VariantReader(base, ref.graph).changes(variant) is None
    with pytest.raises(MismatchError):
        onnxlip.bound_many(base, [variant], samples=0)


def test_float64_weights_with_a_factor_take_the_full_import(tmp_path):
    """MatMul by float64 W, then Mul by a per-column constant (folded: value = W * s). Entries one float64 ulp
    apart can give the same product, so comparing the file's W counted 'changes' the products do not have (4 changed
    parameters and the hi/lo route where the full import sees none)."""
    from tests.helpers import make_model

    rng = np.random.default_rng(0)
    w, s = rng.normal(size=(6, 4)), np.array([0.7, 1.3, 0.9, 3.1])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Mul", ["h", "S"], ["hs"]),
        helper.make_node("Relu", ["hs"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (("W", w), ("S", s), ("W2", rng.normal(size=(4, 2))))]
    io = [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 6])]
    model = make_model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 2])], inits)
    moved = w.copy()
    for i, j in np.ndindex(*w.shape):
        up = np.nextafter(w[i, j], np.inf)
        if up * s[j] == w[i, j] * s[j]:
            moved[i, j] = up
    assert np.any(moved != w)
    base = _save(model, tmp_path / "base.onnx")
    changed = onnx.ModelProto.FromString(model.SerializeToString())
    for init in changed.graph.initializer:
        if init.name == "W":
            init.CopyFrom(numpy_helper.from_array(moved, "W"))  # (float64 kept)
    variant = _save(changed, tmp_path / "variant.onnx")
    fast = onnxlip.bound_many(base, [variant], samples=0)[0]
    full = onnxlip.bound(onnx.load(str(base)), onnx.load(str(variant)), samples=0)
    assert fast.changed_parameters == full.changed_parameters == 0 and fast.route == full.route
