"""Exact selection for pruning (onnxlip/selection.py) against a sort-based reference, on arrays large enough
for the sampled bracket, with ties, zeros, several dtypes, and forced bracket misses."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlip import selection
from onnxlip.selection import keep_largest, kth_smallest


def _reference(arrays, sparsity):
    flat = np.concatenate([a.ravel() for a in arrays])
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for a in arrays:
        out.append(keep[start : start + a.size])
        start += a.size
    return out


def _arrays(kind: str, rng):
    if kind == "continuous":
        return [rng.random(300_000).astype(np.float32), rng.exponential(size=(400, 500)).astype(np.float32)]
    if kind == "ties":  # few distinct values: every threshold sits in a run of ties across both arrays
        return [np.round(rng.random(250_000), 2), np.round(rng.random((300, 400)), 2)]
    if kind == "zeros":  # an already sparse model: most scores exactly 0
        a = rng.random(500_000).astype(np.float32)
        a[rng.random(a.size) < 0.7] = 0
        return [a, np.zeros(1000, np.float32)]
    if kind == "skewed":  # scores spanning 40 orders of magnitude
        return [np.exp(rng.normal(0, 20, 600_000)), np.exp(rng.normal(-30, 5, 10_000))]
    raise AssertionError(kind)


SPARSITIES = [0.0, 1e-6, 0.1, 0.2, 0.4, 0.6, 0.8, 0.999999, 1.0]


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "skewed"])
def test_sampled_selection_equals_the_sort_reference(kind):
    arrays = _arrays(kind, np.random.default_rng(3))
    assert sum(a.size for a in arrays) > 4 * selection.SAMPLE  # the sampled path, not the plain partition
    for sparsity, keeps in zip(SPARSITIES, keep_largest(arrays, SPARSITIES)):
        for got, want in zip(keeps, _reference(arrays, sparsity)):
            np.testing.assert_array_equal(got, want)


def test_a_bracket_that_misses_falls_back_to_the_exact_partition(monkeypatch):
    arrays = _arrays("continuous", np.random.default_rng(4))
    flat = np.sort(np.concatenate([a.ravel() for a in arrays]))
    ks = [1000, flat.size // 3, flat.size // 2, flat.size - 1000]
    monkeypatch.setattr(selection, "_Z", -50.0)  # a bracket that excludes its own centre: always a miss
    calls = []
    real = selection._by_partition
    monkeypatch.setattr(selection, "_by_partition", lambda f, k: calls.append(k) or real(f, k))
    assert kth_smallest(arrays, ks) == [flat[k - 1] for k in ks]
    assert len(calls) == len(ks)


def test_kth_smallest_matches_sorting_for_every_k_of_a_small_array():
    a = np.random.default_rng(5).integers(0, 7, 40).astype(np.float64)
    b = np.random.default_rng(6).random(25)
    ref = np.sort(np.concatenate([a, b]))
    assert kth_smallest([a, b], range(1, 66)) == list(ref)
