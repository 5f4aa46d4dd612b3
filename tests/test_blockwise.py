"""Block-by-block passes (onnxlip/blockwise.py) equal the whole-array computations they replace, across block
boundaries, for float32 and float64 parameters, with zeros, ties and values whose products underflow."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlip import blockwise as B
from onnxlip.mantissas import normalized_power


def _pair(rng, size, dtype, kind):
    a = rng.normal(size=size).astype(dtype)
    b = a.copy()
    if kind == "pruned":
        b[rng.random(size) < 0.3] = 0
    elif kind == "shrunk":  # dominated, but not by zeroing: a zeroing test must not pass it
        shrink = rng.random(size) < 0.01
        b[shrink] = b[shrink] / 2
    elif kind == "quantized":
        b = (np.round(a * 7) / 7).astype(dtype)
    elif kind == "flipped":
        flip = rng.random(size) < 1e-4
        b[flip] = -b[flip]
    elif kind == "tiny":  # products of these underflow to 0 in float64: a sign test must not multiply values
        a = np.full(size, 1e-200, dtype)
        b = a.copy()
        b[size // 2] = -1e-200
    return a, b


@pytest.mark.parametrize("kind", ["pruned", "shrunk", "quantized", "flipped", "tiny", "same"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compare_counts_like_the_whole_array_test(kind, dtype):
    if kind == "tiny" and dtype == np.float32:
        pytest.skip("1e-200 is not a float32")
    rng = np.random.default_rng(0)
    a, b = _pair(rng, 3 * B.BLOCK + 17, dtype, kind)
    changed, flips, dominated, dominating, zeroed = B.compare(a.reshape(-1, 1, 1), b.reshape(-1, 1, 1))
    assert changed == np.count_nonzero(a != b)
    assert flips == np.count_nonzero(((a < 0) & (b > 0)) | ((a > 0) & (b < 0)))
    assert dominated == bool(np.all(np.abs(b) <= np.abs(a)))
    assert dominating == bool(np.all(np.abs(a) <= np.abs(b)))
    assert zeroed == bool(np.all((a == b) | (b == 0)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mantissas_are_bit_identical_to_normalized_power(dtype):
    rng = np.random.default_rng(1)
    a, b = _pair(rng, 5 * (B.BLOCK // 2 + 3), dtype, "quantized")
    a, b = a.reshape(-1, 5), b.reshape(-1, 5)
    cases = [
        (B.same, (b,), np.abs(b)),
        (B.abs_difference, (a, b), np.abs(a) - np.abs(b)),
        (B.abs_max_of, (a, b), np.maximum(np.abs(a), np.abs(b))),
        (B.abs_min_of, (a, b), np.minimum(np.abs(a), np.abs(b))),
        (B.abs_gap, (a, b), np.maximum(np.abs(a), np.abs(b)) - np.minimum(np.abs(a), np.abs(b))),
    ]
    for exponent in (B.exponent_of(max(B.abs_max(a), B.abs_max(b))), 130, -140):  # the float64 path too
        for fn, args, whole in cases:
            out = np.empty(a.shape, np.float32)
            with np.errstate(over="ignore"):  # -140 is no bound of these values: both sides overflow alike
                got, e = B.mantissas(fn, args, exponent, out)
                want, e_want = normalized_power(whole, 1.0, exponent)
            assert got is out and e == e_want
            np.testing.assert_array_equal(got, want)


def test_exponent_matches_frexp_of_the_maximum():
    v = np.array([[-3.0, 2.5], [0.0, 1.0]])
    assert B.abs_max(v) == 3.0 and B.exponent_of(3.0) == 2
    assert B.abs_max(np.zeros(0)) == 0.0 and B.exponent_of(0.0) == 0


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float32), (np.float32, np.float64)])
def test_hilo_mantissas_match_three_mantissa_passes(dtypes):
    rng = np.random.default_rng(4)
    a, b = _pair(rng, 5 * (B.BLOCK // 2 + 7), np.float64, "quantized")
    a, b = a.astype(dtypes[0]).reshape(-1, 5), b.astype(dtypes[1]).reshape(-1, 5)
    b[0, 0], a[0, 1] = -0.0, -0.0
    for exponent in (B.exponent_of(max(B.abs_max(a), B.abs_max(b))), 3, 119, 130):
        outs = tuple(np.empty(a.shape, np.float32) for _ in range(3))
        done = B.hilo_mantissas(a, b, exponent, outs)
        assert done == (-100 < exponent < 120)
        if not done:
            continue
        for out, fn in zip(outs, (B.abs_max_of, B.abs_min_of, B.abs_gap)):
            want, _ = B.mantissas(fn, (a, b), exponent, np.empty(a.shape, np.float32))
            assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    "shape, factor_shape",
    [((6, 4, 3, 3), (6, 1, 1, 1)), ((5, 7), (1, 7)), ((5, 7), (5, 1)), ((4, 3, 2, 2), (4, 3, 1, 1)), ((5, 7), (7,))],
)
def test_formed_rows_and_abs_max_equal_the_formed_value(shape, factor_shape):
    """Folded weights formed block by block (engine's hi/lo route for variants) equal float64(raw) * factor bit
    for bit, and their largest |entry| is found without forming them."""
    from onnxlip.blockwise import formed_abs_max, formed_rows

    rng = np.random.default_rng(len(shape) * 10 + len(factor_shape))
    raw = (rng.standard_normal((3000, *shape[1:])) if shape[0] == 6 else rng.standard_normal(shape)).astype(np.float32)
    factor = rng.uniform(-3, 3, size=factor_shape if shape[0] != 6 else (3000, 1, 1, 1))
    formed = np.multiply(raw, factor, dtype=np.float64)
    rebuilt = np.empty_like(formed)
    for rows, block in formed_rows(raw, factor):
        rebuilt[rows] = block
    assert np.array_equal(rebuilt, formed)
    assert formed_abs_max(raw, factor) == np.abs(formed).max()
    assert formed_abs_max(raw, None) == np.abs(raw).max()
    raw[1, 0] = np.nan
    assert np.isnan(formed_abs_max(raw, factor)) and np.isnan(formed_abs_max(raw, None))


def test_float64_values_below_float32s_normal_range_keep_their_precision():
    """|v| * 2**-e is rounded to float32 once: a float64 value below 2**-126 rounded first would keep only the
    bits of a float32 subnormal (here 2**-16 relative), and the scaling 2**89 would carry that loss into a
    normal-looking mantissa that range_guard cannot tell from an exact one."""
    from onnxlip.mantissas import normalized_power

    v = np.array([2.0**-90, -1.2345678901234e-40, 3.3e-39, 0.0] * 40000)
    exact = np.abs(v) * 2.0**89  # exact in float64
    m, e = normalized_power(v)
    assert e == -89
    assert np.array_equal(m, exact.astype(np.float32))
    assert np.float32(np.float32(v[1]) * np.float32(2.0**89)) != m[1]  # the loss this avoids is real
    out = np.empty(v.shape, np.float32)  # the block routes agree bit for bit
    assert np.array_equal(B.mantissas(B.same, (v,), e, out)[0], m)
    w = np.float32([2.0**-20, -1.2345678e-20] * 4)
    factor = np.array([2.0**-70])
    got = B.factored_mantissas(w.reshape(8, 1), factor)
    assert got is not None and got[1] == -89
    assert np.array_equal(got[0].ravel(), (np.abs(w.astype(np.float64)) * 2.0**-70 * 2.0**89).astype(np.float32))
    outs = tuple(np.empty(v.shape, np.float32) for _ in range(3))
    assert B.hilo_mantissas(v, v * 0.5, e, outs)
    for o, fn in zip(outs, (B.abs_max_of, B.abs_min_of, B.abs_gap)):
        assert np.array_equal(o, (fn(v, v * 0.5) * 2.0**89).astype(np.float32))


def test_params_mantissas_in_threads_equal_one_by_one():
    from onnxlip.ir import Param

    rng = np.random.default_rng(8)
    params = [Param("tiny", np.array([0.5, -2.0]))]
    params += [Param(f"w{i}", rng.normal(size=(256, 300)) * 10.0 ** rng.integers(-5, 5)) for i in range(5)]
    base = rng.normal(size=(32, 16, 3, 3)).astype(np.float32)
    params.append(Param("folded", None, factors=(base, rng.uniform(0.1, 3.0, size=(32, 1, 1, 1)))))
    for q in (1.0, 2.0):
        threaded = B.params_mantissas(params, q)
        assert list(threaded) != [p.name for p in params]  # formed largest first, in threads (> 4 blocks)
        for p in params:
            m, e = p.mantissas(q)
            assert threaded[p.name][1] == e and np.array_equal(threaded[p.name][0].view(np.uint32), m.view(np.uint32))


def test_in_threads_nested_in_its_own_pool_runs_inline():
    """A job that itself calls in_threads (say, a metric engine built inside one) must not wait on the pool it
    occupies: with 2 workers busy that would hang."""
    sizes = {k: 10 * B.BLOCK for k in "abcd"}
    inner = lambda k: B.in_threads(lambda j: j * 2, {i: i for i in range(3)}, {i: 10 * B.BLOCK for i in range(3)})  # noqa: E731
    import threading

    out = {}
    runner = threading.Thread(target=lambda: out.update(B.in_threads(inner, {k: k for k in sizes}, sizes)), daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "in_threads hung on its own pool"
    assert out == {k: {0: 0, 1: 2, 2: 4} for k in sizes}
