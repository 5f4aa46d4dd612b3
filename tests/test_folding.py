"""Folded weights kept as factors (onnxlip/blockwise.py, ir.Param): mantissas and NaN/Inf checks read from the
factors equal, bit for bit, those of the formed float64 value; path-norm and scores never form it."""

from __future__ import annotations

import numpy as np
import pytest

import onnxlip
from onnxlip import blockwise as folding
from onnxlip.api import analyse
from onnxlip.companion import ZERO_EXPONENT, normalized_power
from onnxlip.ir import Param
from tests import dag_factory as F


def _factors(kind: str, rng, dtype=np.float32):
    if kind == "conv":  # (Cout, Cin, k, k) by a per-output-channel scale, several blocks
        return rng.normal(size=(300, 64, 3, 3)).astype(dtype), rng.normal(size=(300, 1, 1, 1))
    if kind == "conv_transpose":  # (Cin, Cout/g, k, k) by a (Cin, Cout/g) matrix
        return rng.normal(size=(40, 8, 5, 5)).astype(dtype), rng.normal(size=(40, 8, 1, 1))
    if kind == "dense_right":  # (in, out) by a per-column scale: a leading axis of length 1
        return rng.normal(size=(700, 200)).astype(dtype), rng.normal(size=(1, 200))
    if kind == "dense_left":
        return rng.normal(size=(200, 700)).astype(dtype), rng.normal(size=(200, 1))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "dense_right", "dense_left"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_factored_mantissas_equal_those_of_the_formed_value(kind, dtype):
    base, factor = _factors(kind, np.random.default_rng(0), dtype)
    factor[0] = 0.0  # a zeroed channel or column
    p = Param("w", None, ("w", "bn.scale"), False, (base, factor))
    want = base.astype(np.float64) * factor
    m, e = p.mantissas(1.0)
    m_want, e_want = normalized_power(want, 1.0)
    assert e == e_want
    np.testing.assert_array_equal(m, m_want)
    assert p._value is None  # not formed
    np.testing.assert_array_equal(p.value, want)
    assert p.shape == want.shape and p.size == want.size


def test_extreme_exponents_take_the_general_path():
    base = np.full((3, 4), 1e30, np.float32)
    factor = np.full((3, 1), 1e10)  # 1e40: beyond the float32 fast path of normalized_power
    p = Param("w", None, (), False, (base, factor))
    assert folding.factored_mantissas(base, factor) is None
    m, e = p.mantissas(1.0)
    m_want, e_want = normalized_power(base.astype(np.float64) * factor, 1.0)
    assert e == e_want
    np.testing.assert_array_equal(m, m_want)


def test_all_zero_factors_give_zero_mantissas():
    p = Param("w", None, (), False, (np.ones((4, 3), np.float32), np.zeros((4, 1))))
    m, e = p.mantissas(1.0)
    assert e == ZERO_EXPONENT and not m.any()  # the exponent no alignment picks (companion.ZERO_EXPONENT)


@pytest.mark.parametrize(
    "base, factor, finite",
    [
        (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[2.0], [0.5]]), True),
        (np.array([[1.0, np.nan], [3.0, 4.0]]), np.array([[2.0], [0.5]]), False),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[np.inf], [0.5]]), False),
        (np.array([[1e200, 1.0], [1.0, 1.0]]), np.array([[1e200], [1.0]]), False),  # the product overflows
        (np.array([[1e200, 1.0], [1.0, 1.0]]), np.array([[1.0], [1e200]]), True),  # large maxima, finite products
    ],
)
def test_factored_finite_matches_the_formed_value(base, factor, finite):
    assert folding.factored_finite(base, factor) is finite
    with np.errstate(over="ignore", invalid="ignore"):
        assert folding.finite(base * factor) is finite


def test_batchnorm_folded_weights_stay_factored_through_path_norm_and_scores():
    spec = F.build("batchnorm", 0)
    m = analyse(spec.model)
    factored = [p for p in m.graph.params() if p.factors is not None]
    assert factored, "the BatchNorm after a Conv should fold into it as factors"
    onnxlip.path_norm(m)
    onnxlip.scores(m)
    assert all(p._value is None for p in factored)  # neither formed the float64 weights
