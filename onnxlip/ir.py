"""The ReLU-DAG intermediate representation: typed op nodes over named tensors, kept apart from protobuf.

A `Graph` is a topologically ordered list of `Node`s. Every tensor has a static shape (batch fixed to 1).
Learned parameters are float64 numpy arrays in `Param`s that remember the user's initializer names, so
results can be reported against them. Which ops exist and what they mean is defined in `onnxlip.ops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Param:
    """A learned tensor. `name` is the user's initializer name (or a derived one); `sources` lists every
    original initializer that was folded into it (e.g. a Conv weight and the BatchNorm scale).

    A folded weight may be kept as `factors` = (base, factor): value = float64(base) * factor (factor broadcasts
    along the leading axis, e.g. BatchNorm's per-channel scale), formed on first access of `value`.
    `mantissas(1)` reads the factors directly, block by block: a path-norm or a scores run never needs the
    float64 copy (2x the model's parameter bytes, and fresh memory is slow on our machines)."""

    name: str
    _value: np.ndarray | None
    sources: tuple[str, ...] = ()
    # True when `value` is the transpose of the initializer `name` (Gemm transB, ...): scores map back with .T
    transposed: bool = False
    factors: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    # the initializer this value was read from unchanged: value == float64(initializer) (its transpose when
    # `transposed`), times factors[1] when factored. None for anything computed (scaled, folded twice, cast).
    # It lets a variant file that differs only in initializer values reuse this import (onnxlip/variants.py).
    origin: str | None = None
    # the initializer's shape where `value` is a C-order reshape of it (an Einsum or N-D MatMul weight lowered to a
    # matrix or a grouped conv): scores are reported in this shape
    file_shape: tuple[int, ...] | None = None
    _formed_factor: np.ndarray | None = field(default=None, repr=False)

    @property
    def value(self) -> np.ndarray:
        if self._value is None:
            base, factor = self.factors
            value = base.astype(np.float64)
            value *= factor
            # formed: the base is no longer needed; the (small) factor stays for `factor`
            self._value, self.factors, self._formed_factor = value, None, factor
        return self._value

    @property
    def factor(self) -> np.ndarray | None:
        """The factor of a folded weight (value = float64(base) * factor), formed or not; None if unfactored."""
        return self.factors[1] if self.factors is not None else self._formed_factor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._value.shape if self._value is not None else self.factors[0].shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def as_in_file(self) -> np.ndarray | None:
        """The initializer `origin` as the IR holds it (no copy), in the file's layout; None when the parameter
        is not read unchanged from one, or is a folded weight whose product has been formed."""
        if self.origin is None:
            return None
        if self.factors is not None:
            raw = self.factors[0]
        elif self._formed_factor is None:
            raw = self._value
        else:
            return None
        return raw.T if self.transposed else raw

    def mantissas(self, q: float = 1.0) -> tuple[np.ndarray, int]:
        """normalized_power(value, q) (companion.py), bit for bit, without forming `value` when it is factored."""
        from .blockwise import factored_mantissas
        from .mantissas import normalized_power

        if self._value is not None or q != 1:
            return normalized_power(self.value, q)
        return factored_mantissas(*self.factors) or normalized_power(self.value, q)

    def true_lam(self, exponent: int, q: float = 1.0) -> float:
        """range_guard.true_lam of the mantissas with this exponent: log2 of the least nonzero |value|**q * 2**-e,
        without forming a factored value: with a factor per leading row, the least product of a row is its least
        |base| entry times |factor| (rounding is monotone)."""
        from .blockwise import BLOCK, formed_rows
        from .mantissas import array_lam
        from .range_guard import lam_of_least, min_nonzero_abs

        if self._value is not None:
            return array_lam(self._value, exponent, q)
        base, factor = self.factors
        if base.ndim >= 1 and factor.ndim == base.ndim and factor.size == base.shape[0] and base.size:
            flat = base.reshape(base.shape[0], -1)
            step = max(1, BLOCK // flat.shape[1])  # row blocks: the temporaries stay in cache
            rows = np.concatenate([min_nonzero_abs(flat[r : r + step], axis=1) for r in range(0, len(flat), step)])
            f = np.abs(factor.reshape(-1)).astype(np.float64)
            live = (f > 0) & np.isfinite(rows)
            least = float(np.min(rows[live] * f[live])) if live.any() else math.inf
            return lam_of_least(least, exponent, q)
        least = min((min_nonzero_abs(b) for _, b in formed_rows(base, factor)), default=math.inf)
        return lam_of_least(least, exponent, q)

    def all_finite(self) -> bool:
        """No NaN or Inf in `value` (checked on the factors when it is factored)."""
        from .blockwise import factored_finite, finite

        if self._value is None:
            return factored_finite(*self.factors)
        return finite(self._value)


@dataclass
class Node:
    """One IR op. `op` names an entry of the op registry; `onnx_op` the ONNX op it came from."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    onnx_op: str = ""

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass
class Graph:
    """A ReLU-DAG: inputs with static shapes, nodes in topological order, chosen outputs."""

    inputs: dict[str, tuple[int, ...]]
    nodes: list[Node]
    outputs: list[str]
    shapes: dict[str, tuple[int, ...]]
    warnings: list[str] = field(default_factory=list)
    # original (source) initializer names -> number of entries, for counting the user's parameters
    source_sizes: dict[str, int] = field(default_factory=dict)
    # initializers whose values became something other than a parameter (importer.ImportContext.fixed_sources)
    fixed_sources: set[str] = field(default_factory=set)

    def params(self) -> list[Param]:
        """Every learned parameter, in node order."""
        return [p for node in self.nodes for p in node.params.values()]

    @property
    def num_parameters(self) -> int:
        """Entries of the user's initializers that the analysed network uses as parameters (before folding)."""
        if self.source_sizes:
            return sum(self.source_sizes.values())
        return sum(p.size for p in self.params())

    def producer(self) -> dict[str, Node]:
        return {t: n for n in self.nodes for t in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for t in n.inputs:
                out.setdefault(t, []).append(n)
        return out

    def to_networkx(self):
        """The DAG of ops (a networkx.DiGraph): one vertex per node name, one edge per tensor between two nodes."""
        import networkx as nx  # imported here: it costs 0.1 s of start-up and only analyses need it

        dag = nx.DiGraph()
        producer = self.producer()
        for n in self.nodes:
            dag.add_node(n.name, op=n.op)
            for t in n.inputs:
                if t in producer:
                    dag.add_edge(producer[t].name, n.name, tensor=t)
        return dag
