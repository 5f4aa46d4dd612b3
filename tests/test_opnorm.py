"""Operator norms (onnxlip.opnorm): certified bounds are >= the exact norm (the SVD of the explicit matrix probed
from onnxruntime), power-iteration estimates agree with it, and the circular-embedding bound is the exact norm of
the strided circular operator it claims to be. numpy + onnxruntime only."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from onnxlip.opnorm import (
    ConvLayer,
    conv_norm_certified,
    conv_norm_estimate_power,
    conv_norms_certified,
    conv_norms_estimate_power,
    conv_output_shape,
    dense_norm,
    dense_norm_estimate_power,
    dense_norm_svd,
    diag_norm,
    explicit_matrix,
)


def _layer(rng, cout, cin_g, k, spatial, strides=None, pads=None, dilations=None, group=1, transpose=False, op=None):
    w = rng.standard_normal((cout, cin_g, *k)).astype(np.float32)
    return ConvLayer(w, tuple(spatial), strides, pads, dilations, group, transpose, op)


def _fixed_cases(rng) -> list[ConvLayer]:
    """Hand-picked: every feature the brief lists at least once."""
    L = _layer
    return [
        L(rng, 4, 3, (3, 3), (8, 8), pads=(1, 1, 1, 1)),  # plain 3x3 pad 1
        L(rng, 3, 2, (3, 3), (7, 6), pads=(2, 2, 2, 2)),  # pad 2
        L(rng, 4, 2, (3, 2), (7, 8), pads=(0, 1, 2, 0)),  # asymmetric pads, rectangular kernel
        L(rng, 4, 3, (3, 3), (9, 9), strides=(2, 2), pads=(1, 1, 1, 1)),  # stride 2
        L(rng, 3, 2, (3, 3), (10, 8), strides=(3, 2), pads=(1, 0, 1, 1)),  # strides 3 and 2
        L(rng, 4, 2, (3, 3), (9, 9), pads=(2, 2, 2, 2), dilations=(2, 2)),  # dilation 2
        L(rng, 4, 2, (3, 3), (8, 8), strides=(2, 1), pads=(1, 1, 1, 1), dilations=(1, 2)),
        L(rng, 4, 2, (3, 3), (6, 6), pads=(1, 1, 1, 1), group=2),  # group 2
        L(rng, 8, 1, (3, 3), (5, 6), pads=(1, 1, 1, 1), group=4),  # group 4, one input channel per group
        L(rng, 4, 1, (3, 3), (7, 7), pads=(1, 1, 1, 1), group=4),  # depthwise
        L(rng, 4, 1, (3, 3), (8, 8), strides=(2, 2), pads=(1, 1, 1, 1), group=4),  # strided depthwise
        L(rng, 5, 3, (1, 1), (6, 5), strides=(2, 2)),  # 1x1 downsample
        L(rng, 4, 3, (3,), (12,), pads=(1, 1)),  # 1-D
        L(rng, 4, 4, (3,), (11,), strides=(3,), pads=(2, 1), dilations=(2,)),  # 1-D stride 3 dilation 2
        L(rng, 6, 1, (5,), (10,), pads=(2, 2), group=2),  # 1-D grouped
        L(rng, 2, 3, (7, 7), (16, 16), strides=(2, 2), pads=(3, 3, 3, 3)),  # small stem
        L(rng, 3, 4, (3, 3), (5, 6), strides=(2, 2), pads=(1, 1, 0, 1), transpose=True, op=(1, 0)),
        L(rng, 4, 2, (2,), (7,), strides=(3,), pads=(0, 1), group=2, transpose=True, op=(2,)),
        L(rng, 4, 2, (3, 3), (4, 5), strides=(2, 2), pads=(1, 1, 1, 1), dilations=(2, 1), transpose=True, op=(1, 1)),
        L(rng, 4, 1, (4, 4), (4, 4), strides=(2, 2), pads=(1, 1, 1, 1), group=4, transpose=True),  # depthwise up
        L(rng, 3, 3, (3,), (6,), strides=(2,), pads=(1, 1), transpose=True, op=(1,)),
        L(rng, 40, 40, (3, 3), (6, 6), pads=(1, 1, 1, 1)),  # > 32 channels: the Lanczos-ranked path
        L(rng, 48, 10, (3, 3), (8, 8), strides=(2, 2), pads=(1, 1, 1, 1)),  # Gram on the s^d * C_in side
    ]


def _random_cases(rng, count: int) -> list[ConvLayer]:
    cases = []
    while len(cases) < count:
        d = int(rng.integers(1, 3))
        group = int(rng.choice([1, 1, 2, 4]))
        cin_g = int(rng.choice([1, 2, 3]))
        cout = group * int(rng.integers(1, 3))
        k = tuple(int(x) for x in rng.integers(1, 4, size=d))
        s = tuple(int(x) for x in rng.integers(1, 4, size=d))
        dil = tuple(int(x) for x in rng.integers(1, 3, size=d))
        pads = tuple(int(x) for x in rng.integers(0, 3, size=2 * d))
        transpose = bool(rng.random() < 0.3)
        n = tuple(int(x) for x in rng.integers(3, 10 if d == 2 else 16, size=d))
        op = tuple(int(rng.integers(0, si)) for si in s) if transpose else None
        if transpose:
            out = [s[i] * (n[i] - 1) + op[i] + (k[i] - 1) * dil[i] + 1 - pads[i] - pads[d + i] for i in range(d)]
        else:
            out = conv_output_shape(n, k, s, pads, dil)
        if min(out) < 1:
            continue
        cases.append(_layer(rng, cout, cin_g, k, n, s, pads, dil, group, transpose, op))
    return cases


def _exact(layer: ConvLayer) -> float:
    a = explicit_matrix(
        layer.weight,
        layer.spatial,
        layer.strides,
        layer.pads,
        layer.dilations,
        layer.group,
        layer.transpose,
        layer.output_padding,
    )
    return float(np.linalg.svd(a, compute_uv=False)[0])


@pytest.fixture(scope="module")
def conv_cases():
    rng = np.random.default_rng(2024)
    layers = _fixed_cases(rng) + _random_cases(rng, 40)
    return layers, [_exact(L) for L in layers]


def test_certified_bound_is_above_exact_norm(conv_cases):
    layers, exact = conv_cases
    certified = conv_norms_certified(layers)
    for layer, ex, cert in zip(layers, exact, certified):
        assert ex <= cert, (layer, ex, cert)
        assert cert <= 4.0 * ex  # sanity: the circular bound is never wildly off on these sizes


def test_power_iteration_matches_exact_norm(conv_cases):
    layers, exact = conv_cases
    estimates = conv_norms_estimate_power(layers, max_iters=3000, tol=1e-9, seed=7)
    for layer, ex, est in zip(layers, exact, estimates):
        assert est.iterations >= 1
        assert abs(est.sigma - ex) <= 1e-3 * ex, (layer, ex, est)
        assert est.sigma <= ex * (1 + 1e-5)  # an estimate from below, up to float32 rounding


def test_single_layer_power_estimate():
    rng = np.random.default_rng(3)
    layer = _layer(rng, 4, 3, (3, 3), (8, 8), pads=(1, 1, 1, 1))
    est = conv_norm_estimate_power(layer.weight, layer.spatial, pads=layer.pads, max_iters=2000, tol=1e-7)
    assert est.converged
    assert est.sigma == pytest.approx(_exact(layer), rel=1e-3)
    fixed = conv_norm_estimate_power(layer.weight, layer.spatial, pads=layer.pads, max_iters=5, tol=None)
    assert fixed.iterations == 5 and not fixed.converged
    assert fixed.sigma <= est.sigma * (1 + 1e-6)


@pytest.mark.parametrize(
    "cout,cin,k,n,pad,max_ratio",
    [
        (4, 4, (3, 3), (16, 16), 1, 1.05),
        (2, 2, (3, 3), (24, 24), 1, 1.04),
        (3, 3, (5, 5), (16, 16), 2, 1.08),
        (8, 8, (3,), (64,), 1, 1.03),
    ],
)
def test_certified_is_tight_for_stride_one(cout, cin, k, n, pad, max_ratio):
    rng = np.random.default_rng(cout * 100 + n[0] + k[0])
    layer = _layer(rng, cout, cin, k, n, pads=(pad,) * (2 * len(n)))
    ex = _exact(layer)
    cert = conv_norm_certified(layer.weight, layer.spatial, pads=layer.pads)
    assert ex <= cert <= max_ratio * ex


def test_chunking_does_not_change_the_bound(conv_cases):
    layers, exact = conv_cases
    for layer, ex in zip(layers, exact):
        if layer.weight.shape[0] < 40:
            continue
        args = (layer.weight, layer.spatial, layer.strides, layer.pads, layer.dilations, layer.group)
        whole = conv_norm_certified(*args)
        pieces = conv_norm_certified(*args, max_chunk_bytes=1)  # one frequency class per chunk
        assert ex <= pieces
        assert pieces == pytest.approx(whole, rel=1e-9)


def test_identity_kernels_certify_at_one():
    """Every frequency has the same (multiple) top eigenvalue: the hardest case for the Cholesky test."""
    eye = np.zeros((64, 64, 3, 3))
    eye[:, :, 1, 1] = np.eye(64)
    assert 1.0 <= conv_norm_certified(eye, (7, 7), pads=(1, 1, 1, 1)) <= 1.0 + 1e-9
    shift = np.zeros((8, 8, 3))
    shift[:, :, 0] = np.eye(8)
    assert 1.0 <= conv_norm_certified(shift, (10,), pads=(1, 1)) <= 1.0 + 1e-9
    depthwise = np.ones((16, 1, 1, 1))
    assert 1.0 <= conv_norm_certified(depthwise, (5, 5), group=16) <= 1.0 + 1e-9


def test_one_dimensional_and_one_by_one_are_tight():
    rng = np.random.default_rng(5)
    # 1x1 conv: the bound is sigma_max of the channel matrix, which is the exact norm
    w = rng.standard_normal((6, 4, 1, 1))
    cert = conv_norm_certified(w, (5, 5), strides=(2, 2))
    ex = float(np.linalg.svd(w[:, :, 0, 0], compute_uv=False)[0])
    assert ex <= cert <= ex * (1 + 1e-9)
    # orthogonal 1x1 kernel: a 1-Lipschitz layer certifies at 1 (up to the rounding margin)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    cert = conv_norm_certified(q[:, :, None, None], (4, 4))
    assert 1.0 <= cert <= 1.0 + 1e-9


def _circular_strided_matrix(w, canvas, strides, dilations, group):
    """Dense matrix of the strided circular conv on `canvas` (brute force, independent of opnorm)."""
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    d = len(canvas)
    q = [canvas[i] // strides[i] for i in range(d)]
    cin = cin_g * group
    a = np.zeros((cout, *q, cin, *canvas))
    for o in range(cout):
        g = o // (cout // group)
        for pos in itertools.product(*[range(x) for x in q]):
            for c in range(cin_g):
                for kp in itertools.product(*[range(x) for x in k]):
                    ip = tuple((pos[i] * strides[i] + kp[i] * dilations[i]) % canvas[i] for i in range(d))
                    a[(o, *pos, g * cin_g + c, *ip)] += w[(o, c, *kp)]
    return a.reshape(cout * int(np.prod(q)), -1)


@pytest.mark.parametrize("seed", range(8))
def test_certified_equals_strided_circular_norm(seed):
    """The bound is the exact norm of the strided circular operator on the smallest canvas, plus a tiny margin."""
    rng = np.random.default_rng(100 + seed)
    d = 1 + seed % 2
    group = 1 + seed % 3 // 2
    k = tuple(int(x) for x in rng.integers(1, 4, size=d))
    s = tuple(int(x) for x in rng.integers(1, 4, size=d))
    dil = tuple(int(x) for x in rng.integers(1, 3, size=d))
    n = tuple(int(rng.integers(k[i] * dil[i], 9)) for i in range(d))
    pads = tuple(int(x) for x in rng.integers(0, 3, size=2 * d))
    w = rng.standard_normal((2 * group, 2, *k))
    canvas = tuple(s[i] * math.ceil((n[i] + pads[i] + pads[d + i]) / s[i]) for i in range(d))
    circ = float(np.linalg.svd(_circular_strided_matrix(w, canvas, s, dil, group), compute_uv=False)[0])
    cert = conv_norm_certified(w, n, s, pads, dil, group)
    assert circ <= cert <= circ * (1 + 1e-9)


def _alias_classes_brute(geo, extra: int):
    """The definition of opnorm.conv._alias_classes, one frequency g at a time: the rows of sorted codes of e and
    of -e (e_i = dil_i f_i mod N_i, 0 where k_i = 1), the smaller row kept, distinct rows in sorted order."""
    d = len(geo.n)
    N = [geo.s[i] * (math.ceil((geo.n[i] + geo.pb[i] + geo.pe[i]) / geo.s[i]) + extra) for i in range(d)]
    q = [N[i] // geo.s[i] for i in range(d)]
    radix = [math.prod(N[:i]) for i in range(d)]
    classes = set()
    for g in itertools.product(*[range(x) for x in q]):
        rows = []
        for sign in (1, -1):
            codes = []
            for a in itertools.product(*[range(x) for x in geo.s]):
                e = [sign * geo.dil[i] * (g[i] + a[i] * q[i]) % N[i] if geo.k[i] > 1 else 0 for i in range(d)]
                codes.append(sum(e[i] * radix[i] for i in range(d)))
            rows.append(tuple(sorted(codes)))
        classes.add(min(rows))
    return [[[c // radix[i] % N[i] for i in range(d)] for c in row] for row in sorted(classes)], tuple(N)


def test_alias_classes_match_their_definition():
    """The vectorised alias classes (bitmap for stride 1, lexsort otherwise) equal the one-g-at-a-time definition,
    order included, on random 1-D, 2-D and 3-D geometries."""
    from onnxlip.opnorm.conv import _alias_classes
    from onnxlip.opnorm.geometry import _geometry

    rng = np.random.default_rng(31)
    checked = 0
    while checked < 150:
        d = int(rng.integers(1, 4))
        k = tuple(int(x) for x in rng.integers(1, 5, size=d))
        s = tuple(int(x) for x in rng.integers(1, 4, size=d))
        dil = tuple(int(x) for x in rng.integers(1, 4, size=d))
        pads = tuple(int(x) for x in rng.integers(0, 3, size=2 * d))
        n = tuple(int(x) for x in rng.integers(1, (24, 9, 5)[d - 1], size=d))
        transpose = bool(rng.random() < 0.3)
        op = tuple(int(rng.integers(0, si)) for si in s) if transpose else None
        try:
            geo = _geometry(np.ones((2, 1, *k)), n, s, pads, dil, 2, transpose, op)
        except ValueError:  # empty output
            continue
        extra = int(rng.integers(0, 3))
        ev, N = _alias_classes(geo, extra)
        want, want_n = _alias_classes_brute(geo, extra)
        assert N == want_n and ev.shape == (len(want), math.prod(s), d) and ev.tolist() == want, (geo, extra)
        checked += 1


def test_conv_transpose_is_the_adjoint():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # ConvTranspose: 4 -> 3 * group channels
    n, s, pads, dil, op = (4, 5), (2, 2), (1, 0, 1, 1), (1, 2), (1, 0)
    ct = explicit_matrix(w, n, s, pads, dil, 1, True, op)
    big = tuple(s[i] * (n[i] - 1) + op[i] + 2 * dil[i] + 1 - pads[i] - pads[2 + i] for i in range(2))
    conv = explicit_matrix(w, big, s, pads, dil, 1)
    np.testing.assert_array_equal(ct, conv.T)
    assert conv_norm_certified(w, n, s, pads, dil, 1, True, op) == conv_norm_certified(w, big, s, pads, dil, 1)


def test_extra_canvases_only_lower_the_bound():
    rng = np.random.default_rng(12)
    layer = _layer(rng, 3, 2, (3, 3), (6, 7), strides=(1, 2), pads=(1, 1, 1, 1))
    args = (layer.weight, layer.spatial, layer.strides, layer.pads)
    ex = _exact(layer)
    one = conv_norm_certified(*args)
    three = conv_norm_certified(*args, extra_canvases=2)
    assert ex <= three <= one


def test_scaling_is_exact_and_no_overflow():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((3, 2, 3, 3))
    base = conv_norm_certified(w, (6, 6), pads=(1, 1, 1, 1))
    for e in (-600, -30, 40, 900):
        assert conv_norm_certified(np.ldexp(w, e), (6, 6), pads=(1, 1, 1, 1)) == math.ldexp(base, e)
    m = rng.standard_normal((7, 5))
    assert dense_norm(m * 2.0**1000) == math.ldexp(dense_norm(m), 1000)
    assert conv_norm_certified(np.zeros((2, 2, 3, 3)), (5, 5)) == 0.0
    assert dense_norm(np.zeros((3, 4))) == 0.0


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (20, 30), (64, 16), (300, 200)])
def test_dense_norm_certified(shape):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32)
    ex = dense_norm_svd(w)
    assert ex == pytest.approx(float(np.linalg.svd(w.astype(np.float64), compute_uv=False)[0]), rel=1e-14)
    cert = dense_norm(w)
    assert ex <= cert <= ex * (1 + 1e-9)
    cheap = dense_norm(w, method="cheap")
    assert cheap >= cert * (1 - 1e-9)
    assert dense_norm(w.T) == pytest.approx(cert, rel=1e-9)
    est = dense_norm_estimate_power(w, max_iters=5000, tol=1e-13)
    assert est.sigma == pytest.approx(ex, rel=1e-6)
    assert est.sigma <= ex * (1 + 1e-12)


def test_dense_norm_special_matrices():
    rng = np.random.default_rng(17)
    q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    assert 1.0 <= dense_norm(q) <= 1.0 + 1e-9  # every singular value is 1: the hardest case for the Cholesky test
    u, v = rng.standard_normal(40), rng.standard_normal(25)
    r1 = np.outer(u, v)
    ex = float(np.linalg.norm(u) * np.linalg.norm(v))
    assert ex * (1 - 1e-14) <= dense_norm(r1) <= ex * (1 + 1e-9)
    d = np.diag(np.linspace(1, 3, 50))
    assert 3.0 <= dense_norm(d) <= 3.0 * (1 + 1e-9)


def test_diag_norm():
    assert diag_norm(np.array([0.5, -3.0, 2.0])) == 3.0
    assert diag_norm(np.float32(-2.5)) == 2.5
    assert diag_norm(np.zeros((0,))) == 0.0
    with pytest.raises(ValueError):
        diag_norm([1.0, np.nan])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight=np.ones((2, 2, 3, 3)), spatial=(2, 2)),  # empty output
        dict(weight=np.ones((3, 2, 3, 3)), spatial=(5, 5), group=2),  # group does not divide C_out
        dict(weight=np.ones((2, 2, 3, 3)), spatial=(5,)),  # wrong rank
        dict(weight=np.ones((2, 2, 3, 3)), spatial=(5, 5), pads=(1, 1)),  # pads need 2 * d entries
        dict(weight=np.ones((2, 2, 3, 3)), spatial=(5, 5), strides=(0, 1)),
        dict(weight=np.ones((2, 2)), spatial=(5, 5)),
        dict(weight=np.full((2, 2, 3, 3), np.inf), spatial=(5, 5)),
    ],
)
def test_bad_geometry_raises(kwargs):
    with pytest.raises(ValueError):
        conv_norm_certified(**kwargs)


@pytest.mark.parametrize("n", [1, 3, 24, 25])
@pytest.mark.parametrize("real", [True, False])
def test_gram_stack_equals_the_per_matrix_products(n, real):
    """_gram_stack forms small Grams by stacked matmul, larger ones one BLAS call each: both equal B B^H."""
    from onnxlip.opnorm.certify import _gram_stack

    rng = np.random.default_rng(n)
    x = rng.standard_normal((7, n, 5))
    y = None if real else rng.standard_normal((7, n, 5))
    b = x if real else x + 1j * y
    expected = b @ b.conj().transpose(0, 2, 1)
    assert np.allclose(_gram_stack(x, y), expected, rtol=1e-13, atol=1e-13)
