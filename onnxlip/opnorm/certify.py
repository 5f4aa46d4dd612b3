"""Certified lambda_max of stacks of Hermitian PSD Gram matrices (the method: opnorm/__init__.py), and the
rounding constants every certificate uses."""

from __future__ import annotations

import numpy as np

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


_STACKED_UP_TO = 24  # (measured: stacked matmul 100x faster at n = 1, 2.4x at 8, 1.5x at 16, 0.6x at 64)


def _gram_stack(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """G_i = B_i B_i^H for B = x + i y (b, n, L) (y None: real): small matrices by numpy's stacked matmul, larger
    ones by one BLAS call each (faster there), complex products done in real arithmetic: Re G = [x y][x y]^T,
    Im G = y x^T - x y^T. Every entry is an inner product whatever the order of its sum: the rounding bounds hold."""
    b, n, _ = x.shape
    if n <= _STACKED_UP_TO:  # small matrices: numpy's stacked matmul (a 1000x1000 single-channel conv: 6 s -> 0.1 s)
        xt = x.transpose(0, 2, 1)
        if y is None:
            return x @ xt
        g = np.empty((b, n, n), dtype=np.complex128)
        z = np.concatenate([x, y], axis=2)
        g.real = z @ z.transpose(0, 2, 1)
        p = y @ xt
        g.imag = p - p.transpose(0, 2, 1)
        return g
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
