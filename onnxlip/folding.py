"""Folded weights kept as factors (ir.Param.factors): value = float64(base) * factor, with factor broadcasting
along the leading axis. Their mantissas and NaN/Inf checks read the factors block by block, bit-identical to
forming the float64 value first (the same roundings entry by entry, see companion.normalized_power)."""

from __future__ import annotations

import math

import numpy as np

BLOCK = 1 << 16
_FLOAT64_MAX = float(np.finfo(np.float64).max)


def finite(v: np.ndarray) -> bool:
    """min and max propagate NaN and show +-Inf: two reductions, no full-size temporary."""
    return v.size == 0 or bool(np.isfinite(v.min()) and np.isfinite(v.max()))


def _abs_max(v: np.ndarray) -> float:
    return max(float(v.max()), -float(v.min())) if v.size else 0.0


def factored_finite(base: np.ndarray, factor: np.ndarray) -> bool:
    """Whether float64(base) * factor is free of NaN and Inf. Finite factors whose largest magnitudes multiply
    to a finite number give finite products; otherwise the products are formed and checked."""
    if not (finite(base) and finite(factor)):
        return False
    if _abs_max(base) * _abs_max(factor) <= _FLOAT64_MAX:
        return True
    value = base.astype(np.float64)
    value *= factor
    return finite(value)


def _blocks(base: np.ndarray, factor: np.ndarray):
    """(rows, product block) pairs covering base * factor along the leading axis, in float64."""
    rows = max(1, BLOCK // max(1, base.size // max(1, base.shape[0])))
    for r in range(0, base.shape[0], rows):
        block = base[r : r + rows].astype(np.float64)
        block *= factor[r : r + rows] if factor.shape[0] > 1 else factor
        yield slice(r, r + rows), block


def factored_mantissas(base: np.ndarray, factor: np.ndarray) -> tuple[np.ndarray, int] | None:
    """normalized_power(float64(base) * factor, 1.0) without the full float64 product; None when the exponent
    leaves float32's comfortable range (the caller then forms the value and takes the general path)."""
    out = np.empty(base.shape, np.float32)
    top = 0.0
    for rows, block in _blocks(base, factor):
        top = max(top, float(block.max()), -float(block.min())) if block.size else top
        out[rows] = block  # float64 -> float32, rounded to nearest as np.array(v, dtype=np.float32) does
    if top == 0.0:
        return np.zeros(base.shape, np.float32), 0
    exponent = int(np.frexp(top)[1])
    if not -100 < exponent < 120 or not math.isfinite(top):
        return None
    np.abs(out, out=out)
    out *= np.float32(2.0**-exponent)
    return out, exponent
