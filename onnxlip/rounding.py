"""An a-priori bound on the float32 rounding error of the companion and metric graphs, so that "certified"
results stay mathematically valid. Every companion quantity is a sum of products of non-negative numbers, so
no error cancels or grows by cancellation: n roundings in one output entry give a relative error of at most
gamma(n) = n*u / (1 - n*u), u = 2**-24 (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3), and
errors compose along the DAG as (1 + e_in)(1 + gamma) - 1. Scaling by powers of two is exact. Underflow (values
below float32's normal range, 2**-126 of a tensor's scale) is bounded at run time by range_guard.py, which refuses
a run whose underflow error exceeds UNDERFLOW_SLACK; the bound adds that allowance. Assumes direct summation of
non-negative terms, which onnxruntime's CPU kernels use; TF32 is disabled on CUDA (runtime.py)."""

from __future__ import annotations

from .ir import Graph
from .ops import OPS
from .range_guard import UNDERFLOW_SLACK

UNIT_ROUNDOFF = 2.0**-24


def gamma(n: int) -> float:
    nu = n * UNIT_ROUNDOFF
    if nu >= 0.5:
        return float("inf")
    return nu / (1.0 - nu)


def relative_error_bound(graph: Graph, metric: bool = False) -> float:
    """Largest relative error any output of the companion (or, with metric=True, of the difference stream,
    whose linear ops sum twice the terms) can carry."""
    err: dict[str, float] = {name: 0.0 for name in graph.inputs}
    for node in graph.nodes:
        rules = OPS[node.op]
        steps = rules.rounding_steps(node, graph.shapes) if rules.rounding_steps else 0
        if metric and rules.metric is not None:
            steps = 2 * steps + 1  # L_delta(a) + L_lo(d) + delta_b
        incoming = max((err[t] for t in node.inputs), default=0.0)
        out = (1.0 + incoming) * (1.0 + gamma(steps)) - 1.0
        for t in node.outputs:
            err[t] = out
    worst = max((err[t] for t in graph.outputs), default=0.0)
    return (1.0 + worst) * (1.0 + UNDERFLOW_SLACK) - 1.0  # range_guard's allowance for underflow
