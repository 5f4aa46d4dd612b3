"""Float32 mantissas of |values|**q: each tensor as m * 2**e with max(m) <= 1 and e an integer (theory.md section 2),
formed block by block without full-size temporaries, and the lam bound range_guard needs of them."""

from __future__ import annotations

import math

import numpy as np

# The exponent of an all-zero tensor. Sums align their terms to the largest exponent (CompanionEmitter.align), so
# a zero term with an ordinary exponent would scale the real terms down, below float32's range when they are
# 2**-126 smaller, and lose them (a zero bias next to small activations gave a path-norm of 0). This one never
# wins an alignment, its own multiplier 2**(ZERO_EXPONENT - E) is 0 (0 * 0, never 0 * inf), and sums of a few
# stay exact in float32. Host code treats a zero mantissa as 0 whatever its exponent.
ZERO_EXPONENT = -(2**20)


def normalized_power(value: np.ndarray, q: float = 1.0, exponent: int | None = None) -> tuple[np.ndarray, int]:
    """|value|**q as a float32 mantissa with max <= 1 and an integer exponent, so |value|**q ~ m * 2**e.
    For q = 1 the only rounding is float32's, once per entry (the power-of-two scaling is exact). `exponent`,
    when given, is a known bound |value|**q <= 2**exponent and saves the pass that finds the maximum."""
    v = np.asarray(value)
    if v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    if q == 1:
        if exponent is None:
            top = max(float(v.max()), -float(v.min())) if v.size else 0.0
            if top == 0.0:
                return np.zeros(v.shape, np.float32), ZERO_EXPONENT
            exponent = int(np.frexp(top)[1])
        if exponent == ZERO_EXPONENT:  # a bound from an all-zero tensor: the value is zero too
            return np.zeros(v.shape, np.float32), ZERO_EXPONENT
        if -100 < exponent < 120:
            if v.dtype == np.float64:
                m = np.empty(v.shape, np.float32)
                scaled_into(v, 2.0**-exponent, m)
                return m, exponent
            m = np.array(v, dtype=np.float32)  # float32 values scale exactly (one rounding where subnormal)
            np.abs(m, out=m)
            m *= np.float32(2.0**-exponent)
            return m, exponent
        return np.ldexp(np.abs(v).astype(np.float64), -exponent).astype(np.float32), exponent
    with np.errstate(divide="ignore"):
        log2 = q * np.log2(np.abs(v).astype(np.float64))
    top = float(log2.max()) if v.size else -math.inf
    if top == -math.inf:
        return np.zeros(v.shape, np.float32), ZERO_EXPONENT
    e = int(math.ceil(top))
    return np.exp2(log2 - e).astype(np.float32), e


BLOCK = 1 << 16  # entries per block of the block-by-block passes (their temporaries stay in cache)


def scaled_into(v: np.ndarray, scale: float, out: np.ndarray) -> None:
    """out = float32(|v| * scale) for float64 v, one rounding per entry, block by block (no full-size temporary).
    Scaling before rounding matters: a float64 value below float32's normal range (2**-126) would lose its low
    bits if rounded first, and a scale > 1 would then carry that loss into a normal-looking mantissa."""
    flat, dest = v.reshape(-1), out.reshape(-1)
    tmp = np.empty(min(BLOCK, flat.size), np.float64)
    for s in range(0, flat.size, BLOCK):
        block = tmp[: min(BLOCK, flat.size - s)]
        np.abs(flat[s : s + BLOCK], out=block)
        block *= scale
        dest[s : s + block.size] = block


def array_lam(array: np.ndarray, exponent: int, q: float = 1.0) -> float:
    """range_guard.true_lam of normalized_power(array, q) with this exponent, read block by block."""
    from .range_guard import true_lam

    flat = np.asarray(array).reshape(-1)
    return true_lam((flat[s : s + BLOCK] for s in range(0, flat.size, BLOCK)), exponent, q)
