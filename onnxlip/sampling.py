"""The sanity figure of `bound`: the largest ||R_a(x) - R_b(x)||_1 seen on random inputs in the box
||x||_inf <= R, computed by running the ORIGINAL models (cut at the analysed outputs) in onnxruntime."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import onnx
from onnx import utils as onnx_utils

from .errors import OnnxlipError, RuntimeFailure
from .ir import Graph
from .runtime import make_session, run


def runnable(proto: onnx.ModelProto, graph: Graph) -> onnx.ModelProto:
    """The original model cut at the analysed outputs, with fixed input shapes."""
    if [o.name for o in proto.graph.output] == list(graph.outputs):
        model = onnx.ModelProto()
        model.CopyFrom(proto)
    else:
        # Extractor needs the value_info of inner tensors, which many exporters (skl2onnx) do not write
        known = {vi.name for vi in list(proto.graph.value_info) + list(proto.graph.output)}
        if not set(graph.outputs) <= known:
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        model = onnx_utils.Extractor(proto).extract_model(list(graph.inputs), list(graph.outputs))
    if model.ir_version > 10:
        model.ir_version = 10
    if _batch_overridden(model, graph):  # declare the analysed shapes: onnxruntime checks inputs against them
        for inp in model.graph.input:
            if inp.name in graph.inputs:
                for dim, size in zip(inp.type.tensor_type.shape.dim, graph.inputs[inp.name]):
                    if dim.HasField("dim_value") and dim.dim_value > 0:
                        dim.dim_value = int(size)
        del model.graph.value_info[:]  # (inner shapes of the declared batch; onnxruntime infers them again)
        for out in model.graph.output:
            out.type.tensor_type.ClearField("shape")
    return model


def _batch_overridden(proto: onnx.ModelProto, graph: Graph) -> bool:
    """Whether an input's fixed dimension differs from the shape it is analysed at (--input-shape may override a
    fixed batch: graph_prep.fixed_input_shapes)."""
    for inp in proto.graph.input:
        shape = graph.inputs.get(inp.name)
        if shape is not None:
            dims = inp.type.tensor_type.shape.dim
            if any(d.HasField("dim_value") and 0 < d.dim_value != n for d, n in zip(dims, shape)):
                return True
    return False


def sampler_for(m, device: str = "cpu") -> Sampler:
    """A Sampler of an analysed model (api.Analysed). onnxruntime reads the file itself when it can run the file
    as it is: weights stored in the file (onnxlip read them in place, so no external data), the analysed outputs
    are the file's, and an IR version onnxruntime loads. Otherwise the model is cut (runnable) and serialised:
    for a large model that costs a protobuf copy and a serialisation (1.3 s for 150 MB)."""
    skeleton = m.skeleton  # only set when the weights were read in place from the file
    direct = (
        skeleton is not None
        and isinstance(m.source, (str, os.PathLike))
        and [o.name for o in skeleton.graph.output] == list(m.graph.outputs)
        and skeleton.ir_version <= 10
        and not _batch_overridden(skeleton, m.graph)
    )
    return Sampler(str(m.source) if direct else runnable(m.full_proto(), m.graph), m.graph, device)


class Sampler:
    """Runs a model on batches of inputs; falls back to one input at a time when the batch is fixed."""

    def __init__(self, model: onnx.ModelProto | str, graph: Graph, device: str = "auto"):
        """`model`: a runnable model (see runnable) or the path of a file onnxruntime can run as it is."""
        self.graph = graph
        # observed differences are a sanity figure, not a bound (certified=False); a few dozen runs do not repay
        # onnxruntime's optimisations and weight prepacking (building two samplers of a 38M-parameter MLP: 1.07 s
        # with them, 0.41 s without; of ResNet-18: 0.22 s and 0.05 s; the runs as fast either way)
        self.session, self.device = make_session(
            model, device, level="none", prepack=False, spin=False, certified=False
        )
        try:
            inputs = self.session.get_inputs()
            self.input_names = [i.name for i in inputs]
            self.input_types = {i.name: i.type for i in inputs}
            # old exporters list initializers among the inputs (onnxruntime feeds their values): not data inputs
            data = [i for i in inputs if i.name in graph.inputs]
            # inputs whose one sample is the whole tensor (sample_shape): fed as they are, one sample per run
            self.whole = {n: sample_shape(s) == tuple(s) for n, s in graph.inputs.items()}
            self.batched = all(not isinstance(i.shape[0], int) for i in data if i.shape) and not any(
                self.whole.values()
            )
            self._checked = False  # the first batched run is checked against single runs (run)
        except ValueError as exc:  # e.g. a dimension name that is not UTF-8 (a damaged file)
            raise OnnxlipError(f"cannot read the model's input description: {exc}") from None

    def input_dtype(self, name: str) -> type:
        """The NumPy type the model reads input `name` as (inputs are rounded to it when fed)."""
        return _INPUT_TYPES.get(self.input_types[name], np.float32)

    def run(self, xs: dict[str, np.ndarray]) -> np.ndarray:
        """Flattened outputs, one row per input of the batch."""
        n = next(iter(xs.values())).shape[0]
        feeds = {k: _inside(v, self.input_dtype(k)) for k, v in xs.items()}
        if self.batched:
            outs = run(self.session, list(self.graph.outputs), feeds)
            if self._checked or n < 2:
                return np.concatenate([np.asarray(o, np.float64).reshape(n, -1) for o in outs], axis=1)
            self._checked = True
            if all(np.ndim(o) >= 1 and np.shape(o)[0] == n for o in outs):
                batch = np.concatenate([np.asarray(o, np.float64).reshape(n, -1) for o in outs], axis=1)
                if all(self._same_as_alone(batch[i], feeds, i) for i in (0, n - 1)):
                    return batch
            # a symbolic first axis that the network mixes (a Transpose or a reduction over it): not a batch
            # axis; the model is run one input at a time, as it was analysed (rows of a batch mixed samples,
            # and a reduction over the axis failed to reshape)
            self.batched = False
        rows = []
        for i in range(n):
            outs = run(self.session, list(self.graph.outputs), self._one(feeds, i))
            rows.append(np.concatenate([np.asarray(o, np.float64).ravel() for o in outs]))
        return np.stack(rows)

    def _one(self, feeds: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
        """The feeds of sample i alone: a batch of one, or the whole tensor where one sample is the whole input."""
        return {k: v[i] if self.whole.get(k) else v[i : i + 1] for k, v in feeds.items()}

    def _same_as_alone(self, row: np.ndarray, feeds: dict[str, np.ndarray], i: int) -> bool:
        """Row i of a batched run equals the run of input i alone, to float32 rounding of other kernels."""
        outs = run(self.session, list(self.graph.outputs), self._one(feeds, i))
        alone = np.concatenate([np.asarray(o, np.float64).ravel() for o in outs])
        if alone.shape != row.shape:
            return False
        scale = float(np.max(np.abs(alone), initial=0.0))
        return bool(np.all(np.abs(alone - row) <= 1e-4 * scale + 1e-30))


_INPUT_TYPES = {"tensor(double)": np.float64, "tensor(float16)": np.float16}


def _inside(v: np.ndarray, dtype) -> np.ndarray:
    """v in the model's input type, rounded toward zero where rounding to nearest would leave the box: a corner
    +-R became +-float16(R) > R (R = 1 + 0.6 * 2**-10), and the observed difference exceeded the bound."""
    out = np.asarray(v).astype(dtype)
    if out.dtype == np.asarray(v).dtype:
        return out
    over = np.abs(out.astype(np.float64)) > np.abs(np.asarray(v, np.float64))
    if np.any(over):
        out[over] = np.nextafter(out[over], np.zeros(1, dtype))
    return out


def sample_shape(shape) -> tuple[int, ...]:
    """The shape of one sample of an input analysed at `shape`: the input without its batch axis of 1, else the
    whole tensor (a fixed batch B above 1 is analysed as one sample of B rows at once, and sampled so; a 1-D input
    has no batch axis)."""
    shape = tuple(int(d) for d in shape)
    return shape[1:] if len(shape) >= 2 and shape[0] == 1 else shape


def random_box_inputs(graph: Graph, n: int, radius: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n inputs with ||x||_inf <= radius (each of sample_shape): half uniform in the box, half at random corners."""
    xs = {}
    for name, shape in graph.inputs.items():
        one = sample_shape(shape)
        uniform = rng.uniform(-radius, radius, size=(n, *one))
        corners = radius * rng.choice([-1.0, 1.0], size=(n, *one))
        pick = (np.arange(n) % 2 == 1).reshape((n,) + (1,) * len(one))
        xs[name] = np.where(pick, corners, uniform)
    return xs


SAMPLE_MEMORY = 64 << 20  # bytes of activations one sampler run may hold


def max_batch(graph: Graph, cap: int = 64) -> int:
    """The largest batch whose activations (every tensor of one forward, an upper bound on what onnxruntime keeps
    live) fit SAMPLE_MEMORY, at least 1 and at most `cap`. ResNet-18 at 224 holds 32 MiB per input: its samplers
    ran batches of 18 and held 370 MiB; one input per run costs no more time per input."""
    params = {p.name for p in graph.params()}
    per_input = 4 * sum(int(np.prod(s[1:])) for t, s in graph.shapes.items() if t not in params and len(s))
    return int(max(1, min(cap, SAMPLE_MEMORY // max(per_input, 1))))


def observed_max_l1(
    samplers: tuple[Sampler, Sampler], n: int, radius: float, seed: int = 0, time_budget: float = 2.0
) -> tuple[float, int]:
    """(largest observed l1 output difference, number of inputs actually tried). Batches grow or shrink so the
    time budget is kept: a first batch of 2 measures the cost of one input."""
    rng = np.random.default_rng(seed)
    largest = max_batch(samplers[0].graph)
    start, done, worst, batch = time.perf_counter(), 0, 0.0, min(2, largest)
    while done < n:
        k = min(batch, n - done)
        xs = random_box_inputs(samplers[0].graph, k, radius, rng)
        # the models' inputs pair by position (structure.align_params checked their shapes), not by name
        renamed = dict(zip(samplers[1].graph.inputs, xs.values()))
        diff = np.abs(samplers[0].run(xs) - samplers[1].run(renamed)).sum(axis=1)
        done += k
        if not np.all(np.isfinite(diff)):  # (max(0.0, nan) is 0.0: a NaN output read as no difference)
            return math.nan, done
        worst = max(worst, float(diff.max()))
        elapsed = time.perf_counter() - start
        left = time_budget - elapsed
        if left <= 0:
            break
        batch = int(max(1, min(largest, left / (elapsed / done))))
    return worst, done


class BoundSamplers:
    """The observed differences of bound_many: the base's sampler built once. Where onnxruntime cannot run the
    models themselves (e.g. a dilated Conv with auto_pad SAME_UPPER, which it has no kernel for), the bound is
    still given, without samples, and a note says why: it does not depend on them."""

    def __init__(self, ref, samples: int):
        self.ref, self.samples = ref, samples
        self.base: Sampler | None = None
        self.failure: str | None = None  # the base's sampler could not be built: no variant can be sampled

    def observe(self, other, radius: float, seed: int, seconds: float) -> tuple[float | None, int, list]:
        if not self.samples:
            return None, 0, []
        if radius > float(np.finfo(np.float32).max):
            return None, 0, [_no_samples(f"inputs of size {radius:g} do not fit the models' float32 inputs")]
        if self.failure is not None:
            return None, 0, [_no_samples(self.failure)]
        try:
            if self.base is None:
                self.base = sampler_for(self.ref)
            observed, tried = observed_max_l1((self.base, sampler_for(other)), self.samples, radius, seed, seconds)
            if not math.isfinite(observed):  # Inf or NaN outputs: the forward passes overflowed float32
                return (
                    None,
                    0,
                    [
                        "no sampled differences (the certified bound does not need them): the models' float32 outputs "
                        f"overflow (Inf or NaN) on the {tried} sampled input(s) run"
                    ],
                )
            return observed, tried, []
        except RuntimeFailure as exc:
            if self.base is None:
                self.failure = str(exc)
            return None, 0, [_no_samples(str(exc))]


def rounding_note(engine, graph, observed: float, log10_bound: float, metric, radius: float) -> str:
    """Why an observed difference can exceed the certified bound: the bound is about exact arithmetic, the samples
    run in float32. The a priori rounding of one forward pass (direct summation, as rounding.py assumes for the
    companion) is at most margin * ||Phi||_1 * max(||x||_inf, 1) in l1, and ||Phi(b)|| <= ||Phi(a)|| + metric."""
    from .rounding import relative_error_bound
    from .routes import log10_add

    text = (
        f"the largest observed difference ({observed:.4g}) exceeds the certified bound "
        f"({_plain(log10_bound)}): the bound is about the models in exact arithmetic, while the samples ran in "
        "floating point"
    )
    try:
        log10_a = engine.log10_base()  # (one companion run; it may itself be refused by range_guard)
    except OnnxlipError:
        return text
    log10_sum = log10_add(log10_add(log10_a, log10_a), metric.log10_path_metric)
    margin = relative_error_bound(graph)
    log10_z = math.log10(margin) + log10_sum + math.log10(max(radius, 1.0)) if margin > 0 else -math.inf
    text += f", whose rounding in the two forward passes is at most about {_plain(log10_z)} here (an a priori "
    text += "estimate for float32)"
    if math.log10(observed) > log10_add(log10_bound, log10_z):
        text += "; that does not explain the excess: please report it"
    return text


def _plain(log10: float) -> str:
    return f"{10**log10:.3g}" if log10 < 300 else f"10^{log10:.2f}"


def _no_samples(why: str) -> str:
    return (
        f"no sampled differences (the certified bound does not need them): running the models themselves failed: {why}"
    )
