"""l2 operator norms (largest singular values) of the linear operators of ReLU networks, for AutoLip.

Two kinds of numbers, never to be confused:

* ESTIMATES (``*_estimate_power``): power iteration on A^T A. Each iterate gives ||A x|| / ||x|| <= sigma_max(A)
  (up to float32 rounding of the operator), so estimates approach sigma_max from BELOW. An estimate is not a
  certificate: a slow convergence or an unlucky start vector leaves it short of sigma_max.
* CERTIFIED values (``dense_norm``, ``conv_norm_certified``, ``diag_norm``): mathematically valid upper bounds on
  sigma_max, with an a-posteriori verification that covers the float64 rounding of the computation itself.

Certification method (the same for dense and conv). An upper bound t on lambda_max(G) for a Hermitian PSD Gram
matrix G = B B^H is verified by a floating-point Cholesky factorisation of t*I - G: if LAPACK completes it, then
R^H R = (t*I - G) + E with |E| <= g |R^H| |R| (Demmel 1989; Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., Thm 10.3, valid for any order of the inner products, hence for blocked LAPACK), which gives
||E||_2 <= g/(1-g) * trace(t*I - G), so lambda_max(G) <= t + g/(1-g) * n * t. The rounding of the Gram product
itself, |fl(B B^H) - B B^H| <= g' |B| |B|^H, is covered by g' * ||B||_F^2 (Cauchy-Schwarz), and the rounding of
t*I - G by u*t. The candidate t is the float64 eigenvalue (numpy.linalg.eigvalsh, of the matrices a batched
Lanczos ranks highest) times (1 + tau) with a tiny tau; a failed Cholesky raises t and tries again. Eigenvalue
solvers only propose t: nothing they return is trusted. All constants g are the textbook gamma_k = k*u/(1 - k*u),
u = 2**-53, with k doubled and then the whole term doubled for complex arithmetic (Higham section 3.6), so the
margins are generous: they are ~1e-10 relative for 512 channels, invisible next to the bound's own looseness.
Assumptions (standard for such a-posteriori proofs): IEEE double arithmetic with round-to-nearest in numpy/BLAS/
LAPACK (no Strassen-like products; OpenBLAS uses none), libm cos/sin within 1 ulp, no overflow (weights are
scaled by a power of two first, which is exact) and underflow only where it cannot matter (an absolute 1e-280
term covers it).

Conv certificate (Sedghi, Gupta, Long 2019, theory.md section 5): a zero-padded conv on an input of spatial size
n with pads (b, e) equals P o C o E, with E the isometric placement of the input at offset b in a zero canvas of
size N >= n + b + e, C the circular conv on that canvas and P the selection of the strided output positions, so
||conv|| <= ||S o C|| where S keeps every s-th canvas position (N is taken a multiple of the stride s). In the
unitary DFT basis the strided circular conv decouples into (N/s)^d blocks: for each output frequency g the
C_out x (s^d C_in) matrix B(g) = s^{-d/2} [M(f_1) ... M(f_{s^d})] over the s^d frequencies f = g + a N/s that alias
to g, with M(f) = sum_k W[:, :, k] exp(2 pi i <k*dil, f/N>) the C_out x C_in kernel DFT. So
||conv|| <= max_g sigma_max(B(g)) exactly for the circular operator (for stride 1 this is the classical
max_f sigma_max(M(f))), which is at least as tight as ignoring the stride. Groups give a block-diagonal operator:
the max over groups. The kernel DFT is computed directly (a small matrix product, not an FFT), so its rounding
has a simple bound, added at the end. Frequencies f and -f give conjugate matrices and are computed once, and
alias classes giving identical matrix sets (e.g. every frequency of a 1x1 kernel) are computed once.

Conventions (ONNX, batch 1): dense y = x @ W with W of shape (K, N) (or y = W @ x: same norm). Conv weight
(C_out, C_in/group, k_1..k_d), d = 1, 2 or 3; pads as ONNX [begin_1..begin_d, end_1..end_d] (resolve auto_pad
to explicit pads first); ConvTranspose weight (C_in, C_out/group, k...) with the same attributes plus
output_padding: it is the adjoint of the Conv with the same weight on an input of the ConvTranspose's output size
L_i = s_i (n_i - 1) + output_padding_i + (k_i - 1) dil_i + 1 - pad_begin_i - pad_end_i, so it has the same norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "ConvLayer",
    "PowerEstimate",
    "conv_norm_certified",
    "conv_norm_estimate_power",
    "conv_norms_certified",
    "conv_norms_estimate_power",
    "conv_output_shape",
    "dense_norm",
    "dense_norm_estimate_power",
    "dense_norm_svd",
    "diag_norm",
    "explicit_matrix",
]

U = 2.0**-53  # unit roundoff of float64
_TINY = 1e-280  # absolute term covering underflow (values are scaled to O(1) before any product)
_SAFE = 1.0 + 2.0**-40  # covers the handful of roundings in evaluating the margins themselves


def _gamma(k: float) -> float:
    ku = k * U
    if ku >= 0.5:
        raise ValueError("problem too large for the rounding analysis")
    return ku / (1.0 - ku)


def _gamma_c(k: float) -> float:
    """A generous complex-arithmetic gamma: real gamma_{2k+8}, doubled (Higham section 3.6 has sqrt(2)*gamma_{k+2})."""
    return 2.0 * _gamma(2 * k + 8)


# --------------------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvLayer:
    """One Conv (transpose=False) or ConvTranspose (transpose=True) node with its input spatial size.

    weight: ONNX weight, (C_out, C_in/group, k...) for Conv, (C_in, C_out/group, k...) for ConvTranspose.
    spatial: the node's input spatial size (n_1..n_d). strides/dilations default to 1, pads to 0, output_padding
    (ConvTranspose only) to 0; pads are ONNX [begin_1..begin_d, end_1..end_d].
    """

    weight: np.ndarray
    spatial: Sequence[int]
    strides: Sequence[int] | None = None
    pads: Sequence[int] | None = None
    dilations: Sequence[int] | None = None
    group: int = 1
    transpose: bool = False
    output_padding: Sequence[int] | None = None


class _Geo(NamedTuple):
    """Normalised conv view: the Conv operator whose norm is wanted (for a ConvTranspose: its adjoint Conv)."""

    w: np.ndarray  # (C_out, C_in/group, k...), the node's weight array as given
    n: tuple[int, ...]  # the Conv's input spatial size (for a ConvTranspose: the ConvTranspose's output size)
    out: tuple[int, ...]  # the Conv's output spatial size (for a ConvTranspose: its input size)
    k: tuple[int, ...]
    s: tuple[int, ...]
    pb: tuple[int, ...]
    pe: tuple[int, ...]
    dil: tuple[int, ...]
    group: int
    transpose: bool
    op: tuple[int, ...]  # output_padding of the ConvTranspose (zeros for a Conv)


def _ints(v, d: int, default: int, name: str) -> tuple[int, ...]:
    if v is None:
        return (default,) * d
    t = tuple(int(x) for x in v)
    if len(t) != d:
        raise ValueError(f"{name} has {len(t)} entries, expected {d}")
    return t


def conv_output_shape(spatial, kernel, strides, pads, dilations) -> tuple[int, ...]:
    """ONNX Conv output spatial size: floor((n + pad_begin + pad_end - ((k - 1) * dil + 1)) / s) + 1."""
    d = len(spatial)
    return tuple(
        (spatial[i] + pads[i] + pads[d + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(d)
    )


def _geometry(weight, spatial, strides, pads, dilations, group, transpose, output_padding) -> _Geo:
    w = np.asarray(weight)
    if w.ndim < 3 or w.ndim > 5:
        raise ValueError(f"conv weight must have 3 to 5 dimensions, got shape {w.shape}")
    d = w.ndim - 2
    n_node = _ints(spatial, d, 0, "spatial")
    k = tuple(int(x) for x in w.shape[2:])
    s = _ints(strides, d, 1, "strides")
    dil = _ints(dilations, d, 1, "dilations")
    p = _ints(pads, 2 * d, 0, "pads")
    op = _ints(output_padding, d, 0, "output_padding") if transpose else (0,) * d
    group = int(group)
    if min(n_node) < 1 or min(k) < 1 or min(s) < 1 or min(dil) < 1 or min(p) < 0 or min(op) < 0:
        raise ValueError("spatial sizes, kernel, strides and dilations must be >= 1, pads and output_padding >= 0")
    if group < 1 or w.shape[0] % group:
        raise ValueError(f"group {group} does not divide the weight's first dimension {w.shape[0]}")
    pb, pe = p[:d], p[d:]
    if transpose:
        n = tuple(s[i] * (n_node[i] - 1) + op[i] + (k[i] - 1) * dil[i] + 1 - pb[i] - pe[i] for i in range(d))
        if min(n) < 1:
            raise ValueError(f"ConvTranspose output size {n} is empty")
        out = conv_output_shape(n, k, s, p, dil)
    else:
        n = n_node
        out = conv_output_shape(n, k, s, p, dil)
        if min(out) < 1:
            raise ValueError(f"Conv output size {out} is empty (input {n}, kernel {k}, pads {p}, dilations {dil})")
    return _Geo(w, n, out, k, s, pb, pe, dil, group, bool(transpose), op)


# --------------------------------------------------------------------------------------------------------------
# certified lambda_max of a batch of Hermitian PSD Gram matrices
# --------------------------------------------------------------------------------------------------------------


def _cholesky_ok(a: np.ndarray) -> bool:
    """Whether LAPACK completes the Cholesky factorisation of the Hermitian matrix a (all pivots > 0)."""
    try:
        np.linalg.cholesky(a)
        return True
    except np.linalg.LinAlgError:
        return False


def _shift_cholesky_ok(g: np.ndarray, t: float) -> np.ndarray:
    """For each matrix of the stack g (b, n, n): does the Cholesky factorisation of fl(t*I - g[i]) complete?"""
    b, n, _ = g.shape
    idx = np.arange(n)
    if n <= 32:  # many tiny matrices: one batched call, and a loop only if some fail
        a = -g
        a[:, idx, idx] += t
        try:
            np.linalg.cholesky(a)
            return np.ones(b, dtype=bool)
        except np.linalg.LinAlgError:
            return np.array([_cholesky_ok(a[i]) for i in range(b)])
    ok = np.empty(b, dtype=bool)
    for i in range(b):
        a = -g[i]
        a[idx, idx] += t
        ok[i] = _cholesky_ok(a)
    return ok


def _lanczos_top(g: np.ndarray, steps: int, seed: int = 12345) -> np.ndarray:
    """Batched Lanczos (full reorthogonalisation) estimates of lambda_max of a stack of Hermitian PSD matrices:
    Ritz values, <= lambda_max up to rounding. Only used to choose which matrices get an exact eigvalsh."""
    b, n, _ = g.shape
    steps = max(1, min(steps, n))
    rng = np.random.default_rng(seed)
    basis = np.zeros((b, n, steps), dtype=g.dtype)
    v = rng.standard_normal((b, n)).astype(g.dtype)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    tri = np.zeros((b, steps, steps))
    scale = np.max(np.abs(g), axis=(1, 2)) + 1e-300
    for j in range(steps):
        basis[:, :, j] = v
        # numpy's own loops (einsum), not thousands of tiny multithreaded BLAS calls
        w = np.einsum("bij,bj->bi", g, v)
        vb = basis[:, :, : j + 1]
        h = np.zeros((b, j + 1), dtype=g.dtype)
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            hh = np.einsum("bij,bi->bj", np.conj(vb), w)
            w = w - np.einsum("bij,bj->bi", vb, hh)
            h = h + hh
        tri[:, j, j] = np.real(h[:, j])
        if j + 1 < steps:
            beta = np.linalg.norm(w, axis=1)
            live = beta > 1e-10 * scale
            tri[:, j, j + 1] = tri[:, j + 1, j] = np.where(live, beta, 0.0)
            v = np.where(live[:, None], w / np.where(live, beta, 1.0)[:, None], 0.0)
    return np.linalg.eigvalsh(tri)[:, -1]


def _certified_lambda_max(g: np.ndarray, fro2_max: float, inner: int, t_floor: float = 0.0) -> tuple[float, float]:
    """A verified upper bound on max_i lambda_max(B_i B_i^H) for the exact products of the float64 matrices B_i
    whose computed Gram matrices are g[i] = fl(B_i B_i^H) (b, n, n), given max_i ||B_i||_F^2 <= fro2_max and the
    inner dimension of the products. Returns (bound, t): t is the shift at which every t*I - g[i] passed the
    Cholesky test (pass it as t_floor for the next batch of the same operator: a bigger t only makes the test
    easier, and the matrices whose eigenvalues stay below it need no eigvalsh)."""
    b, n, _ = g.shape
    tau = max(2.0**-40, 16 * n * U)
    if n <= 32 or (b == 1 and t_floor <= 0.0):
        est = np.linalg.eigvalsh(g)[:, -1]
    else:  # Lanczos ranks the matrices; the top ones above the current floor get an exact eigvalsh
        est = _lanczos_top(g, 12)
        cand = np.argsort(-est)[:3]
        cand = cand[est[cand] * (1 + tau) > t_floor]
        if cand.size:
            est[cand] = np.linalg.eigvalsh(g[cand])[:, -1]
    t = max(t_floor, float(est.max()) * (1 + tau), 1e-300)
    pending = np.arange(b)
    for _ in range(40):
        ok = _shift_cholesky_ok(g[pending], t)
        pending = pending[~ok]
        if pending.size == 0:
            break
        lam = float(np.linalg.eigvalsh(g[pending])[:, -1].max())
        if lam * (1 + tau) > t:  # a matrix Lanczos under-ranked: lift t to its eigenvalue
            t = lam * (1 + tau)
        else:  # a rounding failure next to a tight eigenvalue: widen the gap
            tau *= 64.0
            t *= 1 + tau
    else:
        raise RuntimeError("could not certify lambda_max: the Cholesky factorisation keeps failing")
    gc = _gamma_c(n + 1)
    chol = gc / (1.0 - gc) * n * t * (1 + U)  # ||E|| <= g/(1-g) trace(t I - G), trace <= n t (Gram diag >= 0)
    shift = U * t  # rounding of t - g_ii (0 <= g_ii < t)
    gram = _gamma_c(inner) * fro2_max * (1 + _gamma(inner * n + 2))  # ||fl(BB^H) - BB^H|| <= g ||B||_F^2
    bound = (t + chol + shift + gram + _TINY) * _SAFE
    return bound, t


def _gram_stack(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """G_i = B_i B_i^H for B = x + i y (b, n, L) (y None: real), one BLAS call per matrix (faster than numpy's
    stacked matmul here), complex products done in real arithmetic: Re G = [x y][x y]^T, Im G = y x^T - x y^T."""
    b, n, _ = x.shape
    if y is None:
        g = np.empty((b, n, n))
        for i in range(b):
            np.matmul(x[i], x[i].T, out=g[i])
        return g
    g = np.empty((b, n, n), dtype=np.complex128)
    for i in range(b):
        z = np.concatenate([x[i], y[i]], axis=1)
        g[i].real = z @ z.T
        p = y[i] @ x[i].T
        g[i].imag = p - p.T
    return g


# --------------------------------------------------------------------------------------------------------------
# dense and diagonal
# --------------------------------------------------------------------------------------------------------------


def diag_norm(scale) -> float:
    """Exact l2 norm of an elementwise scaling y = s * x (any broadcasting): max |s| (no rounding involved)."""
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0:
        return 0.0
    if not np.all(np.isfinite(s)):
        raise ValueError("scale has non-finite entries")
    return float(np.max(np.abs(s)))


def dense_norm_svd(w) -> float:
    """Largest singular value of the matrix w by numpy's float64 SVD (accurate, but not certified)."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {w.shape}")
    if w.size == 0:
        return 0.0
    return float(np.linalg.svd(w, compute_uv=False)[0])


def _scale_pow2(w: np.ndarray) -> tuple[np.ndarray, int]:
    """w * 2**-e with max |w * 2**-e| in [0.5, 1) (exact), and e."""
    m = float(np.max(np.abs(w)))
    e = math.frexp(m)[1]
    return np.ldexp(w, -e), e


def dense_norm(w, method: str = "auto", max_gram: int = 8192) -> float:
    """Certified upper bound on ||w||_2 = sigma_max(w) of a matrix (K, N), float64 internally.

    method "gram": verified lambda_max of the smaller Gram matrix (w^T w or w w^T) by a Cholesky factorisation
    (module docstring): the result is sigma_max to ~1e-11 relative, and never below it. Cost: K*N*min(K, N) for the
    Gram product plus min(K, N)^3 for the eigenvalue estimate and the factorisation (a 4096 x 4096 matrix: seconds).
    method "cheap": min(||w||_F, sqrt(||w||_1 ||w||_inf)) with a rounding margin, O(K*N) but loose (up to
    sqrt(min(K, N)) times sigma_max). "auto": "gram" when min(K, N) <= max_gram, else "cheap".
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {w.shape}")
    if w.size == 0 or not np.any(w):
        return 0.0
    if not np.all(np.isfinite(w)):
        raise ValueError("matrix has non-finite entries")
    if method == "auto":
        method = "gram" if min(w.shape) <= max_gram else "cheap"
    ws, e = _scale_pow2(w)
    k, n = ws.shape
    if method == "cheap":
        a = np.abs(ws)
        fro = math.sqrt(float(np.sum(ws * ws)) * (1 + _gamma(k * n + 1)))
        n1 = float(a.sum(axis=0).max()) * (1 + _gamma(k))
        ninf = float(a.sum(axis=1).max()) * (1 + _gamma(n))
        b = min(fro, math.sqrt(n1 * ninf)) * _SAFE * _SAFE
        return math.ldexp(b, e)
    if method != "gram":
        raise ValueError(f"unknown method {method!r}")
    b = ws if k <= n else ws.T  # B with fewer rows: G = B B^T is min(K, N) square
    g = _gram_stack(b[None], None)
    fro2 = float(np.sum(b * b)) * (1 + _gamma(b.size + 1))
    bound, _ = _certified_lambda_max(g, fro2, b.shape[1])
    return math.ldexp(math.sqrt(bound) * _SAFE, e)


class PowerEstimate(NamedTuple):
    """A power-iteration estimate: sigma <= sigma_max up to rounding (NOT a certificate)."""

    sigma: float
    iterations: int
    converged: bool


def dense_norm_estimate_power(w, max_iters: int = 1000, tol: float = 1e-10, seed: int = 0) -> PowerEstimate:
    """Power iteration on w^T w in float64: sigma = ||w x|| / ||x|| for the last iterate x (a lower estimate).
    Stops when the relative change of sigma is <= tol."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {w.shape}")
    if w.size == 0:
        return PowerEstimate(0.0, 0, True)
    x = np.random.default_rng(seed).standard_normal(w.shape[1])
    x /= np.linalg.norm(x)
    sigma = 0.0
    for it in range(1, max_iters + 1):
        y = w @ x
        new = float(np.linalg.norm(y))
        z = w.T @ y
        nz = float(np.linalg.norm(z))
        if nz == 0.0:
            return PowerEstimate(new, it, True)
        x = z / nz
        if abs(new - sigma) <= tol * new:
            return PowerEstimate(new, it, True)
        sigma = new
    return PowerEstimate(sigma, max_iters, False)


# --------------------------------------------------------------------------------------------------------------
# conv: certified circular-embedding bound
# --------------------------------------------------------------------------------------------------------------


def _unit_roots(n: int) -> np.ndarray:
    """exp(2 pi i m / n), m = 0..n-1, from libm cos/sin of an angle with relative error <= 3u."""
    two_pi = 2.0 * math.pi
    return np.array([complex(math.cos(two_pi * m / n), math.sin(two_pi * m / n)) for m in range(n)])


def _alias_classes(geo: _Geo, extra: int = 0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Effective frequencies e = (dil * f) mod N of the distinct alias classes, shape (classes, S, d), and N.

    The strided canvas has q_i = N_i / s_i output frequencies g per dim; g collects the s^d input frequencies
    f = g + a q. The class matrix B(g) depends only on the multiset of e vectors (e_i forced to 0 for k_i = 1), and
    B(-g) is a conjugate of B(g) up to a column permutation: both are deduplicated."""
    d = len(geo.n)
    N = tuple(geo.s[i] * (-(-(geo.n[i] + geo.pb[i] + geo.pe[i]) // geo.s[i]) + extra) for i in range(d))
    q = tuple(N[i] // geo.s[i] for i in range(d))
    g = np.stack(np.meshgrid(*[np.arange(qi) for qi in q], indexing="ij"), -1).reshape(-1, d)
    a = np.stack(np.meshgrid(*[np.arange(si) for si in geo.s], indexing="ij"), -1).reshape(-1, d)
    f = g[:, None, :] + a[None, :, :] * np.array(q)  # (Q, S, d)
    Nv = np.array(N)
    e = (f * np.array(geo.dil)) % Nv
    e[..., np.array(geo.k) == 1] = 0
    radix = np.cumprod((1,) + N[:-1]).astype(np.int64)

    def signature(ev):
        return np.sort((ev * radix).sum(-1), axis=1)

    s1 = signature(e)
    s2 = signature((-e) % Nv)
    if s1.shape[1] == 1:
        canon = np.minimum(s1, s2)
    else:
        diff = s1 != s2
        first = diff.argmax(1)
        rows = np.arange(s1.shape[0])
        take = s1[rows, first] <= s2[rows, first]
        canon = np.where(take[:, None], s1, s2)
    uniq = np.unique(canon, axis=0)  # (classes, S)
    ev = (uniq[..., None] // radix) % Nv  # decode (classes, S, d)
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


# --------------------------------------------------------------------------------------------------------------
# conv: onnxruntime operators (power iteration, explicit matrix)
# --------------------------------------------------------------------------------------------------------------


def _attrs(geo: _Geo) -> dict:
    return {
        "strides": list(geo.s),
        "pads": list(geo.pb) + list(geo.pe),
        "dilations": list(geo.dil),
        "group": geo.group,
        "kernel_shape": list(geo.k),
    }


def _node_io(geo: _Geo) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """(node input spatial, node output spatial, node input channels, node output channels) of the ONNX node."""
    cout_conv, cin_conv = geo.w.shape[0], geo.w.shape[1] * geo.group
    if geo.transpose:
        return geo.out, geo.n, cout_conv, cin_conv
    return geo.n, geo.out, cin_conv, cout_conv


def _adjoint_output_padding(geo: _Geo) -> list[int]:
    """output_padding of the ConvTranspose that maps the Conv's output back to exactly its input size."""
    op = []
    for i in range(len(geo.n)):
        made = geo.s[i] * (geo.out[i] - 1) + (geo.k[i] - 1) * geo.dil[i] + 1 - geo.pb[i] - geo.pe[i]
        op.append(geo.n[i] - made)
    return op


def _add_pair(nodes, inits, inputs, outputs, geo: _Geo, tag: str, with_adjoint: bool) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = np.ascontiguousarray(geo.w, dtype=np.float32)
    inits.append(numpy_helper.from_array(w, f"W{tag}"))
    n_in, n_out, c_in, c_out = _node_io(geo)
    conv_op = _adjoint_output_padding(geo)
    if geo.transpose and any(o >= s for o, s in zip(geo.op, geo.s)):
        raise ValueError("output_padding >= stride is not supported by the onnxruntime operators")
    x, y, z = f"x{tag}", f"y{tag}", f"z{tag}"
    inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", c_in, *n_in]))
    outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["B", c_out, *n_out]))
    a = _attrs(geo)
    if geo.transpose:
        nodes.append(helper.make_node("ConvTranspose", [x, f"W{tag}"], [y], output_padding=list(geo.op), **a))
        if with_adjoint:
            nodes.append(helper.make_node("Conv", [y, f"W{tag}"], [z], **a))
    else:
        nodes.append(helper.make_node("Conv", [x, f"W{tag}"], [y], **a))
        if with_adjoint:
            nodes.append(helper.make_node("ConvTranspose", [y, f"W{tag}"], [z], output_padding=conv_op, **a))
    if with_adjoint:
        outputs.append(helper.make_tensor_value_info(z, TensorProto.FLOAT, ["B", c_in, *n_in]))


def _session(nodes, inputs, outputs, inits, threads: int = 0):
    import onnxruntime as ort
    from onnx import helper

    from . import runtime  # noqa: F401  (sets onnxlip's quiet global logger severity)

    graph = helper.make_graph(nodes, "opnorm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on a shared machine
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _as_geo(layer) -> _Geo:
    if isinstance(layer, _Geo):
        return layer
    return _geometry(
        layer.weight,
        layer.spatial,
        layer.strides,
        layer.pads,
        layer.dilations,
        layer.group,
        layer.transpose,
        layer.output_padding,
    )


def conv_norms_estimate_power(
    layers: Sequence[ConvLayer],
    max_iters: int = 100,
    tol: float | None = 1e-6,
    seed: int = 0,
    threads: int = 0,
) -> list[PowerEstimate]:
    """Power-iteration ESTIMATES (lower, not certified) of the norms of several Conv/ConvTranspose layers at once.

    One onnxruntime graph holds every layer side by side as the exact operator followed by its adjoint (Conv then
    the ConvTranspose with the same pads/strides/dilations/group and the output_padding that restores the input
    size, or ConvTranspose then Conv), in float32; each step is one session.run for all layers. For each layer the
    estimate is sigma = ||A x|| / ||x|| of the last iterate (the square root of the Rayleigh quotient of A^T A,
    <= sigma_max up to float32 rounding). A layer stops changing once its relative change is <= tol (tol=None:
    exactly max_iters steps); the run stops when all layers have converged or after max_iters steps.
    Start vectors: standard normal from numpy's default_rng(seed), one stream for all layers in order.
    """
    geos = [_as_geo(L) for L in layers]
    if not geos:
        return []
    nodes, inits, inputs, outputs = [], [], [], []
    for i, geo in enumerate(geos):
        _add_pair(nodes, inits, inputs, outputs, geo, str(i), with_adjoint=True)
    sess = _session(nodes, inputs, outputs, inits, threads)
    rng = np.random.default_rng(seed)
    xs = []
    for geo in geos:
        n_in, _, c_in, _ = _node_io(geo)
        x = rng.standard_normal((1, c_in, *n_in))
        xs.append((x / np.linalg.norm(x)).astype(np.float32))
    sigma = [0.0] * len(geos)
    done: list[PowerEstimate | None] = [None] * len(geos)
    names = [o.name for o in outputs]
    for it in range(1, max_iters + 1):
        res = dict(zip(names, sess.run(names, {f"x{i}": xs[i] for i in range(len(geos))})))
        for i in range(len(geos)):
            if done[i] is not None:
                continue
            x64 = xs[i].astype(np.float64)
            new = float(np.linalg.norm(res[f"y{i}"].astype(np.float64)) / np.linalg.norm(x64))
            z = res[f"z{i}"].astype(np.float64)
            nz = float(np.linalg.norm(z))
            if nz == 0.0 or not np.isfinite(nz):
                done[i] = PowerEstimate(new, it, True)
                continue
            xs[i] = (z / nz).astype(np.float32)
            if tol is not None and abs(new - sigma[i]) <= tol * new:
                done[i] = PowerEstimate(new, it, True)
            sigma[i] = new
        if all(r is not None for r in done):
            break
    return [r if r is not None else PowerEstimate(sigma[i], max_iters, False) for i, r in enumerate(done)]


def conv_norm_estimate_power(
    weight,
    spatial,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    transpose: bool = False,
    output_padding=None,
    *,
    max_iters: int = 100,
    tol: float | None = 1e-6,
    seed: int = 0,
) -> PowerEstimate:
    """Power-iteration ESTIMATE of one Conv/ConvTranspose norm (see conv_norms_estimate_power)."""
    layer = ConvLayer(weight, spatial, strides, pads, dilations, group, transpose, output_padding)
    return conv_norms_estimate_power([layer], max_iters=max_iters, tol=tol, seed=seed)[0]


def explicit_matrix(
    weight,
    spatial,
    strides=None,
    pads=None,
    dilations=None,
    group: int = 1,
    transpose: bool = False,
    output_padding=None,
) -> np.ndarray:
    """The dense matrix A (out_size, in_size) of a small Conv/ConvTranspose, vec(y) = A @ vec(x) (C-order over
    (C, spatial...)), by running the ONNX node in onnxruntime on all basis vectors at once (batch = in_size).
    Every entry is a single weight times 1, so for float32 weights the matrix is exact. For tests; in_size and
    out_size should stay in the thousands."""
    geo = _geometry(weight, spatial, strides, pads, dilations, group, transpose, output_padding)
    nodes, inits, inputs, outputs = [], [], [], []
    _add_pair(nodes, inits, inputs, outputs, geo, "0", with_adjoint=False)
    sess = _session(nodes, inputs, outputs, inits, threads=1)
    n_in, _, c_in, _ = _node_io(geo)
    size = c_in * int(np.prod(n_in))
    basis = np.eye(size, dtype=np.float32).reshape(size, c_in, *n_in)
    y = sess.run(["y0"], {"x0": basis})[0]
    return y.reshape(size, -1).T.astype(np.float64)
