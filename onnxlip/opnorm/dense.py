"""l2 norms of dense and diagonal operators: certified (dense_norm, diag_norm) and estimated."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .certify import _SAFE, _certified_lambda_max, _gamma, _gram_stack


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
