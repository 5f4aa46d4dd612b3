"""Certifying that float32 underflow changed no companion result beyond UNDERFLOW_SLACK (README "How it computes").

A companion tensor is a float32 mantissa times a power of two shared by the whole tensor, so an entry far below its
tensor's largest, or a product of two such entries, can fall below float32's normal range (2**-126) and be flushed
or rounded coarsely: the path mass through it is then undercounted, and a bound built on it would not hold.

Each multiplication (a Conv, ConvTranspose, MatMul, Gemm or Mul of mantissas, and the power-of-two multipliers that
align a sum's terms or renormalise it) is a *site*. A group of sites ends at a renormalisation, which measures the
least and the largest entry of the sum it rescales. Underflow costs less than 2**-126 per rounding (a flush to zero
or a subnormal result), and an entry of the sum takes N roundings (2 per product of its dot products, a few more),
so the group's relative error is bounded by the best of:
- 0, when no product can underflow: with lam(t) a lower bound on log2 of every nonzero entry of t (a product adds
  its factors' lam, a sum or a copy takes the least, a measured sum its least entry when that is not 0), every
  site's lam is >= -125.5 (a product of normal floats above 2**-126 is normal after rounding; the half binade
  absorbs the rounding of the sums lam was measured on);
- N * 2**-126 / (least entry): each entry against itself;
- size * N * 2**-126 / (largest entry), for a result of which only the total counts (a companion output).
Relative errors of entries pass through the positive linear companion unchanged, so the groups' bounds add up; a
run is certified when their sum is <= UNDERFLOW_SLACK, which rounding.relative_error_bound adds to every margin.

The bound is worked out on the host (GuardProgram.log2_bound) from a few scalars the run also returns: each
renormalisation's least entry (one ReduceMin per renormalisation is all this adds to the graph), its largest and
its exponent step; the exponent arithmetic in between is replayed exactly (integers). Fed and constant mantissas
(weights, base activations) need lam, and it must bound their true values: forming float32 mantissas flushes entries
below 2**-149 of a tensor's largest to 0, which the mantissas' own least entry cannot show (true_lam reads the
values). Callers pass it, or a function computing it that runs only when the measured bounds alone do not certify
the run (compiled.certify)."""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterable

import numpy as np
from onnx import TensorProto, numpy_helper

from .companion import CompanionEmitter
from .runtime import near_producers

UNDERFLOW_SLACK = 2.0**-20  # relative error allowed for underflow, on top of the rounding margin
LAM_ZERO = 2.0**22  # lam of an all-zero tensor: it has no nonzero entry to bound
# measured values are computed ones: their log2 is lowered by this (a 3% relative error, far above float32
# rounding and onnxruntime's Log), and a site needs lam >= _SITE_MIN, half a binade above float32's normal range
_LOG2_SLACK = 0.05
_SITE_MIN = -125.5
_UNKNOWN_K = 2**26  # products per output entry of a product whose operands' shapes are not known here

# ops whose output entries are copies, window maxima or sums of their mantissa inputs' entries: no multiplication
_COPIES = {
    "Reshape", "Transpose", "Slice", "Concat", "Split", "Pad", "Gather", "Identity", "Squeeze", "Unsqueeze",
    "Flatten", "Expand", "Tile", "ReduceSum", "Resize", "Upsample", "GatherElements", "ScatterElements",
    "ReduceMax", "ReduceMin", "MaxPool", "GlobalMaxPool", "DepthToSpace", "SpaceToDepth", "Add", "Sum", "Max",
}  # fmt: skip
_PRODUCTS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Mul"}
# exponent arithmetic replayed exactly on the host (integers held in float32); anything else is fetched
_REPLAY: dict[str, Callable] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Neg": lambda a: -a,
    "Max": lambda *a: max(a),
    "Min": lambda *a: min(a),
    "Identity": lambda a: a,
    "Greater": lambda a, b: float(a > b),
    "Where": lambda c, a, b: a if c else b,
}
_SCALAR_OPS = set(_REPLAY) | {"Mul", "Div", "Pow", "Floor", "Log", "Sum"}


def log2_min_nonzero(m: np.ndarray) -> float:
    """log2 of the smallest nonzero entry of a non-negative float32 array (LAM_ZERO when all are zero)."""
    flat = np.ascontiguousarray(m, dtype=np.float32).reshape(-1).view(np.uint32)
    best = np.uint32(0xFFFFFFFF)
    for s in range(0, flat.size, 1 << 16):  # bits - 1 wraps 0 to the largest: the minimum skips zeros
        best = min(best, (flat[s : s + (1 << 16)] - np.uint32(1)).min(initial=np.uint32(0xFFFFFFFF)))
    if best == np.uint32(0xFFFFFFFF):
        return LAM_ZERO
    value = np.array([best + np.uint32(1)], np.uint32).view(np.float32)[0]
    return math.log2(float(value))


def true_lam(blocks: Iterable[np.ndarray], exponent: int, q: float = 1.0) -> float:
    """lam of the true mantissas |v|**q * 2**-exponent of the values v given block by block (float32 or float64):
    log2 of their least nonzero entry, LAM_ZERO when all are zero. The formed float32 mantissas may hold fewer
    nonzero entries (those below 2**-149 are flushed to 0), so only this lam bounds what the model really has."""
    least = min((min_nonzero_abs(block) for block in blocks), default=math.inf)
    return lam_of_least(least, exponent, q)


def lam_of_least(least: float, exponent: int, q: float = 1.0) -> float:
    """true_lam from the least nonzero |value| (inf when there is none)."""
    return LAM_ZERO if least == math.inf else q * math.log2(least) - exponent


_BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def min_nonzero_abs(v: np.ndarray, axis: int | None = None):
    """The least nonzero |entry| of a float32 or float64 array (inf when all are zero), over all entries or, with
    `axis`, along it. On the bits: shifting out the sign and subtracting 2 sends +-0 to the largest integer, and
    the order of the remaining integers is that of the magnitudes (NaN does not occur: weights are checked)."""
    v = np.ascontiguousarray(v)
    if v.dtype not in _BITS:
        v = v.astype(np.float64)
    uint = _BITS[v.dtype]
    zero = np.iinfo(uint).max - 1  # where +-0 lands
    shifted = np.subtract(np.left_shift(v.view(uint), uint(1)), uint(2), dtype=uint)
    k = np.asarray(shifted.min(axis=axis, initial=zero), dtype=uint)
    bits = np.right_shift(np.add(k, uint(2), dtype=uint), uint(1), dtype=uint)
    out = np.where(k == zero, math.inf, bits.view(v.dtype).astype(np.float64))
    return float(out) if axis is None else out


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else -math.inf


class GuardProgram:
    """Straight-line host code over float slots: constants, fetched run outputs, fed lams, then steps."""

    def __init__(self) -> None:
        self.slots: list[float] = []
        self.fetch: list[str] = []  # graph tensors the run must also return
        self.fetch_slots: list[int] = []
        self.fed: dict[str, int] = {}  # fed input -> its slot: a mantissa's lam, a scalar's value
        self.steps: list[tuple[Callable, int, tuple[int, ...]]] = []
        self.groups: list[int] = []  # slots holding log2 of each group's bound
        self._gathered = False  # emit_fetch gathered the fetched scalars into one vector
        self.first_node = 0  # the emitter's nodes from here on were added after the guarded graph

    def const(self, value: float) -> int:
        self.slots.append(float(value))
        return len(self.slots) - 1

    def fetched(self, name: str) -> int:
        slot = self.const(math.nan)
        self.fetch.append(name)
        self.fetch_slots.append(slot)
        return slot

    def step(self, fn: Callable, *args: int) -> int:
        slot = self.const(math.nan)
        self.steps.append((fn, slot, args))
        return slot

    def emit_fetch(self, em: CompanionEmitter, gather: bool) -> list[str]:
        """The graph outputs carrying `fetch`: the scalars themselves, or with `gather` one float32 vector of them
        all, for a GPU: one copy back to the host instead of ~90 (a ResNet-18 companion run on an H200 took
        9.6 ms instead of 10.9). On the CPU the 2 ms more of session build would cost more than it saves."""
        # many outputs make onnxruntime's session build superlinear (a 3000-layer chain's 9000 scalars: 22 s, 1.3 s
        # gathered): deep graphs gather on the CPU too
        self._gathered = (gather or len(self.fetch) > GATHER_ABOVE) and bool(self.fetch)
        if not self._gathered:
            out = list(self.fetch)
        else:
            parts = [em.op("Reshape", [t, em.i64([1])], "gfetch") for t in self.fetch]
            out = [parts[0] if len(parts) == 1 else em.op("Concat", parts, "gfetch", axis=0)]
        em.nodes[:] = near_producers(em.nodes, self.first_node)
        return out

    def log2_bound(self, fetched, fed: dict[str, float]) -> float:
        """log2 of the underflow error bound of a run, from the values of emit_fetch's outputs and `fed`: each fed
        mantissa's lam and each fed scalar's value."""
        if self._gathered:
            fetched = fetched[0]
        slots = list(self.slots)
        for slot, value in zip(self.fetch_slots, fetched):
            slots[slot] = float(value)
        for name, slot in self.fed.items():
            slots[slot] = float(fed[name])
        for fn, out, args in self.steps:  # (~0.2 ms for ResNet-18; compiling them with exec took 8 ms)
            slots[out] = fn(*[slots[a] for a in args])
        total = math.fsum(2.0 ** slots[g] if slots[g] < 1000 else math.inf for g in self.groups)
        return _log2(total)


GATHER_ABOVE = 512  # fetched scalars


class _Walk:
    """One pass over the emitted nodes, in order, writing the guard program."""

    def __init__(self, em: CompanionEmitter, summed: dict[str, int], thorough: bool):
        self.em, self.summed, self.thorough = em, summed, thorough
        self.p = GuardProgram()
        self.scalar: dict[str, int | None] = {}  # float scalar tensor -> its slot (None: not resolved yet)
        self.nodes_by_output: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.mantissa: set[str] = set()
        self.dims: dict[str, tuple[int, ...]] = {}  # shapes of graph inputs and constants
        self.pow_exponent: dict[str, str] = {}  # 2**d tensors: d
        self.lam: dict[str, int] = {}
        # sites since the last measurement, (lam, products): a list, or a _Joined list of them (_flat)
        self.pending: dict[str, list | _Joined] = {}
        self.own_site: dict[str, tuple[int, int]] = {}  # product output -> its site
        self.consumers: dict[str, int] = {}
        for node in em.nodes:
            for t in node.input:
                self.consumers[t] = self.consumers.get(t, 0) + 1
        for vi in em.inputs:
            if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            dims = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            if vi.name.startswith("ones::"):  # (a 0-d model input's ones too)
                self._mantissa(vi.name, dims, self.p.const(0.0))
            elif not dims:  # a fed exponent: read from the feeds
                self.scalar[vi.name] = self.p.fed[vi.name] = self.p.const(math.nan)
            else:
                self.p.fed[vi.name] = self.p.const(math.nan)
                self._mantissa(vi.name, dims, self.p.fed[vi.name])
        for init in em.initializers:
            if init.data_type != TensorProto.FLOAT:
                continue
            value = em.external.get(init.name)
            if value is None:
                value = numpy_helper.to_array(init)
            if len(init.dims) == 0 and init.name not in em.scalar_mantissas:
                self.scalar[init.name] = self.p.const(float(value))
            else:
                known = em.const_lams.get(init.name)  # a parameter's lam, which its float32 mantissas may not show
                lam = known() if known is not None else log2_min_nonzero(np.abs(value))
                self._mantissa(init.name, tuple(init.dims), self.p.const(lam))

    def _mantissa(self, name: str, dims: tuple[int, ...], lam: int) -> None:
        self.mantissa.add(name)
        self.dims[name] = dims
        self.lam[name] = lam
        self.pending[name] = []

    def value(self, name: str) -> int:
        """The slot of a scalar tensor's value: replayed from its node when exact, else fetched from the run.
        Iterative (an explicit stack): a deep network's exponents chain through thousands of scalar nodes."""
        stack = [name]
        while stack:
            top = stack[-1]
            if self.scalar.get(top) is not None:
                stack.pop()
                continue
            op_type, ins = self.nodes_by_output.get(top, (None, ()))
            if op_type not in _REPLAY:
                self.scalar[top] = self.p.fetched(top)
                stack.pop()
                continue
            missing = [t for t in ins if self.scalar.get(t) is None]
            if missing:  # their slots first, in input order (the steps come out in the recursive order)
                stack.extend(reversed(missing))
                continue
            self.scalar[top] = self.p.step(_REPLAY[op_type], *(self.scalar[t] for t in ins))
            stack.pop()
        return self.scalar[name]

    def log2_multiplier(self, scalar: str) -> int:
        """log2 of a scalar multiplier >= 0 (its exponent for the powers of two the companion uses)."""
        if scalar in self.pow_exponent:
            return self.value(self.pow_exponent[scalar])
        return self.p.step(_log2, self.value(scalar))

    def products_per_entry(self, node) -> int:
        """An upper bound on the products summed into one output entry (from a constant or fed operand's shape)."""
        if node.op_type == "Mul":
            return 1
        if node.op_type in ("Conv", "ConvTranspose"):
            w = self.dims.get(node.input[1])
            if w is None:
                return _UNKNOWN_K
            return int(np.prod(w[1:]) if node.op_type == "Conv" else w[0] * np.prod(w[2:]))
        known = [self.dims[t] for t in node.input[:2] if self.dims.get(t)]  # (0-d mantissas: no inner dimension)
        return max(max(d[-2:]) for d in known) if known else _UNKNOWN_K  # MatMul, Gemm: the inner dimension

    def node(self, node) -> None:
        ins, op_type = tuple(node.input), node.op_type
        m_in = [t for t in ins if t in self.mantissa]
        outs = [t for t in node.output if t]
        if not m_in:  # exponent arithmetic, resolved when a site needs it
            if op_type in _SCALAR_OPS:
                for t in outs:
                    self.scalar.setdefault(t, None)
                    self.nodes_by_output[t] = (op_type, ins)
                if op_type == "Pow" and ins[0] in self.scalar:
                    base = self.scalar[ins[0]]
                    if base is not None and self.p.slots[base] == 2.0:
                        self.pow_exponent[outs[0]] = ins[1]
            return
        if op_type in ("ReduceMax", "ReduceMin") and _reduces_all(node):
            for t in outs:  # a renormalisation's measurements: read back from the run
                self.scalar[t] = None
            return
        if op_type in ("Greater", "Equal", "Cast", "Shape"):
            return
        self.mantissa.update(outs)
        joined = [self.pending[t] for t in m_in if self.pending[t]]
        pending = (joined[0] if len(joined) == 1 else _Joined(joined)) if joined else []
        if op_type in _PRODUCTS:
            pending = _flat(pending)
            # a product read only here (an input scaled by its alignment multiplier) is superseded by this one:
            # factors <= 1 (weights, multipliers) keep it above this product, and a zero factor (an all-zero
            # weight) makes an underflow there harmless
            inner = [self.own_site[t] for t in m_in if t in self.own_site and self.consumers.get(t) == 1]
            pending = [s for s in pending if s not in inner]
            factors = [self.lam[t] for t in m_in] + [
                self.log2_multiplier(t) for t in ins if t in self.scalar and t not in self.mantissa
            ]
            lam = self.p.step(functools.partial(_product_lam, len(m_in)), *factors) if len(factors) > 1 else factors[0]
            site = (lam, self.products_per_entry(node) + sum(k for _, k in inner))
            pending = pending + [site]
            self.own_site.update(dict.fromkeys(outs, site))
        elif op_type in _COPIES:
            lams = list(dict.fromkeys(self.lam[t] for t in m_in))
            lam = lams[0] if len(lams) == 1 else self.p.step(min, *lams)
        else:
            raise RuntimeError(f"range_guard: no rule for {op_type} on companion mantissas")
        for t in outs:
            self.lam[t], self.pending[t] = lam, pending
        measured = self.em.measured.get(outs[0])
        if measured is not None:
            self.measure(outs[0], *measured)

    def measure(self, post: str, smallest: str, shift: str, largest: str, pre: str) -> None:
        """post = pre * 2**shift, with `smallest` and `largest` the least and largest entries of pre: close the
        group of sites of pre (see the module docstring)."""
        sites = _flat(self.pending[post])
        smallest_nonzero = self.least_nonzero(pre, smallest)
        # per entry: each product, each addition and each aligned input entry it reads, the bias and its
        # alignment (each losing < 2**-126 in pre's units); the renormalisation loses < 2**-126 in post's units,
        # 2**(-126 - shift) in pre's
        roundings = 2 * sum(k for _, k in sites) + len(sites) + 1
        size = self.summed.get(post)

        def bound(least_lam: float, least: float, largest_: float, k: float) -> float:
            if least_lam >= _SITE_MIN:
                return -math.inf  # no product could underflow
            lost = math.log2(roundings + 2.0 ** min(-k, 1000)) - 126 + _LOG2_SLACK  # per entry, in pre's units
            whole = lost + math.log2(size) - _log2(largest_) if size else math.inf
            return min(lost - _log2(least), whole)

        lams = [lam for lam, _ in sites]
        least_lam = lams[0] if len(lams) == 1 else self.p.step(min, *lams)
        small, large = self.value(smallest), self.value(largest)
        self.p.groups.append(self.p.step(bound, least_lam, small, large, self.value(shift)))
        # post's nonzero entries are >= its least (nonzero) entry when that is not 0 (-inf then: the max keeps lam).
        # A sum measured all zero (largest 0) is exactly zero in a certified run: its group's bound is finite only
        # when no product in it could underflow (with a zero least and largest entry, both per-entry bounds are
        # infinite), so it is LAM_ZERO, and products with it are 0 whatever their multipliers (a zero exponent's
        # alignment multiplier, 2**-1048576, made such products look like underflow: a false refusal)
        nonzero = self.value(smallest_nonzero)
        self.lam[post] = self.p.step(_measured_lam, self.lam[post], nonzero, self.value(shift), large)
        self.pending[post] = []

    def least_nonzero(self, pre: str, smallest: str) -> str:
        """A scalar bounding the nonzero entries of `pre` from below: its least entry, or (thorough) its least
        nonzero entry."""
        if not self.thorough:
            return smallest
        em = self.em
        positive = em.op("Greater", [pre, em.f32(0.0)], "guard")
        masked = em.op("Where", [positive, pre, em.f32(float(np.finfo(np.float32).max))], "guard")
        out = em.op("ReduceMin", [masked], "guard", keepdims=0)
        self.scalar[out] = None
        return out

    def finish(self, outputs: list[str]) -> None:
        for t in outputs:  # sites not followed by a measurement (none in the companion graphs): lam only
            lams = [lam for lam, _ in _flat(self.pending.get(t, []))]
            if lams:
                self.p.groups.append(self.p.step(lambda *f: -math.inf if min(f) >= _SITE_MIN else math.inf, *lams))


class _Joined:
    """The sites of several inputs, joined without copying them: a sum of k terms chained as k - 1 Adds copied
    k**2 / 2 sites (8000 terms: the guard program took 3.2 s, 1.3 s joined)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts


def _flat(pending) -> list:
    """The sites of a pending entry as one list, in order (each occurrence, as joining copies would give)."""
    if not isinstance(pending, _Joined):
        return pending
    out, stack = [], [pending]
    while stack:
        item = stack.pop()
        if isinstance(item, _Joined):
            stack.extend(reversed(item.parts))
        else:
            out.extend(item)
    return out


def _measured_lam(lam: float, least: float, k: float, largest: float) -> float:
    """lam of a renormalised sum from its propagated lam and its measured least (nonzero) and largest entries."""
    if largest == 0:
        return LAM_ZERO
    return max(lam, _log2(least) + k - _LOG2_SLACK)


def _product_lam(mantissas: int, *factors: float) -> float:
    """lam of a product from its factors' (the first `mantissas` are mantissa lams, the rest log2 of scalar
    multipliers): their sum, or LAM_ZERO when a factor is all zeros, so that the product is exactly 0 whatever the
    other factors (a lam of -inf there means only "unknown"). A mantissa is all zeros when its lam is LAM_ZERO or
    derives from it (above LAM_ZERO / 2: no nonzero mantissa entry, at most about 1, has such a log2); a multiplier
    when it is 0 (log2 -inf)."""
    if any(f >= LAM_ZERO / 2 for f in factors[:mantissas]) or any(f == -math.inf for f in factors[mantissas:]):
        return LAM_ZERO
    return math.fsum(factors)


def _reduces_all(node) -> bool:
    keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    return keep == 0 and len(node.input) == 1 and not any(a.name == "axes" for a in node.attribute)


def guard_program(
    em: CompanionEmitter, summed: dict[str, int], read: list[str], thorough: bool = False
) -> GuardProgram:
    """The guard of the graph emitted in `em`, whose results are the mantissas in `summed` (name -> number of
    entries; only the total of their entries is used) and in `read` (used entry by entry). `thorough`: every sum
    also measures its least nonzero entry (three more passes over it): without, a sum with exact zeros bounds its
    nonzero entries by propagation only, which a long run of such layers can drive below float32's range."""
    walk = _Walk(em, {m: n for m, n in summed.items() if m not in read}, thorough)
    walk.p.first_node = len(em.nodes)
    for node in list(em.nodes):  # (the walk appends a few measuring nodes)
        walk.node(node)
    walk.finish(list(summed) + list(read))
    return walk.p
