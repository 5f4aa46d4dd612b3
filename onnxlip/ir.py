"""The ReLU-DAG intermediate representation: typed op nodes over named tensors, kept apart from protobuf.

A `Graph` is a topologically ordered list of `Node`s. Every tensor has a static shape (batch fixed to 1).
Learned parameters are float64 numpy arrays in `Param`s that remember the user's initializer names, so
results can be reported against them. Which ops exist and what they mean is defined in `onnxlip.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Param:
    """A learned tensor. `name` is the user's initializer name (or a derived one); `sources` lists every
    original initializer that was folded into it (e.g. a Conv weight and the BatchNorm scale)."""

    name: str
    value: np.ndarray
    sources: tuple[str, ...] = ()
    # True when `value` is the transpose of the initializer `name` (Gemm transB, ...): scores map back with .T
    transposed: bool = False

    @property
    def size(self) -> int:
        return int(self.value.size)


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
