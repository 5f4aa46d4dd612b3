"""Elementwise passes over whole parameter sets in cache-sized blocks.

Comparing a base with a variant and forming the float32 mantissas of |v|, |a| - |b|, max and min, one full-size
float64 temporary per step would cost ResNet-18 ~90 MB each, and fresh memory is slow to fault in (about
2 ms per MB on this project's machines): in blocks the temporaries stay in cache and are reused, and the
results go into caller-owned float32 buffers. Results are bit-identical to companion.normalized_power on the
whole array (the same roundings, entry by entry)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .companion import normalized_power

BLOCK = 1 << 16


def compare(a: np.ndarray, b: np.ndarray) -> tuple[int, int, bool, bool]:
    """(entries that differ, entries whose sign flips (both non-zero), |b| <= |a| everywhere, |a| <= |b|
    everywhere)."""
    a, b = a.ravel(), b.ravel()
    changed = flips = 0
    dominated = dominating = True
    for s in range(0, a.size, BLOCK):
        x, y = a[s : s + BLOCK], b[s : s + BLOCK]
        count = int(np.count_nonzero(x != y))
        if count == 0:
            continue
        changed += count
        flips += int(np.count_nonzero(np.sign(x) * np.sign(y) < 0))  # exact: no product of tiny values
        ax, ay = np.abs(x), np.abs(y)
        dominated = dominated and bool(np.all(ay <= ax))
        dominating = dominating and bool(np.all(ax <= ay))
    return changed, flips, dominated, dominating


def mantissas(
    fn: Callable[..., np.ndarray], arrays: tuple[np.ndarray, ...], exponent: int, out: np.ndarray
) -> tuple[np.ndarray, int]:
    """normalized_power(fn(*arrays), 1.0, exponent), computed block by block into `out` (float32, the arrays'
    shape); fn works on flat blocks and must be elementwise."""
    flat = [x.ravel() for x in arrays]
    dest = out.reshape(-1)
    for s in range(0, dest.size, BLOCK):
        dest[s : s + BLOCK] = normalized_power(fn(*(x[s : s + BLOCK] for x in flat)), 1.0, exponent)[0]
    return out, exponent


def abs_max(v: np.ndarray) -> float:
    """max |v| without a full-size temporary (0 for an empty array)."""
    return max(float(v.max()), -float(v.min())) if v.size else 0.0


def exponent_of(top: float) -> int:
    """The e with top < 2**e (frexp's exponent; 0 for 0): the normalisation of normalized_power."""
    return int(np.frexp(top)[1])


def same(x: np.ndarray) -> np.ndarray:
    return x


def abs_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x) - np.abs(y)


def abs_max_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y))


def abs_min_of(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.minimum(np.abs(x), np.abs(y))


def abs_gap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max(|x|, |y|) - min(|x|, |y|), as the hi/lo route forms it."""
    ax, ay = np.abs(x), np.abs(y)
    return np.maximum(ax, ay) - np.minimum(ax, ay)
