"""The op registry. Each op family module registers, beside its definition, an import rule per ONNX op type
and, per IR op, its companion rule (theory.md section 2) and, for parametric ops, its metric rule
(section 3). Adding an op is one local change in one module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from onnx import NodeProto

    from ..companion import CompanionEmitter, Scaled
    from ..importer import ImportContext
    from ..ir import Node

ImportRule = Callable[["NodeProto", "ImportContext"], None]
# companion(node, emitter, inputs, with_constants) -> outputs. with_constants=False drops the fixed
# (parameter-free) constant terms, which is the rule for the difference stream of the metric.
CompanionRule = Callable[["Node", "CompanionEmitter", "list[Scaled]", bool], "list[Scaled]"]
# metric(node, emitter, a_hi_inputs, d_inputs) -> d outputs (parametric ops only; section 3)
MetricRule = Callable[["Node", "CompanionEmitter", "list[Scaled]", "list[Scaled]"], "list[Scaled]"]


@dataclass
class OpRules:
    name: str
    companion: CompanionRule
    metric: MetricRule | None = None
    # rounding_steps(node, shapes) -> how many float32 roundings can compound into one output entry of the
    # companion (products and additions of non-negative terms); see onnxlip/rounding.py
    rounding_steps: Callable[[Node, dict], int] | None = None
    # adjoint(node, emitter, a_inputs, b_outputs) -> b for each input (None where zero): the transpose of the
    # companion's linear part applied to the adjoint values b (theory.md section 4)
    adjoint: Callable | None = None
    # scores(node, emitter, a_inputs, b_outputs) -> {role: Scaled}: |theta| * d||Phi||_1 / d|theta| per entry
    scores: Callable | None = None
    # lipschitz(node, shapes, l_in, norm) -> l2 Lipschitz constant of each output given those of the inputs
    # (AutoLip, seed 001); `norm` is the certified operator norm the driver computed for conv/dense ops
    lipschitz: Callable | None = None


IMPORTERS: dict[str, ImportRule] = {}
# import rules used only by the `lipschitz` command (non-ReLU activations with known Lipschitz constants)
LIPSCHITZ_IMPORTERS: dict[str, ImportRule] = {}
OPS: dict[str, OpRules] = {}
# ONNX ops that are not piecewise linear, with the reason shown to the user
REJECTED: dict[str, str] = {}


def importer(*onnx_ops: str) -> Callable[[ImportRule], ImportRule]:
    """Register an import rule for the given ONNX op types."""

    def register(fn: ImportRule) -> ImportRule:
        for op in onnx_ops:
            IMPORTERS[op] = fn
        return fn

    return register


def lipschitz_importer(*onnx_ops: str) -> Callable[[ImportRule], ImportRule]:
    """Register an import rule that only the `lipschitz` command's import mode uses."""

    def register(fn: ImportRule) -> ImportRule:
        for op in onnx_ops:
            LIPSCHITZ_IMPORTERS[op] = fn
        return fn

    return register


def define(name: str, companion: CompanionRule, metric: MetricRule | None = None, rounding_steps=None) -> None:
    """Define an IR op with its rules."""
    OPS[name] = OpRules(name, companion, metric, rounding_steps)


def define_adjoint(name: str, adjoint: Callable, scores: Callable | None = None) -> None:
    """Attach the adjoint (transpose) rule and, for parametric ops, the weight-score rule to an op."""
    OPS[name].adjoint = adjoint
    OPS[name].scores = scores


def define_lipschitz(name: str, rule: Callable) -> None:
    OPS[name].lipschitz = rule


def reject(reason: str, *onnx_ops: str) -> None:
    for op in onnx_ops:
        REJECTED[op] = reason
