"""Path-norm Lipschitz bounds (theory.md section 5) against the brute-force oracle's input paths, and against
observed ratios ||R(x) - R(x')|| / ||x - x'|| on random pairs (every certified bound must dominate them)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlip.api import analyse
from onnxlip.lipschitz import pathnorm_bounds
from onnxlip.rounding import relative_error_bound
from tests import dag_factory as F
from tests import oracle as O

FAMILIES = [f for f in sorted(F.FAMILIES) if f != "batchnorm_bias"]  # (that one needs the oracle's own folding)


def _oracle_matrix(model) -> np.ndarray:
    dag = O.expand(model)
    ins = {int(n): i for i, n in enumerate(np.concatenate([ids.ravel() for ids in dag.inputs.values()]))}
    outs = {}
    for ids in dag.outputs.values():
        for n in ids.ravel():
            outs.setdefault(int(n), len(outs))
    mass = np.zeros((len(outs), len(ins)))
    for path, phi in dag.paths().items():
        if path[0] in ins:
            last = path[-1] if path[-1] >= 0 else path[-2]
            mass[outs[last], ins[path[0]]] += abs(phi)
    return mass


@pytest.mark.parametrize("family", FAMILIES)
def test_bounds_equal_the_oracle_input_path_masses(family):
    spec = F.build(family, 0)
    mass = _oracle_matrix(spec.model)
    got = {b.norm: b.value for b in pathnorm_bounds(spec.model)}
    # certified: at least the oracle's value, and above it by no more than float32 rounding (a relative error r per
    # stream, up to (1 + r) / (1 - r) once the margin 1 / (1 - r) is added; twice for the adjoint's 1->1)
    r = relative_error_bound(analyse(spec.model).graph)
    slack = (1 + r) / (1 - r)
    want = {
        "inf->1": (mass.sum(), slack),
        "inf->inf": (mass.sum(axis=1).max(), slack),
        "1->1": (mass.sum(axis=0).max(), slack**2),
        "2->2": (np.sqrt(mass.sum(axis=1).max() * mass.sum(axis=0).max()), slack**1.5),
    }
    for norm, (value, slack) in want.items():
        assert value * (1 - 1e-9) <= got[norm] <= value * slack * (1 + 1e-7), norm


@pytest.mark.parametrize("family", ["gemm", "conv2d", "maxpool", "residual", "activations"])
def test_bounds_dominate_observed_ratios(family):
    spec = F.build(family, 1)
    bounds = {b.norm: b.value for b in pathnorm_bounds(spec.model)}
    sess = O.session(spec.model)
    rng = np.random.default_rng(0)
    name = sess.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    worst = {"inf->1": 0.0, "inf->inf": 0.0, "1->1": 0.0, "2->2": 0.0}
    for _ in range(200):
        x = rng.normal(size=shape).astype(np.float32)
        dx = (rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
        y = np.concatenate([o.ravel() for o in sess.run(None, {name: x})]).astype(np.float64)
        y2 = np.concatenate([o.ravel() for o in sess.run(None, {name: x + dx})]).astype(np.float64)
        d, dxx = y2 - y, (x + dx).astype(np.float64) - x
        norms = {"inf": np.abs(dxx).max(), "1": np.abs(dxx).sum(), "2": np.sqrt((dxx**2).sum())}
        worst["inf->1"] = max(worst["inf->1"], np.abs(d).sum() / norms["inf"])
        worst["inf->inf"] = max(worst["inf->inf"], np.abs(d).max() / norms["inf"])
        worst["1->1"] = max(worst["1->1"], np.abs(d).sum() / norms["1"])
        worst["2->2"] = max(worst["2->2"], np.sqrt((d**2).sum()) / norms["2"])
    for norm, ratio in worst.items():
        assert 0 < ratio <= bounds[norm] * (1 + 1e-4), norm
