"""The certified circular-embedding bound on a convolution's l2 norm (method: opnorm/__init__.py)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .certify import _SAFE, _TINY, U, _certified_lambda_max, _gamma, _gram_stack
from .dense import _scale_pow2
from .geometry import ConvLayer, _Geo, _geometry


def _unit_roots(n: int) -> np.ndarray:
    """exp(2 pi i m / n), m = 0..n-1, from libm cos/sin of an angle with relative error <= 3u."""
    two_pi = 2.0 * math.pi
    return np.array([complex(math.cos(two_pi * m / n), math.sin(two_pi * m / n)) for m in range(n)])


def _alias_classes(geo: _Geo, extra: int = 0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Effective frequencies e = (dil * f) mod N of the distinct alias classes, shape (classes, S, d), and N.

    The strided canvas has q_i = N_i / s_i output frequencies g per dim; g collects the s^d input frequencies
    f = g + a q. The class matrix B(g) depends only on the multiset of e vectors (e_i forced to 0 for k_i = 1), and
    B(-g) is a conjugate of B(g) up to a column permutation: both are deduplicated. A class is its row of sorted
    codes sum_i e_i radix_i (mixed radix N), the smaller of the rows of e and -e; classes come in lexicographic
    order of those rows."""
    d = len(geo.n)
    N = tuple(geo.s[i] * (-(-(geo.n[i] + geo.pb[i] + geo.pe[i]) // geo.s[i]) + extra) for i in range(d))
    radix = np.cumprod((1,) + N[:-1]).astype(np.int64)
    S = int(np.prod(geo.s))
    # codes of e and of -e mod N, (Q, S): a sum over dims of (q_i, s_i) tables, broadcast to (q_1..q_d, s_1..s_d)
    code = np.zeros((1,) * (2 * d), dtype=np.int64)
    code_neg = code
    for i in range(d):
        q = N[i] // geo.s[i]
        f = np.arange(q)[:, None] + q * np.arange(geo.s[i])[None, :]
        e = (f * geo.dil[i]) % N[i] if geo.k[i] > 1 else np.zeros_like(f)
        shape = [1] * (2 * d)
        shape[i], shape[d + i] = q, geo.s[i]
        code = code + (e * radix[i]).reshape(shape)
        code_neg = code_neg + (((-e) % N[i]) * radix[i]).reshape(shape)
    s1 = code.reshape(-1, S)
    s2 = code_neg.reshape(-1, S)
    if S == 1:
        canon = np.minimum(s1[:, 0], s2[:, 0])
        seen = np.zeros(math.prod(N), dtype=bool)  # codes are < prod(N): a bitmap gives the sorted unique codes
        seen[canon] = True
        uniq = np.flatnonzero(seen).astype(np.int64)[:, None]
    else:
        s1 = np.sort(s1, axis=1)
        s2 = np.sort(s2, axis=1)
        diff = s1 != s2
        first = diff.argmax(1)
        rows = np.arange(s1.shape[0])
        take = s1[rows, first] <= s2[rows, first]
        canon = np.where(take[:, None], s1, s2)
        canon = canon[np.lexsort(canon.T[::-1])]  # rows in lexicographic order (the first column is the primary key)
        new = np.ones(canon.shape[0], dtype=bool)
        new[1:] = np.any(canon[1:] != canon[:-1], axis=1)
        uniq = canon[new]  # (classes, S)
    ev = (uniq[..., None] // radix) % np.array(N)  # decode (classes, S, d)
    return ev, N


def conv_norm_certified(
    weight,
    spatial,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    transpose: bool = False,
    output_padding=None,
    *,
    extra_canvases: int = 0,
    max_chunk_bytes: int = 256 << 20,
) -> float:
    """Certified upper bound on the l2 operator norm of an ONNX Conv (or ConvTranspose, transpose=True) with zero
    padding, on an input of spatial size `spatial` (the node's input; batch 1).

    The strided circular-embedding bound (module docstring) on the smallest canvas N_i = multiple of s_i >=
    n_i + pad_begin_i + pad_end_i, with rounding margins. Close to exact (a few %) for stride 1 when the pads are
    small next to n; equal to sigma_max of the C_out x C_in matrix for 1x1 kernels; loose when the output is
    tiny next to the kernel. extra_canvases=j also tries the canvases N + s, ..., N + j*s (each a valid bound)
    and returns the smallest: rarely more than a few % better, j+1 times the cost.
    Cost: C_out * C_in/group * prod(k) * #freq for the kernel DFT, plus per distinct frequency class (about
    prod(N_i / s_i) / 2 of them) a Gram product and a Cholesky factorisation of a min(C_out, s^d C_in)/group
    square matrix, plus a little Lanczos; memory is chunked to about max_chunk_bytes.
    """
    geo = _geometry(weight, spatial, strides, pads, dilations, group, transpose, output_padding)
    w = np.asarray(geo.w, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight has non-finite entries")
    if not np.any(w):
        return 0.0
    ws, expo = _scale_pow2(w)
    best = min(_circular_bound(geo, ws, extra, max_chunk_bytes) for extra in range(int(extra_canvases) + 1))
    return math.ldexp(best, expo)


def _circular_bound(geo: _Geo, ws: np.ndarray, extra: int, max_chunk_bytes: int) -> float:
    """Certified sigma_max of the strided circular conv (weights ws, float64) on the canvas enlarged by extra*s."""
    d = len(geo.n)
    grp = geo.group
    cout_g, cin_g = ws.shape[0] // grp, ws.shape[1]
    kk = int(np.prod(geo.k))
    S = int(np.prod(geo.s))
    wt = np.ascontiguousarray(ws.reshape(grp * cout_g * cin_g, kk).T)  # (K, C_out * C_in/g)
    ev, N = _alias_classes(geo, extra)
    roots = [_unit_roots(Ni) for Ni in N]
    kidx = np.stack(np.meshgrid(*[np.arange(ki) for ki in geo.k], indexing="ij"), -1).reshape(-1, d)  # (K, d)
    cols = cout_g <= S * cin_g  # Gram on the C_out side (B B^H) or on the S*C_in side (B^H B)
    n = cout_g if cols else S * cin_g
    inner = S * cin_g if cols else cout_g
    per_class = 40 * grp * cout_g * cin_g * S + 24 * grp * n * n + 48 * kk * S  # x, y, their copies, G
    chunk = max(1, int(max_chunk_bytes // per_class))
    t_cert = t_pass = 0.0
    for c0 in range(0, ev.shape[0], chunk):
        e = ev[c0 : c0 + chunk]  # (c, S, d)
        c = e.shape[0]
        # phases E[(class, a), k] = prod_i exp(2 pi i (k_i e_i mod N_i) / N_i)
        ph = np.ones((c * S, kk), dtype=np.complex128)
        for i in range(d):
            r = (e[..., i].reshape(-1, 1) * kidx[:, i].reshape(1, -1)) % N[i]
            ph *= roots[i][r]
        # kernel DFT M(f) = sum_k W_k E_k, real and imaginary parts, laid out (class, a, group, C_out/g, C_in/g)
        x = (np.ascontiguousarray(ph.real) @ wt).reshape(c, S, grp, cout_g, cin_g)
        y = (np.ascontiguousarray(ph.imag) @ wt).reshape(c, S, grp, cout_g, cin_g)
        del ph
        if cols:  # B = [M(f_1) ... M(f_S)]: (group, class, C_out/g, S * C_in/g)
            x = x.transpose(2, 0, 3, 1, 4).reshape(grp * c, cout_g, S * cin_g)
            y = y.transpose(2, 0, 3, 1, 4).reshape(grp * c, cout_g, S * cin_g)
        else:  # B^H = [M(f_1)^H; ...; M(f_S)^H]: (group, class, S * C_in/g, C_out/g)
            x = x.transpose(2, 0, 1, 4, 3).reshape(grp * c, S * cin_g, cout_g)
            y = -y.transpose(2, 0, 1, 4, 3).reshape(grp * c, S * cin_g, cout_g)
        x = np.ascontiguousarray(x)
        y = np.ascontiguousarray(y)
        fro2 = float(np.max(np.sum(x * x + y * y, axis=(1, 2)))) * (1 + _gamma(2 * x[0].size + 2))
        gmat = _gram_stack(x, y)
        del x, y
        bound, t_pass = _certified_lambda_max(gmat, fro2, inner, t_floor=t_pass)
        t_cert = max(t_cert, bound)
    sigma_b = math.sqrt(t_cert / S) * _SAFE  # sigma_max(B_hat) with the s^{-d/2} scaling
    # rounding of the kernel DFT: |M_hat - M| <= eta * sum_k |w_k| entrywise, so ||M_hat - M||_2 <= eta ||A||_F
    # with A = sum_k |w_k| (C_out x C_in/g), and the same for B (s^d blocks scaled by s^{-d/2}).
    # eta: angle error 3u * 2 pi, libm 1 ulp, d - 1 complex products, K-term real sums; then doubled.
    eta = 2.0 * (40.0 * d * U + 2.0 * _gamma(kk + 1))
    abs_sum = np.abs(ws).reshape(-1, kk).sum(axis=1)
    delta = eta * math.sqrt(float(np.sum(abs_sum * abs_sum))) * (1 + _gamma(kk + abs_sum.size + 2)) + _TINY
    return (sigma_b + delta) * _SAFE


def conv_norms_certified(layers: Sequence[ConvLayer], **kwargs) -> list[float]:
    """conv_norm_certified for each ConvLayer."""
    return [
        conv_norm_certified(
            L.weight, L.spatial, L.strides, L.pads, L.dilations, L.group, L.transpose, L.output_padding, **kwargs
        )
        for L in layers
    ]
