"""rescale's check of its output: the rescaled model is run in onnxruntime beside the input model before it is
written, so that factors under which float arithmetic cannot hold the rescaled activations (overflow, subnormals)
are refused (onnxlip/rescale.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .errors import OnnxlipError, RuntimeFailure

# ---- the rescaled model, run ----------------------------------------------------------------------------------
# The rescaled weights pass _check_representable, but the activations scale with the factors too: factors of 1e38
# made the digits CNN's float32 activations overflow (every output NaN), and tiny ones make them subnormal, which
# keeps fewer bits. check_function runs three models on a few inputs: the input model (a), the rescaled one (b)
# and a reference rescaled by the factors' mantissas alone (m: lam = m * 2**e with m in [1, 2), the same neurons).
# Multiplying by a power of two is exact in floating point wherever no value leaves the normal range, and every op
# a rescaled value passes through (Conv, Gemm, MatMul, BatchNorm, pools, the homogeneous activations) commutes
# with it, roundings included: b's outputs then equal m's bit for bit (measured: 0 difference for the digits
# models and ResNet-18). So b must equal m to one unit in the last place of each input's largest output (what
# stays over is what leaving the normal range cost, e.g. a negligible weight stored as a subnormal; its share is
# far smaller), and m, whose factors within [1, 2) keep every value in range, may differ from a by rounding only.
# That rounding (rescaled weights rounded once or twice more, other roundings in the forward pass; 4e-7 of the
# largest output for the digits models and ResNet-18 with factors 0.013-91, 1.2e-3 for a 6-layer float16 MLP with
# factors 0.7 and 1.3) grows with depth and cancellation and has no a priori bound relative to the outputs: m is
# compared with a to 2**14 units of roundoff u of the coarsest type among the weights and the output (1e-3 in
# float32; at most 1/16: float16's would be 8), which catches a rescaling that is not exact (a neuron multiplied
# and not divided changes the outputs by its share of them) and allows deep networks' rounding.
_MANTISSA_ROUNDOFFS = 2.0**14
_MANTISSA_RTOL_MAX = 1.0 / 16
_EXACT_ULPS = 1.0
_EPS = {onnx.TensorProto.FLOAT16: 2.0**-10, onnx.TensorProto.FLOAT: 2.0**-23, onnx.TensorProto.DOUBLE: 2.0**-52}
# inputs: zero, a uniform point and a corner of the box [-1, 1] (the analysing commands' default -R), and the same
# at this radius: headroom for inputs of other scales (raw 8-bit pixels), so that a model whose activations only
# just fit float32 at radius 1 (the digits CNN rescaled by 1e37 computed NaN at radius 1e4) is refused
_BIG_RADIUS = 1024.0
_BATCHED_ELEMENTS = 1 << 20  # the inputs run in one batch where one of them has no more entries than this


def check_function(source: onnx.ModelProto, rescaled: onnx.ModelProto, applied: dict[str, np.ndarray]):
    """(the number of inputs compared, notes). OnnxlipError where the rescaled model does not compute the input
    model's function to rounding on them; a note, and nothing compared, where onnxruntime cannot run the input
    model itself (an op it has no kernel for, an unknown dimension that 1 does not fit, ...)."""
    samples, why = _samples(source)
    if samples is None:
        return 0, [_unchecked(why)]
    try:
        session = _session(source)
        # in one batch where the inputs have a batch axis (a model that fixes its batch inside fails: one at a time)
        for batched in dict.fromkeys([_batchable(source, samples), False]):
            try:
                a = _run_all(session, samples, batched)
                break
            except RuntimeFailure:
                if not batched:
                    raise
    except RuntimeFailure as exc:
        return 0, [_unchecked(f"onnxruntime cannot run the input model on inputs of its declared shapes ({exc})")]
    if all(np.all(np.frexp(lam)[0] == 0.5) for lam in applied.values()):  # powers of two: m is the input model
        m = a
    else:
        from .rescale import rescale_layers

        reference = onnx.ModelProto()
        reference.CopyFrom(source)
        mantissas = {k: 2.0 * np.frexp(lam)[0] for k, lam in applied.items()}
        rescale_layers(reference, lambda node, f: mantissas[node.output[0]], check=False)
        m = _run_other(reference, samples, batched, "the reference model rescaled by the factors' mantissas")
    b = _run_other(rescaled, samples, batched, "the rescaled model")
    names = [o.name for o in source.graph.output]
    runs = [[what for what, _ in samples]] if batched else [[what] for what, _ in samples]
    weights_eps = max((_EPS.get(i.data_type, 0.0) for i in source.graph.initializer), default=0.0)
    for whats, outs_a, outs_m, outs_b in zip(runs, a, m, b):
        for name, oa, om, ob in zip(names, outs_a, outs_m, outs_b):
            if isinstance(oa, np.ndarray) and oa.dtype.kind == "f":
                rtol = min(
                    _MANTISSA_ROUNDOFFS * max(weights_eps, float(np.finfo(oa.dtype).eps)) / 2, _MANTISSA_RTOL_MAX
                )
                _compare(name, whats, oa, om, ob, rtol)
    return len(samples), []


def _unchecked(why: str) -> str:
    return (
        f"the rescaled model was not run: {why}; only its weights were checked (finite, none flushed to 0 and none "
        "that matters made subnormal), not that its activations stay within float range"
    )


def _samples(proto: onnx.ModelProto) -> tuple[list[tuple[str, dict[str, np.ndarray]]] | None, str]:
    """The inputs to run, as (description, feeds of one sample), each input at its declared shape with an unknown
    first axis (the batch) and any other unknown dimension set to 1; float inputs in their own type, integer and
    boolean ones 0. (None, why) where the inputs' types or ranks are not declared."""
    inits = {i.name for i in proto.graph.initializer}
    declared = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        ttype = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not ttype.HasField("shape"):
            return None, f"the type or rank of input {inp.name!r} is not declared"
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except Exception:  # noqa: BLE001 - onnx raises KeyError or ValueError for undefined element types
            return None, f"input {inp.name!r} has no numeric element type"
        if dtype.kind not in "fiub":
            return None, f"input {inp.name!r} has element type {dtype}"
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in ttype.shape.dim]
        declared[inp.name] = (tuple(dims), dtype)
    rng = np.random.default_rng(0)
    samples = [("the input 0", {n: np.zeros(s, t) for n, (s, t) in declared.items()})]
    for radius in (1.0, _BIG_RADIUS):
        box = f"the box [-{radius:g}, {radius:g}]"
        for what, draw in (
            (f"a random point of {box}", lambda s, r=radius: rng.uniform(-r, r, s)),
            (f"a random corner of {box}", lambda s, r=radius: r * rng.choice([-1.0, 1.0], s)),
        ):
            feeds = {n: draw(s).astype(t) if t.kind == "f" else np.zeros(s, t) for n, (s, t) in declared.items()}
            samples.append((what, feeds))
    return samples, ""


def _batchable(proto: onnx.ModelProto, samples) -> bool:
    """Whether every data input has an unknown first axis (a batch) of rank 2 or more, and inputs small enough."""
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) < 2 or (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            return False
    return all(v.size <= _BATCHED_ELEMENTS for v in samples[0][1].values())


def _groups(samples, batched: bool):
    """The runs: all samples at once along the batch axis, or one run each; as (description, feeds)."""
    if not batched:
        return samples
    feeds = {n: np.concatenate([s[1][n] for s in samples]) for n in samples[0][1]}
    return [("; ".join(s[0] for s in samples), feeds)]


def _session(proto: onnx.ModelProto):
    """A CPU session of `proto` (onnxruntime's failures, and a model over protobuf's 2 GiB, as RuntimeFailure)."""
    from .runtime import make_session

    saved = proto.ir_version
    proto.ir_version = min(saved, 10)  # onnxruntime loads IR versions up to 10 (sampling.runnable)
    try:
        data = proto.SerializeToString()
    except ValueError as exc:
        raise RuntimeFailure(str(exc)) from None
    finally:
        proto.ir_version = saved
    return make_session(data, "cpu", level="none", prepack=False, spin=False, certified=False)[0]


def _run_all(session, samples, batched: bool) -> list[list]:
    """The outputs of every run (_groups); RuntimeFailure where onnxruntime fails."""
    from .runtime import run

    return [run(session, None, feeds) for _, feeds in _groups(samples, batched)]


def _run_other(proto: onnx.ModelProto, samples, batched: bool, what: str) -> list[list]:
    """_run_all of a rescaled model, which onnxruntime must run where it ran the input model."""
    try:
        return _run_all(_session(proto), samples, batched)
    except RuntimeFailure as exc:
        raise OnnxlipError(f"onnxruntime runs the input model but not {what}: {exc}") from None


def _compare(name: str, whats: list[str], oa: np.ndarray, om: np.ndarray, ob: np.ndarray, rtol: float) -> None:
    """Output `name` of the input model (oa), the mantissa reference (om, which may differ from oa by rtol of the
    largest output) and the rescaled model (ob) on the inputs `whats` of one run (_check_function), each input's
    rows to the scale of its own largest output where the output has one row per input (all at once otherwise)."""
    rows = len(whats) if oa.ndim and oa.shape[0] == len(whats) else 1
    if om.shape != oa.shape or ob.shape != oa.shape:
        raise OnnxlipError(f"the rescaled model's output {name!r} has another shape than the input model's")
    a, m, b = (np.asarray(o, np.float64).reshape(rows, -1) for o in (oa, om, ob))
    finite = np.isfinite(a)
    bad = np.any(finite & ~(np.isfinite(b) & np.isfinite(m)), axis=1)
    if np.any(bad):
        raise OnnxlipError(
            f"the rescaled model computes NaN or Inf in its output {name!r} where the input model's is finite (on "
            f"{_which(whats, bad)}): its activations overflow {oa.dtype}; choose factors closer to 1"
        )
    info = np.finfo(oa.dtype)
    scale = np.max(np.abs(np.where(finite, a, 0.0)), axis=1, keepdims=True, initial=0.0)
    off_m = np.where(finite, np.abs(m - a), 0.0)
    off_b = np.where(finite, np.abs(b - m), 0.0)
    bad = np.any(off_m > rtol * scale + info.tiny, axis=1)
    if np.any(bad):  # no range problem at factors within [1, 2): the rescaling itself is not exact
        worst = float(np.max(off_m[bad] / np.maximum(scale[bad], info.tiny)))
        raise OnnxlipError(
            f"the rescaled model does not compute the same function: its output {name!r} differs from the input "
            f"model's by {worst:.2g} of its largest entry (on {_which(whats, bad)}) even with each factor replaced "
            "by its mantissa (within [1, 2)): the rescaling is not exact (please report it), or the model amplifies "
            "rounding that much; factors that are powers of two rescale without rounding"
        )
    bad = np.any(off_b > _EXACT_ULPS * info.eps * scale + info.tiny, axis=1)
    if np.any(bad):
        worst = float(np.max(np.where(finite, np.abs(b - a), 0.0)[bad] / np.maximum(scale[bad], info.tiny)))
        raise OnnxlipError(
            f"the rescaled model does not compute the same function: its output {name!r} differs from the input "
            f"model's by {worst:.2g} of its largest entry (on {_which(whats, bad)}), more than {oa.dtype} rounding: "
            "its activations leave the normal range of floating point (overflow, or subnormals that lose "
            "precision); choose factors closer to 1"
        )


def _which(whats: list[str], bad: np.ndarray) -> str:
    """The inputs whose rows `bad` marks (all of them where the output has no row per input)."""
    return whats[int(np.argmax(bad))] if len(bad) == len(whats) else ", ".join(whats)
